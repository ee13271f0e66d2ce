"""``pdserve bench-kv``: every KV transport against raw TCP, on loopback, side by side.

A sender process holds the KV cache of a 7B-class model (Qwen2.5-7B: 28 layers, 4 KV heads of 128,
bf16, so 57,344 bytes per token) in vLLM's CPU layout ([blocks, kv heads, block size, 2 x head
size] per layer) and serves it with every transport; this process pulls prompts of several lengths
into its own cache with each, round-robin, and also receives the same bytes over a plain TCP
connection (one ``sendall`` of a preallocated buffer into one ``recv_into``), the ceiling of any
transport on this host. Times include connecting, the checks before the first byte, the checksum,
and the release. The medians of ``rounds`` rounds are written as JSON.
"""
from __future__ import annotations

import json
import multiprocessing
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from pdserve.base.net import free_port

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 28, 4, 128, 16
PROMPTS = (1024, 4096, 8192)
TRANSPORTS = ("tcp", "gloo", "grpc")


def _caches(num_blocks: int) -> dict:
    import torch

    return {f"model.layers.{i}.self_attn": torch.zeros(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM, dtype=torch.bfloat16)
            for i in range(LAYERS)}


def _sender(conn: Any, num_blocks: int) -> None:
    """The prefill side (a child process): serve every transport and raw TCP until told to stop."""
    import torch

    from kv_transfer import grpc_server, transports
    from kv_transfer.layout import KvLayout
    from kv_transfer.leases import HeldKv, PullGate

    torch.set_num_threads(1)
    caches = _caches(num_blocks)
    for t in caches.values():
        t.normal_()
    layout = KvLayout(caches, num_blocks, "bench")
    held = HeldKv(lease_s=600)
    gate = PullGate(held, layout.fingerprint)
    ports = {"control": free_port()}
    server = grpc_server.start_server(gate, layout, "127.0.0.1", ports["control"], 64)  # noqa: F841 (kept alive)
    for name in TRANSPORTS:
        if transports.get(name).data_port:
            ports[name] = free_port()
            transports.get(name).serve(transports.ServeContext(gate, layout, "127.0.0.1", ports[name], 64))
    raw = socket.create_server(("127.0.0.1", 0))
    ports["raw"] = raw.getsockname()[1]
    threading.Thread(target=_raw_server, args=(raw,), daemon=True).start()
    conn.send(ports)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        rid, blocks = msg
        held.hold(rid, list(range(blocks)), secret="bench")
        conn.send(True)


def _raw_server(listener: socket.socket) -> None:
    """Answer each connection's 8-byte size with that many bytes from one preallocated buffer."""
    buf = memoryview(bytearray(LAYERS * KV_HEADS * BLOCK * 2 * HEAD_DIM * 2 * (PROMPTS[-1] // BLOCK)))
    while True:
        conn, _ = listener.accept()
        with conn:
            size = int.from_bytes(conn.recv(8), "big")
            conn.sendall(buf[:size])


def _raw_pull(port: int, buf: memoryview) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(len(buf).to_bytes(8, "big"))
        got = 0
        while got < len(buf):
            n = sock.recv_into(buf[got:])
            if n == 0:
                raise ConnectionError("raw sender closed early")
            got += n


def run(out: Path, rounds: int = 5) -> dict:
    """Measure and write the results; returns them."""
    import torch

    from kv_transfer import control, transports
    from kv_transfer.handle import KvHandle
    from kv_transfer.layout import KvLayout

    torch.set_num_threads(1)
    num_blocks = PROMPTS[-1] // BLOCK
    layout = KvLayout(_caches(num_blocks), num_blocks, "bench")
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_sender, args=(child, num_blocks), daemon=True)
    proc.start()
    try:
        ports = parent.recv()
        times: dict[str, dict[int, list[float]]] = {n: {p: [] for p in PROMPTS} for n in (*TRANSPORTS, "raw_tcp")}
        raw_buf = memoryview(bytearray(num_blocks * layout.block_bytes()))
        for r in range(rounds):
            for tokens in PROMPTS:
                blocks = tokens // BLOCK
                for name in TRANSPORTS:
                    rid = f"{name}-{tokens}-{r}"
                    parent.send((rid, blocks))
                    parent.recv()
                    handle = KvHandle("127.0.0.1", ports["control"], rid, tokens, blocks, BLOCK, "bench", name,
                                      ports.get(name, 0))
                    start = time.perf_counter()
                    transports.get(name).pull(transports.PullJob(layout, handle, 0, list(range(blocks)), 120.0))
                    if not transports.get(name).acks_release:
                        control.release(handle)
                    times[name][tokens].append(time.perf_counter() - start)
                start = time.perf_counter()
                _raw_pull(ports["raw"], raw_buf[:blocks * layout.block_bytes()])
                times["raw_tcp"][tokens].append(time.perf_counter() - start)
        parent.send(None)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    result = _summary(times, layout.block_bytes(), rounds)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def _summary(times: dict[str, dict[int, list[float]]], block_bytes: int, rounds: int) -> dict:
    rows = []
    for tokens in PROMPTS:
        nbytes = tokens // BLOCK * block_bytes
        raw_ms = statistics.median(times["raw_tcp"][tokens]) * 1e3
        for name, by_len in times.items():
            ms = statistics.median(by_len[tokens]) * 1e3
            rows.append({"transport": name, "prompt_tokens": tokens, "bytes": nbytes, "median_ms": round(ms, 2),
                         "gb_s": round(nbytes / ms / 1e6, 3), "fraction_of_raw_tcp": round(raw_ms / ms, 3)})
    return {"model": "Qwen2.5-7B-class KV: 28 layers x 4 KV heads x 128, bf16, 57,344 B/token, 16-token blocks",
            "rounds": rounds, "date": time.strftime("%Y-%m-%d"), "rows": rows}
