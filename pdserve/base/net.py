"""Small network helpers shared by the worker actors and the tools (no pdserve imports)."""
from __future__ import annotations

import random
import socket
from pathlib import Path

WORKER_TOKEN_KEY = "x-pdserve-worker-token"
"""The call metadata key of a worker's direct-server token (``protos/worker_v1``)."""
WORKER_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
"""gRPC options of both ends of the router's direct worker calls (a prompt of millions of tokens fits)."""

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PICK_SPAN = 12_000
"""``free_port`` picks among this many ports just below the ephemeral range."""


def free_port(host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A TCP port free on ``host`` now, for a process that binds it later (a deployment's router
    port, picked by the tools that start one). It lies below the kernel's ephemeral range, which
    every outgoing connection and every bind to port 0 draw from, so until the bind only another
    explicit pick can take it (a port from bind(0) was once taken by a connection meanwhile)."""
    rng = rng or random.Random()
    low = _ephemeral_start()
    candidates = range(max(1024, low - PICK_SPAN), low)
    for _ in range(100 if len(candidates) >= 1000 else 0):
        port = rng.choice(candidates)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no room below the range: the kernel's pick
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_start() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
