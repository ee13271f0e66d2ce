"""``RoleBalancer``: moves an adaptive deployment's engines between roles when SLO attainment shows
one phase short of capacity (``mode: adaptive``).

Roles: ``both`` (the engine takes prompts and decodes), ``prefill`` (prompts only: its requests
decode elsewhere) and ``decode`` (decodes only: no prompt is admitted to it). Every engine starts
in ``both``, so an adaptive deployment starts as a colocated one that disaggregates per request;
with one engine in ``prefill`` and one in ``decode`` it is the fixed 1:1 split.

The router feeds it every finished request that carries an SLO (``on_request``) and calls
``rebalance`` from its load poller. Over the last ``window`` such requests:
- TTFT attainment below ``target`` while TPOT attainment meets it: prefill is short. An engine in
  ``decode`` goes back to ``both``; else one in ``both`` becomes ``prefill``, so its prompts stop
  waiting behind decode steps there.
- TPOT attainment short while TTFT meets it: the mirror image (``prefill`` back to ``both``, else a
  ``both`` becomes ``decode``, so no prompt stalls its decodes). The last ``both`` engine
  completes the split: ``prefill`` beside decode engines (the decodes it kept were the ones its
  prefills stalled), else ``decode``.
- A change is never undone for the reason it was made (a ``prefill`` made because TPOT was short
  does not go back to ``both`` because TPOT is short), so the roles do not oscillate.
- Both short (overload) or both met: no change.
At least one engine always takes prompts and one decodes. After a change the window starts again,
and no change comes within ``cooldown_s``. Pure: load and time are passed in.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

from pdserve.base.types import LoadSnapshot, RequestRecord, RouteDecision

BOTH, PREFILL, DECODE = "both", "prefill", "decode"


@dataclass(frozen=True)
class RoleChange:
    """One engine's change of role, and why: ``reason`` (``ttft_short`` or ``tpot_short``, a
    decision label in the metrics) and the short phase's ``attainment`` over the window."""

    instance: str
    old: str
    new: str
    reason: str
    attainment: float


class RoleBalancer:
    """The roles of one adaptive deployment's engines."""

    def __init__(self, instances: Sequence[str], target: float = 0.9, window: int = 50,
                 cooldown_s: float = 10.0) -> None:
        self.roles = {name: BOTH for name in instances}
        self.target, self.cooldown_s = target, cooldown_s
        self._window: deque[tuple[bool, bool]] = deque(maxlen=window)
        self._last_change = float("-inf")
        self._why: dict[str, str] = {}
        """The reason of each engine's last change: a role is not undone for the reason that made it."""

    def takes_prompts(self, name: str) -> bool:
        """Whether admission may send this engine a prompt (the prefill pool's filter)."""
        return self.roles.get(name, BOTH) != DECODE

    def takes_decodes(self, name: str) -> bool:
        """Whether a decode may run on this engine (the decode pool's filter and the split rule's)."""
        return self.roles.get(name, BOTH) != PREFILL

    def on_request(self, record: RequestRecord) -> None:
        """A finished request (``RouterStats`` listener): counted when it carries an SLO."""
        if record.ttft_s is not None and (record.ttft_slo_s or record.tpot_slo_s):
            self._window.append(record.slo_met())

    def on_decision(self, decision: RouteDecision) -> None:
        """``RouterStats`` listener hook; routing decisions do not move roles."""

    def rebalance(self, loads: Sequence[LoadSnapshot], now: float) -> RoleChange | None:
        """The change the last window calls for, applied; None when it calls for none."""
        if (not self._window.maxlen or len(self._window) < self._window.maxlen
                or now - self._last_change < self.cooldown_s):
            return None
        ttft = sum(ok for ok, _ in self._window) / len(self._window)
        tpot = sum(ok for _, ok in self._window) / len(self._window)
        if ttft < self.target <= tpot:
            change = self._shift(loads, undo=DECODE, to=PREFILL, reason="ttft_short", attainment=ttft)
        elif tpot < self.target <= ttft:
            change = self._shift(loads, undo=PREFILL, to=DECODE, reason="tpot_short", attainment=tpot)
        else:
            return None
        if change is not None:
            self.roles[change.instance] = change.new
            self._why[change.instance] = change.reason
            self._window.clear()
            self._last_change = now
        return change

    def _shift(self, loads: Sequence[LoadSnapshot], undo: str, to: str, reason: str,
               attainment: float) -> RoleChange | None:
        """Give the short phase an engine: undo a specialisation made for the other phase first,
        else specialise a ``both`` engine while another ``both`` remains (one engine of each
        phase): for decode the one decoding most, for prefill the one decoding least; for decode,
        the last ``both`` engine completes the split."""
        live = sorted((s for s in loads if s.alive and s.instance in self.roles), key=lambda s: (s.running, s.instance))
        for s in live:
            if self.roles[s.instance] == undo and self._why.get(s.instance) != reason:
                return RoleChange(s.instance, undo, BOTH, reason, attainment)
        both = [s for s in live if self.roles[s.instance] == BOTH]
        if len(both) >= 2:
            return RoleChange((both[-1] if to == DECODE else both[0]).instance, BOTH, to, reason, attainment)
        if to == DECODE and len(both) == 1 and len(live) > 1:  # the last mixed engine completes the split
            new = PREFILL if any(self.roles[s.instance] == DECODE for s in live) else DECODE
            return RoleChange(both[0].instance, BOTH, new, reason, attainment)
        return None
