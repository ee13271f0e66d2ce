"""``pdserve bench-kv``: every KV transport against raw TCP, on loopback, side by side.

For each model shape of ``SHAPES`` (a 7B-class model's KV, and the KV of this machine's engines),
a sender process holds the KV cache in vLLM's CPU layout ([blocks, kv heads, block size, 2 x head
size] per layer, bf16) and serves it with every transport; this process pulls prompts of several
lengths into its own cache with each, round-robin, and also receives the same bytes over a plain
TCP connection (one ``sendall`` of a preallocated buffer into one ``recv_into``), the ceiling of
any transport on this host, and over a two-rank gloo group (one ``send`` of a preallocated tensor
into one ``recv``), the ceiling of the ``gloo`` transport. Times include connecting, the checks before the first byte, the
checksum, and the release. The medians of ``rounds`` rounds are written as JSON. With
``scattered``, both sides hold their blocks in the order a cycled vLLM cache hands them out (freed
last first: no two consecutive), one piece per block and layer, where a fresh cache gives one run.
"""
from __future__ import annotations

import json
import multiprocessing
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any



@dataclass(frozen=True)
class KvShape:
    """A model's KV cache, as vLLM's CPU layout holds it in bf16, and the prompts to pull."""

    model: str
    layers: int
    kv_heads: int
    head_dim: int
    block: int
    prompts: tuple[int, ...]

    def blocks(self, tokens: int) -> int:
        """Whole blocks that hold ``tokens``."""
        return -(-tokens // self.block)

    def describe(self) -> str:
        per_token = self.layers * 2 * self.kv_heads * self.head_dim * 2
        return (f"{self.model}: {self.layers} layers x {self.kv_heads} KV heads x {self.head_dim}, bf16, "
                f"{per_token:,} B/token, {self.block}-token blocks")


SHAPES = (KvShape("Qwen2.5-7B-class", 28, 4, 128, 16, (1024, 4096, 8192)),
          KvShape("SmolLM2-135M (this machine's engines)", 30, 3, 64, 32, (1024, 1900)))
TRANSPORTS = ("tcp", "gloo", "grpc")


def _caches(shape: KvShape, num_blocks: int) -> dict:
    import torch

    return {f"model.layers.{i}.self_attn": torch.zeros(num_blocks, shape.kv_heads, shape.block, 2 * shape.head_dim,
                                                       dtype=torch.bfloat16) for i in range(shape.layers)}


def block_ids(blocks: int, scattered: bool) -> list[int]:
    """The cache blocks a request of ``blocks`` blocks occupies: one run, or none consecutive."""
    return list(range(blocks - 1, -1, -1)) if scattered else list(range(blocks))


def _sender(conn: Any, shape: KvShape, num_blocks: int, scattered: bool) -> None:
    """The prefill side (a child process): serve every transport and raw TCP until told to stop."""
    import torch

    from kv_transfer import grpc_server, transports
    from kv_transfer.layout import KvLayout
    from kv_transfer.leases import HeldKv, PullGate

    torch.set_num_threads(1)
    caches = _caches(shape, num_blocks)
    for t in caches.values():
        t.normal_()
    layout = KvLayout(caches, num_blocks, "bench")
    held = HeldKv(lease_s=600)
    gate = PullGate(held, layout.fingerprint)
    server, control_port = grpc_server.start_server(gate, layout, "127.0.0.1", 64)  # noqa: F841 (kept alive)
    ports = {"control": control_port}
    for name in TRANSPORTS:
        serving = transports.get(name).serve(transports.ServeContext(gate, layout, "127.0.0.1", 64))
        if serving is not None:
            ports[name] = serving.port
    raw = socket.create_server(("127.0.0.1", 0))
    ports["raw"] = raw.getsockname()[1]
    threading.Thread(target=_raw_server, args=(raw, layout.block_bytes() * num_blocks), daemon=True).start()
    store = _gloo_store(is_master=True)
    ports["raw_gloo"] = store.port
    conn.send(ports)
    group, raw_tensor = _gloo_group(store, 0), torch.zeros(layout.block_bytes() * num_blocks, dtype=torch.uint8)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        if msg[0] == "raw_gloo":  # one send of the same byte count, as the ceiling of the gloo transport
            group.send([raw_tensor[:msg[1]]], 1, msg[2]).wait()
            continue
        rid, blocks = msg
        held.hold(rid, block_ids(blocks, scattered), secret="bench")
        conn.send(True)


def _gloo_store(is_master: bool, port: int = 0) -> Any:
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", port, 2, is_master, timedelta(seconds=120), wait_for_workers=False)


def _gloo_group(store: Any, rank: int) -> Any:
    """The raw gloo reference's two-rank group (rank 0 sends, rank 1 receives), on loopback."""
    from datetime import timedelta

    from kv_transfer.transports.gloo import cpu_group

    return cpu_group(store, rank, "127.0.0.1", timedelta(seconds=120))


def _raw_server(listener: socket.socket, nbytes: int) -> None:
    """Answer each connection's 8-byte size (at most ``nbytes``) with that many bytes from one
    preallocated buffer."""
    buf = memoryview(bytearray(nbytes))
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


def run(out: Path, rounds: int = 5, scattered: bool = False) -> dict:
    """Measure every shape and write the results; returns them."""
    rows = [row for shape in SHAPES for row in _measure(shape, rounds, scattered)]
    result = {"models": [shape.describe() for shape in SHAPES], "rounds": rounds, "date": time.strftime("%Y-%m-%d"),
              "blocks": "scattered (none consecutive)" if scattered else "consecutive", "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def _measure(shape: KvShape, rounds: int, scattered: bool) -> list[dict]:
    """One sender process holding ``shape``'s KV; every transport and raw TCP, round-robin."""
    import torch

    from kv_transfer.layout import KvLayout

    torch.set_num_threads(1)
    num_blocks = shape.blocks(shape.prompts[-1])
    layout = KvLayout(_caches(shape, num_blocks), num_blocks, "bench")
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_sender, args=(child, shape, num_blocks, scattered), daemon=True)
    proc.start()
    try:
        ports = parent.recv()
        group = _gloo_group(_gloo_store(False, ports["raw_gloo"]), 1)
        names = (*TRANSPORTS, "raw_tcp", "raw_gloo")
        times: dict[str, dict[int, list[float]]] = {n: {p: [] for p in shape.prompts} for n in names}
        raw_buf = memoryview(bytearray(num_blocks * layout.block_bytes()))
        raw_tensor = torch.zeros(num_blocks * layout.block_bytes(), dtype=torch.uint8)
        for r in range(rounds):
            for tokens in shape.prompts:
                _round(shape, layout, parent, ports, tokens, r, times, scattered)
                nbytes = shape.blocks(tokens) * layout.block_bytes()
                start = time.perf_counter()
                _raw_pull(ports["raw"], raw_buf[:nbytes])
                times["raw_tcp"][tokens].append(time.perf_counter() - start)
                tag, start = r * len(shape.prompts) + shape.prompts.index(tokens), time.perf_counter()
                parent.send(("raw_gloo", nbytes, tag))
                group.recv([raw_tensor[:nbytes]], 0, tag).wait()
                times["raw_gloo"][tokens].append(time.perf_counter() - start)
        parent.send(None)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return _rows(shape, times, layout.block_bytes())


def _round(shape: KvShape, layout: Any, parent: Any, ports: dict, tokens: int, r: int,
           times: dict[str, dict[int, list[float]]], scattered: bool) -> None:
    """Pull ``tokens``' blocks once with every transport (the sender holds them for each first)."""
    from kv_transfer import control, transports
    from kv_transfer.handle import KvHandle

    blocks = shape.blocks(tokens)
    for name in TRANSPORTS:
        rid = f"{name}-{tokens}-{r}"
        parent.send((rid, blocks))
        parent.recv()
        handle = KvHandle("127.0.0.1", (ports["control"],), rid, tokens, blocks, shape.block, "bench", name,
                          (ports.get(name, 0),))
        start = time.perf_counter()
        transports.get(name).pull(transports.PullJob(layout, handle, 0, block_ids(blocks, scattered), 120.0))
        if not transports.get(name).acks_release:
            control.release(handle)
        times[name][tokens].append(time.perf_counter() - start)


def _rows(shape: KvShape, times: dict[str, dict[int, list[float]]], block_bytes: int) -> list[dict]:
    rows = []
    for tokens in shape.prompts:
        nbytes = shape.blocks(tokens) * block_bytes
        raw_ms = statistics.median(times["raw_tcp"][tokens]) * 1e3
        raw_gloo_ms = statistics.median(times["raw_gloo"][tokens]) * 1e3
        for name, by_len in times.items():
            ms = statistics.median(by_len[tokens]) * 1e3
            row = {"model": shape.model, "transport": name, "prompt_tokens": tokens, "bytes": nbytes,
                   "median_ms": round(ms, 2), "gb_s": round(nbytes / ms / 1e6, 3),
                   "fraction_of_raw_tcp": round(raw_ms / ms, 3)}
            if name in ("gloo", "raw_gloo"):
                row["fraction_of_raw_gloo"] = round(raw_gloo_ms / ms, 3)
            rows.append(row)
    return rows
