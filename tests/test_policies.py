"""Routing policies: deterministic given a seed, exact choices in forced situations, and each
DualMap feature shown by a test that fails without it."""
from __future__ import annotations

import random

import pytest

from pdserve.base.types import LoadSnapshot
from router.latency import LatencyModel
from router.policies import (POLICIES, InstanceQueue, PolicyContext, QueuedRequest, RouteRequest, block_hashes,
                             make_policy)
from router.policies.dualmap import DualMapPolicy
from router.policies.hashring import HashRing
from router.policies.hotness import HotnessTree

SEED = 7
NAMES = [f"p{i}" for i in range(8)]
LINEAR = LatencyModel(prefill=(0.0, 0.001, 0.0), decode=(0.01, 0.001, 0.0), origin="test: 1 ms per token")


def snaps(pending: dict[str, int] | None = None, names=NAMES) -> list[LoadSnapshot]:
    """Queued uncached tokens per instance, and their seconds at LINEAR's 1 ms per token."""
    pending = pending or {}
    return [LoadSnapshot(n, pending_prefill_tokens=pending.get(n, 0), queued_prefill_s=pending.get(n, 0) / 1e3)
            for n in names]


def req(rid: str, hashes: tuple[int, ...], tokens: int | None = None, **kw) -> RouteRequest:
    return RouteRequest(rid, hashes, tokens if tokens is not None else 32 * len(hashes) + 5, **kw)


def workload(n: int, seed: int) -> list[RouteRequest]:
    rng = random.Random(seed)
    return [req(f"r{i}", (0, rng.randrange(30), rng.randrange(1000)), rng.randrange(64, 4000)) for i in range(n)]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_are_deterministic_given_a_seed(name):
    def run() -> list[str]:
        policy, rng = make_policy(name, PolicyContext(seed=SEED, latency=LINEAR)), random.Random(SEED)
        out = []
        for r in workload(300, SEED):
            candidates = snaps({n: rng.randrange(5000) for n in NAMES})
            out.append(policy.select(r, candidates).instance)
        return out
    first, second = run(), run()
    assert first == second and len(set(first)) > 1


@pytest.mark.parametrize("name,pending,expected,reason", [
    ("least_loaded", {"p0": 500, "p1": 100, "p2": 100}, "p1", "load"),
    ("least_loaded", {"p0": 0, "p1": 100, "p2": 100}, "p0", "load"),
    ("power_of_two", {"p0": 900, "p1": 100}, "p1", "load"),     # two candidates: the less loaded, any seed
    ("power_of_two", {"p0": 10, "p1": 900}, "p0", "load"),
    ("kv_cost", {"p0": 300, "p1": 20, "p2": 700}, "p1", "load"),  # nothing cached: least cost = least load + tokens
])
def test_load_policies_choose_exactly(name, pending, expected, reason):
    names = sorted(pending)
    choice = make_policy(name, PolicyContext(seed=SEED)).select(req("r", (1, 2, 3)), snaps(pending, names))
    assert (choice.instance, choice.reason) == (expected, reason)


def test_kv_cost_prices_cached_prefix_against_load():
    policy = make_policy("kv_cost", PolicyContext(block_size=32), load_weight=1.0)
    first = req("a", tuple(range(16)), tokens=1000)
    assert policy.select(first, snaps({"p0": 5000, "p1": 0}, ["p0", "p1"])).instance == "p1"
    # p1 holds 16 blocks (512 tokens): cost 488 + 300 = 788 < 1000 + 100 on p0.
    again = req("b", tuple(range(16)) + (99,), tokens=1000)
    assert policy.select(again, snaps({"p0": 100, "p1": 300}, ["p0", "p1"])).instance == "p1"
    # ... but not at any load: 488 + 600 > 1000 + 0.
    assert policy.select(req("c", tuple(range(16)), tokens=1000), snaps({"p0": 0, "p1": 600}, ["p0", "p1"])).instance == "p0"


