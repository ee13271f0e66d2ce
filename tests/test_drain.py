"""The dispatcher's drain (``Dispatcher.drain``), on a real dispatcher whose request path
(``_run``) is a stand-in for the workers: every request still running at the end of the grace ends
its stream with a final ``shutdown`` event carrying the tokens it sent, whether its consumer was
waiting for the next event or busy with the last one (writing to its client) when the cut came."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pdserve.base.types import ModelInfo, PromptInput, RequestState, SamplingSpec
from router.legs import FinalEvent, TokenEvent
from router.request import RouterRequest
from router.server import RouterServer, ServiceSettings

MODEL = ModelInfo(model="/nonexistent/model", max_model_len=2048, block_size=32, eos_token_id=0)
SPEC = SamplingSpec(max_tokens=1000, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=(), ignore_eos=True)


def _dispatcher(token_every_s: float):
    """A real Dispatcher whose request path streams one token every ``token_every_s``, forever."""
    workers = [SimpleNamespace(name="w-0", actor=None)]
    dispatcher = RouterServer(workers, workers, MODEL, ServiceSettings(http_port=-1)).dispatcher

    async def endless(req, legs):
        req.to(RequestState.PREFILLING)
        req.to(RequestState.DECODING)
        while True:
            await asyncio.sleep(token_every_s)
            yield TokenEvent((7,), "x")

    dispatcher._run = endless
    return dispatcher


async def _consume(dispatcher, req: RouterRequest, pause_s: float, out: list) -> None:
    """A front end: takes each event, then spends ``pause_s`` on it (its write to the client)."""
    async for event in dispatcher.run(req):
        out.append(event)
        await asyncio.sleep(pause_s)


# (case, seconds between the path's tokens, seconds the consumer spends on each event)
CASES = [("consumer waits on the path", 0.05, 0.0),
         ("consumer busy writing", 0.0, 0.05),
         ("both", 0.02, 0.03)]


@pytest.mark.parametrize("case,token_every_s,pause_s", CASES, ids=[c[0] for c in CASES])
def test_a_request_cut_by_the_drain_ends_with_a_final_shutdown_event(case, token_every_s, pause_s):
    async def test():
        dispatcher = _dispatcher(token_every_s)
        reqs = [RouterRequest(f"r-{i}", PromptInput(text="hi"), SPEC) for i in range(3)]
        outs = [[] for _ in reqs]
        consumers = [asyncio.create_task(_consume(dispatcher, r, pause_s, o)) for r, o in zip(reqs, outs)]
        await asyncio.sleep(0.2)
        assert await dispatcher.drain(grace_s=0.1) == 3
        await asyncio.gather(*consumers)  # a CancelledError here is a stream cut without its final event
        for req, out in zip(reqs, outs):
            *tokens, final = out
            assert tokens and all(isinstance(e, TokenEvent) for e in tokens)
            assert isinstance(final, FinalEvent) and final.finish_reason == "shutdown"
            assert final.completion_tokens == len(tokens)
            assert req.state is RequestState.CANCELLED
        assert dispatcher.in_flight == 0
    asyncio.run(asyncio.wait_for(test(), 30))
