"""``pdserve bench``'s runs and files: a rate sweep with its JSON results and plots, the
comparison plot of several deployments, and the overhead measurement."""
from __future__ import annotations

import asyncio
import json
import socket
import statistics
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from pdserve.bench import runner
from pdserve.bench.stats import GOODPUT_ATTAINMENT, Slo, attainment_points, max_goodput_rate, summarize
from pdserve.bench.workloads import BenchRequest
from pdserve.client import PdServeClient, build_request


def sweep(target: str, requests: Sequence[BenchRequest], rates: Sequence[float], slos: Sequence[Slo],
          label: str, arrival: str, concurrency: int, seed: int, timeout_s: float, warmup: int = 0,
          rate_warmup: int = 0) -> dict:
    """One run per rate (or one run for concurrency arrivals); results with max goodput per SLO.

    ``requests`` is the pool (``fresh_pool_size`` long): ``warmup`` requests first, sent one at a
    time and not recorded (first requests of a fresh engine pay one-time costs), then one equal
    slice per rate. No request is sent twice, so the engines' prefix caches cannot turn a later
    rate's prefills into cache hits (as they did when every rate resent the same prompts). Each
    rate starts from an idle deployment; with ``rate_warmup`` its first that many requests are
    sent at the rate but not scored, so the scored ones see the rate's steady state (queues
    filled, an adaptive deployment's roles settled)."""
    per_rate = (len(requests) - warmup) // len(rates) - rate_warmup
    if per_rate < 1:
        raise ValueError(f"{len(requests)} requests cannot give {warmup} warm-up and one per rate to {len(rates)} rates"
                         f" after {rate_warmup} unscored each")
    if warmup:
        asyncio.run(runner.run(target, list(requests[:warmup]), "concurrency", concurrency=1, timeout_s=timeout_s,
                               progress=False))
    runs = []
    step = per_rate + rate_warmup
    for i, setting in enumerate(rates):  # a rate (poisson), a time-scale factor (trace); ignored for concurrency
        runs.append(_rate_run(target, list(requests[warmup + i * step:warmup + (i + 1) * step]), setting, slos,
                              arrival, concurrency, seed, timeout_s, rate_warmup))
    results = {"label": label, "target": target, "arrival": arrival, "slos": [asdict(s) for s in slos],
               "warmup_requests": warmup, "rate_warmup_requests": rate_warmup, "requests_per_rate": per_rate,
               "runs": runs}
    results["max_goodput_rps"] = {s.name: max_goodput_rate(attainment_points(results, s.name)) for s in slos}
    return results


def _rate_run(target: str, batch: list[BenchRequest], setting: float, slos: Sequence[Slo], arrival: str,
              concurrency: int, seed: int, timeout_s: float, unscored: int) -> dict:
    """One rate's run: every request of ``batch`` sent, the first ``unscored`` left out of its results
    (the offered rate and throughput are those of the scored ones)."""
    offsets = runner.arrival_times(batch, arrival, setting, setting, seed)
    timings, duration, sent = asyncio.run(runner.run(target, batch, arrival, setting, concurrency, setting, timeout_s,
                                                     seed))
    if unscored:  # the scored requests' window opens when the first of them is sent
        duration -= sent[unscored]
        offsets = [o - offsets[unscored] for o in offsets[unscored:]] if arrival != "concurrency" else offsets
    timings = timings[unscored:]
    summary = summarize(timings, duration, slos)
    offered = (len(timings) - 1) / offsets[-1] if arrival != "concurrency" and offsets[-1] > 0 else summary["throughput_rps"]
    return {"setting": setting, "rate_rps": round(offered, 4), "summary": summary,
            "requests": [asdict(t) for t in timings]}


def fresh_pool_size(per_rate: int, rates: int, warmup: int, rate_warmup: int = 0) -> int:
    """Requests ``sweep`` needs so that every rate, and the warm-ups, get prompts of their own."""
    return warmup + (per_rate + rate_warmup) * rates


