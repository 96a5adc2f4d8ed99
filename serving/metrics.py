"""Gateway metrics vLLM itself lacks: per task and adapter version. The registry is passed in (never global).

Counters that other components own (capture outcomes, engine restarts, PII redactions) are read at scrape time by
a collector, so there is one source of truth for each number.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


ADAPTER_LABEL = "adapter"


class GatewayMetrics:
    """The gateway's own series. Those labelled by adapter (`task@N`, or `base`) are dropped once the adapter is
    neither routed nor loaded in the engine (`retire`), so their number follows what is served now (tasks x
    loaded versions), not every version a long-lived gateway has ever answered with."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["task", ADAPTER_LABEL, "route"]
        self.requests = Counter("tuneloop_gateway_requests", "Requests answered, by status code.",
                                [*labels, "status"], registry=registry)
        self.errors = Counter("tuneloop_gateway_request_errors", "Requests that failed (status >= 400).",
                              [*labels, "status"], registry=registry)
        self.latency = Histogram("tuneloop_gateway_request_duration_seconds", "Gateway request latency.",
                                 labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("tuneloop_gateway_prompt_tokens", "Prompt tokens, as counted by vLLM.",
                                     labels, registry=registry)
        self.completion_tokens = Counter("tuneloop_gateway_completion_tokens",
                                         "Completion tokens, as counted by vLLM.", labels, registry=registry)
        self.key_requests = Counter("tuneloop_gateway_key_requests", "Requests forwarded to the engine, by API key "
                                    "id ('none' without a key) and status code.", ["key", "status"],
                                    registry=registry)
        self.refused = Counter("tuneloop_gateway_refused_requests", "Requests refused before they reached the "
                               "engine, by error type (authentication_error, permission_error, rate_limit_error, "
                               "invalid_request_error, ...).", ["type"], registry=registry)
        self.per_adapter = (self.requests, self.errors, self.latency, self.prompt_tokens, self.completion_tokens)

    def retire(self, kept: Iterable[str]) -> int:
        """Remove every per-adapter series whose adapter is not in `kept`; returns how many label sets went.

        Prometheus sees the series end, as it does for a restarted process; totals of a retired version stay in
        the TSDB up to its last scrape."""
        keep = set(kept) | {"base"}
        removed = 0
        for metric in self.per_adapter:
            names = metric._labelnames  # the metric's own label names: prometheus_client has no public getter
            where = names.index(ADAPTER_LABEL)
            stale = {tuple(sample.labels[n] for n in names)
                     for family in metric.collect() for sample in family.samples
                     if sample.labels.get(ADAPTER_LABEL) not in keep}
            for values in stale:
                if values[where] not in keep:
                    metric.remove(*values)
                    removed += 1
        return removed


class ServingStateCollector(Collector):
    """Engine state and restarts, capture outcomes and PII redactions, read from their owners at scrape time."""

    def __init__(self, engine: Any, capture: Any, redactor: Any, retention: Any = None,
                 membership: Any = None) -> None:
        self.engine, self.capture, self.redactor, self.retention = engine, capture, redactor, retention
        self.membership = membership

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("tuneloop_engine_up", "1 when vLLM answers its health check.")
        up.add_metric([], 1.0 if self.engine.state == "ready" else 0.0)
        yield up
        restarts = CounterMetricFamily("tuneloop_engine_restarts", "vLLM restarts by the supervisor.")
        restarts.add_metric([], float(self.engine.restarts))
        yield restarts
        loaded = GaugeMetricFamily("tuneloop_engine_adapters_loaded", "LoRA adapters loaded in vLLM.")
        loaded.add_metric([], float(len(self.engine.client.loaded)))
        yield loaded
        records = CounterMetricFamily("tuneloop_capture_records", "Captured traffic records by outcome "
                                      "(captured, spilled_*, replayed, quarantined, dropped).", labels=["outcome"])
        for outcome in ("captured", "spilled_queue_full", "spilled_database_error", "spilled_after_close", "replayed",
                        "quarantined", "dropped"):
            records.add_metric([outcome], float(self.capture.counts.get(outcome, 0)))
        yield records
        queue = GaugeMetricFamily("tuneloop_capture_queue_depth", "Records waiting to be written.")
        queue.add_metric([], float(self.capture.queue.qsize()))
        yield queue
        pii = CounterMetricFamily("tuneloop_pii_redactions", "PII occurrences redacted, by kind.", labels=["kind"])
        for kind in ("email", "phone", "card", "iban"):
            pii.add_metric([kind], float(self.redactor.counts.get(kind, 0)))
        yield pii
        if self.retention is not None:
            yield from self._retention()
        if self.membership is not None:
            gateways = GaugeMetricFamily("tuneloop_gateways_live", "Gateways on this database seen in the last three "
                                         "alias polls (each enforces 1/N of every key's rate limit).")
            gateways.add_metric([], float(self.membership.live))
            yield gateways

    def _retention(self) -> Iterator[Any]:
        pruned = CounterMetricFamily("tuneloop_traffic_pruned_rows", "Captured requests deleted by this "
                                     "gateway's retention passes, by limit (age, size).", labels=["reason"])
        for reason in ("age", "size"):
            pruned.add_metric([reason], float(self.retention.pruned[reason]))
        yield pruned
        last = self.retention.last
        if last is None:
            return
        rows = GaugeMetricFamily("tuneloop_traffic_rows", "Captured requests stored, as counted by the last "
                                 "retention pass, by whether they carry feedback.", labels=["labelled"])
        rows.add_metric(["false"], float(last.kept_unlabelled))
        rows.add_metric(["true"], float(last.kept_labelled))
        yield rows
        at = GaugeMetricFamily("tuneloop_traffic_retention_last_run_timestamp_seconds",
                               "When this gateway's last retention pass finished (Unix time).")
        at.add_metric([], self.retention.last_run_at.timestamp())
        yield at
