"""The ``pdserve`` commands that measure a deployment: profile, bench, bench-kv, chaos, bench-ab, bench-compare.
Registered on the main parser by ``add_tool_commands`` (see ``pdserve.cli``)."""
from __future__ import annotations

import argparse

from pdserve.base import config as config_mod


def add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """Add the measurement subcommands to ``pdserve``'s parser."""
    for add in (_add_profile, _add_bench, _add_bench_kv, _add_chaos, _add_bench_ab, _add_bench_compare):
        add(sub)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    prof = sub.add_parser("profile", help="measure the engine's prefill and decode speed into a JSON profile")
    prof.add_argument("--out", default="deploy/profiles/cpu-smollm2-135m.json")
    prof.add_argument("--model"), prof.add_argument("--dtype", choices=["bfloat16", "float32", "float16"])
    prof.add_argument("--contention", action="store_true",
                      help="also measure how a second engine on the other core slows this one (sim-check uses it; "
                           "about 2 minutes more)")
    prof.set_defaults(func=_profile)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="load-test a running pdserve over its gRPC API")
    bench.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT (gRPC) or http://HOST:PORT (OpenAI API)")
    bench.add_argument("--workload", choices=["sharegpt", "azure-code", "azure-conv", "mooncake"], default="sharegpt")
    bench.add_argument("--requests", type=int, default=40, help="per rate; each rate gets requests of its own")
    bench.add_argument("--arrival", choices=["poisson", "trace", "concurrency"], default="poisson")
    bench.add_argument("--rate", type=float, default=1.0, help="req/s (poisson) or time-scale factor (trace)")
    bench.add_argument("--sweep", help="comma-separated rates to run one after another")
    bench.add_argument("--concurrency", type=int, default=4)
    bench.add_argument("--input-scale", type=float, default=0.1), bench.add_argument("--output-scale", type=float, default=0.25)
    bench.add_argument("--max-output", type=int, default=64), bench.add_argument("--max-prompt", type=int, default=1536)
    bench.add_argument("--slo", action="append", metavar="NAME:TTFT_S:TPOT_S",
                       help=f"SLO sets (repeatable; default {' and '.join(DEFAULT_SLOS)})")
    bench.add_argument("--seed", type=int, default=0), bench.add_argument("--timeout", type=float, default=300.0)
    bench.add_argument("--warmup", type=int, default=3, help="unrecorded requests sent first, one at a time (--overheads too)")
    bench.add_argument("--fill", type=int, default=0,
                       help="with --overheads: unrecorded 1,900-token requests after the warm-up, to cycle the KV caches "
                            "(30 cycle deploy/local.yaml's 1 GiB)")
    bench.add_argument("--rate-warmup", type=int, default=0,
                       help="per rate: requests sent at the rate before the --requests that are scored")
    bench.add_argument("--label", default="pdserve"), bench.add_argument("--out", default="results/bench/run.json")
    bench.add_argument("--overheads", action="store_true", help="measure router, KV-transfer and transport overheads instead")
    bench.add_argument("--http-target", metavar="http://HOST:PORT",
                       help="with --overheads: also compare the OpenAI HTTP API's TTFT with gRPC's on this deployment")
    bench.set_defaults(func=_bench)


def _add_bench_kv(sub: argparse._SubParsersAction) -> None:
    kvb = sub.add_parser("bench-kv", help="every KV transport against raw TCP on loopback (7B-class and this machine's KV)")
    kvb.add_argument("--rounds", type=int, default=5)
    kvb.add_argument("--out", default="docs/results/perf/kv-transports.json")
    kvb.add_argument("--scattered", action="store_true", help="blocks as a cycled cache hands them out (none consecutive)")
    kvb.set_defaults(func=_bench_kv)


def _add_chaos(sub: argparse._SubParsersAction) -> None:
    chaos = sub.add_parser("chaos", help="a deployment under load while its parts fail (docs/reliability.md)")
    chaos.add_argument("--config", default="deploy/local.yaml")
    chaos.add_argument("--prefill", type=int, default=2), chaos.add_argument("--decode", type=int, default=2)
    chaos.add_argument("--duration", type=float, default=120.0, help="seconds of Poisson load per run")
    chaos.add_argument("--rate", type=float, default=1.0, help="requests per second")
    chaos.add_argument("--faults", default="decode,prefill,stall,corrupt,blackhole,router")
    chaos.add_argument("--no-baseline", action="store_true", help="skip the fault-free run")
    chaos.add_argument("--seed", type=int, default=0)
    chaos.add_argument("--out", default="docs/results/reliability/chaos.json")
    chaos.set_defaults(func=_chaos)


def _add_bench_ab(sub: argparse._SubParsersAction) -> None:
    ab = sub.add_parser("bench-ab", help="bench --overheads on fresh deployments, alternating one config setting")
    ab.add_argument("--config", default="deploy/local.yaml")
    ab.add_argument("--set", required=True, metavar="KEY=V1,V2", help="e.g. routing.worker_calls=grpc,tcp")
    ab.add_argument("--runs", type=int, default=3), ab.add_argument("--warmup", type=int, default=3)
    ab.add_argument("--fill", type=int, default=0, help="as bench --overheads --fill")
    ab.add_argument("--out", default="docs/results/perf/worker-calls-ab.json")
    ab.set_defaults(func=_bench_ab)


