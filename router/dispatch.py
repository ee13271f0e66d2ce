"""``Dispatcher``: runs one request through prefill, KV hand-off and decode, as a stream of events.

Called by the front ends (gRPC, HTTP) per request. It drives the request's state machine and,
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
import logging
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from kv_transfer import control
from kv_transfer.handle import KvHandle
from pdserve.base.types import LoadSnapshot, ModelInfo, NoInstanceError, PrefillResult, RequestRecord, RequestState
from router.legs import (FinalEvent, Legs, TokenEvent, WorkerFailedError, attempt_id, await_worker, final_event,
                         log_end, quiet, request_record, retry_or_raise, router_block_tokens, terminal_state,
                         worker_stream)
from router.calls import make_calls
from router.policies import RouteRequest
from router.pools import WorkerPool
from router.prepare import RequestPreparer
from router.request import RouterRequest
from router.split import SplitRule
from router.tokenizer import PromptTokenizer

log = logging.getLogger("pdserve.router")
_CLEANUP_TIMEOUT_S = 10.0

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
        self.retries, self.retry_wait_s = retries, retry_wait_s
        self.kv_renew_s = kv_lease_s / 3
        self._record = record
        self.in_flight = 0
        """Requests admitted and not yet ended (the admission bound counts them)."""
        self.draining = False
        """Set by ``drain``: new requests are refused (UNAVAILABLE)."""
        self.cutting = False
        """Set by ``drain`` when its grace ended: the consumers of the requests still running are
        cancelled, and each ends its stream with ``FinalEvent.cut``."""
        self._consumers: dict[int, asyncio.Task] = {}
        self._abandoned: set[asyncio.Task] = set()

    def _snapshot(self, name: str) -> LoadSnapshot:
        """A worker's last load snapshot, from the pool that polls it (``self.calls``' lookup)."""
        pool = self.prefill if self.decode is None or self.prefill.has(name) else self.decode
        return pool.snapshot(name)

    @property
    def pools(self) -> list[WorkerPool]:
        """The pools requests go through: prefill and decode, or the one colocated pool."""
        return [p for p in (self.prefill, self.decode) if p is not None]

    def _steps(self, req: RouterRequest, route: RouteRequest, ids: list[int],
               legs: Legs) -> AsyncIterator[TokenEvent]:
        """The request's path in this deployment's mode."""
        if self.decode is None:
            return self._colocated(req, route, ids, legs)
        if self.split is not None:
            return self._adaptive(req, route, ids, legs)
        return self._disaggregated(req, route, ids, legs)

    async def run(self, req: RouterRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
        """Stream the request's events; raises InvalidRequestError, OverloadedError,
        NoInstanceError (or WorkerFailedError), or CancelledError, after cleaning up."""
        if self.draining:
            raise NoInstanceError("the router is shutting down; retry (on another replica)")
        legs = Legs()
        self.in_flight += 1
        self._consumers[id(legs)] = asyncio.current_task()  # the task iterating us, for ``drain``
        try:
            async for event in self._run(req, legs):
                yield event
                self._consumers[id(legs)] = asyncio.current_task()
        except BaseException as err:
            if not req.state.terminal:
                log_end(req, legs, err)
                req.to(terminal_state(err))
            raise
        finally:
            self.in_flight -= 1
            self._consumers.pop(id(legs), None)
            await asyncio.shield(self._cleanup(req, legs))
            self._record(request_record(req, legs))

    async def drain(self, grace_s: float, settle_s: float = 10.0) -> int:
        """Refuse new requests, let running ones end within ``grace_s``, then cut the rest (their
        consumers end each stream with ``FinalEvent.cut``) and wait, bounded, for their cleanup.
        Called once, by ``RouterServer.stop``; returns how many requests were cut."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        cut = self.in_flight
        if cut:
            self.cutting = True
            for task in list(self._consumers.values()):
                task.cancel("pdserve router shutdown")
            deadline = loop.time() + settle_s
            while self.in_flight and loop.time() < deadline:
                await asyncio.sleep(0.05)
        return cut

    async def _run(self, req: RouterRequest, legs: Legs) -> AsyncIterator[TokenEvent | FinalEvent]:
        route, ids = await self.preparer.prepare(req)
        async for event in self._steps(req, route, ids, legs):
            yield event
        req.to(RequestState.FINISHED)
        yield final_event(req, legs)

    async def _colocated(self, req: RouterRequest, route: RouteRequest, ids: list[int],
                         legs: Legs) -> AsyncIterator[TokenEvent]:
        """One engine serves both phases (the colocated baseline); PREFILLING -> DECODING."""
        await self._admit(req, route, legs)
        async for event in self._whole(req, ids, legs):
            yield event

    async def _adaptive(self, req: RouterRequest, route: RouteRequest, ids: list[int],
                        legs: Legs) -> AsyncIterator[TokenEvent]:
        """Admission picks the engine for the prompt; the split rule decides whether it serves the
        request whole or prefills it for a decode on another engine (``router.split``)."""
        await self._admit(req, route, legs)
        engine = legs.prefill.name
        others = sum(s.instance != engine and self.decode.serves(s.instance) for s in self.decode.live())
        decision = self.split.decide(legs.ticket.uncached, self.prefill.snapshot(engine), others, req.tpot_slo_ms,
                                     self.decode.serves(engine))
        self.prefill.record_decision("split", engine, decision.reason)
        steps = (self._disaggregated(req, route, ids, legs, admitted=True) if decision.disaggregate
                 else self._whole(req, ids, legs))
        async for event in steps:
            yield event

    async def _whole(self, req: RouterRequest, ids: list[int], legs: Legs) -> AsyncIterator[TokenEvent]:
        """The admitted request, whole, on its prefill engine (``generate``)."""
        legs.decode = legs.prefill
        legs.decode_id = attempt_id(req.request_id)
        stream = self.calls.generate(legs.prefill, legs.decode_id, ids, req.sampling)
        async for chunk in worker_stream(self.prefill, legs.prefill, stream):
            if req.state is RequestState.PREFILLING and chunk.token_ids:
                req.mark("first_token")
                req.to(RequestState.DECODING)
                prefill_ms = req.since_arrival_ms("first_token") - req.since_arrival_ms(RequestState.PREFILLING.value)
                legs.result = PrefillResult(chunk.token_ids[0], chunk.text, None, None, len(ids), 0, prefill_ms)
                self.prefill.admission.finish(legs.ticket, prefill_ms / 1e3)
            if chunk.token_ids or chunk.text:
                legs.tokens_sent(len(chunk.token_ids))
                yield TokenEvent(chunk.token_ids, chunk.text)
            legs.finish = chunk.finish_reason or legs.finish
        legs.decode_done = True

    async def _admit(self, req: RouterRequest, route: RouteRequest, legs: Legs) -> None:
        """Route the prefill, queue it in the router until its engine has room (QUEUED ->
        PREFILLING); raises OverloadedError when admission refuses it."""
        await self.prefill.wait_live(self.retry_wait_s)
        worker, choice = self.prefill.choose(route)
        legs.ticket = self.prefill.admission.admit(route, req.priority, choice, req.ttft_slo_ms / 1e3, self.in_flight - 1)
        legs.predicted_ttft_s = choice.predicted_ttft_s or legs.ticket.predicted_ttft_s
        legs.prefill = self.prefill.get(await self.prefill.admission.dispatched(legs.ticket))
        if req.state is RequestState.QUEUED:
            req.to(RequestState.PREFILLING)

    async def _disaggregated(self, req: RouterRequest, route: RouteRequest, ids: list[int],
                             legs: Legs, admitted: bool = False) -> AsyncIterator[TokenEvent]:
        """Prefill instance, KV hand-off, decode instance (``admitted``: the first prefill attempt's
        engine is already chosen and dispatched)."""
        result = legs.result = await self._prefill(req, route, ids, legs, admitted)
        legs.handle = KvHandle.from_params(result.kv_params)
        req.mark("first_token")
        legs.tokens_sent(1)
        legs.sent.append(result.token_id)
        yield TokenEvent((result.token_id,), result.text)
        legs.finish = result.finish_reason or "length"
        if legs.handle is not None:
            async for chunk in self._decode(req, route, ids, result, legs):
                if chunk.token_ids or chunk.text:
                    legs.tokens_sent(len(chunk.token_ids))
                    legs.sent += chunk.token_ids
                    yield TokenEvent(chunk.token_ids, chunk.text)
                legs.finish, legs.kv = chunk.finish_reason or legs.finish, chunk.kv or legs.kv

    async def _prefill(self, req: RouterRequest, route: RouteRequest, ids: list[int], legs: Legs,
                       admitted: bool = False) -> PrefillResult:
        """The prefill call, retried on a worker failure (the client has seen nothing yet)."""
        while True:
            if not admitted:
                await self._admit(req, route, legs)
            admitted = False
            legs.prefill_id = attempt_id(req.request_id)
            legs.prefill_ref = self.calls.prefill(legs.prefill, legs.prefill_id, ids, req.sampling,
                                                  route.max_tokens > 1)
            try:
                result = await await_worker(self.prefill, legs.prefill, legs.prefill_ref)
            except WorkerFailedError as err:
                self.prefill.admission.finish(legs.ticket)
                self._abandon(legs.prefill, legs.prefill_id)
                legs.prefill_ref = legs.ticket = None
                await retry_or_raise(self.prefill, legs.prefill_retries, self.retries, self.retry_wait_s, err)
                legs.prefill_retries += 1
                continue
            self.prefill.admission.finish(legs.ticket, result.prefill_ms / 1e3, result.num_cached_tokens)
            legs.prefill_ref = None
            return result

    def _abandon(self, worker: Any, engine_id: str) -> None:
        """Abort, in the background, an attempt a failure made us leave: a worker that stalled or
        stopped answering may run again, and must not run it for nobody."""
        abort = asyncio.wait_for(self.calls.abort(worker, engine_id), _CLEANUP_TIMEOUT_S)
        task = asyncio.get_running_loop().create_task(quiet(abort))
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)

    async def _decode(self, req: RouterRequest, route: RouteRequest, ids: list[int], result: PrefillResult,
                      legs: Legs) -> AsyncIterator:
        """The decode stream, continued on another instance after a worker failure: with the same KV
        handle if nothing was decoded yet, else from the prompt plus every token already sent."""
        kv_params, spec = result.kv_params, req.sampling
        legs.decode_id = attempt_id(req.request_id)
        while True:
            prompt, first = ids + legs.sent[:-1], legs.sent[-1]
            await self.decode.wait_live(self.retry_wait_s)
            legs.decode = self.decode.pick(route, avoid=legs.prefill.name if self.split else "")
            if req.state is RequestState.PREFILLING:
                req.to(RequestState.TRANSFERRING)
            stream = self.calls.decode(legs.decode, legs.decode_id, prompt, first, spec, kv_params)
            renewal = asyncio.create_task(self._renew_hold(legs)) if kv_params is not None else None
            try:
                async for chunk in worker_stream(self.decode, legs.decode, stream):
                    if req.state is RequestState.TRANSFERRING:
                        req.to(RequestState.DECODING)
                    legs.handle = None  # the decode loaded (and released) the KV, or recomputed it
                    yield chunk
                legs.decode_done = True
                return
            except WorkerFailedError as err:
                self._abandon(legs.decode, legs.decode_id)
                await retry_or_raise(self.decode, legs.decode_migrations, self.retries, self.retry_wait_s, err)
            finally:
                if renewal is not None:
                    renewal.cancel()
            legs.decode_migrations += 1
            legs.decode_id = attempt_id(f"{req.request_id}#migrated-{legs.decode_migrations}")
            if len(legs.sent) > 1:  # tokens were decoded: recompute from the prompt and them
                kv_params = None
                spec = replace(req.sampling, max_tokens=req.sampling.max_tokens - len(legs.sent) + 1)

    async def _renew_hold(self, legs: Legs) -> None:
        """The lease heartbeat: renew the held KV until the decode takes it over (its first output)
        or the sender no longer holds it."""
        while True:
            await asyncio.sleep(self.kv_renew_s)
            handle = legs.handle
            if handle is None or not await asyncio.to_thread(control.renew, handle):
                return

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

