"""``Dispatcher``: runs one request through prefill, KV hand-off and decode, as a stream of events.

Called by the gRPC service per request. It drives the request's state machine and, whatever way
the request ends (finished, cancelled, deadline, worker failure), leaves no engine holding its
blocks: it aborts the running leg and releases KV that no decode instance took over.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

import ray

from kv_transfer import transport
from kv_transfer.handle import KvHandle
from pdserve.types import (InvalidRequestError, ModelInfo, NoInstanceError, Outcome, OverloadedError, PrefillResult,
                           RequestRecord, RequestState)
from router.policies import RouteRequest, block_hashes
from router.admission import Ticket
from router.pools import WorkerPool
from router.request import RouterRequest

log = logging.getLogger("pdserve.router")
_CLEANUP_TIMEOUT_S = 10.0


class WorkerFailedError(NoInstanceError):
    """A worker died or failed mid-request (gRPC UNAVAILABLE)."""


@dataclass(frozen=True)
class TokenEvent:
    """New tokens for the client."""

    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class FinalEvent:
    """The request ended normally; usage and timings."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_ms: float
    prefill_ms: float
    kv_transfer_ms: float
    kv_transfer_bytes: int
    ttft_ms: float
    e2e_ms: float
    prefill_instance: str
    decode_instance: str = ""
    prefill_reason: str = ""


@dataclass
class _Legs:
    """What of a request is outstanding on the workers (for cleanup) and what it produced (for
    its record)."""

    prefill: Any = None
    prefill_ref: Any = None
    handle: KvHandle | None = None
    decode: Any = None
    decode_done: bool = False
    result: Any = None
    finish: str = ""
    completion: int = 0
    kv: dict = field(default_factory=dict)
    gaps: list[float] = field(default_factory=list)
    last_token_at: float = 0.0
    predicted_ttft_s: float | None = None
    ticket: Ticket | None = None

    def tokens_sent(self, count: int) -> None:
        """Account ``count`` tokens sent now (gaps are spread evenly over a message's tokens)."""
        now = time.perf_counter()
        if self.completion and count:
            self.gaps += [(now - self.last_token_at) / count] * count
        self.completion += count
        self.last_token_at = now


