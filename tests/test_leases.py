"""The prefill side's lease registry and pull gate (kv_transfer/leases.py) as plain objects: what
every transport's server checks before it sends a byte. The transports themselves are in
tests/test_transport.py."""
from __future__ import annotations

import threading
import time

import pytest

from kv_transfer import leases
from kv_transfer.leases import HeldKv, PullGate

SECRET = "s3cret-of-this-transfer"


def test_lease_expiry_waits_for_pulls_in_flight():
    held = HeldKv(lease_s=10)
    held.hold("a", [1])
    held.hold("b", [2])
    assert held.pin("a") is not None
    assert held.take_finished(now=1e12) == {"b"}          # a is being pulled: not freed under it
    held.unpin("a")
    assert held.take_finished(now=1e12) == {"a"}
    assert len(held) == 0


def test_release_before_hold_frees_on_arrival():
    held = HeldKv(lease_s=10)
    assert held.release("early") is False
    held.hold("early", [4])
    assert held.pin("early") is None                        # nobody may pull released blocks
    assert held.take_finished() == {"early"}


@pytest.mark.parametrize("ending", ["released", "expired"])
def test_a_pull_for_an_ended_hold_is_refused_at_once(monkeypatch, ending):
    """A decode that asks after the hold ended (the router released it, or its lease ran out) gets
    NOT_FOUND at once, not after waiting for a hold that cannot come."""
    monkeypatch.setattr(leases, "HOLD_WAIT_S", 3600.0)
    gate = PullGate(HeldKv(lease_s=10), "fp")
    gate.held.hold("gone", [1], secret=SECRET)
    if ending == "released":
        assert gate.held.release("gone", SECRET) is True
    assert gate.held.take_finished(now=time.monotonic() + (0 if ending == "released" else 11)) == {"gone"}
    refused = []
    asker = threading.Thread(target=lambda: refused.append(_refusal(gate, "gone")), daemon=True)
    asker.start()
    asker.join(30)
    assert refused == ["NOT_FOUND"]


def _refusal(gate: PullGate, request_id: str) -> str:
    try:
        gate.admit(request_id, SECRET, "fp")
    except leases.PullRefused as err:
        return err.code
    return "admitted"
