"""``Dispatcher``: runs one request through prefill, KV hand-off and decode, as a stream of events.

Called by the front ends (gRPC, HTTP) per request. It owns the request's lifecycle (the count of
requests in flight, drain, cleanup); the path in each deployment mode is ``router.paths``. It
drives the request's state machine and,
whatever way the request ends (finished, cancelled, deadline, worker failure), leaves no engine
holding its blocks: it aborts the running leg and releases KV that no decode instance took over.

A failed leg is survived, transparently to the client, up to ``retries`` times per leg:
- a prefill that fails before the first token runs again on another live prefill instance (or on
  the restarted one, waiting at most ``retry_wait_s`` for one to come up);
- a decode that fails before it produced a token restarts on another decode instance with the same
  KV handle (loaded while its hold lasts, recomputed otherwise);
- a decode that fails mid-stream continues on another decode instance from the prompt plus every
  token already streamed (a recompute migration): one stream, no token repeated or skipped.

The router owns a request's held KV from the prefill's result until the decode's first output
(which comes after its load): meanwhile it renews the hold every third of a lease, so a decode
queued longer than the lease still finds its KV, and a router that dies stops renewing, so the
lease frees the blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Callable

from kv_transfer import control
from kv_transfer.handle import KvHandle
from pdserve.base.types import LoadSnapshot, ModelInfo, NoInstanceError, RequestRecord, RequestState
from router.legs import (FinalEvent, Legs, TokenEvent, WorkerFailedError, final_event, log_end, quiet, request_record,
                         router_block_tokens, terminal_state)
from router.calls import make_calls
from router.paths import RequestPaths
from router.pools import WorkerPool
from router.prepare import RequestPreparer
from router.request import RouterRequest
from router.split import SplitRule
from router.tokenizer import PromptTokenizer

log = logging.getLogger("pdserve.router")
_CLEANUP_TIMEOUT_S = 10.0
_CUT = object()  # ``_next``'s answer for a request the drain cut

__all__ = ["Dispatcher", "FinalEvent", "TokenEvent", "WorkerFailedError", "router_block_tokens"]


class Dispatcher:
    """The request path: over two pools (disaggregated), over one pool of engines that serve
    both phases (colocated: ``decode`` is None), or over two pools of the same ``kv_both``
    engines, disaggregating per request as ``split`` decides (adaptive)."""

    def __init__(self, prefill: WorkerPool, decode: WorkerPool | None, model: ModelInfo, default_max_tokens: int,
                 record: Callable[[RequestRecord], None] = lambda rec: None, router_block: int = 0,
                 retries: int = 2, retry_wait_s: float = 60.0, kv_lease_s: float = 60.0,
                 tokenizer: PromptTokenizer | None = None, split: SplitRule | None = None,
                 worker_calls: str = "tcp") -> None:
        self.prefill, self.decode, self.split = prefill, decode, split
        self.calls = make_calls(worker_calls, self._snapshot)
        """How request calls reach the workers (``router.calls``)."""
        self.preparer = RequestPreparer(prefill, model, default_max_tokens, router_block, tokenizer, retries,
                                        retry_wait_s)
        self._record = record
        self.in_flight = 0
        """Requests admitted and not yet ended (the admission bound counts them)."""
        self.draining = False
        """Set by ``drain``: new requests are refused (UNAVAILABLE)."""
        self.cutting = False
        """Set by ``drain`` when its grace ended: every request still running ends its stream
        with ``FinalEvent.cut`` (finish reason ``shutdown``)."""
        self._consumers: dict[int, asyncio.Task] = {}
        """The tasks awaiting a request's next event, by request (``_next``)."""
        self._cut: set[asyncio.Task] = set()
        """The tasks ``drain`` cancelled to cut their requests."""
        self._abandoned: set[asyncio.Task] = set()
        self.paths = RequestPaths(prefill, decode, split, self.calls, retries, retry_wait_s, kv_lease_s / 3,
                                  lambda: self.in_flight, self._abandon)
        """The request's path in this deployment's mode (``router.paths``)."""

    def _snapshot(self, name: str) -> LoadSnapshot:
        """A worker's last load snapshot, from the pool that polls it (``self.calls``' lookup)."""
        pool = self.prefill if self.decode is None or self.prefill.has(name) else self.decode
        return pool.snapshot(name)

    @property
    def pools(self) -> list[WorkerPool]:
        """The pools requests go through: prefill and decode, or the one colocated pool."""
        return [p for p in (self.prefill, self.decode) if p is not None]

    async def run(self, req: RouterRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
        """Stream the request's events, the last a ``FinalEvent`` (finish reason ``shutdown`` if
        the router's drain cut it); raises InvalidRequestError, OverloadedError, NoInstanceError
        (or WorkerFailedError), or CancelledError, after cleaning up."""
        if self.draining:
            raise NoInstanceError("the router is shutting down; retry (on another replica)")
        legs, sent, event = Legs(), 0, None
        self.in_flight += 1
        try:
            async with contextlib.aclosing(self._run(req, legs)) as events:
                while (event := await self._next(events, legs)) is not None and event is not _CUT:
                    sent += len(getattr(event, "token_ids", ()))
                    yield event
            if event is _CUT:
                log_end(req, legs, asyncio.CancelledError("cut by the router's shutdown"))
                req.to(RequestState.CANCELLED)
                yield FinalEvent.cut(sent)
        except BaseException as err:
            if not req.state.terminal:
                log_end(req, legs, err)
                req.to(terminal_state(err))
            raise
        finally:
            self.in_flight -= 1
            await asyncio.shield(self._cleanup(req, legs))
            self._record(request_record(req, legs))

    async def _next(self, events: AsyncIterator, legs: Legs) -> Any:
        """The request's next event, None at its end, or ``_CUT`` once ``drain`` cut it. Only while
        the consumer awaits here may ``drain`` cancel its task: between events the consumer is in
        its front end's code (writing to the client), where a cancel would break the stream."""
        if self.cutting:
            return _CUT
        task = asyncio.current_task()
        self._consumers[id(legs)] = task
        try:
            return await anext(events, None)
        except asyncio.CancelledError:
            if task not in self._cut:
                raise
            task.uncancel()
            return _CUT
        finally:
            self._consumers.pop(id(legs), None)

    async def drain(self, grace_s: float, settle_s: float = 10.0) -> int:
        """Refuse new requests, let running ones end within ``grace_s``, then cut the rest (each
        stream ends with ``FinalEvent.cut``) and wait, bounded, for their cleanup. Called once, by
        ``RouterServer.stop``; returns how many requests were cut."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        cut = self.in_flight
        if cut:
            self.cutting = True
            self._cut = set(self._consumers.values())
            for task in self._cut:
                task.cancel("pdserve router shutdown")
            deadline = loop.time() + settle_s
            while self.in_flight and loop.time() < deadline:
                await asyncio.sleep(0.05)
        return cut

    async def _run(self, req: RouterRequest, legs: Legs) -> AsyncIterator[TokenEvent | FinalEvent]:
        route, ids = await self.preparer.prepare(req)
        async for event in self.paths.steps(req, route, ids, legs):
            yield event
        req.to(RequestState.FINISHED)
        yield final_event(req, legs)

    def _abandon(self, worker: Any, engine_id: str) -> None:
        """Abort, in the background, an attempt a failure made us leave: a worker that stalled or
        stopped answering may run again, and must not run it for nobody."""
        abort = asyncio.wait_for(self.calls.abort(worker, engine_id), _CLEANUP_TIMEOUT_S)
        task = asyncio.get_running_loop().create_task(quiet(abort))
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)

    async def _cleanup(self, req: RouterRequest, legs: Legs) -> None:
        """Abort what still runs and release KV nobody took over (bounded)."""
        if legs.ticket is not None:
            self.prefill.admission.finish(legs.ticket)
        try:
            async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
                if legs.prefill_ref is not None:
                    await quiet(self.calls.abort(legs.prefill, legs.prefill_id))
                    late = await quiet(legs.prefill_ref)  # it may have finished before the abort
                    legs.handle = KvHandle.from_params(getattr(late, "kv_params", None))
                if legs.handle is not None:
                    await asyncio.to_thread(control.release, legs.handle)
                if legs.decode is not None and not legs.decode_done:
                    await quiet(self.calls.abort(legs.decode, legs.decode_id))
        except TimeoutError:
            log.warning("cleanup of %s timed out", req.request_id)