def test_cache_aware_prefers_affinity_until_imbalanced():
    policy = make_policy("cache_aware", PolicyContext(), balance_abs_tokens=1000, balance_rel=1.5)
    two = ["p0", "p1"]
    assert policy.select(req("a", (1, 2, 3)), snaps({}, two)).instance == "p0"
    assert policy.select(req("b", (1, 2, 3, 4)), snaps({"p0": 800, "p1": 100}, two)).reason == "affinity"
    imbalanced = policy.select(req("c", (1, 2, 3, 5)), snaps({"p0": 5000, "p1": 100}, two))
    assert (imbalanced.instance, imbalanced.reason) == ("p1", "load")


def test_consistent_hash_keeps_prefixes_together_and_spreads_others():
    policy = make_policy("consistent_hash", PolicyContext(seed=SEED), prefix_blocks=2)
    same = {policy.select(req(f"t{i}", (0, 42) + tuple(range(i))), snaps()).instance for i in range(10)}
    spread = {policy.select(req(f"u{i}", (0, 1000 + i)), snaps()).instance for i in range(64)}
    assert len(same) == 1 and len(spread) >= 6


def test_block_hashes_are_chained_and_block_aligned():
    a, b = block_hashes(list(range(100)), 32), block_hashes(list(range(64)) + [7] * 40, 32)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert block_hashes([5] * 31, 32) == ()
    assert block_hashes([1] * 32 + [2] * 32, 32)[1] != block_hashes([2] * 32 + [2] * 32, 32)[1]  # depends on the prefix


# ---- DualMap -------------------------------------------------------------------------------------

def test_dualmap_candidates_are_two_distinct_instances_from_two_rings():
    policy = DualMapPolicy(PolicyContext(seed=SEED))
    for i in range(200):
        policy.select(req(f"r{i}", (0, i)), snaps())
    pairs = [policy.candidates(req(f"r{i}", (0, i)), NAMES) for i in range(200)]
    assert all(a != b for a, b in pairs)
    assert len({a for a, _ in pairs}) == 8 and len({b for _, b in pairs}) == 8


@pytest.mark.parametrize("slo_aware,expected_reason", [(True, "slo_switch"), (False, "affinity")])
def test_dualmap_slo_switch(slo_aware, expected_reason):
    """The affine candidate is loaded past the TTFT SLO: the SLO-aware policy takes the other."""
    policy = DualMapPolicy(PolicyContext(seed=SEED, latency=LINEAR, block_size=32), slo_aware=slo_aware,
                           slo_fallback=0)
    first = req("turn1", (0, 77, 78, 79), tokens=130)
    a, b = policy.candidates(first, NAMES)
    assert policy.select(first, snaps()).instance in (a, b)
    affine = policy.select(req("warm", (0, 77, 78, 79), tokens=130), snaps()).instance
    other = b if affine == a else a
    turn2 = req("turn2", (0, 77, 78, 79, 80), tokens=170, ttft_slo_ms=500)
    choice = policy.select(turn2, snaps({affine: 2000, other: 100}))  # 2.0 s + ... vs 0.1 s + 0.17 s
    assert choice.reason == expected_reason
    assert choice.instance == (other if slo_aware else affine)
    # predicted TTFT: queued tokens x 1 ms + own uncached prefill (other: 170 new; affine: 42 new)
    assert choice.predicted_ttft_s == pytest.approx(0.1 + 0.170 if slo_aware else 2.0 + 0.042)


@pytest.mark.parametrize("slo_fallback,outside_pair,reason", [(8, True, "slo_fallback"), (0, False, "load")])
def test_dualmap_falls_back_past_both_candidates_only_when_both_miss_the_slo(slo_fallback, outside_pair, reason):
    """Both hash candidates are queued past the SLO and every other instance is idle: with the
    fallback the request goes to a sampled idle instance; the paper's DualMap stays on the pair."""
    policy = DualMapPolicy(PolicyContext(seed=SEED, latency=LINEAR, block_size=32), slo_fallback=slo_fallback)
    r = req("r", (0, 5, 6), tokens=100, ttft_slo_ms=500)
    pair = policy.candidates(r, NAMES)
    choice = policy.select(r, snaps({pair[0]: 3000, pair[1]: 2000}))
    assert (choice.instance not in pair, choice.reason) == (outside_pair, reason)
    assert choice.predicted_ttft_s == pytest.approx(0.1 if outside_pair else 2.0 + 0.1)
    fresh = DualMapPolicy(PolicyContext(seed=SEED, latency=LINEAR, block_size=32), slo_fallback=slo_fallback)
    within = fresh.select(req("r", (0, 5, 6), tokens=100, ttft_slo_ms=5000), snaps({pair[0]: 3000, pair[1]: 2000}))
    assert (within.instance, within.reason) == (pair[1], "load")  # 2.1 s meets a 5 s SLO: no fallback


