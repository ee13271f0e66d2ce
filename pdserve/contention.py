"""How much two engines on one host slow each other, measured for the simulator (``pdserve
profile``; the ``contention`` section of a CPU profile, read by ``pdserve.sim.host``).

The profiled engine runs on core 0; a neighbour engine, a process of its own on core 1 (as a
deployment's second worker would be), is switched between loads over its stdin: ``idle``,
``decode B`` (B requests decoding without end) and ``prefill`` (512-token prompts back to back).
Under each load the profiled engine times a reference prefill and a reference decode step, each
next to the same measurement with the neighbour idle, alternating, so the VM's drift over the
run falls on both sides of every ratio.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from pdserve.base import env
from pdserve.base.config import EngineConfig
from pdserve.base.types import SamplingSpec

NEIGHBOUR_BATCHES = (1, 4, 16)
REFERENCE_PREFILL = 512
REFERENCE_DECODE = (8, 128)
"""(batch, context) of the profiled engine's reference decode step."""
ROUNDS = 3
READY = "ready"


async def measure(host: Any, cfg: EngineConfig, model: str) -> dict:
    """The ``contention`` section: the profiled engine's slowdown (loaded / idle neighbour) per
    neighbour load. Starts and ends the neighbour process."""
    neighbour = Neighbour([sys.executable, "-m", "pdserve.contention", model, json.dumps(dataclasses.asdict(cfg))])
    try:
        loads = [f"decode {b}" for b in NEIGHBOUR_BATCHES] + ["prefill"]
        ratios = {load: await _ratios(host, neighbour, load) for load in loads}
    finally:
        neighbour.close()
    return {"neighbour_decode_batches": list(NEIGHBOUR_BATCHES),
            "prefill_vs_decoding": [ratios[f"decode {b}"][0] for b in NEIGHBOUR_BATCHES],
            "decode_vs_decoding": [ratios[f"decode {b}"][1] for b in NEIGHBOUR_BATCHES],
            "prefill_vs_prefilling": ratios["prefill"][0], "decode_vs_prefilling": ratios["prefill"][1],
            "reference": {"prefill_tokens": REFERENCE_PREFILL, "decode_batch_context": list(REFERENCE_DECODE)}}


async def _ratios(host: Any, neighbour: Neighbour, load: str) -> tuple[float, float]:
    """(prefill, decode step) medians under ``load`` over those with the neighbour idle."""
    from pdserve.profile import _decode_step_s, _prefill_s

    times: dict[str, list[tuple[float, float]]] = {"idle": [], load: []}
    for _, state in itertools.product(range(ROUNDS), ("idle", load)):
        neighbour.switch(state)
        times[state].append((await _prefill_s(host, REFERENCE_PREFILL), await _decode_step_s(host, *REFERENCE_DECODE)))
    neighbour.switch("idle")
    return tuple(statistics.median(t[k] for t in times[load]) / statistics.median(t[k] for t in times["idle"])
                 for k in (0, 1))


class Neighbour:
    """The neighbour engine's process (``python -m pdserve.contention MODEL ENGINE_JSON``), driven
    line by line: each load on a line of its stdin, acknowledged by a ``ready`` line on its stdout
    (its other lines are its log). Every wait is bounded by ``timeout_s``."""

    def __init__(self, command: list[str], timeout_s: float = 300.0) -> None:
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     start_new_session=True)  # a group of its own: its engine core with it
        self.timeout_s, self._pending = timeout_s, b""
        try:
            self._await_ready()
        except RuntimeError:
            self.close(graceful=False)
            raise

    def switch(self, load: str) -> None:
        """Change the neighbour's load; returns once the new load runs."""
        try:
            self.proc.stdin.write(load + "\n")
        except OSError as err:  # the neighbour has gone: its pipe is closed
            raise RuntimeError(f"the contention neighbour has exited (code {self.proc.poll()})") from err
        self._await_ready()

    def _await_ready(self) -> None:
        """Read the neighbour's stdout up to its next READY line (other lines are its log), bounded."""
        deadline = time.monotonic() + self.timeout_s
        while (line := self._readline(deadline)) != READY:
            if line is None:
                raise RuntimeError(f"the contention neighbour did not answer in {self.timeout_s:.0f} s "
                                   f"(exit code {self.proc.poll()})")

    def _readline(self, deadline: float) -> str | None:
        """The next line of the neighbour's stdout, stripped; None at its end or past ``deadline``
        (read from the pipe unbuffered, so a line already read is never waited for again)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode(errors="replace").strip()

    def close(self, graceful: bool = True) -> None:
        """End the neighbour and its engine core (ours: started by ``__init__``). ``graceful``: its
        stdin closes, so it shuts its engine down, for up to 30 s; what is left of its process
        group is then killed (a killed neighbour would leave its engine core behind)."""
        if graceful and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


# ---- the neighbour process -----------------------------------------------------------------------

async def _neighbour(model: str, cfg: EngineConfig) -> None:
    from pdserve.engine.host import EngineHost

    host = EngineHost(cfg, model, "colocated")
    loop, task, serial = asyncio.get_running_loop(), None, itertools.count()
    try:
        print(READY, flush=True)
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            task = asyncio.create_task(_load(host, line, serial)) if line != "idle" else None
            await asyncio.sleep(0.5)  # the load is running before the next measurement starts
            print(READY, flush=True)
    finally:
        host.shutdown()


async def _load(host: Any, load: str, serial: itertools.count) -> None:
    """Run ``load`` until cancelled: ``decode B`` or ``prefill``."""
    if load == "prefill":
        while True:
            n = next(serial)
            ids = [(11 * i + n) % 30000 + 100 for i in range(REFERENCE_PREFILL)]
            async for _ in host.stream(f"neighbour-p{n}", ids, SamplingSpec(max_tokens=1), 1):
                pass
    batch = int(load.split()[1])
    await asyncio.gather(*(_decode_forever(host, serial) for _ in range(batch)))


async def _decode_forever(host: Any, serial: itertools.count) -> None:
    spec, steps = SamplingSpec(max_tokens=host.cfg.max_model_len // 2, ignore_eos=True), host.cfg.max_model_len // 2
    while True:
        n = next(serial)
        ids = [(13 * i + n) % 30000 + 100 for i in range(REFERENCE_DECODE[1])]
        async for _ in host.stream(f"neighbour-d{n}", ids, spec, steps):
            pass


if __name__ == "__main__":
    env.apply(env.worker_process_env(1, EngineConfig(**json.loads(sys.argv[2])).kv_cache_gib))
    asyncio.run(_neighbour(sys.argv[1], EngineConfig(**json.loads(sys.argv[2]))))
