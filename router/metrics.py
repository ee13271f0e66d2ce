"""The one place stats become Prometheus metrics (names ``pdserve_*``, units in the names).

``PrometheusExporter`` listens to ``router.stats.RouterStats`` (request records, routing
decisions) and, at scrape time, reads the pools' load snapshots, which the router polls from every
worker: so one endpoint, the router's ``/metrics``, covers every worker, and Prometheus needs no
per-worker service discovery across a Ray cluster. Labels are low-cardinality: outcome, finish
reason, pool, worker, policy, reason, slo, result; never request ids or prompts.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pdserve.base.types import Outcome, RequestRecord, RouteDecision

# Buckets wide enough for a 2-core CPU (seconds per request) and a GPU (milliseconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
BYTES_BUCKETS = tuple(1024 * 4**i for i in range(12))  # 1 KiB .. 4 GiB
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.1, 1.25, 1.5, 2.0, 4.0, 10.0)
ATTAINMENT_WINDOW = 1000
"""Finished requests the ``pdserve_slo_attainment_ratio`` gauge is computed over."""


class PrometheusExporter:
    """Owns a registry; ``on_request``/``on_decision`` are called by RouterStats."""

    def __init__(self, pools: Sequence[Any], admission: Any = None, latency: Any = None) -> None:
        self.registry = CollectorRegistry()
        self._pools = pools
        self._met: deque[tuple[bool, bool]] = deque(maxlen=ATTAINMENT_WINDOW)
        self._define()
        self.registry.register(_PoolCollector(pools))
        if admission is not None:
            self.registry.register(_AdmissionCollector(admission, latency))
        self._server = None

    def _define(self) -> None:
        r = self.registry
        self.requests = Counter("pdserve_requests", "Requests by outcome.", ["outcome"], registry=r)
        self.finished = Counter("pdserve_requests_finished", "Finished requests by finish reason.", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens", "Tokens sent to clients.", registry=r)
        self.ttft = Histogram("pdserve_time_to_first_token_seconds", "Arrival to first token sent.", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pdserve_inter_token_latency_seconds", "Gap between consecutive output tokens.", buckets=TOKEN_BUCKETS, registry=r)
        self.tpot = Histogram("pdserve_time_per_output_token_seconds", "Mean gap per request after its first token.", buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve_e2e_request_latency_seconds", "Arrival to final message.", buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("pdserve_router_queue_time_seconds", "Arrival to prefill dispatch (incl. tokenization).", buckets=LATENCY_BUCKETS, registry=r)
        self.prefill = Histogram("pdserve_prefill_time_seconds", "Prefill call on the prefill instance.", buckets=LATENCY_BUCKETS, registry=r)
        self.kv_time = Histogram("pdserve_kv_transfer_time_seconds", "KV pull on the decode instance, per request.", buckets=LATENCY_BUCKETS, registry=r)
        self.kv_bytes = Histogram("pdserve_kv_transfer_size_bytes", "KV bytes moved per request.", buckets=BYTES_BUCKETS, registry=r)
        self.kv_failures = Counter("pdserve_kv_transfer_failures", "KV pulls that failed (prompt recomputed).", registry=r)
        self.retries = Counter("pdserve_request_retries", "Worker failures survived: prefill retries, decode migrations.", ["leg"], registry=r)
        self.decisions = Counter("pdserve_router_decisions", "Routing decisions.", ["pool", "policy", "reason"], registry=r)
        self.predicted_ttft = Histogram("pdserve_router_predicted_ttft_seconds", "The prefill policy's TTFT prediction "
                                        "for requests that got their first token.", buckets=LATENCY_BUCKETS, registry=r)
        self.prediction_ratio = Histogram("pdserve_router_ttft_prediction_ratio", "Actual over predicted TTFT.",
                                          buckets=RATIO_BUCKETS, registry=r)
        self.slo_checks = Counter("pdserve_slo_checks", "Finished requests with an SLO target, by result.", ["slo", "result"], registry=r)
        self.goodput = Counter("pdserve_goodput_requests", "Finished requests meeting both TTFT and TPOT SLOs (unset = met).", registry=r)
        self.attainment = Gauge("pdserve_slo_attainment_ratio", f"Share of the last {ATTAINMENT_WINDOW} finished requests meeting the SLO.", ["slo"], registry=r)

    def on_request(self, rec: RequestRecord) -> None:
        """Account one request's record."""
        self.requests.labels(rec.outcome.value).inc()
        self.generation_tokens.inc(rec.completion_tokens)
        _observe(self.queue, rec.queue_s)
        _observe(self.prefill, rec.prefill_s)
        _observe(self.ttft, rec.ttft_s)
        if rec.predicted_ttft_s and rec.ttft_s is not None:
            self.predicted_ttft.observe(rec.predicted_ttft_s)
            self.prediction_ratio.observe(rec.ttft_s / rec.predicted_ttft_s)
        for gap in rec.inter_token_s:
            self.itl.observe(gap)
        _observe(self.kv_time, rec.kv_transfer_s)
        _observe(self.kv_bytes, rec.kv_transfer_bytes)
        if rec.kv_transfer_failed:
            self.kv_failures.inc()
        if rec.prefill_retries:
            self.retries.labels("prefill").inc(rec.prefill_retries)
        if rec.decode_migrations:
            self.retries.labels("decode").inc(rec.decode_migrations)
        if rec.outcome is Outcome.FINISHED:
            self._on_finished(rec)

    def _on_finished(self, rec: RequestRecord) -> None:
        self.finished.labels(rec.finish_reason).inc()
        self.prompt_tokens.inc(rec.prompt_tokens)
        _observe(self.e2e, rec.e2e_s)
        _observe(self.tpot, rec.tpot_s)
        ttft_ok, tpot_ok = rec.slo_met()
        for slo, target, ok in (("ttft", rec.ttft_slo_s, ttft_ok), ("tpot", rec.tpot_slo_s, tpot_ok)):
            if target:
                self.slo_checks.labels(slo, "met" if ok else "missed").inc()
        if ttft_ok and tpot_ok:
            self.goodput.inc()
        self._met.append((ttft_ok, tpot_ok))
        n = len(self._met)
        self.attainment.labels("ttft").set(sum(t for t, _ in self._met) / n)
        self.attainment.labels("tpot").set(sum(p for _, p in self._met) / n)
        self.attainment.labels("both").set(sum(t and p for t, p in self._met) / n)

    def on_decision(self, decision: RouteDecision) -> None:
        """Count one routing decision."""
        self.decisions.labels(decision.pool, decision.policy, decision.reason).inc()

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP from a daemon thread; returns the bound port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        """Stop the HTTP server."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _observe(histogram: Histogram, value: float | None) -> None:
    if value is not None:
        histogram.observe(value)


class _PoolCollector:
    """Per-instance load, read from the pools' latest snapshots at scrape time."""

    def __init__(self, pools: Sequence[Any]) -> None:
        self._pools = pools

    def collect(self) -> Iterable[Metric]:
        labels = ["pool", "worker"]  # not "instance": Prometheus sets that to the scrape target
        up = GaugeMetricFamily("pdserve_instance_up", "1 if the instance answered its last load poll.", labels=labels)
        waiting = GaugeMetricFamily("pdserve_instance_requests_waiting", "Requests queued in the engine.", labels=labels)
        running = GaugeMetricFamily("pdserve_instance_requests_running", "Requests in the engine's batch.", labels=labels)
        usage = GaugeMetricFamily("pdserve_instance_kv_cache_usage_ratio", "Share of KV-cache blocks in use.", labels=labels)
        queries = CounterMetricFamily("pdserve_instance_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=labels)
        hits = CounterMetricFamily("pdserve_instance_prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels=labels)
        recovered = CounterMetricFamily("pdserve_instance_recoveries", "Times the instance came back after being down.", labels=labels)
        outage = GaugeMetricFamily("pdserve_instance_last_recovery_seconds", "How long the instance's last outage lasted (time to recovery).", labels=labels)
        stalls = CounterMetricFamily("pdserve_instance_stalls", "Times the progress watchdog found the instance's engine stalled and replaced it.", labels=labels)
        steps = CounterMetricFamily("pdserve_instance_engine_steps", "Engine steps of the instance's current incarnation.", labels=labels)
        for pool in self._pools:
            for s in pool.snapshots():
                key = [pool.role, s.instance]
                up.add_metric(key, 1.0 if s.alive else 0.0)
                waiting.add_metric(key, s.waiting)
                running.add_metric(key, s.running)
                usage.add_metric(key, s.kv_cache_usage)
                queries.add_metric(key, s.prefix_cache_queries)
                hits.add_metric(key, s.prefix_cache_hits)
                count, seconds = getattr(pool, "recoveries", {}).get(s.instance, (0, 0.0))
                recovered.add_metric(key, count)
                outage.add_metric(key, seconds)
                stalls.add_metric(key, getattr(pool, "stalls", {}).get(s.instance, 0))
                steps.add_metric(key, s.steps)
        return [up, waiting, running, usage, queries, hits, recovered, outage, stalls, steps]


class _AdmissionCollector:
    """The router-side admission queue: depth, rejections, rebalancing moves, the latency refit."""

    def __init__(self, admission: Any, latency: Any) -> None:
        self._admission, self._latency = admission, latency

    def collect(self) -> Iterable[Metric]:
        a = self._admission
        queued = GaugeMetricFamily("pdserve_router_queued_requests", "Requests waiting in the router's admission queue.")
        queued.add_metric([], a.queued())
        rejected = CounterMetricFamily("pdserve_router_rejections", "Requests refused at admission (RESOURCE_EXHAUSTED).",
                                       labels=["reason"])
        for reason, count in sorted(a.stats.rejected.items()):
            rejected.add_metric([reason], count)
        moves = CounterMetricFamily("pdserve_router_rebalance_moves", "Queued requests moved to their other candidate.")
        moves.add_metric([], a.stats.moved)
        out = [queued, rejected, moves]
        if self._latency is not None and hasattr(self._latency, "scale"):
            scale = GaugeMetricFamily("pdserve_router_latency_scale", "Observed over profiled prefill time (online refit).")
            scale.add_metric([], self._latency.scale)
            out.append(scale)
        return out
