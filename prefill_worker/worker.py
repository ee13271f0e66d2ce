"""``PrefillWorker``: computes prompts and first tokens, and holds their KV for decode instances.

Also serves whole requests without disaggregation (``generate``), which the exactness tests use
as the single-engine reference and a colocated deployment uses as its engine.
"""
from __future__ import annotations

from typing import AsyncIterator

from pdserve.base.types import DecodeChunk, PrefillResult, SamplingSpec
from pdserve.engine.actor import EngineWorker, own_errors, own_errors_stream


class PrefillWorker(EngineWorker):
    """Ray actor of the prefill pool (created by ``pdserve.cluster``)."""

    role = "prefill"

    async def prefill(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec,
                      remote_decode: bool, fault: str = "") -> PrefillResult:
        """Run the prompt and sample its first token. With ``remote_decode`` the KV is held and
        ``kv_params`` names it; the router must hand it to a decode instance or release it.
        ``fault`` is test-only fault injection (``"corrupt"`` flips a byte of every KV chunk)."""
        return await own_errors(self.host.prefill(request_id, prompt_ids, spec, remote_decode, fault))

    async def generate(self, request_id: str, prompt_ids: list[int],
                       spec: SamplingSpec) -> AsyncIterator[DecodeChunk]:
        """Serve the whole request on this engine, streaming deltas (no KV transfer)."""
        async for chunk in own_errors_stream(self.host.stream(request_id, prompt_ids, spec, spec.max_tokens)):
            yield chunk


class ColocatedWorker(PrefillWorker):
    """Ray actor of a colocated deployment (``mode: colocated``): one engine, no KV connector,
    serving both phases of every request with vLLM's own chunked-prefill scheduling (``generate``)."""

    role = "colocated"
