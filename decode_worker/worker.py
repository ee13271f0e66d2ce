"""``DecodeWorker``: continues a request from its first token with the prompt's KV pulled from
the prefill instance that computed it. ``FlexWorker``: an engine in every role."""
from __future__ import annotations

from typing import Any, AsyncIterator

from pdserve.base.types import DecodeChunk, SamplingSpec
from pdserve.engine.actor import EngineWorker, own_errors_stream
from prefill_worker.worker import PrefillWorker


class DecodeWorker(EngineWorker):
    """Ray actor of the decode pool (created by ``pdserve.cluster``)."""

    role = "decode"

    async def decode(self, request_id: str, prompt_ids: list[int], first_token: int, spec: SamplingSpec,
                     kv_params: dict[str, Any]) -> AsyncIterator[DecodeChunk]:
        """Stream tokens after ``first_token``; the engine's prompt is ``prompt_ids + [first_token]``
        with the prompt's KV loaded through ``kv_params``. The last chunk carries the load report.
        Cancelling the stream aborts the request and frees its blocks."""
        stream = self.host.stream(request_id, prompt_ids + [first_token], spec, spec.max_tokens - 1, kv_params)
        async for chunk in own_errors_stream(stream):
            yield chunk


class FlexWorker(PrefillWorker, DecodeWorker):
    """Ray actor of an adaptive deployment (``mode: adaptive``): one ``kv_both`` engine that
    prefills for a remote decode (``prefill``), decodes from remote KV (``decode``) or serves a
    request whole (``generate``), as the router decides per request (``router.split``)."""

    role = "flex"
