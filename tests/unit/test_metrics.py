"""The serving metrics recorder, outside Ray: the per-replica Prometheus exposition."""

from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import ServerMetrics


def samples(metrics: ServerMetrics) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counts_requests_errors_tokens_and_latency():
    m = ServerMetrics()
    m.request("completions")
    m.request("completions")
    m.error("completions", 400)
    m.generated(12)
    m.generated(0)
    m.latency("completions", 0.02)
    got = samples(m)
    assert got[("attnlm_requests_total", (("endpoint", "completions"),))] == 2
    assert got[("attnlm_errors_total", (("endpoint", "completions"), ("status", "400")))] == 1
    assert got[("attnlm_generated_tokens_total", ())] == 12
    assert got[("attnlm_request_seconds_count", (("endpoint", "completions"),))] == 1