class Dispatcher:
    """The request path: over two pools (disaggregated), or over one pool of engines that serve
    both phases (colocated: ``decode`` is None)."""

    def __init__(self, prefill: WorkerPool, decode: WorkerPool | None, model: ModelInfo, default_max_tokens: int,
                 record: Callable[[RequestRecord], None] = lambda rec: None, router_block: int = 0) -> None:
        self.prefill, self.decode = prefill, decode
        self.max_model_len = model.max_model_len
        self.router_block = router_block_tokens(model, router_block)
        self.default_max_tokens = default_max_tokens
        self._record = record
        self.in_flight = 0
        """Requests admitted and not yet ended (the admission bound counts them)."""

    @property
    def pools(self) -> list[WorkerPool]:
        """The pools requests go through: prefill and decode, or the one colocated pool."""
        return [p for p in (self.prefill, self.decode) if p is not None]

    async def run(self, req: RouterRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
        """Stream the request's events; raises InvalidRequestError, NoInstanceError (or
        WorkerFailedError), or CancelledError, after cleaning up."""
        legs = _Legs()
        self.in_flight += 1
        try:
            async for event in self._run(req, legs):
                yield event
        except BaseException as err:
            if not req.state.terminal:
                req.to(_terminal_state(err))
            raise
        finally:
            self.in_flight -= 1
            await asyncio.shield(self._cleanup(req, legs))
            self._record(_request_record(req, legs))

    async def _run(self, req: RouterRequest, legs: _Legs) -> AsyncIterator[TokenEvent | FinalEvent]:
        route, ids = await self._prepare(req)
        steps = self._disaggregated(req, route, ids, legs) if self.decode is not None else self._colocated(req, route, ids, legs)
        async for event in steps:
            yield event
        req.to(RequestState.FINISHED)
        yield self._final(req, legs)

    async def _colocated(self, req: RouterRequest, route: RouteRequest, ids: list[int],
                         legs: _Legs) -> AsyncIterator[TokenEvent]:
        """One engine serves both phases (the colocated baseline); PREFILLING -> DECODING."""
        await self._admit(req, route, legs)
        legs.decode = legs.prefill
        stream = legs.prefill.actor.generate.options(num_returns="streaming").remote(req.request_id, ids, req.sampling)
        async for ref in stream:
            chunk = await _await(self.prefill, legs.prefill, ref)
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

    async def _admit(self, req: RouterRequest, route: RouteRequest, legs: _Legs) -> None:
        """Route the prefill, queue it in the router until its engine has room (QUEUED ->
        PREFILLING); raises OverloadedError when admission refuses it."""
        worker, choice = self.prefill.choose(route)
        legs.ticket = self.prefill.admission.admit(route, req.priority, choice, req.ttft_slo_ms / 1e3, self.in_flight - 1)
        legs.predicted_ttft_s = choice.predicted_ttft_s or legs.ticket.predicted_ttft_s
        legs.prefill = self.prefill.get(await self.prefill.admission.dispatched(legs.ticket))
        req.to(RequestState.PREFILLING)

    async def _disaggregated(self, req: RouterRequest, route: RouteRequest, ids: list[int],
                             legs: _Legs) -> AsyncIterator[TokenEvent]:
        """Prefill instance, KV hand-off, decode instance."""
        await self._admit(req, route, legs)
        legs.prefill_ref = legs.prefill.actor.prefill.remote(req.request_id, ids, req.sampling, route.max_tokens > 1)
        result = legs.result = await _await(self.prefill, legs.prefill, legs.prefill_ref)
        self.prefill.admission.finish(legs.ticket, result.prefill_ms / 1e3, result.num_cached_tokens)
        legs.prefill_ref, legs.handle = None, KvHandle.from_params(result.kv_params)
        req.mark("first_token")
        legs.tokens_sent(1)
        yield TokenEvent((result.token_id,), result.text)
        legs.finish = result.finish_reason or "length"
        if legs.handle is not None:
            async for chunk in self._decode(req, route, ids, result, legs):
                if chunk.token_ids or chunk.text:
                    legs.tokens_sent(len(chunk.token_ids))
                    yield TokenEvent(chunk.token_ids, chunk.text)
                legs.finish, legs.kv = chunk.finish_reason or legs.finish, chunk.kv or legs.kv

    async def _prepare(self, req: RouterRequest) -> tuple[RouteRequest, list[int]]:
        """Tokenize on a live prefill worker and check the lengths against the context."""
        worker = self.prefill.helper()
        try:
            ids = await _await(self.prefill, worker, worker.actor.tokenize.remote(req.prompt))
        except InvalidRequestError:
            req.to(RequestState.REJECTED)
            raise
        room = self.max_model_len - len(ids)
        max_tokens = req.sampling.max_tokens or min(self.default_max_tokens, room)
        if max_tokens > room:
            req.to(RequestState.REJECTED)
            raise InvalidRequestError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                      f"context ({self.max_model_len})")
        req.sampling = replace(req.sampling, max_tokens=max_tokens)
        hashes = block_hashes(ids, self.router_block) if self.prefill.policy.uses_prefix else ()
        route = RouteRequest(req.request_id, hashes, len(ids), max_tokens, req.ttft_slo_ms, req.tpot_slo_ms,
                             req.priority)
        return route, ids

    async def _decode(self, req: RouterRequest, route: RouteRequest, ids: list[int], result: Any,
                      legs: _Legs) -> AsyncIterator[Any]:
        legs.decode = self.decode.pick(route)
        req.to(RequestState.TRANSFERRING)
        stream = legs.decode.actor.decode.options(num_returns="streaming").remote(
            req.request_id, ids, result.token_id, req.sampling, result.kv_params)
        legs.handle = None  # the decode instance now owns the KV: it releases it after loading
        try:
            async for ref in stream:
                chunk = await _await(self.decode, legs.decode, ref)
                if req.state is RequestState.TRANSFERRING:
                    req.to(RequestState.DECODING)
                yield chunk
        except ray.exceptions.RayError as err:
            self.decode.mark_dead(legs.decode.name)
            raise WorkerFailedError(f"{legs.decode.name} failed: {type(err).__name__}") from None
        legs.decode_done = True

    def _final(self, req: RouterRequest, legs: _Legs) -> FinalEvent:
        result, kv = legs.result, legs.kv
        return FinalEvent(
            finish_reason=legs.finish, prompt_tokens=result.num_prompt_tokens, completion_tokens=legs.completion,
            cached_tokens=result.num_cached_tokens, queue_ms=req.since_arrival_ms(RequestState.PREFILLING.value),
            prefill_ms=result.prefill_ms, kv_transfer_ms=kv.get("ms", 0.0), kv_transfer_bytes=kv.get("bytes", 0),
            ttft_ms=req.since_arrival_ms("first_token"), e2e_ms=req.since_arrival_ms(RequestState.FINISHED.value),
            prefill_instance=legs.prefill.name, decode_instance=legs.decode.name if legs.decode else "",
            prefill_reason=legs.ticket.reason if legs.ticket else "")

    async def _cleanup(self, req: RouterRequest, legs: _Legs) -> None:
        """Abort what still runs and release KV nobody took over (bounded)."""
        if legs.ticket is not None:
            self.prefill.admission.finish(legs.ticket)
        try:
            async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
                if legs.prefill_ref is not None:
                    await _quiet(legs.prefill.actor.abort.remote(req.request_id))
                    late = await _quiet(legs.prefill_ref)  # it may have finished before the abort
                    legs.handle = KvHandle.from_params(getattr(late, "kv_params", None))
                if legs.handle is not None:
                    h = legs.handle
                    await asyncio.to_thread(transport.release, h.host, h.port, h.request_id, secret=h.secret)
                if legs.decode is not None and not legs.decode_done:
                    await _quiet(legs.decode.actor.abort.remote(req.request_id))
        except TimeoutError:
            log.warning("cleanup of %s timed out", req.request_id)