@pytest.mark.parametrize("follow_owner,expected", [(True, "owner"), (False, "pair")])
def test_dualmap_follows_a_conversation_to_where_its_last_turn_ran(follow_owner, expected):
    """Turn 1 fell back past its loaded hash pair to a third instance. Turn 2 (its prefix and more)
    finds the pair idle again: with ``follow_owner`` it goes where turn 1's blocks are (192 of its
    cached tokens: 0.1 s predicted, not 0.3 s); without, the pair holds nothing of it and it goes
    there, recomputing the whole prompt."""
    policy = DualMapPolicy(PolicyContext(seed=SEED, latency=LINEAR, block_size=32), adaptive_key=False,
                           follow_owner=follow_owner)
    turn1 = req("turn1", (0, 5, 6, 7, 8, 9), tokens=200, ttft_slo_ms=500)
    pair = policy.candidates(turn1, NAMES)
    first = policy.select(turn1, snaps({pair[0]: 3000, pair[1]: 2000}))
    assert first.reason == "slo_fallback" and first.instance not in pair
    turn2 = req("turn2", (0, 5, 6, 7, 8, 9, 10, 11, 12), tokens=300, ttft_slo_ms=500)
    second = policy.select(turn2, snaps())
    assert (second.instance, second.reason) == ((first.instance, "owner") if expected == "owner"
                                                else (min(pair), "load"))   # equal reuse: by name
    assert second.predicted_ttft_s == pytest.approx(0.108 if expected == "owner" else 0.3)


def test_dualmap_keeps_a_conversation_on_its_instance_under_equal_load():
    policy = DualMapPolicy(PolicyContext(seed=SEED, latency=LINEAR))
    chosen = {policy.select(req(f"turn{i}", (0, 5) + tuple(range(10, 10 + i)), tokens=200 + 32 * i), snaps()).instance
              for i in range(1, 8)}
    assert len(chosen) == 1


@pytest.mark.parametrize("adaptive,min_spread,max_spread", [(True, 6, 8), (False, 1, 2)])
def test_dualmap_adaptive_key_skips_a_hot_shared_prefix(adaptive, min_spread, max_spread):
    """Every request starts with the same system-prompt block 0. Its share (100%) exceeds 2/n, so
    the hotness tree lengthens the key past it and conversations spread; keyed on block 0 alone
    they crowd onto two instances."""
    policy = DualMapPolicy(PolicyContext(seed=SEED, latency=LINEAR), adaptive_key=adaptive)
    used = {policy.select(req(f"c{i}", (0, 1000 + i, 2000 + i)), snaps()).instance for i in range(200)}
    assert min_spread <= len(used) <= max_spread
    assert (0 in policy.hotness.expanded) == adaptive or not adaptive


def test_hotness_tree_expands_above_two_over_n_and_contracts_below_one_over_n():
    tree, n = HotnessTree(window=100, max_depth=4, min_count=1), 8
    record = lambda paths: [tree.record(p, 2 / n, 1 / n) for p in paths]  # noqa: E731
    record([(1000 + i, 1) for i in range(70)] + [(7, 100 + i) for i in range(30)])  # 30% under 7 > 2/8
    assert 7 in tree.expanded and tree.depth((7, 123, 5)) == 2
    record([(2000 + i, 1) for i in range(85)])  # 7's oldest leave the window: 15%, inside the hysteresis
    assert 7 in tree.expanded and tree.share(7) == pytest.approx(0.15)
    record([(3000 + i, 1) for i in range(5)])   # 10% < 1/8: contracted
    assert 7 not in tree.expanded and tree.depth((7, 123, 5)) == 1


