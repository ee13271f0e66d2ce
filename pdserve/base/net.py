"""Small network helpers shared by the worker actors and the tools (no pdserve imports)."""
from __future__ import annotations

import socket

WORKER_TOKEN_KEY = "x-pdserve-worker-token"
"""The call metadata key of a worker's direct-server token (``protos/worker_v1``)."""
WORKER_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
"""gRPC options of both ends of the router's direct worker calls (a prompt of millions of tokens fits)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