def write(results: dict, out: Path) -> None:
    """The JSON file and, beside it, the latency-CDF plot."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in results["runs"]:
        for ax, key in zip(axes, ("ttft_s", "tpot_s")):
            vals = sorted(r[key] for r in run["requests"] if r[key] is not None)
            ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=f"{run['rate_rps']:g} req/s")
    for ax, name in zip(axes, ("TTFT (s)", "TPOT (s)")):
        ax.set(xlabel=name, ylabel="CDF", title=f"{results['label']}: {name}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".cdf.png"), dpi=110)
    plt.close("all")


def compare(files: Sequence[Path], out: Path) -> None:
    """Attainment vs. rate of several deployments' result files, one panel per SLO set."""
    plot_attainment([json.loads(Path(f).read_text()) for f in files], out)


def plot_attainment(data: Sequence[dict], out: Path) -> None:
    """Attainment vs. rate of several deployments' results, one panel per SLO set."""
    slos = [s["name"] for s in data[0]["slos"]]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(slos), figsize=(5 * len(slos), 4), squeeze=False)
    for ax, slo in zip(axes[0], slos):
        for d in data:
            ax.plot(*zip(*attainment_points(d, slo)), marker="o",
                    label=f"{d['label']} (max goodput {d['max_goodput_rps'][slo]:g} req/s)")
        ax.axhline(GOODPUT_ATTAINMENT, color="grey", ls="--", lw=0.8)
        ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment", title=slo, ylim=(0, 1.05))
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close("all")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overheads(target: str, lengths: Sequence[int], repeats: int, vocab_id: int = 1000, warmup: int = 0,
              fill: int = 0) -> dict:
    """Sequential requests of each prompt length: the router's added latency (client TTFT minus
    the prefill call), KV-transfer time and bytes, the transport's throughput against a raw TCP
    loopback stream of the same bytes measured in the same run, and the gap between the first
    and the second token (seen by the client) next to the transfer and one decode step. The
    ``warmup`` requests (64 tokens, prompts of their own) go first and are not recorded: they
    carry the deployment's one-time costs (first connections, first calls). Then ``fill`` requests
    of the longest length, also unrecorded, cycle the engines' KV caches: once a cache has been
    through all its blocks, vLLM hands a request blocks freed by others, scattered, which is how
    a long-running engine allocates (0: measure a fresh deployment's consecutive blocks)."""
    client, rows = PdServeClient(target), []
    try:
        for w in range(warmup):
            _overhead_row(client, 64, _overhead_ids(64, repeats + w, vocab_id))
        for f in range(fill):
            _overhead_row(client, max(lengths), _overhead_ids(max(lengths), 1000 + f, vocab_id))
        for n in lengths:
            for r in range(repeats):
                rows.append(_overhead_row(client, n, _overhead_ids(n, r, vocab_id)))
    finally:
        client.close()
    added = sorted(x["router_added_ms"] for x in rows)
    return {"per_length": per_length(rows, lengths), "requests": rows, "warmup_requests": warmup,
            "fill_requests": fill, "router_added_ms_median": statistics.median(added),
            "router_added_ms_p99": nearest_rank(added, 0.99)}


def per_length(rows: list[dict], lengths: Sequence[int]) -> dict[int, dict]:
    """Medians per prompt length over ``rows`` (``overheads``' requests, of one run or pooled
    over several by ``bench-ab``): KV bytes and transfer time against raw TCP of the same bytes,
    their throughputs and ratio, the router's added latency, the first-to-second-token gap and
    one decode step."""
    by_len = {}
    for n in lengths:
        sel = [x for x in rows if x["prompt_tokens"] == n]
        kv_ms, raw_ms = statistics.median(x["kv_transfer_ms"] for x in sel), statistics.median(x["raw_tcp_ms"] or 0 for x in sel)
        nbytes = sel[0]["kv_transfer_bytes"]
        by_len[n] = {"kv_transfer_bytes": nbytes, "kv_transfer_ms_median": kv_ms, "raw_tcp_ms_median": raw_ms,
                     "transport_mib_s": nbytes / 2**20 / (kv_ms / 1e3) if kv_ms else None,
                     "raw_tcp_mib_s": nbytes / 2**20 / (raw_ms / 1e3) if raw_ms else None,
                     "transport_fraction_of_raw": (raw_ms / kv_ms) if kv_ms else None,
                     "router_added_ms_median": statistics.median(x["router_added_ms"] for x in sel),
                     "first_to_second_token_ms_median": statistics.median(x["first_to_second_token_ms"] for x in sel),
                     "decode_step_ms_median": statistics.median(x["decode_step_ms"] for x in sel)}
    return by_len


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of sorted values as one of them (no interpolation): with few
    requests, p99 is the worst one. The overheads' tails use it."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _overhead_ids(n: int, r: int, vocab_id: int) -> list[int]:
    """The prompt of length ``n`` and repeat ``r``: distinct for each pair, so none is cached."""
    return [(vocab_id + 7 * i + 131 * r + n) % 48_000 + 100 for i in range(n)]


