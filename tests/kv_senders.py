"""A KV sender and receiver on their own, for the transport tests: layouts of real torch tensors,
a prefill side serving its holds over one transport (real sockets on loopback), and a pull. No
vLLM."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from kv_transfer import grpc_server, transports
from kv_transfer.handle import KvHandle
from kv_transfer.layout import KvLayout
from kv_transfer.leases import HeldKv, PullGate
from kv_transfer.transports import PullJob, ServeContext

NUM_BLOCKS, LAYERS = 12, 3
SECRET = "s3cret-of-this-transfer"
TRANSPORTS = ["grpc", "tcp", "gloo"]


def make_layout(seed: int, dtype: torch.dtype = torch.bfloat16, identity: str = "model|tp 0/1",
            heads: int = 3, block_major: bool = False, device: str = "cpu") -> tuple[KvLayout, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    if block_major:  # [blocks, K/V, ...] in memory, registered as a [K/V, blocks, ...] view
        caches = {f"layer.{i}": torch.randn(NUM_BLOCKS, 2, heads, 4, 8, generator=gen).to(dtype).transpose(0, 1)
                  for i in range(LAYERS)}
    else:  # [K/V, blocks, heads, tokens, dim], like the CPU backend's per-layer view
        caches = {f"layer.{i}": torch.randn(2, NUM_BLOCKS, heads, 4, 8, generator=gen).to(dtype) for i in range(LAYERS)}
    caches = {n: t.to(device) for n, t in caches.items()}
    return KvLayout(caches, NUM_BLOCKS, identity), caches



@dataclass
class Sender:
    """A prefill side: its holds, served by the control server and one transport."""

    held: HeldKv
    handle: KvHandle
    stop: Callable[[], None]

    def handle_for(self, request_id: str, secret: str = SECRET) -> KvHandle:
        return replace(self.handle, request_id=request_id, secret=secret)


def start_sender(layout: KvLayout, name: str, lease_s: float = 30) -> Sender:
    held = HeldKv(lease_s=lease_s)
    gate = PullGate(held, layout.fingerprint)
    server, port = grpc_server.start_server(gate, layout, "127.0.0.1", chunk_blocks=2)
    serving = transports.get(name).serve(ServeContext(gate, layout, "127.0.0.1", 2))

    def stop() -> None:
        server.stop(grace=0)
        if serving:
            serving.stop()
    handle = KvHandle("127.0.0.1", (port,), "", 0, 0, 4, SECRET, name, (serving.port,) if serving else ())
    return Sender(held, handle, stop)


def pull_blocks(layout: KvLayout, handle: KvHandle, first_block: int, local: list[int], timeout_s: float = 10,
          cancelled: threading.Event | None = None) -> int:
    job = PullJob(layout, handle, first_block, local, timeout_s, cancelled=cancelled or threading.Event())
    return transports.get(handle.transport).pull(job)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False
