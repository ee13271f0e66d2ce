"""Unit tests of the pure pieces: config, request validation, the request state machine, the
round-robin policy, and the router's freedom from torch and vLLM."""
from __future__ import annotations

import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.base.config import ConfigError, ServeConfig, load
from pdserve.base.types import InvalidRequestError, LoadSnapshot, RequestState, SamplingSpec
from pdserve.client import build_request
from router.policies import Choice, RouteRequest, make_policy
from router.request import IllegalTransition, RouterRequest
from router.validate import parse_request

ROOT = Path(__file__).resolve().parents[1]


def test_deploy_yaml_loads_to_defaults():
    assert load(ROOT / "deploy" / "local.yaml") == ServeConfig(slo_ttft_ms=3000)  # the one deliberate difference


@pytest.mark.parametrize("overrides,message", [
    ({"prefil": {"instances": 2}}, "unknown config key(s) prefil"),
    ({"engine": {"dtype": "int3"}}, "engine.dtype: unknown 'int3'"),
    ({"engine": {"blocksize": 32}}, "unknown config key(s) engine.blocksize"),
    ({"engine": {"block_size": 48}}, "engine.block_size must be"),
    ({"engine": {"kv_cache_gib": 0.5}}, "engine.kv_cache_gib must be a whole number"),
    ({"prefill": {"instances": 0}}, "pool instances must be >= 1"),
    ({"port": 70000}, "port must be in 0..65535"),
    ({"kv_transfer": {"lease_s": 0}}, "kv_transfer.lease_s must be > 0"),
    ({"engine": 3}, "engine: expected a mapping, got int"),
    ({"kv_transfer": {"transport": "pigeon"}}, "kv_transfer.transport must be one of"),
    ({"security": {"tls_cert": "a.pem"}}, "security.tls_cert and security.tls_key go together"),
    ({"security": {"tls_client_ca": "ca.pem"}}, "security.tls_client_ca needs tls_cert"),
    ({"faults": {"drain_s": -1}}, "faults.drain_s must be >= 0"),
    ({"routing": {"worker_calls": "pigeon"}}, "routing.worker_calls must be one of"),
])
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ConfigError) as info:
        load(None, overrides)
    assert message in str(info.value)


@pytest.mark.parametrize("token,header,ok", [
    ("", None, True),                       # auth off: everything passes
    ("t0k", None, False),
    ("t0k", "Bearer t0k", True),
    ("t0k", "bearer t0k", True),            # the scheme is case-insensitive
    ("t0k", "Bearer t0k2", False),
    ("t0k", "Basic t0k", False),
    ("t0k", "t0k", False),
])
def test_bearer_token_check(token, header, ok):
    from router.security import Guard

    assert Guard(token=token).authorized(header) is ok


