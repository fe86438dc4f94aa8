"""Request metrics of the serving app, recorded twice:

- in a per-replica prometheus_client registry, exposed by the app at `GET /metrics`;
- through `ray.serve.metrics`, so they are scraped from Ray's metrics endpoint alongside Ray
  Serve's own (`ray_serve_*`), summed over every replica of a cluster (names get Ray's `ray_`
  prefix there, e.g. `ray_attnlm_requests_total`).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "attnlm_requests", "HTTP requests", ["endpoint"], registry=self.registry
        )
        self._errors = Counter(
            "attnlm_errors",
            "requests answered with an error",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._tokens = Counter(
            "attnlm_generated_tokens", "completion tokens generated", registry=self.registry
        )
        self._latency = Histogram(
            "attnlm_request_seconds",
            "request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._ray = _ray_metrics()

    def request(self, endpoint: str) -> None:
        self._requests.labels(endpoint).inc()
        if self._ray:
            self._ray["requests"].inc(tags={"endpoint": endpoint})

    def error(self, endpoint: str, status: int) -> None:
        self._errors.labels(endpoint, str(status)).inc()
        if self._ray:
            self._ray["errors"].inc(tags={"endpoint": endpoint, "status": str(status)})

    def generated(self, tokens: int) -> None:
        if tokens > 0:
            self._tokens.inc(tokens)
            if self._ray:
                self._ray["tokens"].inc(tokens)

    def latency(self, endpoint: str, seconds: float) -> None:
        self._latency.labels(endpoint).observe(seconds)
        if self._ray:
            self._ray["latency"].observe(seconds, tags={"endpoint": endpoint})

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _ray_metrics() -> dict | None:
    """Ray-side metrics, or None outside a Ray worker (e.g. the engine used in-process)."""
    try:
        import ray
        from ray.serve import metrics

        if not ray.is_initialized():
            return None
        return {
            "requests": metrics.Counter("attnlm_requests", "HTTP requests", tag_keys=("endpoint",)),
            "errors": metrics.Counter(
                "attnlm_errors", "requests answered with an error", tag_keys=("endpoint", "status")
            ),
            "tokens": metrics.Counter("attnlm_generated_tokens", "completion tokens generated"),
            "latency": metrics.Histogram(
                "attnlm_request_seconds",
                "request latency",
                boundaries=list(LATENCY_BUCKETS),
                tag_keys=("endpoint",),
            ),
        }
    except Exception:  # metrics are best effort: never stop a replica from serving
        return None
