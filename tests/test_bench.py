"""pdserve bench: its statistics are exact for known timings, and a short real run against the
test cluster writes a well-formed results file."""
from __future__ import annotations

import json
import random
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from pdserve.bench import report, rescore, runner, workloads
from pdserve.bench.stats import RequestTiming, Slo, max_goodput_rate, summarize, sustained_goodput

TIMINGS = [
    RequestTiming(True, ttft_s=0.2, tpot_s=0.05, e2e_s=1.0, prompt_tokens=10, output_tokens=17),
    RequestTiming(True, ttft_s=0.4, tpot_s=0.15, e2e_s=2.0, prompt_tokens=10, output_tokens=11),
    RequestTiming(True, ttft_s=1.2, tpot_s=0.05, e2e_s=3.0, prompt_tokens=10, output_tokens=21),
    RequestTiming(True, ttft_s=0.3, tpot_s=None, e2e_s=0.3, prompt_tokens=10, output_tokens=1),
    RequestTiming(False, error="UNAVAILABLE: no live decode instance"),
]
SLOS = [Slo("tight", ttft_s=0.5, tpot_s=0.1), Slo("loose", ttft_s=2.0, tpot_s=0.2)]


@pytest.mark.parametrize("path,value", [
    (("requests",), 5), (("succeeded",), 4), (("failed",), 1),
    (("throughput_rps",), 0.4), (("output_tokens_per_s",), 5.0),
    (("ttft_s", "p50"), 0.35), (("ttft_s", "p90"), 0.96), (("ttft_s", "mean"), 0.525),
    (("tpot_s", "p50"), 0.05), (("tpot_s", "p99"), 0.148),
    (("e2e_s", "p50"), 1.5),
    (("slo", "tight", "attainment"), 0.4),      # #1 and #4 (no TPOT to miss); #2 misses TPOT, #3 TTFT, #5 failed
    (("slo", "tight", "goodput_rps"), 0.2),
    (("slo", "loose", "attainment"), 0.8),
    (("slo", "loose", "goodput_rps"), 0.4),
])
def test_summary_is_exact(path, value):
    summary = summarize(TIMINGS, duration_s=10.0, slos=SLOS)
    for key in path:
        summary = summary[key]
    assert summary == pytest.approx(value)


@pytest.mark.parametrize("points,expected", [
    ([(0.5, 1.0), (1.0, 0.95), (2.0, 0.7)], 1.0),
    ([(0.5, 0.8), (1.0, 0.5)], 0.0),
    ([(0.5, 0.9), (1.0, 0.5), (2.0, 0.91)], 2.0),   # the highest rate that met it, as measured
])
def test_max_goodput_rate(points, expected):
    assert max_goodput_rate(points) == expected


@pytest.mark.parametrize("points,expected", [
    ([(0.5, 1.0), (1.0, 0.95), (2.0, 0.7)], 1.0),
    ([(0.5, 0.9), (1.0, 0.5), (2.0, 0.91)], 0.5),   # a pass above a failed rate does not count
    ([(2.0, 0.95), (0.5, 0.8)], 0.0),               # sorted by rate: the lowest failed
    ([], 0.0),
])
def test_sustained_goodput(points, expected):
    assert sustained_goodput(points) == expected


def test_rescore_applies_other_slos_to_the_recorded_requests():
    runs = [{"rate_rps": rate, "summary": summarize(TIMINGS, 10.0, SLOS), "requests": [asdict(t) for t in TIMINGS]}
            for rate in (1.0, 2.0)]
    result = {"label": "x", "slos": [asdict(s) for s in SLOS], "runs": runs, "max_goodput_rps": {}}
    lax = rescore.rescore(result, [Slo("lax", ttft_s=1.5, tpot_s=0.2)])
    assert [r["summary"]["slo"]["lax"]["attainment"] for r in lax["runs"]] == [0.8, 0.8]   # all but the failed one
    assert lax["runs"][0]["summary"]["slo"]["lax"]["goodput_rps"] == pytest.approx(0.4)
    assert lax["max_goodput_rps"] == {"lax": 0.0} and "tight" in result["runs"][0]["summary"]["slo"]
    assert rescore.table([lax]).splitlines()[-1] == "| goodput lax, sustained / highest (req/s) | 0 / 0 |"


def test_poisson_arrivals_are_seeded_and_average_the_rate():
    reqs = [workloads.BenchRequest(4)] * 2000
    a, b = runner.arrival_times(reqs, "poisson", 4.0, 1.0, 1), runner.arrival_times(reqs, "poisson", 4.0, 1.0, 1)
    assert a == b and a[0] == 0.0 and 1999 / a[-1] == pytest.approx(4.0, rel=0.1)
    trace = [workloads.BenchRequest(4, arrival_s=t) for t in (10.0, 12.0, 16.0)]
    assert runner.arrival_times(trace, "trace", 0.0, 2.0, 0) == [0.0, 1.0, 3.0]