def test_dualmap_keeps_a_growing_conversation_on_one_key():
    """The key never becomes the whole prompt: turns of a conversation under a hot system prompt
    keep the key of their first own block, whatever their length."""
    policy = DualMapPolicy(PolicyContext(seed=SEED, latency=LINEAR))
    for i in range(100):
        policy.select(req(f"warm{i}", (0, 5000 + i)), snaps())
    turns = [req(f"t{k}", (0, 42) + tuple(range(100, 100 + k))) for k in range(1, 12)]
    assert len({policy.key(t) for t in turns}) == 1


@pytest.mark.parametrize("queue_estimate,expected", [(True, "slo_switch"), (False, "affinity")])
def test_dualmap_prices_the_queue_by_each_queued_request(queue_estimate, expected):
    """A 7k-token request behind one 85k-token prompt on a superlinear profile. Priced per queued
    request the wait is the big prompt's own 8.1 s, past the 5 s SLO; priced at the arriving
    request's per-token cost it looks like 1.4 s and the switch is blind."""
    model = LatencyModel(prefill=(0.0, 1e-5, 1e-9), decode=(0.01, 0.0, 0.0), origin="superlinear")
    policy = DualMapPolicy(PolicyContext(seed=SEED, latency=model, block_size=512), queue_estimate=queue_estimate)
    conv = req("turn1", (0, 77), tokens=7000, ttft_slo_ms=5000)
    affine = policy.select(conv, snaps()).instance
    a, b = policy.candidates(conv, NAMES)
    other = b if affine == a else a
    big = 85_000
    loaded = [LoadSnapshot(n, pending_prefill_tokens=big if n == affine else 0,
                           queued_prefill_s=model.prefill_s(big) if n == affine else 0.0) for n in NAMES]
    choice = policy.select(req("turn2", (0, 77, 78), tokens=7000, ttft_slo_ms=5000), loaded)
    assert (choice.reason, choice.instance) == (expected, other if queue_estimate else affine)


def _queues(policy, requests, names=NAMES, busy=0.0, waited=0.0):
    """Route ``requests`` on an idle pool and return each instance's router-side queue."""
    placed: dict[str, list] = {n: [] for n in names}
    for r in requests:
        choice = policy.select(r, snaps({}, names))
        prefill_s = LINEAR.prefill_s(r.num_tokens - choice.cached_tokens, choice.cached_tokens)
        placed[choice.instance].append(QueuedRequest(r, prefill_s, arrived_s=0.0))
    return {n: InstanceQueue(n, busy, tuple(items), now_s=waited) for n, items in placed.items()}


@pytest.mark.parametrize("slo_ms,expect_moves", [(6000, 4), (60_000, 0)])
def test_dualmap_rebalances_only_a_queue_that_violates_the_slo(slo_ms, expect_moves):
    """One hot conversation queues 10 prefills (1 s, then 0.936 s each with its 64 cached tokens) on
    one instance: 9.4 s. With a 6 s SLO the queue violates it, and the last-queued requests (largest
    gain first) move to their other candidate until the source meets the SLO: 4 moves, 5.7 s left,
    4 s on the target. With 60 s nothing moves, however uneven."""
    policy = DualMapPolicy(PolicyContext(seed=SEED, latency=LINEAR, block_size=32), adaptive_key=False)
    burst = [req(f"hot{i}", (7, 8, 900 + i), tokens=1000, ttft_slo_ms=slo_ms) for i in range(10)]
    queues = _queues(policy, burst)
    source = max(queues, key=lambda n: len(queues[n].items))
    moves = policy.rebalance(list(queues.values()))
    pair = policy.candidates(burst[0], NAMES)
    assert len(moves) == expect_moves and all(m.target in pair and m.target != source for m in moves)
    assert [m.request_id for m in moves] == [f"hot{i}" for i in range(9, 9 - expect_moves, -1)]
    kept = [q for q in queues[source].items if q.request.request_id not in {m.request_id for m in moves}]
    if expect_moves:
        assert sum(q.prefill_s for q in kept) == pytest.approx(1.0 + 5 * 0.936)   # the source meets the SLO
        assert sum(m.prefill_s for m in moves) == pytest.approx(4.0)    # and the target still does (priced
        # before any move, as one round: nothing cached there yet)


