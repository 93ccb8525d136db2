"""Engine metrics, exported on the server's Prometheus `/metrics` next to KServe's own.

Every series carries a `model` label: a server may serve many models (server/repository.py),
and each model's engine reports through its own `ModelMetrics`."""

import contextlib

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

MODEL = ("model",)

QUEUE_DEPTH = Gauge("gpt2serve_queue_depth", "Requests waiting for a KV-cache slot", MODEL)
RUNNING = Gauge("gpt2serve_running_sequences",
                "Sequences in the running batch, or about to be: their prompt being read", MODEL)
REJECTED = Counter("gpt2serve_rejected_requests_total",
                   "Requests refused (503) because the queue was full, or that waited in it "
                   "past --request_timeout", MODEL)
ABORTED = Counter("gpt2serve_aborted_sequences_total",
                  "Sequences dropped, queued or running, because their client went away", MODEL)
TOKENS_GENERATED = Counter("gpt2serve_generated_tokens_total", "Tokens generated", MODEL)
BATCH_SIZE = Histogram("gpt2serve_batch_size", "Sequences per decode step", MODEL,
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
PROMPT_TOKENS_BESIDE_DECODE = Histogram(
    "gpt2serve_prompt_tokens_beside_decode",
    "Prompt tokens read in one decode step beside the running sequences (chunked prefill; "
    "the chunk budget bounds it, --max_prefill_tokens at most)", MODEL,
    buckets=(16, 32, 64, 128, 256, 512, 1024, 2048))
# (to --request_timeout's default and past: the wait in the queue is part of it)
TIME_TO_FIRST_TOKEN = Histogram(
    "gpt2serve_time_to_first_token_seconds", "Arrival to first generated token", MODEL,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
             1200))
