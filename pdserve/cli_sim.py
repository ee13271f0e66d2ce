"""The ``pdserve`` commands that run the simulators: simulate (routing policies on a trace), plan (the
P:D split and parallelism from SLOs) and sim-check (the serving simulator against a live bench run).
Registered on the main parser by ``add_sim_commands`` (see ``pdserve.cli``)."""
from __future__ import annotations

import argparse

from pdserve.base import config as config_mod


def add_sim_commands(sub: argparse._SubParsersAction) -> None:
    """Add the simulator subcommands to ``pdserve``'s parser."""
    _add_simulate(sub), _add_plan(sub), _add_sim_check(sub)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("simulate", help="trace-driven cluster simulation of the routing policies")
    sim.add_argument("--setup", help="a regime under deploy/sim (paper, paper-h100, paper-tune, paper-routers4, cpu, "
                     "synthetic, azure-conv) or a YAML path; default: the CPU regime of --trace")
    sim.add_argument("--trace", choices=["mooncake", "azure-conv", "azure-code", "synthetic"])
    sim.add_argument("--limit", type=int, help="first N requests only")
    sim.add_argument("--prefill", type=int), sim.add_argument("--decode", type=int)
    sim.add_argument("--cache-blocks", type=int, help="prefix cache per prefill instance, blocks")
    sim.add_argument("--ttft-slo-s", type=float, help="default: the setup's, else isolated prefill of the p95 prompt")
    sim.add_argument("--policies", default="all", help="comma-separated prefill policies")
    sim.add_argument("--profile", help="latency profile: a name under deploy/profiles or a JSON path")
    sim.add_argument("--requests", type=int), sim.add_argument("--rate", type=float)
    sim.add_argument("--seed", type=int)
    sim.add_argument("--routers", type=int, help="router replicas, each seeing the others' load as last reported")
    sim.add_argument("--param", action="append", default=[], metavar="POLICY.NAME=VALUE",
                     help="a policy parameter, e.g. cache_aware.balance_abs_tokens=32768 (repeatable)")
    sim.add_argument("--ablation", action="store_true", help="also DualMap's goodput with each mechanism off")
    sim.add_argument("--out", default="results/sim")
    sim.set_defaults(func=_simulate)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="the P:D split with the highest goodput per device under TTFT/TPOT SLOs")
    plan.add_argument("--profile", default="cpu-smollm2-135m", help="latency profile (NAME-tpN files for TP N)")
    plan.add_argument("--tp", default="1", help="comma-separated tensor-parallel degrees to consider")
    plan.add_argument("--gpus", type=int, default=2, help="device budget (instances x TP)")
    plan.add_argument("--workload", choices=["sharegpt", "azure-conv", "azure-code", "mooncake"], default="sharegpt")
    plan.add_argument("--requests", type=int, default=30_000, help="workload pool (arrivals at 1 req/s)")
    plan.add_argument("--input-scale", type=float, default=1.0,
                      help="multiply every prompt's length (a sensitivity study)")
    plan.add_argument("--max-context", type=int, default=0,
                      help="cap prompt + output tokens (the model's context; 0: none)")
    plan.add_argument("--max-output", type=int, default=0, help="cap output tokens (a client's max_tokens; 0: none)")
    plan.add_argument("--horizon-s", type=float, default=120.0, help="simulated seconds per run (steady state)")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--ttft-slo-s", type=float, required=True)
    plan.add_argument("--tpot-slo-s", type=float, required=True)
    plan.add_argument("--max-batch-tokens", type=int, default=2048, help="prompt tokens per prefill pass")
    plan.add_argument("--max-batch", type=int, default=256, help="requests per decode batch (max_num_seqs)")
    plan.add_argument("--max-pass-prompts", type=int, default=256, help="prompts per prefill pass")
    plan.add_argument("--colocated-schedule", choices=["mixed", "prefill_first"], default="mixed",
                      help="colocated engines: vLLM v1's chunked prefill (mixed) or prefill first (vLLM before it)")
    plan.add_argument("--out", default="results/plan")
    plan.set_defaults(func=_plan)


