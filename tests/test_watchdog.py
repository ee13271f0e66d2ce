"""The router's progress watchdog and its "lost worker" signal, on a WorkerPool whose actors are
fakes at the process boundary (a Ray actor handle's ``load`` and ``terminate``), on a fake clock.
The live version, a real engine stopped mid-request, is in tests/test_chaos.py."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pdserve.base.types import LoadSnapshot
from router import pools
from router.legs import WorkerFailedError, await_worker
from router.policies import make_policy

TIMEOUT_S = 10.0


class FakeActor:
    """Answers load polls with the snapshots it is given; records terminate calls."""

    def __init__(self, name: str) -> None:
        self.name, self.snapshot, self.terminated = name, LoadSnapshot(instance=name), 0
        self.load = SimpleNamespace(remote=self._load)
        self.terminate = SimpleNamespace(remote=self._terminate)

    async def _load(self) -> LoadSnapshot:
        return self.snapshot

    async def _terminate(self) -> None:
        self.terminated += 1


def poll(at: float, running: int = 0, waiting: int = 0, accepted: int = 0, steps: int = 0,
         boot: str = "a", tokens: int | None = None) -> tuple[float, LoadSnapshot]:
    """A snapshot at ``at`` s; unless given, ``tokens`` advances with ``steps``."""
    return at, LoadSnapshot("decode-0", running=running, waiting=waiting, accepted=accepted, steps=steps, boot=boot,
                            tokens=steps if tokens is None else tokens)


# (name, polls, expected alive after each poll, terminations)
CASES = [
    ("busy_and_stepping", [poll(0, 2, steps=1), poll(6, 2, steps=5), poll(12, 2, steps=9), poll(18, 2, steps=9)],
     [True, True, True, True], 0),
    ("busy_without_a_step", [poll(0, 2, steps=7), poll(6, 2, steps=7), poll(10, 2, steps=7)], [True, True, False], 1),
    ("only_waiting_counts_too", [poll(0, waiting=3, steps=7), poll(10, waiting=3, steps=7)], [True, False], 1),
    ("accepted_while_the_engine_stats_stopped", [poll(0, steps=7), poll(5, accepted=2, steps=7),
                                                 poll(10, accepted=2, steps=7)], [True, True, False], 1),
    ("idle_needs_no_step", [poll(0, steps=7), poll(30, steps=7)], [True, True], 0),
    ("stalled_stays_out_until_a_new_boot",
     [poll(0, 1, steps=3), poll(10, 1, steps=3), poll(20, 1, steps=3), poll(40, boot="b"), poll(45, 1, steps=1, boot="b")],
     [True, False, False, True, True], 1),
    ("stepping_without_a_token_for_three_timeouts",
     [poll(0, 2, steps=1, tokens=5), poll(20, 2, steps=50, tokens=5), poll(29, 2, steps=90, tokens=5),
      poll(30, 2, steps=99, tokens=5)], [True, True, True, False], 1),
    ("tokens_keep_a_stepping_engine_alive", [poll(0, 2, steps=1), poll(20, 2, steps=50), poll(40, 2, steps=90)],
     [True, True, True], 0),
    ("waiting_for_kv_computes_no_token", [poll(0, waiting=2, steps=1, tokens=5), poll(40, waiting=2, steps=900, tokens=5)],
     [True, True], 0),
    ("a_step_resets_the_clock", [poll(0, 1, steps=3), poll(9, 1, steps=4), poll(18, 1, steps=4), poll(19, 1, steps=4)],
     [True, True, True, False], 1),
]


@pytest.mark.parametrize("name,polls,alive,terminations", CASES, ids=[c[0] for c in CASES])
def test_watchdog(monkeypatch, name, polls, alive, terminations):
    clock = [0.0]
    monkeypatch.setattr(pools.time, "monotonic", lambda: clock[0])
    actor = FakeActor("decode-0")
    pool = pools.WorkerPool("decode", [SimpleNamespace(name="decode-0", actor=actor)], make_policy("decode_p2c"),
                            progress_timeout_s=TIMEOUT_S)

    async def run() -> list[bool]:
        seen = []
        for at, snapshot in polls:
            clock[0] = at
            actor.snapshot = snapshot
            await pool.refresh(1.0)
            await asyncio.sleep(0)  # let a replacement run
            seen.append(bool(pool.live()))
        return seen

    assert asyncio.run(run()) == alive
    assert actor.terminated == terminations and pool.stalls.get("decode-0", 0) == terminations
    if terminations and alive[-1]:
        assert pool.recoveries["decode-0"][0] == 1


def test_watchdog_off_never_replaces(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(pools.time, "monotonic", lambda: clock[0])
    actor = FakeActor("prefill-0")
    pool = pools.WorkerPool("prefill", [SimpleNamespace(name="prefill-0", actor=actor)], make_policy("round_robin"))
    actor.snapshot = LoadSnapshot("prefill-0", running=1, steps=3, boot="a")

    async def run() -> None:
        for at in (0, 100, 1000):
            clock[0] = at
            await pool.refresh(1.0)

    asyncio.run(run())
    assert pool.live() and actor.terminated == 0


@pytest.mark.parametrize("call", ["future", "coroutine"])  # a Ray ObjectRef is awaited as a task
@pytest.mark.parametrize("loss", ["stall", "mark_dead"])
def test_a_call_on_a_lost_worker_fails_over_at_once(monkeypatch, loss, call):
    """A request awaiting a worker stops waiting when the pool loses it (WorkerFailedError, which
    the dispatcher retries or migrates), whether the worker stalled or its actor failed."""
    clock = [0.0]
    monkeypatch.setattr(pools.time, "monotonic", lambda: clock[0])
    actor = FakeActor("decode-0")
    worker = SimpleNamespace(name="decode-0", actor=actor)
    pool = pools.WorkerPool("decode", [worker], make_policy("decode_p2c"), progress_timeout_s=TIMEOUT_S)
    actor.snapshot = LoadSnapshot("decode-0", running=1, steps=3, boot="a")

    async def run() -> str:
        await pool.refresh(1.0)
        never = asyncio.get_running_loop().create_future()        # a call that would never answer
        waiting = asyncio.create_task(await_worker(pool, worker, never if call == "future" else _wait(never)))
        await asyncio.sleep(0)
        if loss == "stall":
            clock[0] = TIMEOUT_S
            await pool.refresh(1.0)
        else:
            pool.mark_dead("decode-0")
        with pytest.raises(WorkerFailedError) as info:
            await asyncio.wait_for(waiting, 5)
        assert never.cancelled()                                    # the abandoned await is cancelled
        with pytest.raises(WorkerFailedError):                      # and later calls fail at once
            await await_worker(pool, worker, asyncio.get_running_loop().create_future())
        return str(info.value)

    message = asyncio.run(run())
    assert message.startswith("decode-0 ") and ("stalled" if loss == "stall" else "failed") in message


async def _wait(future: asyncio.Future) -> None:
    await future


def test_a_worker_is_out_of_routing_before_its_requests_are_woken():
    """A poll that finds a worker gone wakes the requests on it while the other polls of the same
    refresh still run: their retry must already see it out of routing (else it picks it again
    and burns every retry at once)."""
    slow, gone = FakeActor("decode-0"), FakeActor("decode-1")
    answer = asyncio.Event()

    async def slow_load() -> LoadSnapshot:
        await answer.wait()
        return slow.snapshot

    async def gone_load() -> LoadSnapshot:
        raise RuntimeError("actor died")

    slow.load, gone.load = SimpleNamespace(remote=slow_load), SimpleNamespace(remote=gone_load)
    workers = [SimpleNamespace(name="decode-0", actor=slow), SimpleNamespace(name="decode-1", actor=gone)]
    pool = pools.WorkerPool("decode", workers, make_policy("decode_p2c"))

    async def run() -> list[str]:
        waiting = asyncio.create_task(await_worker(pool, workers[1], asyncio.get_running_loop().create_future()))
        await asyncio.sleep(0)
        refresh = asyncio.create_task(pool.refresh(5.0))
        with pytest.raises(WorkerFailedError):
            await asyncio.wait_for(waiting, 5)
        live = [s.instance for s in pool.live()]                  # seen by the woken request's retry
        answer.set()
        await refresh
        return live

    assert asyncio.run(run()) == ["decode-0"]
