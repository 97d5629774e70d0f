"""Prometheus metric definitions. One `Metrics` per server, on its own registry.

Label values come from configuration (model names, tasks, methods, status codes), never from
what a client sends: a request naming an unknown model is counted under `model="(unresolved)"`.
The registry also carries the standard `process_*` metrics (memory, CPU, open fds).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

# Fine between 1 and 10 s, where generation requests land.
_LATENCY = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75,
    1, 1.5, 2, 2.5, 3, 4, 5, 6, 7.5, 10, 15, 20, 30, 60,
)  # fmt: skip
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter(
            "bitserve_requests",
            "RPCs answered, by final status code.",
            ["model", "task", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "bitserve_request_duration_seconds",
            "RPC wall time, by final status code.",
            ["model", "task", "method", "code"],
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_wait = Histogram(
            "bitserve_queue_wait_seconds",
            "Time a text waited before its batch ran.",
            ["model", "task"],
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "bitserve_batch_size",
            "Texts per forward pass (encoders) or sequences per decode step.",
            ["model", "task"],
            buckets=_BATCH,
            registry=r,
        )
        self.queue_depth = Gauge(
            "bitserve_queue_depth", "Texts waiting for a batch slot.", ["model", "task"], registry=r
        )
        self.generated_tokens = Counter(
            "bitserve_generated_tokens", "Tokens generated.", ["model", "task"], registry=r
        )
        self.prompt_tokens = Counter(
            "bitserve_prompt_tokens", "Prompt tokens processed.", ["model", "task"], registry=r
        )
        # Per LoRA adapter: the label takes only names the engine accepted (configured or loaded
        # ones; an unknown adapter is NOT_FOUND before any token), so it stays bounded.
        self.adapter_generated_tokens = Counter(
            "bitserve_adapter_generated_tokens",
            "Tokens generated with a LoRA adapter.",
            ["model", "adapter"],
            registry=r,
        )
        self.adapter_sequences = Counter(
            "bitserve_adapter_sequences",
            "Sequences finished with a LoRA adapter.",
            ["model", "adapter"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "bitserve_time_to_first_token_seconds",
            "Arrival to first generated token.",
            ["model", "task"],
            buckets=_LATENCY,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "bitserve_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence.",
            ["model", "task"],
            buckets=_LATENCY,
            registry=r,
        )
        self.running_sequences = Gauge(
            "bitserve_running_sequences",
            "Sequences in the running generation batch.",
            ["model", "task"],
            registry=r,
        )
        self.kv_cache_tokens = Gauge(
            "bitserve_kv_cache_tokens",
            "KV-cache tokens of the engine's persistent batch: reserved (allocated slots x "
            "columns, bounded by kv_cache_tokens) and used (columns its rows fill).",
            ["model", "task", "state"],
            registry=r,
        )
        # Per tenant (frontend/tenants.py): label values are configured tenant names, or
        # "(none)" for a token that names no tenant; created at start, never from a request.
        self.tenant_requests = Counter(
            "bitserve_tenant_requests",
            "Inference RPCs answered per tenant, by final status code.",
            ["tenant", "code"],
            registry=r,
        )
        self.tenant_prompt_tokens = Counter(
            "bitserve_tenant_prompt_tokens", "Prompt tokens admitted per tenant.", ["tenant"], registry=r
        )
        self.tenant_generated_tokens = Counter(
            "bitserve_tenant_generated_tokens", "Tokens generated per tenant.", ["tenant"], registry=r
        )
        self.tenant_queue_wait = Histogram(
            "bitserve_tenant_queue_wait_seconds",
            "Per tenant, a sequence's time from admission in the front to its first token "
            "(queue wait plus prefill).",
            ["tenant"],
            buckets=_LATENCY,
            registry=r,
        )
        self.tenant_limited = Counter(
            "bitserve_tenant_limited",
            "Requests refused with RESOURCE_EXHAUSTED per tenant, by the limit they hit.",
            ["tenant", "limit"],
            registry=r,
        )
        self.tenant_limit_usage = Gauge(
            "bitserve_tenant_limit_usage_ratio",
            "Per tenant and configured limit, the part of it in use now (1 = at the limit).",
            ["tenant", "limit"],
            registry=r,
        )
        self.model_memory = Gauge(
            "bitserve_model_weight_memory_bytes",
            "Weight memory of a loaded model.",
            ["model", "task", "quantization"],
            registry=r,
        )
        self.model_loaded = Gauge(
            "bitserve_model_loaded",
            "1 when the model is loaded and serving.",
            ["model", "task"],
            registry=r,
        )