def _add_sim_check(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser("sim-check", help="the simulator's TTFT/TPOT against a recorded `pdserve bench` run")
    check.add_argument("bench", help="a `pdserve bench --out` JSON (Poisson arrivals)")
    check.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated")
    check.add_argument("--prefill", type=int, default=1), check.add_argument("--decode", type=int, default=1)
    check.add_argument("--profile", default="cpu-smollm2-135m")
    check.add_argument("--max-batch", type=int, default=32, help="the engines' max_num_seqs")
    check.add_argument("--max-pass-prompts", type=int, default=8, help="the router's admission.max_engine_prompts")
    check.add_argument("--no-contention", action="store_true",
                       help="ignore the profile's contention section: every engine as if alone on the host")
    check.add_argument("--out", help="write the comparison JSON here (and .md beside it)")
    check.set_defaults(func=_sim_check)


_DEFAULT_SETUP = {"mooncake": "cpu", "synthetic": "synthetic", "azure-conv": "azure-conv", "azure-code": "azure-conv"}
_SETUP_FLAGS = ("trace", "limit", "prefill", "decode", "cache_blocks", "ttft_slo_s", "profile", "requests", "rate", "seed",
                "routers")


def _simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve.sim import workloads
    from pdserve.sim.cluster import SimConfig
    from pdserve.sim.setup import load_setup
    from pdserve.sim.study import run_study
    from router.latency import LatencyModel
    from router.policies import PREFILL_POLICIES

    overrides = {k: getattr(args, k) for k in _SETUP_FLAGS if getattr(args, k) is not None}
    setup = load_setup(args.setup or _DEFAULT_SETUP[args.trace or "mooncake"], overrides)
    latency = LatencyModel.load(setup.profile_path())
    requests = workloads.from_setup(setup)
    slo = setup.ttft_slo_s or workloads.p95_isolated_prefill_s(requests, latency)
    cfg = SimConfig(prefill=setup.prefill, decode=setup.decode, cache_blocks=setup.cache_blocks, ttft_slo_s=slo,
                    kv_bytes_per_token=setup.kv_bytes_per_token, kv_bandwidth_bps=setup.kv_bandwidth_bps,
                    warmup=setup.warmup, seed=setup.seed, routers=setup.routers)
    policies = list(PREFILL_POLICIES) if args.policies == "all" else args.policies.split(",")
    params = {**setup.policy_params, **_policy_params(args.param)}
    results = run_study(setup.trace, requests, cfg, latency, policies, Path(args.out), params, setup.fixed_rates,
                        args.ablation)
    print(Path(args.out, "table.md").read_text())
    print(f"TTFT SLO {slo:.1f} s; reference rate {results['reference_rate_rps']:.4f} req/s "
          f"(capacity of {results['best_baseline']}); {results['seconds']:.0f} s; files in {args.out}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve.sim import plan, workloads
    from pdserve.sim.serving import ServingConfig

    engines, facts = plan.load_engines(args.profile, [int(t) for t in args.tp.split(",")])
    requests = workloads.poisson_lengths(args.workload, args.requests, args.seed, args.input_scale, args.max_context,
                                         args.max_output)
    cfg = ServingConfig(args.ttft_slo_s, args.tpot_slo_s, max_batch_tokens=args.max_batch_tokens,
                        max_batch=args.max_batch, max_pass_prompts=args.max_pass_prompts,
                        colocated_schedule=args.colocated_schedule, horizon_s=args.horizon_s, seed=args.seed, **facts)
    meta = {"workload": args.workload, "profile": args.profile, "input_scale": args.input_scale,
            "mean_input_tokens": sum(r.input_len for r in requests) / len(requests),
            "mean_output_tokens": sum(r.output_len for r in requests) / len(requests),
            "title": f"{args.workload}, {args.profile}: TTFT {args.ttft_slo_s:g} s, TPOT {args.tpot_slo_s:g} s"}
    report = plan.run_plan(requests, engines, cfg, args.gpus, Path(args.out), meta)
    print(Path(args.out, "table.md").read_text())
    print(f"{report['seconds']:.0f} s; recommended config: {Path(args.out, 'plan.yaml')}")
    return 0


def _sim_check(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pdserve.sim import check, plan
    from pdserve.sim.serving import Placement, ServingConfig

    engines, facts = plan.load_engines(args.profile, [1])
    colocated = args.mode == "colocated"
    placement = Placement(args.prefill + args.decode if colocated else args.prefill, 0 if colocated else args.decode,
                          colocated=colocated)
    contention = None if args.no_contention else plan.load_contention(args.profile)
    cfg = ServingConfig(1.0, 1.0, max_batch=args.max_batch, max_pass_prompts=args.max_pass_prompts,
                        colocated_schedule="mixed", horizon_s=float("inf"), warmup_share=0.0, contention=contention,
                        **facts)
    report = check.compare(Path(args.bench), placement, engines[1], cfg)
    table = check.markdown(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


def _policy_params(items: list[str]) -> dict[str, dict]:
    """``["cache_aware.balance_abs_tokens=32768"]`` -> ``{"cache_aware": {"balance_abs_tokens": 32768.0}}``."""
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        policy, _, name = key.partition(".")
        if not (policy and name and value):
            raise config_mod.ConfigError(f"--param {item!r}: expected POLICY.NAME=VALUE")
        number = float(value)
        out.setdefault(policy, {})[name] = int(number) if number.is_integer() else number
    return out
