"""``HttpFrontEnd``: the OpenAI-compatible HTTP API (FastAPI on uvicorn), in the router's own event
loop beside the gRPC server. Not a second request path: every request is parsed into the same
``GenerateRequest`` (``openai_protocol``), validated by ``router.validate`` and run by the same
``Dispatcher``, with the same routing, SLOs, admission, metrics and cancellation.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent events
ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (200 only when every pool has a
live instance), ``GET /metrics`` (Prometheus). Errors: OpenAI's JSON shape; 400 invalid input, 404
unknown model, 429 admission refused (``Retry-After``), 503 no live instance, 504 deadline, 500 bug.
A client that disconnects mid-stream aborts its request on both workers.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pdserve.base.types import InvalidRequestError, ModelInfo, NoInstanceError, Outcome, OverloadedError, RequestRecord
from router import openai_protocol as oa
from router.dispatch import Dispatcher
from router.health import pools_status
from router.legs import FinalEvent, TokenEvent
from router.security import OPEN_HTTP_PATHS, Guard
from router.settings import ServiceSettings

log = logging.getLogger("pdserve.http")
MAX_BODY_BYTES = 16 * 2**20
"""Bodies beyond this are refused before parsing (prompts are bounded far below, per deployment)."""


class _Server(uvicorn.Server):
    """uvicorn inside a running loop: the router process owns signal handling, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self):  # noqa: D102 - uvicorn's hook
        yield


class HttpFrontEnd:
    """The HTTP API over one dispatcher; ``start`` and ``stop`` are called by ``RouterServer``."""

    def __init__(self, dispatcher: Dispatcher, model: ModelInfo, settings: ServiceSettings,
                 record: Callable[[RequestRecord], None], registry: Any, guard: Guard = Guard()) -> None:
        self.dispatcher, self.settings, self._record, self.registry = dispatcher, settings, record, registry
        self.guard = guard
        self.model, self.model_id = model, Path(model.model).name
        self._model_names = {self.model_id, model.model}
        self.app = self._build()
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> int:
        """Serve on ``host:port`` (0: a free port) in this loop; returns the bound port. The port is
        bound with SO_REUSEPORT, as gRPC's is, so router replicas can share it."""
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", lifespan="off",
                                access_log=False, timeout_graceful_shutdown=5, **self.guard.uvicorn_tls())
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[_shared_socket(host, port)]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the bind error
                raise OSError(f"HTTP server on {host}:{port} did not start")
            await asyncio.sleep(0.01)
        return self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, let open streams end (uvicorn's grace), then return."""
        if self._server is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)

    # ---- routes ------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
        app.post("/v1/chat/completions")(self._chat)
        app.post("/v1/completions")(self._completions)
        app.get("/v1/models")(self._models)
        app.get("/health")(self._health)
        app.get("/metrics")(self._metrics)
        if self.guard.token:
            app.middleware("http")(self._authenticate)
        return app

    async def _authenticate(self, request: Request, call_next: Callable) -> Response:
        """401 without the bearer token (OpenAI's error shape; ``/health`` stays open)."""
        if request.url.path in OPEN_HTTP_PATHS or self.guard.authorized(request.headers.get("authorization")):
            return await call_next(request)
        body = {"error": {"message": "missing or wrong bearer token", "type": "authentication_error",
                          "param": None, "code": "invalid_api_key"}}
        return JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0, "owned_by": "pdserve"}]}

    async def _health(self) -> Response:
        serving, detail = pools_status(self.dispatcher.pools)
        if self.dispatcher.draining:
            serving, detail = False, "shutting down"
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING", "detail": detail}, 200 if serving else 503)

    async def _metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- the request path --------------------------------------------------------------------
    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise InvalidRequestError(f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
            body = json.loads(raw)
            if isinstance(body, dict) and body.get("model") not in self._model_names:
                return _error(404, f"model {body.get('model')!r} not found; this server serves {self.model_id!r}",
                              "not_found_error", "model_not_found")
            req = self.settings.parse(oa.chat_request(body) if chat else oa.completion_request(body), self.model)
        except (InvalidRequestError, ValueError) as err:  # ValueError: the body is not JSON
            self._record(RequestRecord(Outcome.REJECTED))
            return _error(400, str(err).splitlines()[0] or "invalid request", "invalid_request_error")
        req.request_id = ("chatcmpl-" if chat else "cmpl-") + req.request_id
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        events = self.dispatcher.run(req)
        try:
            async with asyncio.timeout_at(deadline):
                first = await anext(events)
        except BaseException as err:
            await events.aclose()
            return _status_error(err)
        meta = (chat, req.request_id, self.model_id, int(time.time()))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._sse(meta, first, events, deadline, include_usage),
                                     media_type="text/event-stream")
        return await self._whole(meta, first, events, deadline)

    async def _whole(self, meta: tuple, first: Any, events: AsyncIterator, deadline: float) -> Response:
        text = first.text if isinstance(first, TokenEvent) else ""
        final = first if isinstance(first, FinalEvent) else None
        try:
            async with asyncio.timeout_at(deadline):
                async for event in events:
                    if isinstance(event, TokenEvent):
                        text += event.text
                    else:
                        final = event
        except BaseException as err:
            return _status_error(err)
        finally:
            await events.aclose()
        return JSONResponse(oa.completion(*meta, text, final))

    async def _sse(self, meta: tuple, first: Any, events: AsyncIterator, deadline: float,
                   include_usage: bool) -> AsyncIterator[str]:
        """The event stream; closing it (client gone) closes ``events``, which aborts the request."""
        try:
            event, is_first = first, True
            async with asyncio.timeout_at(deadline):
                while event is not None:
                    yield from_event(meta, event, is_first, include_usage)
                    is_first = False
                    event = await anext(events, None)
        except Exception as err:  # mid-stream failure: an error event, then the end
            body = _status_body(err)[1]
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"