@pytest.mark.parametrize("follow_moves", [True, False])
def test_dualmap_cache_view_follows_a_moved_request(follow_moves):
    """After a move, that conversation's next turn is steered to where its blocks now are; without
    the follow, the stale view sends it back to the source."""
    policy = DualMapPolicy(PolicyContext(seed=SEED, latency=LINEAR, block_size=32), adaptive_key=False,
                           follow_moves=follow_moves)
    burst = [req(f"conv{i}", (7, 8, 900 + i, 950 + i), tokens=1000, ttft_slo_ms=6000) for i in range(10)]
    queues = _queues(policy, burst)
    source = max(queues, key=lambda n: len(queues[n].items))
    moves = policy.rebalance(list(queues.values()))
    moved = next(m for m in moves)
    i = int(moved.request_id[4:])
    nxt = policy.select(req("next", (7, 8, 900 + i, 950 + i, 999), tokens=1100, ttft_slo_ms=6000), snaps())
    assert nxt.instance == (moved.target if follow_moves else source)


def test_dual_ring_scaling_moves_about_one_nth_of_keys():
    keys = list(range(20_000))
    ring = HashRing(NAMES, vnodes=64, seed=1)
    before = {k: ring.lookup(k) for k in keys}
    ring.sync(NAMES + ["p8"])
    moved = [k for k in keys if ring.lookup(k) != before[k]]
    assert all(ring.lookup(k) == "p8" for k in moved)           # only keys taken by the new instance
    assert 0.6 / 9 < len(moved) / len(keys) < 1.6 / 9           # about 1/N, not a reshuffle
    ring.sync([n for n in NAMES if n != "p3"])
    assert all(ring.lookup(k) == before[k] for k in keys if before[k] != "p3")   # removal: only p3's keys move
    naive_moved = sum(1 for k in keys if k % 8 != k % 9) / len(keys)             # modulo hashing, for contrast
    assert naive_moved > 0.8


def test_decode_p2c_load_and_tpot_check():
    policy = make_policy("decode_p2c", PolicyContext(seed=SEED, latency=LINEAR))
    a = LoadSnapshot("d0", running=30, kv_cache_usage=0.1)
    b = LoadSnapshot("d1", running=2, kv_cache_usage=0.5)
    assert policy.select(req("r", (1,), 100), [a, b]) .instance == "d0"          # lower KV usage
    tight = req("r", (1,), 100, tpot_slo_ms=20)   # d0: 10 + 31 ms > 20 ms; d1: 10 + 3 ms
    assert (policy.select(tight, [a, b]).instance, policy.select(tight, [a, b]).reason) == ("d1", "slo_switch")


def test_latency_model_fit_recovers_coefficients():
    prefill = [(n, 0.02 + 1e-4 * n + 2e-8 * n * n) for n in (32, 128, 512, 1024, 2048, 4096)]
    decode = [(b, c, 0.01 + 0.002 * b + 1e-6 * b * c) for b in (1, 4, 16) for c in (128, 1024)]
    model = LatencyModel.fit(prefill, decode, "synthetic")
    assert model.prefill == pytest.approx((0.02, 1e-4, 2e-8), rel=1e-6)
    assert model.decode == pytest.approx((0.01, 0.002, 1e-6), rel=1e-6)
    assert model.prefill_s(0) == 0.0 and model.decode_step_s(1, 0) == pytest.approx(0.012)


def test_a_hash_ring_synced_to_no_members_after_a_generator_is_empty():
    """``sync`` skips work for the sequence it saw last; an empty list after a generator is not
    that sequence."""
    ring = HashRing(vnodes=4)
    ring.sync(n for n in NAMES)
    ring.sync([])
    assert ring.members == set()
    with pytest.raises(LookupError):
        ring.lookup(1)
