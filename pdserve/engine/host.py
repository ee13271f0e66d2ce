"""``EngineHost``: one vLLM ``AsyncLLM`` engine in the role of prefill (KV producer), decode (KV
consumer), both phases without a connector (colocated) or every role (flex: ``kv_both``).
Imports vLLM: only worker processes import this.

Called by the worker actors (``prefill_worker``, ``decode_worker``); every method is async and
safe to call concurrently (vLLM's AsyncLLM multiplexes requests).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, AsyncIterator

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from kv_transfer.handle import DO_REMOTE_DECODE, FAULT, LoadReport
from pdserve.base import procs
from pdserve.base.config import EngineConfig
from pdserve.base.types import (DecodeChunk, InvalidRequestError, LoadSnapshot, ModelInfo, PrefillResult,
                                PromptInput, SamplingSpec)
from pdserve.engine.stats import EngineStatsLogger

ROLES = ("prefill", "decode", "colocated", "flex")
MAX_ABORTED_IDS = 10_000
"""Aborted request ids remembered, so an abort that overtakes its request still ends it."""
_KV_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer", "flex": "kv_both"}


def engine_args(cfg: EngineConfig, model: str, role: str, connector: dict[str, Any]) -> AsyncEngineArgs:
    """vLLM engine arguments for a pdserve role; ``connector`` is the KV connector's extra config."""
    kv = None
    if role in _KV_ROLE:
        kv = {"kv_connector": "PdserveConnector", "kv_connector_module_path": "kv_transfer.connector",
              "kv_role": _KV_ROLE[role], "kv_load_failure_policy": "recompute",
              "kv_connector_extra_config": {**connector, "model": Path(model).name}}
    return AsyncEngineArgs(model=model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                           block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs,
                           enable_prefix_caching=cfg.enable_prefix_caching, enforce_eager=cfg.enforce_eager,
                           kv_transfer_config=kv, disable_log_stats=False, seed=0)


def sampling_params(spec: SamplingSpec, max_tokens: int, kv_params: dict[str, Any] | None) -> SamplingParams:
    """vLLM sampling parameters streaming deltas, with optional KV-transfer params."""
    return SamplingParams(max_tokens=max_tokens, temperature=spec.temperature, top_p=spec.top_p,
                          top_k=spec.top_k, seed=spec.seed, stop=list(spec.stop),
                          ignore_eos=spec.ignore_eos, output_kind=RequestOutputKind.DELTA,
                          extra_args={"kv_transfer_params": kv_params} if kv_params else None)


class EngineStartError(RuntimeError):
    """The vLLM engine failed to start; the message quotes the end of its log, where vLLM's "see
    root cause above" points (operators rarely see that log: Ray keeps it on the worker's node)."""


class EngineHost:
    """Owns one AsyncLLM and the stats it reports."""

    def __init__(self, cfg: EngineConfig, model: str, role: str, connector: dict[str, Any] | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        self.role, self.cfg = role, cfg
        self.stats = EngineStatsLogger()
        self._aborted: OrderedDict[str, None] = OrderedDict()
        self.accepted = 0
        """Requests handed to the engine that have not ended (``_generate`` counts them)."""
        args = engine_args(cfg, model, role, connector or {})
        try:
            self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[self.stats.factory])
        except Exception as err:
            raise EngineStartError(f"the {role} engine did not start: {err}\nThe end of its log:\n"
                                   f"{procs.stderr_tail()}") from err
        self.tokenizer = self.engine.get_tokenizer()
        self.info = ModelInfo(model=model, max_model_len=cfg.max_model_len, block_size=cfg.block_size,
                              eos_token_id=self.tokenizer.eos_token_id,
                              cache_blocks=self.engine.vllm_config.cache_config.num_gpu_blocks or 0)

    def tokenize(self, prompt: PromptInput) -> list[int]:
        """Token ids of the prompt (chat template applied to messages); validates the length."""
        if prompt.token_ids is not None:
            ids = list(prompt.token_ids)
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"token ids must be in [0, {vocab})")
        elif prompt.messages is not None:
            messages = [{"role": r, "content": c} for r, c in prompt.messages]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(prompt.text or "", add_special_tokens=False)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if len(ids) >= self.cfg.max_model_len:
            raise InvalidRequestError(f"prompt is {len(ids)} tokens; the model's context is {self.cfg.max_model_len} "
                                      "(prompt must leave room for at least one output token)")
        return ids

    async def prefill(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec,
                      remote_decode: bool, fault: str = "") -> PrefillResult:
        """Compute the prompt and its first token; with ``remote_decode`` the KV stays held."""
        params = {DO_REMOTE_DECODE: True, **({FAULT: fault} if fault else {})} if remote_decode else None
        start = time.perf_counter()
        tokens, text, last = [], "", None
        async for out in self._generate(request_id, prompt_ids, sampling_params(spec, 1, params)):
            tokens += out.outputs[0].token_ids
            text += out.outputs[0].text
            last = out
        if last is None or not tokens:
            raise RuntimeError(f"prefill of {request_id} " + ("was aborted" if request_id in self._aborted
                                                              else "produced no token"))
        return PrefillResult(token_id=tokens[0], text=text, finish_reason=_finish(last),
                             kv_params=last.kv_transfer_params, num_prompt_tokens=len(prompt_ids),
                             num_cached_tokens=last.num_cached_tokens or 0,
                             prefill_ms=(time.perf_counter() - start) * 1e3)

    async def stream(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec, max_tokens: int,
                     kv_params: dict[str, Any] | None = None) -> AsyncIterator[DecodeChunk]:
        """Generate up to ``max_tokens`` tokens, yielding deltas; the last chunk has the finish
        reason and, for a KV load, its report. Cancelling the iteration aborts the request."""
        async for out in self._generate(request_id, prompt_ids, sampling_params(spec, max_tokens, kv_params)):
            completion = out.outputs[0]
            finish = _finish(out)
            report = LoadReport.from_params(out.kv_transfer_params) if out.finished else None
            yield DecodeChunk(tuple(completion.token_ids), completion.text, finish,
                              report.__dict__ if report else {})

    async def abort(self, request_id: str) -> None:
        """Abort a request if it is still running (its KV blocks return to the pool). The id is
        remembered, so a request whose abort arrived first (an actor runs calls concurrently) ends
        at its start or at its next output."""
        self._aborted[request_id] = None
        while len(self._aborted) > MAX_ABORTED_IDS:
            self._aborted.popitem(last=False)
        await self.engine.abort(request_id)

    async def _generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Any]:
        """The engine's outputs for one request, ending early (aborted) once ``abort`` named it.
        Request ids are unique per attempt (the router makes them so), so a remembered id never
        matches a later request."""
        if request_id in self._aborted:
            return
        self.accepted += 1
        try:
            async for out in self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id):
                if request_id in self._aborted and not out.finished:
                    await self.engine.abort(request_id)
                    return
                yield out
        finally:
            self.accepted -= 1

    def load(self, name: str) -> LoadSnapshot:
        """The engine's latest reported load."""
        return self.stats.snapshot(name, alive=not self.engine.errored, accepted=self.accepted)

    def shutdown(self) -> None:
        """Stop the engine's processes."""
        self.engine.shutdown()


def _finish(out: Any) -> str | None:
    return out.outputs[0].finish_reason if out.finished else None
