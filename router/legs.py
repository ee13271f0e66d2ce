"""What the request path produces and keeps per request: the events it streams (``TokenEvent``,
``FinalEvent``), the outstanding legs on the workers (``Legs``), the record it emits, and the helpers
that turn Ray's errors into pdserve's. Used by ``router.dispatch`` and the front ends."""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from kv_transfer.handle import KvHandle
from pdserve.base.types import (InvalidRequestError, ModelInfo, NoInstanceError, Outcome, OverloadedError, RequestRecord,
                                RequestState)
from router.admission import Ticket
from router.request import RouterRequest

_log = logging.getLogger("pdserve.router")


class WorkerFailedError(NoInstanceError):
    """A worker died or failed mid-request (gRPC UNAVAILABLE)."""


class WorkerUnreachableError(WorkerFailedError):
    """A worker could not be reached at all (its process is gone): out of routing until a poll
    finds it again."""


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
    prefill_retries: int = 0
    """Prefills retried on another (or the restarted) instance after a worker failure."""
    decode_migrations: int = 0
    """Decodes continued on another instance after a worker failure."""

    @classmethod
    def cut(cls, completion_tokens: int) -> FinalEvent:
        """The final event of a stream the router cut at the end of its shutdown grace
        (finish reason ``shutdown``: the client may resend the rest elsewhere)."""
        return cls("shutdown", 0, completion_tokens, 0, 0.0, 0.0, 0.0, 0, 0.0, 0.0, "")


@dataclass
class Legs:
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
    sent: list[int] = field(default_factory=list)
    """Token ids the client has received (a decode migration continues after them)."""
    prefill_id: str = ""
    """The prefill engine's id of the current prefill attempt (``attempt_id``)."""
    decode_id: str = ""
    """The decode engine's id of the request (``attempt_id``; a migration gets a new one)."""
    prefill_retries: int = 0
    decode_migrations: int = 0

    def tokens_sent(self, count: int) -> None:
        """Account ``count`` tokens sent now (gaps are spread evenly over a message's tokens)."""
        now = time.perf_counter()
        if self.completion and count:
            self.gaps += [(now - self.last_token_at) / count] * count
        self.completion += count
        self.last_token_at = now


async def await_worker(pool: Any, worker: Any, call: Any) -> Any:
    """Await a worker call (``router.calls``: it raises only pdserve's errors), unless the pool
    loses the worker first (``WorkerPool.lost``: down or stalled): WorkerFailedError then, as for a
    failed call. A worker found unreachable is taken out of routing."""
    try:
        return await _unless_lost(pool.lost(worker.name), worker.name, call)
    except WorkerUnreachableError:
        pool.mark_dead(worker.name)
        raise


async def worker_stream(pool: Any, worker: Any, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The items of a worker's streaming call, each awaited as ``await_worker`` does."""
    while True:
        try:
            item = await await_worker(pool, worker, stream.__anext__())
        except StopAsyncIteration:
            return
        yield item


async def _unless_lost(lost: asyncio.Future, name: str, call: Any) -> Any:
    if lost.done():
        if asyncio.iscoroutine(call):
            call.close()
        raise WorkerFailedError(f"{name} {lost.result()}")
    task = asyncio.ensure_future(call)
    try:
        await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    raise WorkerFailedError(f"{name} {lost.result()}")


async def retry_or_raise(pool: Any, done: int, retries: int, wait_s: float, err: WorkerFailedError) -> None:
    """After a worker failure of one leg: re-raise ``err`` when ``done`` retries spend ``retries``;
    else wait (at most ``wait_s``) for a live instance in ``pool`` to retry on."""
    if done >= retries:
        raise err
    _log.warning("%s; retrying on the %s pool (%d of %d)", err, pool.role, done + 1, retries)
    try:
        await pool.wait_live(wait_s)
    except NoInstanceError:
        raise NoInstanceError(f"no live {pool.role} instance within {wait_s:g} s of a failure") from None


def attempt_id(request_id: str) -> str:
    """An engine-side id for one attempt at ``request_id``: unique even when clients reuse ids, so
    an engine's memory of aborted ids (``EngineHost.abort``) never ends a later attempt."""
    return f"{request_id}-{secrets.token_hex(4)}"


async def quiet(ref: Any) -> Any:
    try:
        return await ref
    except Exception:
        return None


_OUTCOME = {RequestState.FINISHED: Outcome.FINISHED, RequestState.CANCELLED: Outcome.CANCELLED,
            RequestState.REJECTED: Outcome.REJECTED, RequestState.FAILED: Outcome.FAILED}


def final_event(req: RouterRequest, legs: Legs) -> FinalEvent:
    """The final event of a request that finished: usage, timings and the legs it took."""
    result, kv = legs.result, legs.kv
    return FinalEvent(
        finish_reason=legs.finish, prompt_tokens=result.num_prompt_tokens, completion_tokens=legs.completion,
        cached_tokens=result.num_cached_tokens, queue_ms=req.since_arrival_ms(RequestState.PREFILLING.value),
        prefill_ms=result.prefill_ms, kv_transfer_ms=kv.get("ms", 0.0), kv_transfer_bytes=kv.get("bytes", 0),
        ttft_ms=req.since_arrival_ms("first_token"), e2e_ms=req.since_arrival_ms(RequestState.FINISHED.value),
        prefill_instance=legs.prefill.name, decode_instance=legs.decode.name if legs.decode else "",
        prefill_reason=legs.ticket.reason if legs.ticket else "", prefill_retries=legs.prefill_retries,
        decode_migrations=legs.decode_migrations)


def request_record(req: RouterRequest, legs: Legs) -> RequestRecord:
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
        prefill_instance=legs.prefill.name if legs.prefill else "", decode_instance=legs.decode.name if legs.decode else "",
        prefill_retries=legs.prefill_retries, decode_migrations=legs.decode_migrations)


def router_block_tokens(model: ModelInfo, configured: int = 0) -> int:
    """Tokens per router block: ``configured``, or min(512, context / 16) rounded down to a multiple
    of the engine's KV block (at least one engine block)."""
    if configured:
        return configured
    return max(model.block_size, min(512, model.max_model_len // 16) // model.block_size * model.block_size)


def terminal_state(err: BaseException) -> RequestState:
    if isinstance(err, (asyncio.CancelledError, TimeoutError, GeneratorExit)):
        return RequestState.CANCELLED
    if isinstance(err, (InvalidRequestError, OverloadedError)):
        return RequestState.REJECTED
    return RequestState.FAILED


def log_end(req: RouterRequest, legs: Legs, err: BaseException) -> None:
    """One log line for a request that did not finish: where it was when it ended (a client's
    cancel or deadline at INFO, a failure at WARNING; refusals are the front ends' to report)."""
    state = terminal_state(err)
    if state is RequestState.REJECTED:
        return
    level = logging.INFO if state is RequestState.CANCELLED else logging.WARNING
    _log.log(level, "%s ended (%s) while %s: prefill %s, decode %s, %d token(s) sent, %.1f s after arrival",
            req.request_id, str(err) or type(err).__name__, req.state.value, getattr(legs.prefill, "name", "-"),
            getattr(legs.decode, "name", "-"), legs.completion, time.perf_counter() - req.arrival)