@pytest.mark.parametrize("pool,rates,warmup,rate_warmup,sent", [
    (10, [1.0, 2.0, 4.0], 1, 0, [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9]]),
    (7, [1.0, 2.0], 0, 0, [[0, 1, 2], [3, 4, 5]]),        # the remainder is not sent
    (4, [2.0], 3, 0, [[0, 1, 2], [3]]),
    (9, [1.0, 2.0], 1, 2, [[0], [1, 2, 3, 4], [5, 6, 7, 8]]),
])
def test_sweep_never_sends_a_request_twice(monkeypatch, pool, rates, warmup, rate_warmup, sent):
    """Every rate gets requests of its own: a resent prompt would be a prefix-cache hit."""
    calls = []

    async def record(target, requests, *args, **kwargs):
        calls.append([r.max_tokens for r in requests])
        return [RequestTiming(True, ttft_s=0.1, tpot_s=0.01, e2e_s=0.2, prompt_tokens=4, output_tokens=2)
                for _ in requests], 1.0, [0.1 * i for i in range(len(requests))]

    monkeypatch.setattr(runner, "run", record)
    reqs = [workloads.BenchRequest(i) for i in range(pool)]
    results = report.sweep("unused:0", reqs, rates, SLOS, "t", "poisson", 1, seed=0, timeout_s=1, warmup=warmup,
                           rate_warmup=rate_warmup)
    assert calls == sent and results["requests_per_rate"] == len(sent[-1]) - rate_warmup
    assert report.fresh_pool_size(results["requests_per_rate"], len(rates), warmup, rate_warmup) <= pool


# (arrival, unscored requests, attainment, scored requests, throughput in req/s)
WARMUPS = [("poisson", 0, 4 / 6, list(range(6)), 0.6), ("poisson", 2, 1.0, [2, 3, 4, 5], 4 / 8.0),
           ("concurrency", 0, 4 / 6, list(range(6)), 0.6), ("concurrency", 2, 1.0, [2, 3, 4, 5], 4 / 8.0)]


@pytest.mark.parametrize("arrival,rate_warmup,attainment,scored,throughput", WARMUPS)
def test_a_rates_warmup_requests_are_sent_but_not_scored(monkeypatch, arrival, rate_warmup, attainment, scored,
                                                         throughput):
    """The first ``rate_warmup`` requests of each rate (here: the ones that miss) are left out, and
    so is the time before the first scored one was sent (request i is sent at i seconds of a 10 s
    run), whatever the arrival process."""
    async def first_two_late(target, requests, *args, **kwargs):
        return ([RequestTiming(True, ttft_s=9.0 if i < 2 else 0.1, tpot_s=0.01, e2e_s=0.2,
                               prompt_tokens=r.max_tokens, output_tokens=2) for i, r in enumerate(requests)],
                10.0, [float(i) for i in range(len(requests))])

    monkeypatch.setattr(runner, "run", first_two_late)
    reqs = [workloads.BenchRequest(i) for i in range(12)]
    run = report.sweep("unused:0", reqs, [1.0, 2.0], SLOS, "t", arrival, 1, 0, 1, 0, rate_warmup)["runs"][0]
    assert run["summary"]["slo"][SLOS[0].name]["attainment"] == pytest.approx(attainment)
    assert [r["prompt_tokens"] for r in run["requests"]] == scored
    assert run["summary"]["throughput_rps"] == pytest.approx(throughput)


def test_sweep_refuses_a_pool_too_small_for_its_rates():
    with pytest.raises(ValueError, match="one per rate"):
        report.sweep("unused:0", [workloads.BenchRequest(1)] * 2, [1.0, 2.0], SLOS, "t", "poisson", 1, 0, 1, warmup=1)


@pytest.mark.skipif(not workloads.exists("mooncake"), reason="../shared/traces not present")
def test_mooncake_workload_shares_real_token_blocks():
    reqs = workloads.load("mooncake", 30, seed=0, max_output=16, input_scale=0.02, output_scale=0.1, max_prompt=1536)
    firsts = {r.token_ids[:5] for r in reqs}
    assert len(firsts) == 1                      # every row starts with the trace's block 0
    assert all(1 <= r.max_tokens <= 16 and 0 < len(r.token_ids) <= 1536 for r in reqs)


