"""Engine metrics, exported on the server's Prometheus `/metrics` next to KServe's own."""

from prometheus_client import Counter, Gauge, Histogram

QUEUE_DEPTH = Gauge("gpt2serve_queue_depth", "Requests waiting for a KV-cache slot")
RUNNING = Gauge("gpt2serve_running_sequences", "Sequences in the running batch")
REJECTED = Counter("gpt2serve_rejected_requests_total", "Requests refused because the queue was full")
ABORTED = Counter("gpt2serve_aborted_sequences_total",
                  "Sequences dropped, queued or running, because their client went away")
TOKENS_GENERATED = Counter("gpt2serve_generated_tokens_total", "Tokens generated")
BATCH_SIZE = Histogram("gpt2serve_batch_size", "Sequences per decode step",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
TIME_TO_FIRST_TOKEN = Histogram(
    "gpt2serve_time_to_first_token_seconds", "Arrival to first generated token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TIME_PER_TOKEN = Histogram(
    "gpt2serve_time_per_output_token_seconds",
    "Duration of one decode step (one token per sequence), prefills admitted during it included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
HEAD_SCREEN = Counter(
    "gpt2serve_head_screen_steps_total",
    "Greedy or top-k CPU decode steps whose LM head was screened in int8 (packing.HeadScreen), "
    "by outcome: 'decided' computed in fp32 only the logits that can be among each row's k "
    "largest, 'full' found too many candidates (or a hidden state not finite) and computed "
    "every logit",
    ["outcome"])
KV_CACHE_USAGE = Gauge("gpt2serve_kv_cache_usage_ratio",
                       "Share of the KV cache's blocks held by sequences, 0 to 1")
KV_CACHE_CAPACITY = Gauge("gpt2serve_kv_cache_capacity_tokens",
                          "Tokens the KV cache holds (blocks x block size)")

# Serving latencies, named and bucketed as vLLM's (vllm:e2e_request_latency_seconds, ...).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
PREFIX_CACHE_QUERIES = Counter("gpt2serve_prefix_cache_queries_total",
                               "Prompt tokens looked up in the prefix cache")
PREFIX_CACHE_HITS = Counter("gpt2serve_prefix_cache_hits_total",
                            "Prompt tokens found in the prefix cache (not read again)")
PROMPT_TOKENS = Counter("gpt2serve_prompt_tokens_total",
                        "Prompt tokens prefilled (once per request, whatever its n)")
REQUEST_QUEUE_TIME = Histogram(
    "gpt2serve_request_queue_time_seconds", "Arrival to admission into the running batch",
    buckets=LATENCY_BUCKETS)
E2E_REQUEST_LATENCY = Histogram(
    "gpt2serve_e2e_request_latency_seconds",
    "Arrival to the last token of a request's last sequence (requests that finished)",
    buckets=LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram(
    "gpt2serve_inter_token_latency_seconds",
    "Time between two consecutive tokens of one sequence",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
             0.75, 1, 2.5, 5))
