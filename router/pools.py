"""``WorkerPool``: one pool's workers, their last load snapshots, and its routing policy.

The router's poller calls ``refresh`` periodically; request handling calls ``pick``. A worker
whose actor is gone, or that has never answered (an engine still loading), is marked dead at once;
one that answered before but now does not (a busy machine, a stalled process) keeps its last
snapshot for ``STALL_S``, then is marked dead too; either way until a later refresh answers.

The progress watchdog: a worker that answers its polls while its engine completes no step, with
requests running, waiting or accepted, for ``progress_timeout_s`` is stalled (a hung step). It is
taken out of routing and replaced: asked to end itself and its engine processes, so Ray starts a fresh one
(``faults.max_restarts``), which rejoins once it answers.

Whenever a worker goes down or stalls, its ``lost`` future resolves: every request awaiting that
worker stops waiting (``router.legs.await_worker``) and takes its retry or migration path.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import ray

from pdserve.base.types import LoadSnapshot, NoInstanceError, RouteDecision
from router.admission import AdmissionQueue
from router.policies import Choice, Policy, RouteRequest

log = logging.getLogger("pdserve.router")
STALL_S = 6.0
"""A worker that does not answer its load polls for this long is taken out of routing."""
TERMINATE_TIMEOUT_S = 10.0
"""How long a stalled worker gets to end itself before Ray kills it (and restarts it)."""
POLL_TIMEOUT_S = 2.0
"""How long one poll of the workers' load may take (``refresh``'s default)."""


class WorkerPool:
    """A role's workers (objects with ``name`` and a Ray ``actor`` handle)."""

    def __init__(self, role: str, workers: Sequence[Any], policy: Policy,
                 on_decision: Callable[[RouteDecision], None] = lambda decision: None,
                 admission: AdmissionQueue | None = None, progress_timeout_s: float = 0.0,
                 eligible: Callable[[str], bool] | None = None) -> None:
        self.role, self.policy, self._on_decision = role, policy, on_decision
        self._eligible = eligible
        self.admission = admission
        """The router-side queue in front of this pool's prefills (prefill and colocated pools)."""
        self._workers = {w.name: w for w in workers}
        self._loads = {w.name: LoadSnapshot(instance=w.name) for w in workers}
        self._helper_turn = 0
        self._down_since: dict[str, float] = {}
        self._silent_since: dict[str, float] = {}
        self._answered: set[str] = set()
        self.recoveries: dict[str, tuple[int, float]] = {}
        """Per worker: times it came back after being down, and how long the last outage lasted (s)."""
        self.stalls: dict[str, int] = {}
        """Per worker: times the watchdog found it stalled and replaced it."""
        self._progress = ProgressClock(progress_timeout_s)
        """The watchdog's clock; its ``timeout_s`` bounds a busy engine's time without progress (0: off)."""
        self._stalled: dict[str, str] = {}  # name -> boot id of the stalled incarnation
        self._lost: dict[str, asyncio.Future] = {}
        self._replacing: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._workers)

    def snapshots(self) -> list[LoadSnapshot]:
        """Every worker's last snapshot with the admission queue's own accounting of the prefill
        work routed to it (uncached tokens, predicted seconds), dead ones included, in name order."""
        if self.admission is None:
            return [self._loads[n] for n in sorted(self._loads)]
        out = []
        for n in sorted(self._loads):
            tokens, seconds = self.admission.load(n)
            out.append(replace(self._loads[n], pending_prefill_tokens=tokens, queued_prefill_s=seconds))
        return out

    def live(self) -> list[LoadSnapshot]:
        """Snapshots of the live workers."""
        return [s for s in self.snapshots() if s.alive]

    def serves(self, name: str) -> bool:
        """Whether a worker currently serves this pool's phase: its role in an adaptive deployment
        (the ``eligible`` filter), always otherwise."""
        return self._eligible is None or self._eligible(name)

    def has(self, name: str) -> bool:
        """Whether this pool has a worker named ``name``."""
        return name in self._workers

    def snapshot(self, name: str) -> LoadSnapshot:
        """The last snapshot of the worker named ``name``."""
        return self._loads[name]

    def pick(self, request: RouteRequest, avoid: str = "") -> Any:
        """The worker the policy chooses among the live ones, other than ``avoid`` while another
        is live (an adaptive decode leaves its prompt's engine); NoInstanceError if none is live."""
        return self.choose(request, avoid)[0]

    def choose(self, request: RouteRequest, avoid: str = "") -> tuple[Any, Choice]:
        """Like ``pick``, with the policy's whole answer (reason, TTFT prediction)."""
        candidates = self.live()
        if not candidates:
            raise NoInstanceError(f"no live {self.role} instance")
        candidates = [s for s in candidates if self.serves(s.instance)] or candidates
        candidates = [s for s in candidates if s.instance != avoid] or candidates
        choice = self.policy.select(request, candidates)
        self.record_decision(self.policy.name, choice.instance, choice.reason)
        return self._workers[choice.instance], choice

    def record_decision(self, policy: str, instance: str, reason: str) -> None:
        """Count one decision about ``instance`` (the exporter's decision counters)."""
        self._on_decision(RouteDecision(self.role, policy, instance, reason))

    async def wait_live(self, timeout_s: float) -> None:
        """Return once a worker is live, waiting at most ``timeout_s`` (a restart, a stall);
        NoInstanceError at once for a pool without workers, or when the wait runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._workers and not self.live() and loop.time() < deadline:
            await asyncio.sleep(0.25)
        if not self.live():
            raise NoInstanceError(f"no live {self.role} instance")

    def helper(self) -> Any:
        """A live worker for side work (tokenization), in turn, without consulting the policy
        (so the policy's own state, e.g. a round-robin cursor, only sees real routing)."""
        candidates = self.live()
        if not candidates:
            raise NoInstanceError(f"no live {self.role} instance")
        self._helper_turn += 1
        return self._workers[candidates[self._helper_turn % len(candidates)].instance]

    def get(self, name: str) -> Any:
        """The worker named ``name``."""
        return self._workers[name]

    def mark_dead(self, name: str) -> None:
        """Take a worker out of routing until a refresh finds it alive."""
        self._lose(name, "failed")

    def lost(self, name: str) -> asyncio.Future:
        """A future that resolves, with the reason, when this worker goes down or stalls (called
        on the router's loop by ``router.legs.await_worker``); a worker back up gets a new one."""
        if name not in self._lost:
            self._lost[name] = asyncio.get_running_loop().create_future()
        return self._lost[name]

    def _lose(self, name: str, why: str) -> None:
        """Out of routing now, and only then the lost signal: a request it wakes retries at once and
        must not pick this worker again."""
        self._loads[name] = replace(self._loads[name], alive=False)
        if name not in self._down_since:
            log.warning("%s is out of routing: %s", name, why)
        self._down_since.setdefault(name, time.monotonic())
        future = self._lost.get(name)
        if future is not None and not future.done():
            future.set_result(why)

    async def refresh(self, timeout_s: float = POLL_TIMEOUT_S) -> None:
        """Poll every worker's load once, bounded by ``timeout_s``; run the progress watchdog;
        log and count recoveries."""
        names = list(self._workers)
        results = await asyncio.gather(*(self._poll(n, timeout_s) for n in names))
        now = time.monotonic()
        for name, snap in zip(names, results):
            snap = self._watch_progress(name, snap, now)
            if not snap.alive:
                self._lose(name, "reports its engine dead")
            elif name in self._down_since:
                outage = now - self._down_since.pop(name)
                self._lost.pop(name, None)
                count, _ = self.recoveries.get(name, (0, 0.0))
                self.recoveries[name] = (count + 1, outage)
                log.warning("%s is back after %.1f s", name, outage)
            self._loads[name] = snap

    def _watch_progress(self, name: str, snap: LoadSnapshot, now: float) -> LoadSnapshot:
        """``snap``, or it marked dead when the worker's engine stalled (then it is replaced) or is
        the stalled incarnation still answering before its replacement."""
        if not snap.alive or not self._progress.timeout_s or name in self._silent_since:
            return snap
        if self._stalled.get(name) == snap.boot:
            return replace(snap, alive=False)
        self._stalled.pop(name, None)
        why = self._progress.observe(name, snap, now)
        if not why:
            return snap
        self._stalled[name] = snap.boot
        self.stalls[name] = self.stalls.get(name, 0) + 1
        log.warning("%s: %s with %d request(s) accepted (last engine report: %d running, %d waiting); replacing it",
                    name, why, snap.accepted, snap.running, snap.waiting)
        self._lose(name, f"stalled ({why})")
        task = asyncio.get_running_loop().create_task(_terminate(self._workers[name]))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)
        return replace(snap, alive=False)

    async def _poll(self, name: str, timeout_s: float) -> LoadSnapshot:
        try:
            snap = await asyncio.wait_for(self._workers[name].actor.load.remote(), timeout_s)
            self._silent_since.pop(name, None)
            self._answered.add(name)
            return snap
        except TimeoutError:  # silent: one that answered before keeps its place for STALL_S
            since = self._silent_since.setdefault(name, time.monotonic())
            if name in self._answered and self._loads[name].alive and time.monotonic() - since < STALL_S:
                return self._loads[name]
            err_name = f"no answer for {time.monotonic() - since + timeout_s:.0f} s"
        except Exception as err:  # a dead actor: out of routing at once, not fatal
            err_name = type(err).__name__
        self._lose(name, f"stopped answering ({err_name})")
        return replace(self._loads[name], alive=False)


