"""A bounded chaos run (``pdserve chaos``): 1 prefill and 2 decode engines under steady load, a
decode worker SIGKILLed with its engine, the other decode engine stalled (SIGSTOP of its engine
processes while its actor answers: the progress watchdog must fail its requests over and replace
it), a KV transfer corrupted, the router SIGKILLed and started again. Every request ends with a
clear status and none hangs; at least 99% of those in flight during the worker faults finish
correctly; those cut by the router kill finish when resent; no engine holds KV afterwards; the
killed and the stalled worker come back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLEAR = {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}


def test_bounded_chaos_run_loses_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, "-m", "pdserve.cli", "chaos", "--prefill", "1", "--decode", "2", "--duration", "40",
           "--rate", "1", "--faults", "decode,stall,corrupt,router", "--no-baseline", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    chaos = json.loads(out.read_text())["chaos"]
    assert set(chaos["statuses"]) <= CLEAR, chaos["statuses"]                 # no DEADLINE_EXCEEDED: no hang
    assert chaos["in_flight_during_worker_faults"] >= 1
    assert chaos["finished_during_worker_faults"] >= 0.99 * chaos["in_flight_during_worker_faults"]
    assert chaos["resent_ok"] == chaos["resent_after_router_kill"]
    assert chaos["ok"] == chaos["requests"], chaos["statuses"]
    assert chaos["idle_after_s"] is not None                                   # no KV left held anywhere
    faults = {f["kind"]: f for f in chaos["faults"]}
    assert all(faults[kind]["recovered_s"] is not None for kind in ("decode", "stall", "router")), faults
    assert "recomputed, 8/8 tokens" in faults["corrupt"]["detail"]
