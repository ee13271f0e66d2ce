"""A small synchronous client for the public API (used by the CLI, the tests and the bench)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc

from protos import pdserve_v1_pb2 as pb
from protos import pdserve_v1_pb2_grpc as pb_grpc


def build_request(prompt: str | None = None, messages: list[tuple[str, str]] | None = None,
                  token_ids: list[int] | None = None, max_tokens: int = 0, request_id: str = "",
                  **sampling: object) -> pb.GenerateRequest:
    """A GenerateRequest from one input and sampling keywords (temperature, top_p, top_k, seed,
    stop, ignore_eos); ``ttft_ms``/``tpot_ms`` keywords become SLO targets, ``priority`` the priority."""
    slo = pb.SloTargets(ttft_ms=float(sampling.pop("ttft_ms", 0.0)), tpot_ms=float(sampling.pop("tpot_ms", 0.0)))
    priority = int(sampling.pop("priority", 0))
    req = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=max_tokens, **sampling), slo=slo,
                             request_id=request_id, priority=priority)
    if prompt is not None:
        req.prompt = prompt
    elif messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
    elif token_ids is not None:
        req.tokens.token_ids.extend(token_ids)
    return req


@dataclass
class Completion:
    """A whole streamed answer, as the client saw it."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    messages: int = 0
    final: pb.GenerateResponse | None = None


@dataclass(frozen=True)
class ClientAuth:
    """How a client reaches a guarded router: TLS trust, an optional client certificate (mutual
    TLS) and an optional bearer token. The default is plaintext without a token."""

    tls_ca: str = ""
    """PEM file of the CA that signed the router's certificate (enables TLS)."""
    tls_cert: str = ""
    """PEM certificate chain of this client (mutual TLS, with ``tls_key``)."""
    tls_key: str = ""
    token: str = ""

    def channel(self, target: str) -> grpc.Channel:
        """A channel to ``target`` with this TLS setting."""
        if not self.tls_ca:
            return grpc.insecure_channel(target)
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(read(self.tls_ca), read(self.tls_key), read(self.tls_cert))
        return grpc.secure_channel(target, creds)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the token (none without one)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class PdServeClient:
    """One channel to a router; methods are bounded by ``timeout_s``."""

    def __init__(self, target: str, auth: ClientAuth = ClientAuth()) -> None:
        self.channel = auth.channel(target)
        self.stub = pb_grpc.PdServeStub(self.channel)
        self._metadata = auth.metadata

    def stream(self, request: pb.GenerateRequest, timeout_s: float = 300.0) -> Iterator[pb.GenerateResponse]:
        """The response stream (a grpc call object: ``.cancel()`` cancels it)."""
        return self.stub.Generate(request, timeout=timeout_s, metadata=self._metadata)

    def complete(self, request: pb.GenerateRequest, timeout_s: float = 300.0) -> Completion:
        """Consume the whole stream."""
        out = Completion()
        for msg in self.stream(request, timeout_s):
            out.messages += 1
            out.token_ids += msg.token_ids
            out.text += msg.text
            if msg.final:
                out.final = msg
        return out

    def health(self, timeout_s: float = 5.0) -> pb.HealthResponse:
        """The router's health answer."""
        return self.stub.Health(pb.HealthRequest(), timeout=timeout_s, metadata=self._metadata)

    def info(self, timeout_s: float = 5.0) -> pb.ServerInfoResponse:
        """Model, pools and instances."""
        return self.stub.ServerInfo(pb.ServerInfoRequest(), timeout=timeout_s, metadata=self._metadata)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()
