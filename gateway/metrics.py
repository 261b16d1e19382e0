"""Prometheus collectors, all named fmgate_*. Labels carry key ids or names, never secrets.

One process serves one engine set, so the default registry is the right one; several uvicorn
workers would each hold their own copy of the models, and the Helm chart scales by replicas instead.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

REQUESTS = Counter("fmgate_requests_total", "HTTP requests handled", ["route", "model", "status"])
REQUEST_SECONDS = Histogram(
    "fmgate_request_duration_seconds", "End-to-end request latency", ["route", "model"], buckets=_LATENCY
)
TTFT_SECONDS = Histogram(
    "fmgate_time_to_first_token_seconds", "Time from admission to the first generated token", ["model"],
    buckets=_LATENCY,
)
TPOT_SECONDS = Histogram(
    "fmgate_time_per_output_token_seconds", "Mean time per generated token after the first", ["model"],
    buckets=_TOKEN_LATENCY,
)
PROMPT_TOKENS = Counter("fmgate_prompt_tokens_total", "Prompt (input) tokens processed", ["model"])
COMPLETION_TOKENS = Counter("fmgate_completion_tokens_total", "Completion (output) tokens generated", ["model"])
QUEUE_DEPTH = Gauge("fmgate_queue_depth", "Requests waiting for a batch slot", ["model"])
RUNNING_SEQS = Gauge("fmgate_running_sequences", "Sequences in the running batch", ["model"])
PREEMPTIONS = Counter("fmgate_preemptions_total",
                      "Sequences paused to give their batch slot to an under-share key (fair policy)", ["model"])
BATCH_SIZE = Histogram(
    "fmgate_batch_size", "Sequences (or inputs) per engine step", ["model", "kind"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
ENGINE_UP = Gauge("fmgate_engine_up", "1 while a model's engine thread is serving, 0 once it stopped or died",
                  ["model"])
ENGINE_FAILURES = Counter("fmgate_engine_failures_total", "Engine threads that died", ["model"])
ENGINE_OVERLOADED = Counter(
    "fmgate_engine_overloaded_total", "Requests refused because a model's queue was full (429)", ["model"]
)
QUOTA_REJECTIONS = Counter("fmgate_quota_rejections_total", "Requests refused by quotas", ["reason"])
REDIS_ERRORS = Counter("fmgate_redis_errors_total", "Errors talking to the quota Redis", ["op"])
MODEL_LOAD_SECONDS = Gauge("fmgate_model_load_seconds", "Seconds the last load of a model took", ["model"])
MODEL_COMPRESS_SECONDS = Gauge(
    "fmgate_model_compress_seconds", "Seconds spent building and evaluating variants", ["model"]
)
MODEL_VARIANT = Info("fmgate_model_variant", "The variant each model serves", ["model"])
MODEL_STATE = Gauge("fmgate_model_state", "1 for each model's current state (unloaded, loading, ready, unloading, "
                    "failed); the error of a failed one is in GET /admin/models", ["model", "state"])
MODEL_MEMORY_BYTES = Gauge("fmgate_model_memory_bytes", "Resident memory a loaded model added (measured)", ["model"])
MODEL_LOAD_FAILURES = Counter("fmgate_model_load_failures_total", "Model loads that failed", ["model"])
MODEL_UNLOADS = Counter("fmgate_model_unloads_total", "Model unloads by reason (lru, keep_alive, admin)",
                        ["model", "reason"])