@pytest.mark.skipif(not workloads.exists("sharegpt"), reason="../shared/traces not present")
@pytest.mark.parametrize("api", ["grpc", "http"])
def test_short_real_run_writes_a_well_formed_results_file(router, tmp_path, api):
    requests = workloads.load("sharegpt", 4, seed=random.Random(0).randrange(100), max_output=6, input_scale=1.0,
                              output_scale=1.0, max_prompt=1536)
    target = router.target if api == "grpc" else router.http
    results = report.sweep(target, requests, [2.0], SLOS, "test", "poisson", 4, seed=0, timeout_s=120)
    out = tmp_path / "run.json"
    report.write(results, out)
    data = json.loads(out.read_text())
    run = data["runs"][0]
    assert data["label"] == "test" and [s["name"] for s in data["slos"]] == ["tight", "loose"]
    assert run["summary"]["requests"] == 4 and run["summary"]["succeeded"] == 4
    assert all(r["ok"] and r["ttft_s"] > 0 and r["output_tokens"] >= 1 for r in run["requests"])
    # the router's own account of each request, over either API: its queue and prefill call fit in the client's TTFT
    assert all(0 <= r["queue_ms"] and 0 < r["prefill_ms"] and (r["queue_ms"] + r["prefill_ms"]) / 1e3 < r["ttft_s"]
               for r in run["requests"])
    assert set(data["max_goodput_rps"]) == {"tight", "loose"}
    assert out.with_suffix(".cdf.png").stat().st_size > 1000
    report.compare([out, out], tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 1000


# (key, value, what the variant's config holds there; None: the variant is refused)
VARIANTS = [("routing.worker_calls", "tcp", "tcp"), ("prefill.instances", "2", 2), ("mode", "colocated", "colocated"),
            ("routing.worker_calls", "pigeon", None), ("routing.no_such_key", "1", None)]


@pytest.mark.parametrize("key,value,held", VARIANTS)
def test_a_bench_ab_variant_changes_one_setting_and_is_validated(tmp_path, key, value, held):
    from pdserve import ab_run
    from pdserve.base.config import ConfigError, load

    base = Path(__file__).resolve().parents[1] / "deploy" / "local.yaml"
    if held is None:
        with pytest.raises(ConfigError):
            ab_run._variant(str(base), key, value, tmp_path)
        return
    variant, original = load(ab_run._variant(str(base), key, value, tmp_path)), load(base)
    section, _, field = key.rpartition(".")
    got = getattr(getattr(variant, section), field) if section else getattr(variant, field)
    assert got == held
    if section:
        assert replace(variant, **{section: getattr(original, section)}) == original
    else:
        assert replace(variant, **{field: getattr(original, field)}) == original


def _ab_row(n: int, kv: float, raw: float, first: float, step: float) -> dict:
    return {"prompt_tokens": n, "kv_transfer_bytes": n * 2**20, "kv_transfer_ms": kv, "raw_tcp_ms": raw,
            "first_to_second_token_ms": first, "decode_step_ms": step, "router_added_ms": 1.0}


def test_bench_ab_pools_each_length_over_its_runs():
    """The per-length medians pool every run's requests of that length (3 runs of 1 here), and
    the fraction is raw TCP's median over the transfer's, both of the same requests."""
    from pdserve import ab_run

    runs = [{"requests": [_ab_row(n, kv * n, raw * n, 40.0 + kv, 30.0) for n in ab_run.LENGTHS],
             "router_added_ms_median": 1.0} for kv, raw in ((2.0, 1.0), (4.0, 1.0), (3.0, 3.0))]
    summary = ab_run._summary(runs)
    for n in ab_run.LENGTHS:
        assert summary["per_length"][n] == pytest.approx({
            "kv_transfer_bytes": n * 2**20, "kv_transfer_ms_median": 3.0 * n, "raw_tcp_ms_median": 1.0 * n,
            "transport_mib_s": 1000 / 3, "raw_tcp_mib_s": 1000.0, "transport_fraction_of_raw": 1 / 3,
            "router_added_ms_median": 1.0, "first_to_second_token_ms_median": 43.0, "decode_step_ms_median": 30.0})
    assert summary["requests"] == 3 * len(ab_run.LENGTHS)


def test_bench_kv_rows_give_gloo_its_fraction_of_raw_gloo_and_every_row_its_fraction_of_raw_tcp():
    """``pdserve bench-kv``'s rows: medians per transport; each against raw TCP, and the gloo
    transport also against the raw gloo send/recv of the same bytes."""
    from pdserve.bench.kv import KvShape, _rows

    shape = KvShape("m", 2, 1, 4, 16, (16,))
    times = {"tcp": {16: [0.004, 0.002, 0.003]}, "gloo": {16: [0.008, 0.008]}, "grpc": {16: [0.012]},
             "raw_tcp": {16: [0.002, 0.002]}, "raw_gloo": {16: [0.004]}}
    rows = {r["transport"]: r for r in _rows(shape, times, 8_000_000)}
    assert {n: r["fraction_of_raw_tcp"] for n, r in rows.items()} == {
        "tcp": 0.667, "gloo": 0.25, "grpc": 0.167, "raw_tcp": 1.0, "raw_gloo": 0.5}
    assert {n: r.get("fraction_of_raw_gloo") for n, r in rows.items()} == {
        "tcp": None, "gloo": 0.5, "grpc": None, "raw_tcp": None, "raw_gloo": 1.0}
    assert rows["tcp"]["median_ms"] == 3.0 and rows["gloo"]["gb_s"] == 1.0   # 8 MB in 8 ms
