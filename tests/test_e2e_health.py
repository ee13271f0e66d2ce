"""The standard gRPC dialects on the real stack: grpc.health.v1 (Check per pool, Watch while an
engine loads) and server reflection (a request built and sent with no generated stubs); the
KubeRay probes name what the router serves."""
from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import start_router, stop_router, wait_until
from pdserve.base.config import load
from router.health import API_SERVICE, ROUTER_SERVICE

ROOT = Path(__file__).resolve().parents[1]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def check(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.mark.parametrize("service", ["", API_SERVICE, "pdserve.prefill", "pdserve.decode", ROUTER_SERVICE])
def test_every_service_is_serving_when_the_deployment_is_ready(router, service):
    assert check(router.target, service) == SERVING


def test_unknown_service_is_not_found(router):
    with pytest.raises(grpc.RpcError) as info:
        check(router.target, "pdserve.nothing")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_engines_run_the_model_in_their_core_process(cluster):
    """No engine has vLLM's separate worker process, whose shared-memory reader spins for a second
    after every step (docs/performance.md, "vLLM's executor")."""
    import psutil

    for name, pid in cluster.pids().items():
        kids = [p.name() for p in psutil.Process(pid).children(recursive=True)]
        assert "VLLM::EngineCore" in kids and "VLLM::Worker" not in kids, (name, kids)


def test_a_dead_pool_is_not_serving(cluster):
    router = start_router(cluster.prefill, [], cluster.model_info, metrics=False)
    try:
        statuses = {s: check(router.target, s) for s in ("", "pdserve.prefill", "pdserve.decode", ROUTER_SERVICE)}
    finally:
        stop_router(router)
    assert statuses == {"": NOT_SERVING, "pdserve.prefill": SERVING, "pdserve.decode": NOT_SERVING,
                        ROUTER_SERVICE: SERVING}


def test_watch_reports_not_serving_while_the_engine_loads_then_serving(cluster):
    """A router whose only prefill engine is still loading: NOT_SERVING; Watch streams the change
    to SERVING once the engine answers."""
    loading = cluster.add_worker("prefill", wait=False)
    router = start_router([loading], cluster.decode, cluster.model_info, metrics=False)
    seen: list[int] = []
    channel = grpc.insecure_channel(router.target)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=300)

    def follow() -> None:
        try:
            for answer in watch:
                seen.append(answer.status)
                if answer.status == SERVING:
                    return
        except grpc.RpcError:
            pass
    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: bool(seen), 30) and seen[0] == NOT_SERVING
        assert check(router.target, "pdserve.prefill") == NOT_SERVING
        thread.join(280)
        assert seen[-1] == SERVING and check(router.target, "pdserve.prefill") == SERVING
    finally:
        watch.cancel()
        channel.close()
        stop_router(router)
        cluster.remove_worker(loading.name)


def test_reflection_lists_services_and_drives_generate_without_stubs(router):
    with grpc.insecure_channel(router.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)  # descriptors from the server, not from protos/
        method = pool.FindServiceByName(API_SERVICE).methods_by_name["Generate"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls(prompt="The capital of France is")
        request.sampling.max_tokens = 4
        request.sampling.ignore_eos = True
        call = channel.unary_stream(f"/{API_SERVICE}/Generate", request_serializer=request_cls.SerializeToString,
                                    response_deserializer=response_cls.FromString)
        answers = list(call(request, timeout=60))
    assert {API_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert answers[-1].final and answers[-1].finish_reason == "length"
    assert sum(len(a.token_ids) for a in answers) == 4


def test_kuberay_probes_name_the_port_and_services_the_router_serves():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "raycluster.yaml").read_text()))
    head = docs[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    cfg = load(ROOT / "deploy" / "cluster.yaml")
    grpc_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "grpc")
    assert grpc_port == cfg.port
    probes = {kind: head[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert all(p["grpc"]["port"] == cfg.port for p in probes.values())
    assert probes["readinessProbe"]["grpc"].get("service", "") == ""           # every pool can make progress
    assert probes["startupProbe"]["grpc"].get("service", "") == ""
    assert probes["livenessProbe"]["grpc"]["service"] == ROUTER_SERVICE         # the router itself answers
    startup_budget = probes["startupProbe"]["periodSeconds"] * probes["startupProbe"]["failureThreshold"]
    assert startup_budget >= 600                                                # model download and engine start