TIME_PER_TOKEN = Histogram(
    "gpt2serve_time_per_output_token_seconds",
    "Duration of one decode step (one token per sequence), prefills admitted during it included",
    MODEL, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
HEAD_SCREEN = Counter(
    "gpt2serve_head_screen_steps_total",
    "Greedy or top-k CPU decode steps whose LM head was screened in int8 (packing.HeadScreen), "
    "by outcome: 'decided' computed in fp32 only the logits that can be among each row's k "
    "largest, 'full' found too many candidates (or a hidden state not finite) and computed "
    "every logit",
    ("model", "outcome"))
SCREEN_OUTCOMES = ("decided", "full")
KV_CACHE_USAGE = Gauge("gpt2serve_kv_cache_usage_ratio",
                       "Share of the KV cache's blocks held by sequences, 0 to 1", MODEL)
KV_CACHE_CAPACITY = Gauge("gpt2serve_kv_cache_capacity_tokens",
                          "Tokens the KV cache holds (blocks x block size)", MODEL)

# Serving latencies, named as vLLM's (vllm:e2e_request_latency_seconds, ...).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
PREFIX_CACHE_QUERIES = Counter("gpt2serve_prefix_cache_queries_total",
                               "Prompt tokens looked up in the prefix cache", MODEL)
PREFIX_CACHE_HITS = Counter("gpt2serve_prefix_cache_hits_total",
                            "Prompt tokens found in the prefix cache (not read again)", MODEL)
PROMPT_TOKENS = Counter("gpt2serve_prompt_tokens_total",
                        "Prompt tokens of the requests admitted (once per request, whatever "
                        "its n), those found in the prefix cache included", MODEL)
REQUEST_QUEUE_TIME = Histogram(
    "gpt2serve_request_queue_time_seconds", "Arrival to admission into the running batch",
    MODEL, buckets=LATENCY_BUCKETS)
E2E_REQUEST_LATENCY = Histogram(
    "gpt2serve_e2e_request_latency_seconds",
    "Arrival to the last token of a request's last sequence (requests that finished)",
    MODEL, buckets=LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram(
    "gpt2serve_inter_token_latency_seconds",
    "Time between two consecutive tokens of one sequence", MODEL,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
             0.75, 1, 2.5, 5))

# Server-level: what the HTTP routes answered (server/middleware.CountAnswers). KServe's
# request_*_seconds histograms count V1 and V2 predictions only, refusals among them.
HTTP_ANSWERS = Counter("gpt2serve_http_requests_total",
                       "HTTP requests by route (its path template; 'none' for a request "
                       "answered before routing or matching no route) and status ('none': "
                       "the client left before an answer began)", ("route", "status"))

# Server-level: the memory budget that loaded models share (server/repository.py).
MODELS_LOADED = Gauge("gpt2serve_models_loaded", "Models loaded and serving")
MODEL_MEMORY = Gauge("gpt2serve_model_memory_bytes",
                     "Bytes a loaded model holds: weights and its KV cache", MODEL)


class _Budget:
    """gpt2serve_memory_budget_bytes, exported where there is a budget (a repository, or
    --memory_budget): a server of one model has none, and its 0 read as a budget of 0 (an
    alert on model_memory_bytes > memory_budget_bytes fired)."""

    def __init__(self):
        self.value: float | None = None

    def set(self, value: float) -> None:
        self.value = value

    def collect(self):
        if self.value is not None:
            yield GaugeMetricFamily("gpt2serve_memory_budget_bytes", "Bytes that loaded "
                                    "models' weights and KV caches may hold together",
                                    value=self.value)


MEMORY_BUDGET = _Budget()
REGISTRY.register(MEMORY_BUDGET)
LOAD_OUTCOMES, UNLOAD_REASONS = ("loaded", "failed"), ("memory", "request")
MODEL_LOADS = Counter("gpt2serve_model_loads_total", "Model loads, by outcome",
                      ("model", "outcome"))
MODEL_UNLOADS = Counter("gpt2serve_model_unloads_total",
                        "Model unloads, by reason: 'request' (the repository API) or 'memory' "
                        "(least recently used, to make room)", ("model", "reason"))
MODEL_LOAD_SECONDS = Histogram("gpt2serve_model_load_seconds",
                               "Reading a model and building its engine", MODEL,
                               buckets=(0.1, 0.25, 0.5, 1, 1.5, 2.5, 5, 10, 30, 60, 120))

_PER_MODEL = {"queue_depth": QUEUE_DEPTH, "running": RUNNING, "rejected": REJECTED,
              "aborted": ABORTED, "tokens_generated": TOKENS_GENERATED,
              "batch_size": BATCH_SIZE,
              "prompt_tokens_beside_decode": PROMPT_TOKENS_BESIDE_DECODE,
              "time_to_first_token": TIME_TO_FIRST_TOKEN,
              "time_per_token": TIME_PER_TOKEN, "kv_cache_usage": KV_CACHE_USAGE,
              "kv_cache_capacity": KV_CACHE_CAPACITY,
              "prefix_cache_queries": PREFIX_CACHE_QUERIES,
              "prefix_cache_hits": PREFIX_CACHE_HITS, "prompt_tokens": PROMPT_TOKENS,
              "request_queue_time": REQUEST_QUEUE_TIME,
              "e2e_request_latency": E2E_REQUEST_LATENCY,
              "inter_token_latency": INTER_TOKEN_LATENCY}
_GAUGES = (QUEUE_DEPTH, RUNNING, KV_CACHE_USAGE, KV_CACHE_CAPACITY, MODEL_MEMORY)


class ModelMetrics:
    """One model's series: each metric of _PER_MODEL under its key, its `model` label set."""

    def __init__(self, model: str = ""):
        self.model = model
        for key, metric in _PER_MODEL.items():
            setattr(self, key, metric.labels(model))
        self.head_screen = {outcome: HEAD_SCREEN.labels(model, outcome)
                            for outcome in SCREEN_OUTCOMES}

    def forget(self) -> None:
        """Drop the gauges of an unloaded model: a level it no longer has is not zero, it is
        absent (counters and histograms stay: Prometheus expects them to only grow)."""
        for gauge in _GAUGES:
            _remove(gauge, self.model)


def drop(model: str) -> None:
    """Remove every series of a model that is gone (its folder deleted): a repository whose
    models come and go (KServe's TrainedModels) exported the series of each one it had ever
    seen, for as long as it ran."""
    series = [(metric, (model,)) for metric in (*_PER_MODEL.values(), MODEL_MEMORY,
                                                 MODEL_LOAD_SECONDS)]
    series += [(HEAD_SCREEN, (model, outcome)) for outcome in SCREEN_OUTCOMES]
    series += [(MODEL_LOADS, (model, outcome)) for outcome in LOAD_OUTCOMES]
    series += [(MODEL_UNLOADS, (model, reason)) for reason in UNLOAD_REASONS]
    # and KServe's, by model_name (a server's: kserve is imported there, not by the engine)
    from kserve.metrics import EXPLAIN_HIST_TIME, POST_HIST_TIME, PRE_HIST_TIME, PREDICT_HIST_TIME

    series += [(h, (model,)) for h in (PRE_HIST_TIME, POST_HIST_TIME, PREDICT_HIST_TIME,
                                       EXPLAIN_HIST_TIME)]
    for metric, labels in series:
        _remove(metric, *labels)


def _remove(metric, *labels: str) -> None:
    """The series of `labels`, gone; one never set is gone already."""
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
