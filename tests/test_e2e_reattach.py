"""The router is not the engines' owner, nor a single point of failure: ``pdserve serve`` run as
operators run it (a process of its own, its own Ray head), killed with SIGKILL, and started again
with the same config re-attaches to the same engine processes (no reload) and serves; with
``--replicas 2`` two routers share the port, and killing one leaves every new request served;
SIGTERM leaves the engines running; ``pdserve stop`` ends the engines and the head."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from conftest import wait_until
from pdserve.base.net import free_port
from pdserve.client import PdServeClient, build_request

ROOT = Path(__file__).resolve().parents[1]
ENGINES = re.compile(r"pdserve engines of '[^']+': (.*)")



class Serve:
    """One ``pdserve serve`` process and what it printed."""

    def __init__(self, name: str, port: int, env: dict, log: Path, replicas: int = 1) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--config", str(ROOT / "deploy" / "local.yaml"),
               "--name", name, "--port", str(port), "--http-port", "-1", "--metrics-port", "-1",
               "--replicas", str(replicas)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def engines(self, timeout_s: float = 600, routers: int = 1) -> dict[str, tuple[int, str]]:
        """{worker: (pid, started | re-attached)} once ``routers`` routers serve (bounded)."""
        assert wait_until(lambda: self.log.read_text().count("pdserve serving gRPC") >= routers
                          or self.proc.poll() is not None, timeout_s, 0.5), "pdserve serve did not come up"
        match = ENGINES.search(self.log.read_text())
        assert match, self.log.read_text()[-3000:]
        return {m[0]: (int(m[1]), m[2]) for m in re.findall(r"(\S+) \(pid (\d+), ([\w-]+)\)", match[1])}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _answer(target: str, retries: int = 0) -> int:
    """Completion tokens of one request, resent up to ``retries`` times on UNAVAILABLE, a second
    apart (what a client does when the router carrying its connection died: gRPC keeps the last
    connection error for its reconnect backoff)."""
    client = PdServeClient(target)
    try:
        return client.complete(build_request(prompt="The capital of France is", max_tokens=6, ignore_eos=True),
                               timeout_s=120).final.usage.completion_tokens
    except grpc.RpcError as err:
        if err.code() is not grpc.StatusCode.UNAVAILABLE or retries == 0:
            raise
        time.sleep(1.0)
        return _answer(target, retries - 1)
    finally:
        client.close()


def test_restarted_router_reattaches_and_stop_ends_the_deployment(tmp_path):
    name, port = f"reattach-{os.getpid()}", free_port()
    env = {**os.environ, "PDSERVE_STATE_DIR": str(tmp_path / "state")}
    stop = [sys.executable, "-m", "pdserve.cli", "stop", "--name", name]
    first = second = None
    try:
        first = Serve(name, port, env, tmp_path / "first.log")
        engines = first.engines()
        assert {state for _, state in engines.values()} == {"started"} and len(engines) == 2
        assert _answer(f"127.0.0.1:{port}") == 6
        first.proc.send_signal(signal.SIGKILL)              # the router dies without any cleanup
        first.proc.wait(30)
        assert all(_alive(pid) for pid, _ in engines.values())

        second = Serve(name, port, env, tmp_path / "second.log", replicas=2)
        again = second.engines(timeout_s=180, routers=2)
        assert again == {n: (pid, "re-attached") for n, (pid, _) in engines.items()}   # same processes
        assert [_answer(f"127.0.0.1:{port}") for _ in range(6)] == [6] * 6
        replica = int(re.search(r"pdserve router replicas: pids (\d+)", second.log.read_text())[1])
        os.kill(replica, signal.SIGKILL)                    # one router of two dies
        assert wait_until(lambda: not _alive(replica), 10)
        # gRPC clients share connections: one still open to the dead router fails, and is resent
        assert [_answer(f"127.0.0.1:{port}", retries=3) for _ in range(6)] == [6] * 6
        second.proc.send_signal(signal.SIGTERM)             # graceful: the router exits, engines stay
        assert second.proc.wait(60) == 0
        assert all(_alive(pid) for pid, _ in engines.values())
        assert "keep running" in (tmp_path / "second.log").read_text()

        done = subprocess.run(stop, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0 and "stopped" in done.stdout, done.stdout + done.stderr
        assert wait_until(lambda: not any(_alive(pid) for pid, _ in engines.values()), 60)
        assert not list((tmp_path / "state").glob("*.head.json"))
    finally:
        for serve in (first, second):
            if serve is not None and serve.proc.poll() is None:
                serve.proc.kill()
        subprocess.run(stop, cwd=ROOT, env=env, capture_output=True, timeout=180)
    assert "no running deployment" in subprocess.run(stop, cwd=ROOT, env=env, capture_output=True, text=True,
                                                     timeout=60).stdout
