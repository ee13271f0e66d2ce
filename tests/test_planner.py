"""The serving simulator behind `pdserve plan`: hand-computed timelines of prefill passes, decode
batches, KV capacity and colocated stalls; the placement search and its config file; the
replay of a recorded bench run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.base import config as config_mod
from pdserve.sim import check, plan
from pdserve.contention import Neighbour
from pdserve.sim.host import Contention
from pdserve.sim.serving import EngineSpec, Placement, ServingConfig, ServingSim
from pdserve.sim.traces import TraceRequest
from router.latency import LatencyModel

# a pass costs 0.1 s + 1 ms per prompt token; a decode step 10 ms + 1 ms per running request
MODEL = LatencyModel(prefill=(0.1, 0.001, 0.0), decode=(0.01, 0.001, 0.0), origin="test")
FLAT = LatencyModel(prefill=(0.1, 0.0, 0.0), decode=(0.01, 0.001, 0.0), origin="test: 0.1 s per pass")
CFG = ServingConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, kv_bandwidth_bps=1e18, warmup_share=0.0)


def run(model, requests, placement=Placement(1, 1), kv_tokens=10_000, **cfg):
    engines = {1: EngineSpec(model, kv_tokens)}
    cfg = ServingConfig(**{**CFG.__dict__, **cfg})
    return ServingSim(placement, engines, cfg).run([TraceRequest(t, n, out, ()) for t, n, out in requests])


@pytest.mark.parametrize("pass_prompts,ttft", [
    (256, [0.2, 0.45, 0.4]),   # A alone (0-0.2), then B and C in one pass (0.2-0.5)
    (1, [0.2, 0.35, 0.5]),     # one prompt per pass: B 0.2-0.4, C 0.4-0.6
])
def test_prefill_batches_what_queued_during_a_pass(pass_prompts, ttft):
    result = run(MODEL, [(0.0, 100, 2), (0.05, 100, 2), (0.1, 100, 2)], max_pass_prompts=pass_prompts)
    assert result.ttft_s == pytest.approx(ttft)


@pytest.mark.parametrize("kv_tokens,tpot", [
    (1000, [0.0112, 0.0145]),  # B joins A's batch at the step boundary after it arrives (0.21 s)
    (150, [0.011, 0.041]),     # B's KV does not fit beside A's: it waits until A finishes (0.32 s)
])
def test_decode_batch_joins_at_step_boundaries_within_kv_capacity(kv_tokens, tpot):
    result = run(FLAT, [(0.0, 100, 21), (0.0, 100, 5)], kv_tokens=kv_tokens)
    assert result.ttft_s == pytest.approx([0.1, 0.2])
    assert result.tpot_s == pytest.approx(tpot)


@pytest.mark.parametrize("schedule,ttft,tpot", [
    ("prefill_first", [0.1, 0.105], [0.0211, 0.012]),  # B's 0.1 s pass stalls A's batch
    ("mixed", [0.1, 0.106], [0.0201, 0.012]),          # B prefills beside A's decode (one 0.101 s step)
])
def test_colocated_schedules(schedule, ttft, tpot):
    result = run(FLAT, [(0.0, 100, 11), (0.15, 100, 2)], Placement(1, colocated=True), colocated_schedule=schedule)
    assert result.ttft_s == pytest.approx(ttft)   # B starts at A's next step boundary (0.155 s)
    assert result.tpot_s == pytest.approx(tpot)


def test_attainment_needs_both_slos_and_skips_the_warmup():
    result = run(FLAT, [(0.0, 100, 11), (0.15, 100, 2)], Placement(1, colocated=True), tpot_slo_s=0.015)
    assert result.attainment == pytest.approx(0.5)        # A's TPOT 21 ms misses 15 ms
    result = run(FLAT, [(0.0, 100, 11), (0.15, 100, 2)], Placement(1, colocated=True), tpot_slo_s=0.015,
                 warmup_share=0.5)
    assert result.attainment == 1.0


@pytest.mark.parametrize("scale,replayed", [(1.0, 11), (2.0, 21), (0.1, 5)])
def test_a_run_covers_the_horizon_in_compressed_time(scale, replayed):
    result = ServingSim(Placement(1, 1), {1: EngineSpec(MODEL, 10_000)},
                        ServingConfig(**{**CFG.__dict__, "horizon_s": 10.0, "min_requests": 5})).run(
        [TraceRequest(float(k), 10, 2, ()) for k in range(100)], scale)
    assert len(result.ttft_s) == replayed


def test_placements_fill_the_budget():
    labels = [p.label() for p in plan.placements(4, (1, 2))]
    assert labels == ["colocated 4 x TP1", "colocated 2 x TP2", "3P(TP1)+1D(TP1)", "2P(TP1)+2D(TP1)",
                      "1P(TP1)+3D(TP1)", "2P(TP1)+1D(TP2)", "1P(TP2)+1D(TP1)", "1P(TP2)+2D(TP1)",
                      "1P(TP2)+1D(TP2)"]
    assert [p.gpus for p in plan.placements(4, (1, 2))] == [4, 4, 4, 4, 4, 4, 3, 4, 4]


def test_plan_writes_a_config_that_serve_accepts(tmp_path):
    requests = [TraceRequest(float(k), 50 + k % 7 * 20, 4 + k % 5, ()) for k in range(400)]
    engines = {1: EngineSpec(MODEL, 5_000)}
    cfg = ServingConfig(ttft_slo_s=0.5, tpot_slo_s=0.05, kv_bandwidth_bps=1e18, horizon_s=60.0, min_requests=50)
    report = plan.run_plan(requests, engines, cfg, 3, tmp_path, {"workload": "test", "profile": "test"})
    best = max(report["placements"], key=lambda p: p["per_gpu_rps"])
    assert report["best"] == best["label"] and best["goodput_rps"] > 0
    served = config_mod.load(tmp_path / "plan.yaml")
    chosen = best["placement"]
    if chosen["colocated"]:
        assert served.mode == "colocated" and served.prefill.instances + served.decode.instances == chosen["prefill"]
    else:
        assert (served.mode, served.prefill.instances, served.decode.instances) == (
            "disaggregated", chosen["prefill"], chosen["decode"])
    assert served.slo_ttft_ms == 500 and served.slo_tpot_ms == 50
    assert (tmp_path / "goodput.png").stat().st_size > 0 and "per device" in (tmp_path / "table.md").read_text()


def test_profiles_per_tensor_parallel_degree_load():
    engines, facts = plan.load_engines("a100-roofline-opt-13b", [1, 2, 4])
    assert [engines[t].gpus for t in (1, 2, 4)] == [1, 2, 4]
    assert engines[1].kv_tokens < engines[2].kv_tokens < engines[4].kv_tokens
    assert engines[1].latency.decode_step_s(1, 512) > engines[2].latency.decode_step_s(1, 512)
    assert facts["kv_bytes_per_token"] == 2 * 40 * 5120 * 2  # OPT-13B: K and V, 40 layers, hidden 5120, fp16
    with pytest.raises(FileNotFoundError):
        plan.load_engines("a100-roofline-opt-13b", [8])


def test_sim_check_replays_the_bench_arrivals(tmp_path):
    rows = [{"ok": True, "ttft_s": 0.3, "tpot_s": 0.02, "prompt_tokens": 100, "output_tokens": 3},
            {"ok": False, "ttft_s": 0.0, "tpot_s": 0.0, "prompt_tokens": 0, "output_tokens": 0}]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"arrival": "poisson", "seed": 0, "runs": [{"setting": 1.0, "rate_rps": 1.0,
                                                                            "requests": rows}]}))
    cfg = ServingConfig(1.0, 1.0, kv_bandwidth_bps=1e18, horizon_s=float("inf"), warmup_share=0.0)
    report = check.compare(path, Placement(1, 1), EngineSpec(MODEL, 10_000), cfg)
    ttft = report["runs"][0]["ttft_s"]["p50"]
    assert ttft == pytest.approx({"live": 0.3, "sim": 0.2})   # one request, an idle 100-token pass
    assert report["runs"][0]["tpot_s"]["p50"]["sim"] == pytest.approx(0.011)
    assert "0.67x" in check.markdown(report)
    assert "router queue" not in check.markdown(report)  # recorded before the bench kept the router's account


def test_sim_check_splits_the_ttft_where_the_router_accounted_for_it(tmp_path):
    """Live: 300 ms = 20 ms queued at the router + a 250 ms prefill call + 30 ms of hops; the
    profile's idle 100-token pass is 200 ms, so the call took 1.25x it; the simulator's single
    request waits 0 and passes in 200 ms."""
    rows = [{"ok": True, "ttft_s": 0.3, "tpot_s": 0.02, "prompt_tokens": 100, "output_tokens": 3,
             "queue_ms": 20.0, "prefill_ms": 250.0}]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"arrival": "poisson", "seed": 0, "runs": [{"setting": 1.0, "rate_rps": 1.0,
                                                                            "requests": rows}]}))
    cfg = ServingConfig(1.0, 1.0, kv_bandwidth_bps=1e18, horizon_s=float("inf"), warmup_share=0.0)
    report = check.compare(path, Placement(1, 1), EngineSpec(MODEL, 10_000), cfg)
    parts = report["runs"][0]["ttft_parts_ms"]
    assert parts["live"] == pytest.approx({"router_queue": 20.0, "prefill_call": 250.0, "hops": 30.0})
    assert parts["sim"] == pytest.approx({"wait": 0.0, "pass": 200.0})
    assert parts["prefill_call_vs_profile"] == pytest.approx(1.25)
    assert "| 1.00 | 20.0 | 250 | 30.0 | 0.0 | 200 | 1.25x |" in check.markdown(report)


def test_profile_fit_keeps_short_prompts_accurate():
    """Points 10% off the line at the long end: a relative-error fit keeps the short prompts'
    time within 2%; an absolute fit would bend its intercept to the long points (41 ms -> 12 ms
    on a real profile)."""
    true = LatencyModel(prefill=(0.04, 2e-4, 0.0), decode=(0.02, 1e-3, 0.0), origin="truth")
    lengths = (32, 64, 128, 256, 512, 1024, 2048, 4096)
    points = [(n, true.prefill_s(n, 0) * (1.1 if n >= 2048 else 1.0)) for n in lengths]
    decode = [(b, 100.0, true.decode_step_s(b, 100.0)) for b in (1, 2, 4, 8)]
    fitted = LatencyModel.fit(points, decode, "test")
    for n in (32, 64, 128):
        assert fitted.prefill_s(n, 0) == pytest.approx(true.prefill_s(n, 0), rel=0.02)


SHARED = Contention(neighbour_decode_batches=(1, 4, 16), prefill_vs_decoding=(1.1, 1.3, 1.5),
                    decode_vs_decoding=(1.05, 1.1, 1.2), prefill_vs_prefilling=1.6, decode_vs_prefilling=1.4)


@pytest.mark.parametrize("prefill,neighbour_prefilling,batch,factor", [
    (True, False, 0, 1.0),            # an idle neighbour costs nothing
    (True, False, 1, 1.1),
    (True, False, 2, 1.1 + 0.2 / 3),  # between measured batches: linear
    (False, False, 4, 1.1),
    (False, False, 40, 1.2),          # past the last batch measured: flat
    (True, True, 3, 1.6),             # a prefilling neighbour, whatever it decodes
    (False, True, 0, 1.4),
])
def test_contention_slowdown_per_neighbour_load(prefill, neighbour_prefilling, batch, factor):
    assert SHARED.slowdown(prefill, neighbour_prefilling, batch) == pytest.approx(factor)


@pytest.mark.parametrize("batches,prefill,decode", [((1, 4), (1.1,), (1.0, 1.1)), ((4, 1), (1.0, 1.1), (1.0, 1.1)),
                                                    ((), (), ()), ((0, 4), (1.0, 1.1), (1.0, 1.1))])
def test_contention_refuses_a_malformed_section(batches, prefill, decode):
    with pytest.raises(ValueError):
        Contention(batches, prefill, decode, 1.5, 1.5)


def test_a_pass_beside_a_busy_engine_is_slowed_by_the_measured_factor():
    """A (t=0, 100 tokens) decodes 49 steps from 0.2 s; B (t=0.5, 100 tokens) prefills beside that
    batch of 1: its idle 0.2 s pass takes 1.1x. A's steps beside B's prefill take 1.4x, so A's TPOT
    grows; with the engines apart, neither changes."""
    requests = [(0.0, 100, 50), (0.5, 100, 1)]
    apart, shared = run(MODEL, requests), run(MODEL, requests, contention=SHARED)
    assert apart.ttft_s == pytest.approx([0.2, 0.2]) and shared.ttft_s == pytest.approx([0.2, 0.22])
    assert shared.tpot_s[0] > apart.tpot_s[0] == pytest.approx(0.011)


@pytest.mark.parametrize("script,answers", [
    ("import sys; print('log line\\nready', flush=True); sys.stdin.readline(); print('ready', flush=True)", True),
    ("import time; print('log line', flush=True); time.sleep(60)", False),   # never ready: a bounded wait
    ("print('starting'); raise SystemExit(3)", False),                        # died before ready
])
def test_the_contention_neighbour_is_waited_for_within_its_bound(script, answers):
    import sys
    import time

    start = time.monotonic()
    if answers:
        neighbour = Neighbour([sys.executable, "-c", script], timeout_s=20)
        neighbour.switch("decode 4")
        neighbour.close()
    else:
        with pytest.raises(RuntimeError, match="did not answer"):
            Neighbour([sys.executable, "-c", script], timeout_s=2)
    assert time.monotonic() - start < 15


def test_closing_the_contention_neighbour_ends_what_it_started(tmp_path):
    """A neighbour that leaves a child behind when it exits (as a killed engine host leaves its
    engine core): closing it ends the child too."""
    import sys
    import time

    pid_file = tmp_path / "child"
    script = (f"import subprocess, sys; c = subprocess.Popen(['sleep', '60']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('ready', flush=True); sys.stdin.readline()")
    neighbour = Neighbour([sys.executable, "-c", script], timeout_s=20)
    child = Path(f"/proc/{pid_file.read_text()}/stat")
    assert _alive(child)
    neighbour.close()
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert neighbour.proc.returncode is not None and not _alive(child)


def _alive(stat: Path) -> bool:
    """Whether the process of ``/proc/PID/stat`` runs (gone, or dead awaiting its reaper: no)."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
