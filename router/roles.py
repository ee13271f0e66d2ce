"""``RoleBalancer``: moves an adaptive deployment's engines between roles when SLO attainment shows
one phase short of capacity (``mode: adaptive``).

Roles: ``both`` (the engine takes prompts and decodes), ``prefill`` (prompts only: its requests
decode elsewhere) and ``decode`` (decodes only: no prompt is admitted to it). Every engine starts
in ``both``, so an adaptive deployment starts as a colocated one that disaggregates per request;
with one engine in ``prefill`` and one in ``decode`` it is the fixed 1:1 split.

The router feeds it every finished request that carries an SLO (``on_request``) and calls
``rebalance`` from its load poller. A request counts against a phase when its latency there passes
``headroom`` x its SLO (at risk, whether or not it missed): acting on those, not on misses, gives
the phase an engine while the load is still within the SLO, so the change is made before the
attainment falls. A phase is short as soon as the last ``window`` such requests hold more at-risk
requests than a full window may miss (``(1 - target) x window``): a clear shortfall is acted on at
once, without waiting for the window to fill. Only requests that began under the current
roles count (one that began before the last change saw the old ones). Then:
- TTFT attainment below ``target`` while TPOT attainment meets it: prefill is short. An engine in
  ``decode`` goes back to ``both``; else one in ``both`` becomes ``prefill``, so its prompts stop
  waiting behind decode steps there.
- TPOT attainment short while TTFT meets it: the mirror image (``prefill`` back to ``both``, else a
  ``both`` becomes ``decode``, so no prompt stalls its decodes). A ``both`` engine that would be
  left alone beside decode engines completes the split in the same step (``prefill``): it would
  take every prompt and stall its own decodes with them.
- A change is never undone for the reason it was made (a ``prefill`` made because TPOT was short
  does not go back to ``both`` because TPOT is short), so the roles do not oscillate.
- Both short (overload) or both met: no change.
At least one engine always takes prompts and one decodes. After a change the window starts again,
and no change comes within ``cooldown_s``. Pure: load and time are passed in (a request's start is
the poll that took it in, less its end-to-end time).
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
    decision label in the metrics) and the short phase's ``attainment`` over the window (of its
    SLO scaled by the headroom)."""

    instance: str
    old: str
    new: str
    reason: str
    attainment: float


class RoleBalancer:
    """The roles of one adaptive deployment's engines."""

    def __init__(self, instances: Sequence[str], target: float = 0.9, window: int = 50,
                 cooldown_s: float = 10.0, headroom: float = 1.0) -> None:
        self.roles = {name: BOTH for name in instances}
        self.target, self.cooldown_s, self.headroom = target, cooldown_s, headroom
        self._window: deque[tuple[bool, bool]] = deque(maxlen=window)
        self._allowed = int((1 - target) * window + 1e-9)
        """Misses per phase a full window may hold and still meet the target."""
        self._finished: list[RequestRecord] = []
        """Requests finished since the last poll, not yet windowed."""
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
            self._finished.append(record)

    def on_decision(self, decision: RouteDecision) -> None:
        """``RouterStats`` listener hook; routing decisions do not move roles."""

    def rebalance(self, loads: Sequence[LoadSnapshot], now: float) -> list[RoleChange]:
        """The changes the window calls for, applied (one step; empty when it calls for none)."""
        self._take(now)
        if not self._window or now - self._last_change < self.cooldown_s:
            return []
        ttft_missed = sum(not ok for ok, _ in self._window)
        tpot_missed = sum(not ok for _, ok in self._window)
        if ttft_missed > self._allowed >= tpot_missed:
            changes = self._shift(loads, undo=DECODE, to=PREFILL, reason="ttft_short",
                                  attainment=1 - ttft_missed / len(self._window))
        elif tpot_missed > self._allowed >= ttft_missed:
            changes = self._shift(loads, undo=PREFILL, to=DECODE, reason="tpot_short",
                                  attainment=1 - tpot_missed / len(self._window))
        else:
            return []
        for change in changes:
            self.roles[change.instance] = change.new
            self._why[change.instance] = change.reason
        if changes:
            self._window.clear()
            self._last_change = now
        return changes

    def _take(self, now: float) -> None:
        """Window the requests finished since the last poll that began under the current roles."""
        for record in self._finished:
            if now - (record.e2e_s or 0.0) >= self._last_change:
                self._window.append(record.slo_met(self.headroom))
        self._finished.clear()

    def _shift(self, loads: Sequence[LoadSnapshot], undo: str, to: str, reason: str,
               attainment: float) -> list[RoleChange]:
        """Give the short phase an engine: undo a specialisation made for the other phase first,
        else specialise a ``both`` engine while another ``both`` remains (one engine of each
        phase), for prefill the one decoding least; for decode see ``_to_decode``."""
        live = sorted((s for s in loads if s.alive and s.instance in self.roles), key=lambda s: (s.running, s.instance))
        for s in live:
            if self.roles[s.instance] == undo and self._why.get(s.instance) != reason:
                return [RoleChange(s.instance, undo, BOTH, reason, attainment)]
        both = [s.instance for s in live if self.roles[s.instance] == BOTH]
        if to == DECODE:
            return self._to_decode(both, [s.instance for s in live], reason, attainment)
        return [RoleChange(both[0], BOTH, PREFILL, reason, attainment)] if len(both) >= 2 else []

    def _to_decode(self, both: list[str], live: list[str], reason: str, attainment: float) -> list[RoleChange]:
        """TPOT short: the ``both`` engine decoding most becomes ``decode``. A ``both`` engine that
        would be left alone beside decode engines would take every prompt and stall its own
        decodes with them, the interference the change removes: it completes the split in the same
        step (``prefill``), as does a last ``both`` engine (``decode`` when no engine decodes yet)."""
        if len(both) >= 2:
            changes = [RoleChange(both[-1], BOTH, DECODE, reason, attainment)]
            if len(both) == 2:  # the other would be left alone beside decode engines
                changes.append(RoleChange(both[0], BOTH, PREFILL, reason, attainment))
            return changes
        if len(both) == 1 and len(live) > 1:
            new = PREFILL if any(self.roles[name] == DECODE for name in live) else DECODE
            return [RoleChange(both[0], BOTH, new, reason, attainment)]
        return []
