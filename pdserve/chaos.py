"""``pdserve chaos``: a deployment under steady load while its parts fail, and what became of every
request (docs/reliability.md).

It starts ``pdserve serve`` as operators do (its own process and Ray head, ``--name``), sends
Poisson load over gRPC, and on a schedule: SIGKILLs a decode worker and a prefill worker (with
their engine processes), stalls a decode engine (SIGSTOP of its engine processes while its actor
still answers: the router's progress watchdog must replace it), corrupts one KV transfer, black-holes a prefill worker (SIGSTOP of its
whole process tree, so its engine and KV server stop answering, then SIGCONT), and SIGKILLs the
router and starts it again. A client whose stream the router kill cut (UNAVAILABLE) resends the
request once the router is back; those requests are counted apart. After the load it waits for
every engine to be idle and reports leaked KV, each fault's time to recovery, and goodput against
the same load without faults.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from pdserve.client import build_request
from protos import pdserve_v1_pb2 as pb
from protos import pdserve_v1_pb2_grpc as pb_grpc

WORKER_FAULTS = ("decode", "prefill", "stall", "blackhole")
ALL_FAULTS = ("decode", "prefill", "stall", "corrupt", "blackhole", "router")
MAX_TOKENS = 24


@dataclass
class Outcome:
    """One request as its client saw it."""

    start: float
    end: float = 0.0
    status: str = ""
    """OK, or the gRPC status name of the failure."""
    tokens: int = 0
    resent: bool = False
    """Resent after the router kill cut it."""
    migrations: int = 0
    retries: int = 0


@dataclass
class Fault:
    """One injected fault: when, what, and when the deployment had recovered from it."""

    kind: str
    at: float
    until: float = 0.0
    """End of the fault's window (black-hole: SIGCONT; others: the injection itself)."""
    recovered_s: float | None = None
    detail: str = ""


@dataclass
class Run:
    """A chaos run's raw results."""

    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    duration_s: float = 0.0
    idle_after_s: float | None = None
    """Seconds after the load until every engine held no KV and ran nothing (None: never)."""


class ServeProcess:
    """``pdserve serve`` in a process of its own, and what it printed."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log, self.proc = args, log, None

    def start(self, timeout_s: float = 600.0) -> dict[str, int]:
        """Start and wait (bounded) until it serves; {engine: pid}."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", *self.args],
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text()[offset:]
            if "pdserve serving gRPC" in text:
                line = re.search(r"pdserve engines of '[^']+': (.*)", text)[1]
                return {m[0]: int(m[1]) for m in re.findall(r"(\S+) \(pid (\d+),", line)}
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"pdserve serve did not come up; see {self.log}")

    def kill(self) -> None:
        """SIGKILL the router process (the engines keep running)."""
        self.proc.kill()
        self.proc.wait(30)

    def terminate(self) -> None:
        """SIGTERM (drain) and wait, bounded."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class LoadClient:
    """Poisson load over one gRPC channel, as a robust client sends it: each call waits for the
    channel to be ready (bounded by its deadline) rather than failing while the router restarts,
    and a stream the router kill cut (UNAVAILABLE) is resent once."""

    def __init__(self, target: str, timeout_s: float, router_down: asyncio.Event) -> None:
        self.target, self.timeout_s, self.router_down = target, timeout_s, router_down
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.PdServeStub(self.channel)

    async def one(self, prompt: list[int], t0: float) -> Outcome:
        """Send one request (resent once, on a fresh channel, if the router kill cut it)."""
        out = Outcome(start=time.monotonic() - t0)
        try:
            await self._send(self.stub, prompt, out)
        except grpc.aio.AioRpcError as err:
            out.status = err.code().name
            if err.code() is grpc.StatusCode.UNAVAILABLE and self.router_down.is_set():
                out.resent, out.tokens = True, 0
                await self.wait_serving(120)
                async with grpc.aio.insecure_channel(self.target) as channel:
                    try:
                        await self._send(pb_grpc.PdServeStub(channel), prompt, out)
                    except grpc.aio.AioRpcError as again:
                        out.status = again.code().name
        out.end = time.monotonic() - t0
        return out

    async def _send(self, stub: pb_grpc.PdServeStub, prompt: list[int], out: Outcome) -> None:
        request = build_request(token_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
        async for msg in stub.Generate(request, timeout=self.timeout_s, wait_for_ready=True):
            out.tokens += len(msg.token_ids)
            if msg.final:
                out.migrations, out.retries = msg.decode_migrations, msg.prefill_retries
        out.status = "OK" if out.tokens == MAX_TOKENS else f"SHORT({out.tokens})"

    async def wait_serving(self, timeout_s: float) -> float | None:
        """Seconds until the router answers SERVING on a fresh channel (None: not within bound)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            try:
                async with grpc.aio.insecure_channel(self.target) as ch:
                    answer = await pb_grpc.PdServeStub(ch).Health(pb.HealthRequest(), timeout=2)
                if answer.status == pb.HealthResponse.SERVING:
                    return time.monotonic() - start
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.25)
        return None


def prompts(n: int, seed: int) -> list[list[int]]:
    """Distinct random-token prompts of 64-512 tokens (no prefix shared: every request transfers)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, 48_000) for _ in range(rng.randrange(64, 513))] for _ in range(n)]


def summary(run: Run, slo_ttft_s: float | None = None) -> dict:
    """The report of one run (JSON-ready)."""
    worker_windows = [(f.at, max(f.until, f.at)) for f in run.faults if f.kind in WORKER_FAULTS]
    during = [o for o in run.outcomes if any(o.start <= b and o.end >= a for a, b in worker_windows)]
    ok = [o for o in run.outcomes if o.status == "OK"]
    statuses: dict[str, int] = {}
    for o in run.outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    return {
        "requests": len(run.outcomes), "ok": len(ok), "statuses": statuses,
        "in_flight_during_worker_faults": len(during),
        "finished_during_worker_faults": sum(o.status == "OK" for o in during),
        "resent_after_router_kill": sum(o.resent for o in run.outcomes),
        "resent_ok": sum(o.resent and o.status == "OK" for o in run.outcomes),
        "decode_migrations": sum(o.migrations for o in run.outcomes),
        "prefill_retries": sum(o.retries for o in run.outcomes),
        "goodput_rps": len(ok) / run.duration_s if run.duration_s else 0.0,
        "duration_s": run.duration_s, "idle_after_s": run.idle_after_s,
        "faults": [asdict(f) for f in run.faults],
        "not_ok": [asdict(o) for o in run.outcomes if o.status != "OK"],
    }


def write(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