class ProgressClock:
    """Per worker, since when its engine has made no progress of each kind (the watchdog's
    clock): no step while it has requests (a hung step; ``timeout_s``), and no token computed
    while it has requests running (stepping without work done; 3 x ``timeout_s``, as a long
    prompt's prefill reports its tokens only when it ends)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._last: dict[str, tuple[str, int, int, float, float]] = {}  # boot, steps, tokens, since x 2

    def observe(self, name: str, snap: LoadSnapshot, now: float) -> str:
        """Record a fresh snapshot; the reason the engine counts as stalled, or ""."""
        boot, steps, tokens, step_since, token_since = self._last.get(name, (snap.boot, -1, -1, now, now))
        if boot != snap.boot:
            steps, tokens = -1, -1
        if snap.steps != steps or not (snap.running or snap.waiting or snap.accepted):
            step_since = now
        if snap.tokens != tokens or not snap.running:
            token_since = now
        self._last[name] = (snap.boot, snap.steps, snap.tokens, step_since, token_since)
        if now - step_since >= self.timeout_s:
            return f"no engine step for {now - step_since:.0f} s"
        if now - token_since >= 3 * self.timeout_s:
            return f"no token computed for {now - token_since:.0f} s"
        return ""


async def _terminate(worker: Any) -> None:
    """Have a stalled worker end itself and its engine processes (Ray restarts it); kill it through
    Ray if it does not within TERMINATE_TIMEOUT_S."""
    try:
        await asyncio.wait_for(worker.actor.terminate.remote(), TERMINATE_TIMEOUT_S)
    except TimeoutError:
        log.warning("%s did not end itself; killing it through Ray", worker.name)
        ray.kill(worker.actor, no_restart=False)
    except Exception:  # the actor exited during the call, as asked
        pass
