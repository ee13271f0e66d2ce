"""The connector's idle wait (kv_transfer/worker_side.py): a step that runs no forward pass while
blocks are held or pulled waits for one of them to end, up to ``idle_wait_ms``, instead of letting
vLLM re-step the engine every millisecond; any other step reports at once. Real WorkerSide and
lease registry, no engine; the release comes from another thread, as a KV server's would."""
from __future__ import annotations

import threading
import time

import pytest

from kv_transfer.messages import ConnectorSettings, PdserveConnectorMeta, SendSpec
from kv_transfer.worker_side import WorkerSide

LONG_MS = 30_000.0
"""A bound no passing test reaches: returning well before it shows the wait ended for a reason."""


@pytest.fixture
def side():
    made = []

    def make(idle_wait_ms: float) -> WorkerSide:
        made.append(WorkerSide(ConnectorSettings(idle_wait_ms=idle_wait_ms), num_blocks=8, is_producer=True))
        return made[-1]
    yield make
    for s in made:
        s.shutdown()


def _step(worker: WorkerSide, idle: bool, hold: bool = False) -> None:
    sends = [SendSpec("r1", [1, 2], secret="s")] if hold else []
    worker.start_step(PdserveConnectorMeta(sends=sends, idle=idle))


def _timed_results(worker: WorkerSide) -> tuple[set[str], float]:
    start = time.monotonic()
    finished = worker.transfer_results().finished_sending
    return finished, time.monotonic() - start


def test_an_idle_step_ends_its_wait_when_a_hold_is_released(side):
    worker = side(LONG_MS)
    _step(worker, idle=False, hold=True)
    _step(worker, idle=True)
    threading.Timer(0.2, worker._held.release, args=("r1", "s")).start()
    finished, waited = _timed_results(worker)
    assert finished == {"r1"}
    assert 0.15 <= waited < 10


@pytest.mark.parametrize("idle,hold_first,wait_ms", [
    (False, True, LONG_MS),   # a step with a forward pass never waits
    (True, False, LONG_MS),   # nothing held or pulled: nothing to wait for
    (True, True, 0.0),        # the wait turned off
])
def test_other_steps_report_at_once(side, idle, hold_first, wait_ms):
    worker = side(wait_ms)
    if hold_first:
        _step(worker, idle=False, hold=True)
    _step(worker, idle=idle)
    finished, waited = _timed_results(worker)
    assert finished == set() and waited < 10


def test_an_idle_wait_is_bounded(side):
    worker = side(300.0)
    _step(worker, idle=False, hold=True)
    _step(worker, idle=True)
    finished, waited = _timed_results(worker)
    assert finished == set() and 0.25 <= waited < 10


def test_a_release_between_steps_is_not_missed(side):
    """A release that lands after one report and before the next idle step's wait: that step
    returns at once with it, rather than sleeping through its bound."""
    worker = side(LONG_MS)
    _step(worker, idle=False, hold=True)
    worker.transfer_results()
    worker._held.release("r1", "s")
    _step(worker, idle=True)
    finished, waited = _timed_results(worker)
    assert finished == {"r1"} and waited < 10
