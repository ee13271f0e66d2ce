"""``RequestPaths``: a request's path through the engines in each deployment mode, called by the
``Dispatcher`` (``router.dispatch``), which owns the request's lifecycle (admission count, drain,
cleanup). Disaggregated: prefill instance, KV hand-off, decode instance. Colocated: one engine
serves both phases. Adaptive: the split rule decides per request.

Each path drives the request's state (QUEUED -> PREFILLING -> [TRANSFERRING ->] DECODING) and
records in ``legs`` what runs where, so that the dispatcher's cleanup can abort and release it;
a failed leg is retried here (see ``router.dispatch`` for the rules).
"""
from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from kv_transfer import control
from kv_transfer.handle import KvHandle
from pdserve.base.types import PrefillResult, RequestState
from router.calls import WorkerCalls
from router.legs import Legs, TokenEvent, WorkerFailedError, attempt_id, await_worker, retry_or_raise, worker_stream
from router.policies import RouteRequest
from router.pools import WorkerPool
from router.request import RouterRequest
from router.split import SplitRule


class RequestPaths:
    """The per-mode paths over the dispatcher's pools and worker calls. ``in_flight()`` counts the
    requests admitted and not ended; ``abandon(worker, engine_id)`` aborts a left attempt in the
    background."""

    def __init__(self, prefill: WorkerPool, decode: WorkerPool | None, split: SplitRule | None, calls: WorkerCalls,
                 retries: int, retry_wait_s: float, kv_renew_s: float, in_flight: Callable[[], int],
                 abandon: Callable[[Any, str], None]) -> None:
        self.prefill, self.decode, self.split, self.calls = prefill, decode, split, calls
        self.retries, self.retry_wait_s, self.kv_renew_s = retries, retry_wait_s, kv_renew_s
        self.in_flight, self.abandon = in_flight, abandon

    def steps(self, req: RouterRequest, route: RouteRequest, ids: list[int], legs: Legs) -> AsyncIterator[TokenEvent]:
        """The request's path in this deployment's mode."""
        if self.decode is None:
            return self.colocated(req, route, ids, legs)
        if self.split is not None:
            return self.adaptive(req, route, ids, legs)
        return self.disaggregated(req, route, ids, legs)

    async def colocated(self, req: RouterRequest, route: RouteRequest, ids: list[int],
                         legs: Legs) -> AsyncIterator[TokenEvent]:
        """One engine serves both phases (the colocated baseline); PREFILLING -> DECODING."""
        await self._admit(req, route, legs)
        async for event in self._whole(req, ids, legs):
            yield event

    async def adaptive(self, req: RouterRequest, route: RouteRequest, ids: list[int],
                        legs: Legs) -> AsyncIterator[TokenEvent]:
        """Admission picks the engine for the prompt; the split rule decides whether it serves the
        request whole or prefills it for a decode on another engine (``router.split``)."""
        await self._admit(req, route, legs)
        engine = legs.prefill.name
        others = sum(s.instance != engine and self.decode.serves(s.instance) for s in self.decode.live())
        decision = self.split.decide(legs.ticket.uncached, self.prefill.snapshot(engine), others, req.tpot_slo_ms,
                                     self.decode.serves(engine))
        self.prefill.record_decision("split", engine, decision.reason)
        steps = (self.disaggregated(req, route, ids, legs, admitted=True) if decision.disaggregate
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
        legs.ticket = self.prefill.admission.admit(route, req.priority, choice, req.ttft_slo_ms / 1e3, self.in_flight() - 1)
        legs.predicted_ttft_s = choice.predicted_ttft_s or legs.ticket.predicted_ttft_s
        legs.prefill = self.prefill.get(await self.prefill.admission.dispatched(legs.ticket))
        if req.state is RequestState.QUEUED:
            req.to(RequestState.PREFILLING)

    async def disaggregated(self, req: RouterRequest, route: RouteRequest, ids: list[int],
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
                self.abandon(legs.prefill, legs.prefill_id)
                legs.prefill_ref = legs.ticket = None
                await retry_or_raise(self.prefill, legs.prefill_retries, self.retries, self.retry_wait_s, err)
                legs.prefill_retries += 1
                continue
            self.prefill.admission.finish(legs.ticket, result.prefill_ms / 1e3, result.num_cached_tokens)
            legs.prefill_ref = None
            return result

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
                self.abandon(legs.decode, legs.decode_id)
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
