"""Prometheus metrics of one server (``GET /metrics``), in their own registry so that several apps in one
process (the tests) do not collide."""

from __future__ import annotations

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    def __init__(self):
        # deferred: heavy optional dependency
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
        self._render = generate_latest
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorakit_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("lorakit_generated_tokens", "Tokens generated", ["model"],
                                        registry=r)
        self.queue_depth = Gauge("lorakit_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("lorakit_batch_size", "Sequences in the last decoding step", registry=r)
        self.batch_sizes = Histogram("lorakit_step_batch_size", "Sequences per decoding step",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.step_seconds = Histogram("lorakit_step_seconds", "Time of one decoding step",
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                      registry=r)
        self.resident_adapters = Gauge("lorakit_resident_adapters", "Adapters loaded in memory",
                                       registry=r)
        self.adapter_loads = Counter("lorakit_adapter_loads", "Adapter loads, by result", ["result"],
                                     registry=r)
        self.adapter_evictions = Counter("lorakit_adapter_evictions", "Adapters evicted (LRU)",
                                         registry=r)
        self.adapter_load_seconds = Histogram("lorakit_adapter_load_seconds",
                                              "Time to load and check one adapter",
                                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                              registry=r)
        self.disconnects = Counter("lorakit_client_disconnects", "Streams the client left early",
                                   registry=r)

    def render(self) -> bytes:
        return self._render(self.registry)
