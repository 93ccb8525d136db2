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
KV_CACHE_USAGE = Gauge("gpt2serve_kv_cache_usage_ratio",
                       "Share of the KV cache's blocks held by sequences, 0 to 1")
KV_CACHE_CAPACITY = Gauge("gpt2serve_kv_cache_capacity_tokens",
                          "Tokens the KV cache holds (blocks x block size)")