def _overhead_row(client: PdServeClient, n: int, ids: list[int]) -> dict:
    """One sequential request, timed per streamed token."""
    start, stamps, final = time.perf_counter(), [], None
    for msg in client.stream(build_request(token_ids=ids, max_tokens=6, ignore_eos=True)):
        stamps += [time.perf_counter()] * len(msg.token_ids)
        final = msg if msg.final else final
    t = final.timings  # router-side TTFT: arrival to first token sent
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return {"prompt_tokens": n, "router_added_ms": t.ttft_ms - t.prefill_ms,
            "client_ttft_ms": (stamps[0] - start) * 1e3, "prefill_ms": t.prefill_ms,
            "client_e2e_ms": (time.perf_counter() - start) * 1e3, "kv_transfer_ms": t.kv_transfer_ms,
            "kv_transfer_bytes": t.kv_transfer_bytes,
            "first_to_second_token_ms": (stamps[1] - stamps[0]) * 1e3,
            "decode_step_ms": statistics.median(steps) * 1e3,
            "raw_tcp_ms": _raw_tcp_ms(t.kv_transfer_bytes) if t.kv_transfer_bytes else None}


def _raw_tcp_ms(nbytes: int, chunk: int = 1 << 20) -> float:
    """Milliseconds to stream ``nbytes`` over a fresh TCP connection on 127.0.0.1 (connect
    included, as a pull's is) until the receiver has read them all."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = threading.Event()

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            got = 0
            while got < nbytes:
                data = conn.recv(chunk)
                if not data:
                    break
                got += len(data)
        received.set()

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    payload = bytes(min(chunk, nbytes))
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        sent = 0
        while sent < nbytes:
            conn.sendall(payload[: min(chunk, nbytes - sent)])
            sent += min(chunk, nbytes - sent)
    received.wait(30)
    elapsed = time.perf_counter() - start
    server.close()
    return elapsed * 1e3


def http_overhead(grpc_target: str, http_target: str, n: int = 40, length: int = 256, vocab_id: int = 3000) -> dict:
    """Client-seen TTFT of the same deployment through its gRPC API and its OpenAI HTTP API:
    ``n`` pairs of sequential one-token requests of ``length`` distinct token ids each, the order
    within a pair alternating so drift cancels; medians and the median difference."""
    async def measure() -> list[tuple[float, float]]:
        out = []
        async with runner.driver(grpc_target) as g, runner.driver(http_target) as h:
            for i in range(n):
                reqs = [BenchRequest(1, token_ids=tuple((vocab_id + 97 * i + 13 * k + j) % 48_000 + 100
                                                        for j in range(length))) for k in range(2)]
                order = (g, h) if i % 2 else (h, g)
                got = {id(c): (await c.send(r, 60)).ttft_s for c, r in zip(order, reqs)}
                out.append((got[id(g)], got[id(h)]))
        return out
    pairs = asyncio.run(measure())
    grpc_ms = [1e3 * g for g, _ in pairs]
    http_ms = [1e3 * h for _, h in pairs]
    return {"requests": n, "prompt_tokens": length, "grpc_ttft_ms_p50": statistics.median(grpc_ms),
            "http_ttft_ms_p50": statistics.median(http_ms),
            "http_minus_grpc_ms_p50": statistics.median(h - g for g, h in zip(grpc_ms, http_ms))}