async def _await(pool: WorkerPool, worker: Any, ref: Any) -> Any:
    """Await a worker call; an InvalidRequestError raised there is re-raised as itself."""
    try:
        return await ref
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, InvalidRequestError):
            raise InvalidRequestError(str(cause)) from None
        raise WorkerFailedError(f"{worker.name} failed: {cause or err}".splitlines()[0]) from None
    except ray.exceptions.RayError as err:
        pool.mark_dead(worker.name)
        raise WorkerFailedError(f"{worker.name} is unavailable: {type(err).__name__}") from None


async def _quiet(ref: Any) -> Any:
    try:
        return await ref
    except Exception:
        return None


_OUTCOME = {RequestState.FINISHED: Outcome.FINISHED, RequestState.CANCELLED: Outcome.CANCELLED,
            RequestState.REJECTED: Outcome.REJECTED, RequestState.FAILED: Outcome.FAILED}


def _request_record(req: RouterRequest, legs: _Legs) -> RequestRecord:
    """The request's record for the stats, whatever way it ended."""
    def seconds(name: str) -> float | None:
        return req.since_arrival_ms(name) / 1e3 if name in req.marks else None

    result, kv = legs.result, legs.kv
    return RequestRecord(
        outcome=_OUTCOME.get(req.state, Outcome.FAILED), finish_reason=legs.finish if req.state is RequestState.FINISHED else "",
        prompt_tokens=result.num_prompt_tokens if result else 0, completion_tokens=legs.completion,
        queue_s=seconds(RequestState.PREFILLING.value), prefill_s=result.prefill_ms / 1e3 if result else None,
        ttft_s=seconds("first_token"), e2e_s=seconds(RequestState.FINISHED.value), inter_token_s=tuple(legs.gaps),
        kv_transfer_s=kv["ms"] / 1e3 if "ms" in kv else None, kv_transfer_bytes=kv.get("bytes"),
        kv_transfer_failed=bool(kv.get("failed")), predicted_ttft_s=legs.predicted_ttft_s,
        ttft_slo_s=req.ttft_slo_ms / 1e3, tpot_slo_s=req.tpot_slo_ms / 1e3,
        prefill_instance=legs.prefill.name if legs.prefill else "", decode_instance=legs.decode.name if legs.decode else "")


def router_block_tokens(model: ModelInfo, configured: int = 0) -> int:
    """Tokens per router block: ``configured``, or min(512, context / 16) rounded down to a multiple
    of the engine's KV block (at least one engine block)."""
    if configured:
        return configured
    return max(model.block_size, min(512, model.max_model_len // 16) // model.block_size * model.block_size)


def _terminal_state(err: BaseException) -> RequestState:
    if isinstance(err, (asyncio.CancelledError, TimeoutError, GeneratorExit)):
        return RequestState.CANCELLED
    if isinstance(err, (InvalidRequestError, OverloadedError)):
        return RequestState.REJECTED
    return RequestState.FAILED
