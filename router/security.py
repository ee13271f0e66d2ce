"""The router's guards on its public APIs, from ``SecurityConfig``: TLS or mutual TLS credentials
for gRPC and HTTP, and a bearer token checked on every call except health checks.

Used by ``RouterServer`` (gRPC credentials and interceptor) and ``HttpFrontEnd`` (uvicorn's TLS
settings and the token check); nothing here touches a request's content.
"""
from __future__ import annotations

import hmac
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from pdserve.base import env
from pdserve.base.config import ConfigError, SecurityConfig

OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)
"""gRPC methods served without a token (load balancers' and Kubernetes' probes)."""
OPEN_HTTP_PATHS = ("/health",)
"""HTTP paths served without a token."""


@dataclass(frozen=True)
class Guard:
    """What the router enforces: TLS material (PEM bytes) and the bearer token ("" when off)."""

    cert: bytes = b""
    key: bytes = b""
    client_ca: bytes = b""
    token: str = ""
    files: SecurityConfig = SecurityConfig()

    @classmethod
    def load(cls, cfg: SecurityConfig) -> Guard:
        """Read the files ``cfg`` names (ConfigError when one is unreadable or the token empty)."""
        token = env.auth_token() or (_read(cfg.auth_token_file).decode().strip() if cfg.auth_token_file else "")
        if cfg.auth_token_file and not token:
            raise ConfigError(f"security.auth_token_file {cfg.auth_token_file} is empty")
        return cls(_read(cfg.tls_cert), _read(cfg.tls_key), _read(cfg.tls_client_ca), token, cfg)

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        """Server credentials for the gRPC port; None for plaintext."""
        if not self.cert:
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca or None,
                                           require_client_auth=bool(self.client_ca))

    def uvicorn_tls(self) -> dict[str, Any]:
        """uvicorn.Config keywords for the HTTP port (empty for plaintext)."""
        if not self.cert:
            return {}
        kw: dict[str, Any] = {"ssl_certfile": self.files.tls_cert, "ssl_keyfile": self.files.tls_key}
        if self.client_ca:
            kw.update(ssl_ca_certs=self.files.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return kw

    def authorized(self, header: str | None) -> bool:
        """Whether an ``authorization`` header value carries the token (always, when off)."""
        if not self.token:
            return True
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses gRPC calls without the guard's token with UNAUTHENTICATED (health checks exempt)."""

    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_GRPC_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self._guard.authorized(metadata.get("authorization")):
            return handler
        return _refusing(handler)


def _refusing(handler: Any) -> Any:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    kind = ("unary_unary" if handler.unary_unary else "unary_stream" if handler.unary_stream
            else "stream_unary" if handler.stream_unary else "stream_stream")
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _read(path: str) -> bytes:
    if not path:
        return b""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
