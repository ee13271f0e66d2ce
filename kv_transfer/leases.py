"""The prefill side's KV holds: which blocks are kept for which decode, for how long, and who may
read them. Shared by every transport's server and by the control service (release, renew).

No torch and no gRPC here: the registry is plain data behind one lock.
"""
from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass, field

HOLD_WAIT_S = 5.0
"""How long a pull waits for the sender's engine to register the blocks it named in a handle."""
MAX_WAITING_PULLS = 8
"""Pulls that may wait for a hold at once, per server; more are refused (UNAVAILABLE) at once, so
calls for unknown ids (bogus or early) can never occupy every server thread."""


class PullRefused(RuntimeError):
    """A server refuses a pull before sending any byte; ``code`` is a gRPC status name
    (FAILED_PRECONDITION, NOT_FOUND, PERMISSION_DENIED, UNAVAILABLE, OUT_OF_RANGE)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass
class Hold:
    """One request's held blocks."""

    block_ids: list[int]
    deadline: float
    fault: str = ""
    secret: str = ""
    pulls: int = 0
    released: bool = False

    def allows(self, secret: str) -> bool:
        """Whether a call carrying ``secret`` may pull, renew or release these blocks."""
        return hmac.compare_digest(self.secret, secret)


@dataclass
class HeldKv:
    """Thread-safe registry of the KV blocks a prefill instance holds for decode instances.

    Written by the connector's worker side (``hold``, ``take_finished``) and by the servers'
    threads (``pin``/``unpin``, ``renew``, ``release``). An entry ends when released or when its
    lease expires while no pull is in flight; ``take_finished`` hands ended ids back to vLLM.
    """

    lease_s: float
    _entries: dict[str, Hold] = field(default_factory=dict)
    _early_releases: dict[str, tuple[float, str]] = field(default_factory=dict)  # id -> (forget after, secret)
    _ended: dict[str, float] = field(default_factory=dict)  # id -> forget after: pulls for it fail at once
    _lock: threading.Condition = field(default_factory=threading.Condition)
    ended: threading.Event = field(default_factory=threading.Event)
    """Set whenever a hold may have ended (a release, the end of a pull); cleared by its reader,
    the worker side's idle wait (``WorkerSide.transfer_results``)."""

    def hold(self, request_id: str, block_ids: list[int], fault: str = "", secret: str = "") -> None:
        """Start holding a finished prefill's blocks for one lease (already released if a release
        carrying this transfer's secret came first)."""
        with self._lock:
            entry = Hold(list(block_ids), time.monotonic() + self.lease_s, fault, secret)
            early = self._early_releases.pop(request_id, None)
            entry.released = early is not None and entry.allows(early[1])
            self._entries[request_id] = entry
            self._lock.notify_all()

    def known(self, request_id: str) -> bool:
        """Whether a hold for ``request_id`` has arrived (held, released, or ended within a lease)."""
        with self._lock:
            return request_id in self._entries or request_id in self._ended

    def pin(self, request_id: str, wait_s: float = 0.0) -> Hold | None:
        """Mark a pull in flight (the lease cannot expire under it); None if unknown or ended.

        Waits up to ``wait_s`` for the hold: the engine hands out a request's handle one engine
        step before its worker side registers the blocks, so a fast decode instance can ask first.
        """
        with self._lock:
            self._lock.wait_for(lambda: request_id in self._entries or request_id in self._ended, timeout=wait_s)
            entry = self._entries.get(request_id)
            if entry is None or entry.released:
                return None
            entry.pulls += 1
            return entry

    def unpin(self, request_id: str) -> None:
        """End a pull started by ``pin``."""
        with self._lock:
            if request_id in self._entries:
                self._entries[request_id].pulls -= 1
        self.ended.set()

    def renew(self, request_id: str, secret: str) -> float | None:
        """Extend a live hold by one lease from now (the router's heartbeat while its decode is
        queued); return the seconds granted, 0.0 when the id is not held, None for a wrong secret."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is None or entry.released:
                return 0.0
            if not entry.allows(secret):
                return None
            entry.deadline = time.monotonic() + self.lease_s
            return self.lease_s

    def release(self, request_id: str, secret: str = "") -> bool | None:
        """Mark the blocks free to reuse; False when the id is not held (yet: a hold that
        arrives later within one lease, with the same secret, starts released); None when the
        secret is wrong."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is None:
                self._early_releases[request_id] = (time.monotonic() + self.lease_s, secret)
                return False
            if not entry.allows(secret):
                return None
            entry.released = True
        self.ended.set()
        return True

    def take_finished(self, now: float | None = None) -> set[str]:
        """Remove and return ids released, or whose lease ran out with no pull in flight. An ended
        id is remembered for one lease, so a late pull for it is refused at once, not after
        HOLD_WAIT_S."""
        now = time.monotonic() if now is None else now
        with self._lock:
            done = {rid for rid, e in self._entries.items()
                    if (e.released or e.deadline <= now) and e.pulls == 0}
            for rid in done:
                del self._entries[rid]
                self._ended[rid] = now + self.lease_s
            for rid in [r for r, (forget, _) in self._early_releases.items() if forget <= now]:
                del self._early_releases[rid]
            for rid in [r for r, forget in self._ended.items() if forget <= now]:
                del self._ended[rid]
            return done

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class PullGate:
    """The checks every transport's server makes before it sends a byte, in order: the layout
    fingerprint, the hold (waiting for it bounded, and only so many at once), the secret, the
    block range. ``admit`` returns the pinned hold; the caller must ``held.unpin`` it."""

    def __init__(self, held: HeldKv, fingerprint: str) -> None:
        self.held, self._fingerprint = held, fingerprint
        self._waiting = threading.BoundedSemaphore(MAX_WAITING_PULLS)

    def admit(self, request_id: str, secret: str, fingerprint: str, first_block: int = 0,
              num_blocks: int = -1) -> Hold:
        """Pin ``request_id``'s hold for one pull, or raise PullRefused (nothing pinned then)."""
        self.check_fingerprint(fingerprint)
        entry = self._pin(request_id)
        try:
            if not entry.allows(secret):
                raise PullRefused("PERMISSION_DENIED", "wrong or missing transfer secret")
            end = len(entry.block_ids) if num_blocks < 0 else first_block + num_blocks
            if not 0 <= first_block <= end <= len(entry.block_ids):
                raise PullRefused("OUT_OF_RANGE", f"blocks {first_block}..{end} of {len(entry.block_ids)} held")
        except PullRefused:
            self.held.unpin(request_id)
            raise
        return entry

    def check_fingerprint(self, fingerprint: str) -> None:
        """PullRefused (FAILED_PRECONDITION) unless a receiver's layout fingerprint equals ours."""
        if fingerprint != self._fingerprint:
            raise PullRefused("FAILED_PRECONDITION", f"KV layout fingerprint mismatch: receiver "
                                                     f"{fingerprint or '(none)'}, sender {self._fingerprint}")

    def _pin(self, request_id: str) -> Hold:
        if self.held.known(request_id):
            entry = self.held.pin(request_id)
        elif self._waiting.acquire(blocking=False):
            try:
                entry = self.held.pin(request_id, HOLD_WAIT_S)
            finally:
                self._waiting.release()
        else:
            raise PullRefused("UNAVAILABLE", "too many pulls waiting for their holds")
        if entry is None:
            raise PullRefused("NOT_FOUND", f"no KV held for request {request_id}")
        return entry
