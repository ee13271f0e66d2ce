"""Requests survive a worker failure, on the real stack: the decode worker serving a stream is
killed (SIGKILL, with its engine process) mid-stream; the stream continues on the other decode
instance from the tokens already sent, with no token repeated or skipped. Ray restarts the killed
worker, which rejoins its pool.

Exactness: up to the failure the stream equals an uninterrupted greedy run, and after it, the
engine's own greedy continuation of the prompt plus the tokens already sent. (In bf16 that
continuation is not always bit-identical to the uninterrupted run's: the migrated tokens' KV is
recomputed as one prefill instead of step by step, which changes the last bits; see the README on
bf16 exactness.)"""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import ray

from conftest import start_router, stop_router, wait_until
from helpers import STORY, idle, reference, reset_caches, tokenize
from pdserve.base.types import PromptInput, SamplingSpec
from pdserve.client import PdServeClient, build_request

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def two_decode(cluster):
    """The session cluster plus a second decode instance for this module."""
    extra = cluster.add_worker("decode")
    yield cluster
    cluster.remove_worker(extra.name)


def _kill_worker(worker) -> None:
    """SIGKILL a worker actor's process and its engine processes (a crashed node, as Ray sees it)."""
    pid = ray.get(worker.actor.pid.remote(), timeout=30)
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in procs:
        os.kill(proc.pid, signal.SIGKILL)


def _continues(cluster, ids: list[int], tokens: list[int], m: int) -> bool:
    """Whether ``tokens[m:]`` is the engine's greedy continuation of the prompt plus ``tokens[:m]``."""
    tail = reference(cluster, f"failover-cont-{m}", ids + tokens[:m],
                     SamplingSpec(max_tokens=len(tokens) - m, ignore_eos=True))
    return tail.token_ids == tokens[m:]


def _serving(cluster) -> object:
    """The decode worker currently running a request."""
    for _ in range(100):
        for worker in cluster.decode:
            if ray.get(worker.actor.load.remote(), timeout=30).running:
                return worker
        time.sleep(0.05)
    raise AssertionError("no decode worker is running the request")


def test_decode_killed_mid_stream_continues_elsewhere_with_identical_greedy_output(two_decode):
    cluster = two_decode
    prompt = STORY * 3 + "What happened next?"
    ids = tokenize(cluster, PromptInput(text=prompt))
    expected = reference(cluster, "failover-ref", ids, SamplingSpec(max_tokens=MAX_TOKENS, ignore_eos=True))
    reset_caches(cluster)
    router = start_router(cluster.prefill, cluster.decode, cluster.model_info, metrics=False)
    client = PdServeClient(router.target)
    try:
        call = client.stream(build_request(prompt=prompt, max_tokens=MAX_TOKENS, ignore_eos=True), timeout_s=300)
        messages, tokens, victim, killed_at = [], [], None, 0
        for msg in call:
            messages.append(msg)
            tokens += msg.token_ids
            if victim is None and len(tokens) >= 8:
                victim, killed_at = _serving(cluster), len(tokens)
                _kill_worker(victim)
        final = messages[-1]
        back = wait_until(lambda: all(s.alive for s in router.server.decode.snapshots()), 240, interval_s=1.0)
        recoveries = router.server.decode.recoveries.get(victim.name, (0, 0.0))
    finally:
        client.close()
        stop_router(router)
    assert final.final and final.finish_reason == "length" and final.decode_migrations == 1
    assert final.decode_instance != victim.name and final.usage.completion_tokens == MAX_TOKENS
    assert tokens[:killed_at] == expected.token_ids[:killed_at]
    assert any(_continues(cluster, ids, tokens, m) for m in range(killed_at, killed_at + 8))  # nothing repeated or skipped
    assert back and recoveries[0] == 1 and recoveries[1] > 0  # the killed worker was restarted and rejoined
    assert wait_until(lambda: idle(cluster), 60)