def _add_bench_compare(sub: argparse._SubParsersAction) -> None:
    cmp_ = sub.add_parser("bench-compare", help="plot attainment vs. rate of several bench results")
    cmp_.add_argument("files", nargs="+"), cmp_.add_argument("--out", default="results/bench/compare.png")
    cmp_.add_argument("--slo", action="append", metavar="NAME:TTFT_S:TPOT_S",
                      help="score the recorded requests with these SLO sets instead of the files' own")
    cmp_.set_defaults(func=_bench_compare)


def _chaos(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pdserve.chaos import ALL_FAULTS
    from pdserve.chaos_run import ChaosPlan, run

    faults = tuple(f for f in args.faults.split(",") if f)
    unknown = set(faults) - set(ALL_FAULTS)
    if unknown:
        raise config_mod.ConfigError(f"unknown fault(s) {', '.join(sorted(unknown))} (known: {', '.join(ALL_FAULTS)})")
    plan = ChaosPlan(args.config, args.prefill, args.decode, args.duration, args.rate, faults, not args.no_baseline,
                     seed=args.seed)
    report = run(plan, Path(args.out))
    print(json.dumps({k: v for k, v in report.items() if k != "plan"}, indent=1))
    print(f"wrote {args.out}")
    return 0


def _bench_kv(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve.bench import kv

    result = kv.run(Path(args.out), args.rounds, args.scattered)
    print(f"{'model':>16} {'transport':>10} {'tokens':>7} {'MB':>7} {'ms':>9} {'GB/s':>6} {'of raw TCP':>10} "
          f"{'of raw gloo':>11}")
    for row in result["rows"]:
        gloo = f"{row['fraction_of_raw_gloo']:>11.2f}" if "fraction_of_raw_gloo" in row else ""
        print(f"{row['model'].split()[0]:>16} {row['transport']:>10} {row['prompt_tokens']:>7} {row['bytes'] / 1e6:>7.0f} {row['median_ms']:>9.1f} "
              f"{row['gb_s']:>6.2f} {row['fraction_of_raw_tcp']:>10.2f} {gloo}")
    print(f"wrote {args.out}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve import profile
    from pdserve.model import resolve_model

    cfg = config_mod.load(None, {"engine": {k: v for k, v in (("model", args.model), ("dtype", args.dtype)) if v}})
    result = profile.run(cfg.engine, resolve_model(cfg.engine.model), Path(args.out), args.contention)
    print(f"wrote {args.out}: prefill {result['fit']['prefill']}, decode {result['fit']['decode']}")
    return 0


DEFAULT_SLOS = ("ttft-tight:0.25:0.5", "tpot-tight:10.0:0.1")


def _bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pdserve.bench import report, workloads

    out = Path(args.out)
    if args.overheads:
        result = report.overheads(args.target, [64, 256, 512, 1024, 1900], repeats=3, warmup=args.warmup,
                                  fill=args.fill)
        if args.http_target:
            result["http_vs_grpc"] = report.http_overhead(args.target, args.http_target)
            print(json.dumps(result["http_vs_grpc"], indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["per_length"], indent=1))
        return 0
    slos = _slos(args.slo or DEFAULT_SLOS)
    rates = [float(r) for r in args.sweep.split(",")] if args.sweep else [args.rate]
    pool = report.fresh_pool_size(args.requests, len(rates), args.warmup, args.rate_warmup)
    requests = workloads.load(args.workload, pool, args.seed, args.max_output, args.input_scale, args.output_scale,
                              args.max_prompt)
    results = report.sweep(args.target, requests, rates, slos, args.label, args.arrival, args.concurrency, args.seed,
                           args.timeout, args.warmup, args.rate_warmup)
    results.update(workload=args.workload, input_scale=args.input_scale, output_scale=args.output_scale, seed=args.seed)
    report.write(results, out)
    for run in results["runs"]:
        s = run["summary"]
        print(f"{run['rate_rps']:g} req/s: TTFT p50/p99 {s['ttft_s']['p50']:.3f}/{s['ttft_s']['p99']:.3f} s, TPOT p50/p99 "
              f"{s['tpot_s']['p50'] * 1e3:.0f}/{s['tpot_s']['p99'] * 1e3:.0f} ms, "
              + ", ".join(f"{k} {v['attainment']:.0%}" for k, v in s["slo"].items()))
    print(f"max goodput (req/s at >= 90% attainment): {results['max_goodput_rps']}; wrote {out}")
    return 0


def _slos(specs: list[str]) -> list:
    from pdserve.bench.stats import Slo

    slos = []
    for spec in specs:
        name, ttft, tpot = spec.split(":")
        slos.append(Slo(name, float(ttft), float(tpot)))
    return slos


def _bench_ab(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve import ab_run

    key, _, values = args.set.partition("=")
    result = ab_run.run(args.config, key, values.split(","), args.runs, args.warmup, Path(args.out), args.fill)
    for value in values.split(","):
        s = result[value]
        print(f"{key}={value}: router added p50 {s['router_added_ms_p50']:.2f} ms (per run "
              + ", ".join(f"{x:.2f}" for x in s["router_added_ms_p50_per_run"])
              + f"), p99 {s['router_added_ms_p99']:.2f} ms, 1st-2nd minus transfer and step "
              f"{s['first_to_second_minus_transfer_and_step_ms_p50']:.1f} ms")
    print(f"wrote {args.out}")
    return 0


def _bench_compare(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pdserve.bench import report, rescore

    results = [json.loads(Path(f).read_text()) for f in args.files]
    if args.slo:
        results = [rescore.rescore(r, _slos(args.slo)) for r in results]
    report.plot_attainment(results, Path(args.out))
    print(rescore.table(results))
    print(f"wrote {args.out}")
    return 0
