"""``RequestPreparer``: the step before routing. It turns a validated ``RouterRequest`` into its
prompt token ids and the ``RouteRequest`` the policies see (lengths checked against the context,
``max_tokens`` resolved, router-block hashes only for policies that read them).

Called by ``Dispatcher.run`` once per request; its only side effects are the request's
``REJECTED`` state on bad input and, without a router-side tokenizer, one tokenize call on a
prefill worker (retried on another after a worker failure).
"""
from __future__ import annotations

import asyncio
from dataclasses import replace

from pdserve.base.types import InvalidRequestError, ModelInfo, RequestState
from router.legs import WorkerFailedError, await_worker, retry_or_raise, router_block_tokens
from router.policies import RouteRequest, block_hashes
from router.pools import WorkerPool
from router.request import RouterRequest
from router.tokenizer import PromptTokenizer


class RequestPreparer:
    """Token ids and route of each request for one deployment's model."""

    def __init__(self, pool: WorkerPool, model: ModelInfo, default_max_tokens: int, router_block: int = 0,
                 tokenizer: PromptTokenizer | None = None, retries: int = 2, retry_wait_s: float = 60.0) -> None:
        self.pool, self.max_model_len, self.default_max_tokens = pool, model.max_model_len, default_max_tokens
        self.router_block = router_block_tokens(model, router_block)
        self.tokenizer = tokenizer
        """The router's own tokenizer (``router.tokenizer``); None: prefill workers tokenize."""
        self.retries, self.retry_wait_s = retries, retry_wait_s

    async def prepare(self, req: RouterRequest) -> tuple[RouteRequest, list[int]]:
        """The request's route and prompt ids; sets ``req.sampling.max_tokens``. Raises
        InvalidRequestError (the request is then REJECTED) or NoInstanceError."""
        try:
            ids = await self._tokenize(req)
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
        hashes = block_hashes(ids, self.router_block) if self.pool.policy.uses_prefix else ()
        route = RouteRequest(req.request_id, hashes, len(ids), max_tokens, req.ttft_slo_ms, req.tpot_slo_ms,
                             req.priority)
        return route, ids

    async def _tokenize(self, req: RouterRequest) -> list[int]:
        """The prompt's token ids: from the router's own tokenizer when it has one (on a thread
        for a long prompt), else from a live prefill worker, asked again (another one, or the
        restarted one) after a worker failure, up to ``retries`` times."""
        if self.tokenizer is not None:
            if self.tokenizer.inline(req.prompt):
                return self.tokenizer.tokenize(req.prompt)
            return await asyncio.to_thread(self.tokenizer.tokenize, req.prompt)
        done = 0
        await self.pool.wait_live(self.retry_wait_s)
        while True:
            worker = self.pool.helper()
            try:
                return await await_worker(self.pool, worker, worker.actor.tokenize.remote(req.prompt))
            except WorkerFailedError as err:
                await retry_or_raise(self.pool, done, self.retries, self.retry_wait_s, err)
                done += 1
