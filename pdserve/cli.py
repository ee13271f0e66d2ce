"""The ``pdserve`` command: serve, stop, generate, health, status, prepare-model (and the tools of
``cli_tools`` and ``cli_sim``). Parses arguments and calls the modules that do the work (``launch`` for serve/stop)."""
from __future__ import annotations

import argparse
import logging
import sys
import time

import grpc

from pdserve.base import config as config_mod
from pdserve.base import env
from pdserve.cli_sim import add_sim_commands
from pdserve.cli_tools import add_tool_commands


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pdserve`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except (config_mod.ConfigError, FileNotFoundError) as err:
        print(f"pdserve: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Prefill/decode-disaggregated LLM serving.")
    sub = parser.add_subparsers(required=True)
    _add_serve(sub)
    _add_client_commands(sub)
    stop = sub.add_parser("stop", help="end a deployment's engines and its embedded Ray head")
    stop.add_argument("--config", help="YAML file (its name and ray_address)")
    stop.add_argument("--name", help="the deployment's name (default: the config's, pdserve)")
    stop.set_defaults(func=_stop)
    add_tool_commands(sub)
    add_sim_commands(sub)
    prep = sub.add_parser("prepare-model", help="download and convert the bundled model (idempotent)")
    prep.set_defaults(func=_prepare)
    return parser


def _add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="start Ray workers and the gRPC router")
    serve.add_argument("--config", help="YAML file (see deploy/local.yaml)")
    serve.add_argument("--name", help="the deployment's name (default pdserve): a running one is re-attached")
    serve.add_argument("--host"), serve.add_argument("--port", type=int)
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9400; -1 disables)")
    serve.add_argument("--replicas", type=int, default=1,
                       help="router processes sharing the ports and the engines (README: Several routers)")
    serve.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP API port (default 8000; -1 disables)")
    serve.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    serve.add_argument("--prefill", type=int, help="prefill instances")
    serve.add_argument("--decode", type=int, help="decode instances")
    serve.add_argument("--prefill-policy"), serve.add_argument("--decode-policy")
    serve.add_argument("--model", help="local Hugging Face model folder (default: bundled SmolLM2-135M)")
    serve.add_argument("--dtype", choices=["bfloat16", "float32", "float16"])
    serve.add_argument("--mode", choices=list(config_mod.MODES),
                       help="colocated: the same number of engines, each serving both phases (the baseline); "
                            "adaptive: kv_both engines, disaggregated per request")
    serve.set_defaults(func=_serve)


def _add_client_commands(sub: argparse._SubParsersAction) -> None:
    """generate, health and status: the commands that talk to a running router."""
    gen = sub.add_parser("generate", help="stream an answer to the terminal")
    gen.add_argument("text"), gen.add_argument("--target", default="127.0.0.1:50051")
    gen.add_argument("--max-tokens", type=int, default=64), gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--raw", action="store_true", help="send as a raw prompt (default: one user chat message)")
    gen.add_argument("--timeout", type=float, default=300.0)
    _add_client_auth(gen)
    gen.set_defaults(func=_generate)
    health = sub.add_parser("health", help="exit 0 only when every pool has a live instance")
    health.add_argument("--target", default="127.0.0.1:50051")
    health.add_argument("--wait", type=float, default=0.0, help="keep asking for up to this many seconds")
    _add_client_auth(health)
    health.set_defaults(func=_health)
    status = sub.add_parser("status", help="a table of the pools: instances, health, load, cache hits, latency")
    status.add_argument("--target", default="127.0.0.1:50051")
    _add_client_auth(status)
    status.set_defaults(func=_status)


def _overrides(args: argparse.Namespace) -> dict:
    out: dict = {}
    for flag, key in (("host", "host"), ("port", "port"), ("http_port", "http_port"), ("ray_address", "ray_address"),
                      ("mode", "mode"), ("name", "name"), ("metrics_port", "metrics_port")):
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    for pool in ("prefill", "decode"):
        pool_cfg = {k: v for k, v in (("instances", getattr(args, pool)),
                                      ("policy", getattr(args, f"{pool}_policy"))) if v is not None}
        if pool_cfg:
            out[pool] = pool_cfg
    engine = {k: v for k, v in (("model", args.model), ("dtype", args.dtype)) if v is not None}
    if engine:
        out["engine"] = engine
    return out


def _serve(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, _overrides(args))
    from router.policies import make_policy

    for name in (cfg.prefill.policy, cfg.decode.policy):
        try:
            make_policy(name)
        except ValueError as err:
            raise config_mod.ConfigError(str(err)) from None
    if args.replicas < 1:
        raise config_mod.ConfigError("--replicas must be >= 1")
    from pdserve import launch

    return launch.serve(cfg, args.replicas)


def _stop(args: argparse.Namespace) -> int:
    from pdserve import launch

    return launch.stop(config_mod.load(args.config, {"name": args.name} if args.name else {}))


def _add_client_auth(cmd: argparse.ArgumentParser) -> None:
    """Flags of a client command for a guarded router (README: Securing the APIs)."""
    cmd.add_argument("--tls-ca", default="", help="PEM CA of the router's certificate (enables TLS)")
    cmd.add_argument("--tls-cert", default="", help="PEM client certificate (mutual TLS)")
    cmd.add_argument("--tls-key", default="", help="PEM key of --tls-cert")
    cmd.add_argument("--token", default="", help="bearer token (default: $PDSERVE_AUTH_TOKEN)")


def _client_auth(args: argparse.Namespace) -> object:
    from pdserve.client import ClientAuth

    return ClientAuth(args.tls_ca, args.tls_cert, args.tls_key, args.token or env.auth_token() or "")


def _generate(args: argparse.Namespace) -> int:
    from pdserve.client import PdServeClient, build_request

    client = PdServeClient(args.target, _client_auth(args))
    input_kw = {"prompt": args.text} if args.raw else {"messages": [("user", args.text)]}
    request = build_request(max_tokens=args.max_tokens, temperature=args.temperature, **input_kw)
    try:
        for msg in client.stream(request, args.timeout):
            sys.stdout.write(msg.text)
            sys.stdout.flush()
            if msg.final:
                t = msg.timings
                print(f"\n[{msg.finish_reason}; {msg.usage.prompt_tokens} prompt + {msg.usage.completion_tokens} "
                      f"completion tokens; TTFT {t.ttft_ms:.0f} ms, KV transfer {t.kv_transfer_ms:.0f} ms "
                      f"({t.kv_transfer_bytes} B), total {t.e2e_ms:.0f} ms; "
                      f"{msg.prefill_instance} -> {msg.decode_instance or '-'}]", file=sys.stderr)
    except grpc.RpcError as err:
        print(f"\npdserve: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    return 0


def _health(args: argparse.Namespace) -> int:
    from pdserve.client import PdServeClient
    from protos import pdserve_v1_pb2 as pb

    client = PdServeClient(args.target, _client_auth(args))
    deadline = time.monotonic() + args.wait
    while True:
        try:
            answer = client.health()
            if answer.status == pb.HealthResponse.SERVING:
                print(f"SERVING: {answer.detail}")
                return 0
            detail = f"NOT_SERVING: {answer.detail}"
        except grpc.RpcError as err:
            detail = f"{err.code().name}: {err.details()}"
        if time.monotonic() >= deadline:
            print(detail, file=sys.stderr)
            return 1
        time.sleep(1.0)


def _status(args: argparse.Namespace) -> int:
    from pdserve.client import PdServeClient

    try:
        info = PdServeClient(args.target, _client_auth(args)).info()
    except grpc.RpcError as err:
        print(f"pdserve: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(format_status(info))
    return 0 if all(i.alive for p in info.pools for i in p.instances) else 1


STATUS_COLUMNS = ("POOL", "INSTANCE", "HEALTH", "WAITING", "RUNNING", "KV-CACHE", "PREFIX-HIT", "TTFT-P50", "TPOT-P50")


def format_status(info: object) -> str:
    """The ``pdserve status`` table for a ServerInfoResponse."""
    rows = [STATUS_COLUMNS]
    for pool in info.pools:
        for i in pool.instances:
            hit = f"{100 * i.prefix_cache_hits / i.prefix_cache_queries:.1f}%" if i.prefix_cache_queries else "-"
            rows.append((f"{pool.role} ({pool.policy})", i.name, "up" if i.alive else "DOWN", str(i.waiting),
                         str(i.running), f"{100 * i.kv_cache_usage:.1f}%", hit,
                         f"{i.recent_ttft_ms:.0f} ms" if i.recent_ttft_ms else "-",
                         f"{i.recent_tpot_ms:.1f} ms" if i.recent_tpot_ms else "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(STATUS_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    metrics = f", metrics on :{info.metrics_port}/metrics" if info.metrics_port else ""
    head = f"pdserve {info.version}: {info.model} (context {info.max_model_len}, block {info.block_size}{metrics})"
    return "\n".join([head, *lines])


def _prepare(args: argparse.Namespace) -> int:
    from pdserve.model import prepare_bundled_model

    print(prepare_bundled_model())
    return 0


if __name__ == "__main__":
    sys.exit(main())