def test_unreadable_security_file_is_a_config_error(tmp_path):
    from pdserve.base.config import SecurityConfig
    from router.security import Guard

    with pytest.raises(ConfigError, match="cannot read"):
        Guard.load(SecurityConfig(tls_cert=str(tmp_path / "none.pem"), tls_key=str(tmp_path / "none.key")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        Guard.load(SecurityConfig(auth_token_file=str(tmp_path / "empty")))


def test_config_overrides_merge_into_yaml():
    cfg = load(ROOT / "deploy" / "local.yaml", {"prefill": {"instances": 3}, "port": 0})
    assert (cfg.prefill.instances, cfg.prefill.policy, cfg.decode.policy, cfg.port) == (3, "dualmap", "decode_p2c", 0)


@pytest.mark.parametrize("kwargs,expected", [
    ({"prompt": "hi", "max_tokens": 5}, SamplingSpec(max_tokens=5)),
    ({"prompt": "hi", "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3, "stop": ["\n"]},
     SamplingSpec(max_tokens=0, temperature=0.7, top_p=0.9, top_k=40, seed=3, stop=("\n",))),
    ({"prompt": "hi", "top_k": -1, "ignore_eos": True}, SamplingSpec(max_tokens=0, top_k=0, ignore_eos=True)),
])
def test_valid_sampling_is_parsed(kwargs, expected):
    got = parse_request(build_request(**kwargs)).sampling
    assert got.max_tokens == expected.max_tokens and got.top_k == expected.top_k and got.stop == expected.stop
    assert got.seed == expected.seed and got.ignore_eos == expected.ignore_eos
    assert got.temperature == pytest.approx(expected.temperature) and got.top_p == pytest.approx(expected.top_p)


@pytest.mark.parametrize("kwargs,inputs", [
    ({"prompt": "hello"}, ("hello", None, None)),
    ({"messages": [("system", "be brief"), ("user", "hi")]}, (None, (("system", "be brief"), ("user", "hi")), None)),
    ({"token_ids": [1, 2, 3]}, (None, None, (1, 2, 3))),
])
def test_inputs_are_parsed(kwargs, inputs):
    p = parse_request(build_request(**kwargs)).prompt
    assert (p.text, p.messages, p.token_ids) == inputs


def test_request_id_is_generated_when_empty():
    a, b = parse_request(build_request(prompt="x")), parse_request(build_request(prompt="x"))
    assert a.request_id != b.request_id and len(a.request_id) == 32
    with pytest.raises(InvalidRequestError, match="request_id longer than 128"):
        parse_request(build_request(prompt="x", request_id="r" * 129))


_S = RequestState
TRANSITIONS = [  # (path from QUEUED, legal)
    ([_S.PREFILLING, _S.TRANSFERRING, _S.DECODING, _S.FINISHED], True),
    ([_S.PREFILLING, _S.FINISHED], True),
    ([_S.REJECTED], True),
    ([_S.PREFILLING, _S.TRANSFERRING, _S.CANCELLED], True),
    ([_S.PREFILLING, _S.FAILED], True),
    ([_S.DECODING], False),
    ([_S.PREFILLING, _S.DECODING, _S.FINISHED], True),   # colocated: one engine, no transfer
    ([_S.TRANSFERRING], False),
    ([_S.PREFILLING, _S.FINISHED, _S.CANCELLED], False),
    ([_S.CANCELLED, _S.FAILED], False),
]


@pytest.mark.parametrize("path,legal", TRANSITIONS)
def test_request_state_machine(path, legal):
    req = RouterRequest("r", None, SamplingSpec(max_tokens=1))
    if legal:
        for state in path:
            req.to(state)
        assert req.state is path[-1] and req.state.value in req.marks
    else:
        with pytest.raises(IllegalTransition):
            for state in path:
                req.to(state)


def test_round_robin_cycles_in_name_order_over_live_candidates():
    policy = make_policy("round_robin")
    req = RouteRequest("r", (1, 2), 64)
    snaps = [LoadSnapshot("p-1"), LoadSnapshot("p-0"), LoadSnapshot("p-2")]
    assert [policy.select(req, snaps).instance for _ in range(4)] == ["p-0", "p-1", "p-2", "p-0"]
    assert policy.select(req, snaps[:2]) == Choice("p-0", "rotation")


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match="known: cache_aware, consistent_hash, decode_p2c, dualmap, kv_cost"):
        make_policy("best_guess")


def test_router_imports_neither_torch_nor_vllm():
    code = ("import sys, router.server, router.dispatch, kv_transfer.control, kv_transfer.handle, pdserve.cli;"
            "bad = [m for m in ('torch', 'vllm') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pool_helper_turns_do_not_move_the_policy():
    """Tokenization picks a helper in turn; round-robin routing still alternates (2 instances)."""
    from types import SimpleNamespace

    from router.pools import WorkerPool

    pool = WorkerPool("prefill", [SimpleNamespace(name=f"prefill-{i}", actor=None) for i in range(2)],
                      make_policy("round_robin"))
    routed = []
    for _ in range(4):
        pool.helper()
        routed.append(pool.pick(RouteRequest("r", (), 1)).name)
    assert routed == ["prefill-0", "prefill-1", "prefill-0", "prefill-1"]
    pool.mark_dead("prefill-0")
    assert {pool.helper().name for _ in range(3)} == {"prefill-1"}
    assert pool.pick(RouteRequest("r", (), 1)).name == "prefill-1"


def test_http_connections_are_accepted_with_nagle_off():
    """The HTTP API's listening socket is made by hand (for SO_REUSEPORT). asyncio turns Nagle off on
    a transport only when its socket's protocol is IPPROTO_TCP; with protocol 0 every response chunk
    after the headers waited for the client's delayed ACK, 40 ms on a keep-alive connection."""
    import asyncio
    import socket

    from router.http_api import _shared_socket

    async def accepted_nodelay() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_connect(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        listener = _shared_socket("127.0.0.1", 0)
        server = await asyncio.start_server(on_connect, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname())
            value = await asyncio.wait_for(seen, 10)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) == 1


def test_live_router_replicas_draw_independently_and_share_hash_rings():
    """Two routers of one deployment (``--replicas``): their policies' random draws differ, their
    DualMap hash rings map a key to the same instances."""
    from types import SimpleNamespace

    from pdserve.base.types import ModelInfo
    from router.server import RouterServer, ServiceSettings

    workers = [SimpleNamespace(name=f"prefill-{i}", actor=None) for i in range(8)]
    model = ModelInfo(model="/nonexistent/model", max_model_len=2048, block_size=32, eos_token_id=0)
    a, b = (RouterServer(workers, workers, model, ServiceSettings(http_port=-1)).prefill.policy for _ in range(2))
    assert [a._rng.random() for _ in range(4)] != [b._rng.random() for _ in range(4)]
    for policy in (a, b):
        for ring in policy.rings:
            ring.sync(w.name for w in workers)
    assert [[r.lookup(k) for r in a.rings] for k in range(50)] == [[r.lookup(k) for r in b.rings] for k in range(50)]


@pytest.mark.parametrize("mode,decode_names,role_split", [
    ("disaggregated", ["decode-0"], False),
    ("colocated", None, False),
    ("adaptive", ["prefill-0", "prefill-1"], True),     # one set of kv_both engines behind both pools
])
def test_the_router_builds_the_pools_of_its_mode(mode, decode_names, role_split):
    from types import SimpleNamespace

    from pdserve.base.types import ModelInfo
    from router.server import RouterServer, ServiceSettings

    prefill = [SimpleNamespace(name=f"prefill-{i}", actor=None) for i in range(2)]
    decode = [SimpleNamespace(name="decode-0", actor=None)]
    model = ModelInfo(model="/nonexistent/model", max_model_len=2048, block_size=32, eos_token_id=0)
    router = RouterServer(prefill, [] if mode == "colocated" else decode, model, ServiceSettings(http_port=-1, mode=mode))
    assert router.prefill.role == ("colocated" if mode == "colocated" else "prefill")
    assert router.prefill.admission is not None and router.exporter is not None
    assert (router.decode and sorted(router.decode._workers)) == decode_names
    assert (router.roles is not None, router.dispatcher.pools[0] is router.prefill) == (role_split, True)


CHILD_LOG = "Traceback (most recent call last):\n    bind(port)\n    ^^^^^^^^^^\nOSError: Address already in use\n"
CHILD = f"import sys; sys.stderr.write({CHILD_LOG!r})"
PARENT = ("import subprocess, sys; from pdserve.base.procs import stderr_tail;"
          f"subprocess.run([sys.executable, '-c', {CHILD!r}]); print(stderr_tail(max_lines=2), end='')")


@pytest.mark.parametrize("to_file,expected", [
    (True, "    bind(port)\nOSError: Address already in use"),   # the caret line is left out
    (False, ""),                                                # a pipe has no tail to read
])
def test_stderr_tail_quotes_what_a_child_wrote_to_the_shared_log(tmp_path, to_file, expected):
    with open(tmp_path / "worker.err", "w") as log:
        result = subprocess.run([sys.executable, "-c", PARENT], cwd=ROOT, timeout=60, text=True,
                                stdout=subprocess.PIPE, stderr=log if to_file else subprocess.PIPE)
    assert result.stdout == expected


def test_free_port_picks_below_the_ephemeral_range_and_binds():
    from pdserve.base.net import _ephemeral_start, free_port

    low = _ephemeral_start()
    ports = [free_port(rng=random.Random(seed)) for seed in range(5)]
    assert all(max(1024, low - 12_000) <= p < low for p in ports) and len(set(ports)) == 5
    for port in ports:
        socket.create_server(("127.0.0.1", port)).close()