def _shared_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port that other router processes may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def from_event(meta: tuple, event: Any, first: bool, include_usage: bool) -> str:
    """The SSE lines of one dispatcher event (a final event ends the choice, then usage)."""
    if isinstance(event, TokenEvent):
        data = oa.chunk(*meta, event.text, tokens=len(event.token_ids), first=first, with_usage=include_usage)
        return f"data: {json.dumps(data)}\n\n"
    lines = f"data: {json.dumps(oa.chunk(*meta, None, event.finish_reason, with_usage=include_usage))}\n\n"
    if include_usage:
        lines += f"data: {json.dumps(oa.usage_chunk(*meta, event))}\n\n"
    return lines


def _status_body(err: BaseException) -> tuple[int, dict, dict]:
    """HTTP status, OpenAI error body and headers for an exception of the request path."""
    if isinstance(err, InvalidRequestError):
        return 400, oa.error(str(err), "invalid_request_error"), {}
    if isinstance(err, OverloadedError):
        retry = f"{err.retry_after_s:.0f}"
        return 429, oa.error(f"{err}; retry after {retry} s", "rate_limit_error", "overloaded"), {"Retry-After": retry}
    if isinstance(err, NoInstanceError):
        return 503, oa.error(str(err), "service_unavailable", "unavailable"), {}
    if isinstance(err, TimeoutError):
        return 504, oa.error("the request's deadline passed", "timeout", "deadline_exceeded"), {}
    log.error("request failed: %s: %s", type(err).__name__, err)
    return 500, oa.error(f"internal error: {type(err).__name__}: {err}".splitlines()[0], "internal_error"), {}


def _status_error(err: BaseException) -> Response:
    if isinstance(err, asyncio.CancelledError):
        raise err
    status, body, headers = _status_body(err)
    return JSONResponse(body, status, headers=headers)


def _error(status: int, message: str, kind: str, code: str | None = None) -> Response:
    return JSONResponse(oa.error(message, kind, code), status)
