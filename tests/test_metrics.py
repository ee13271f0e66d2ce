"""The exporter's values are exact for known records, and everything under deploy/ parses and
refers only to metrics pdserve exports."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pdserve.base.config import load
from pdserve.base.types import LoadSnapshot, Outcome, RequestRecord, RouteDecision
from router.metrics import PrometheusExporter

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

RECORDS = [
    RequestRecord(Outcome.FINISHED, "length", 10, 3, queue_s=0.01, prefill_s=0.1, ttft_s=0.12, e2e_s=0.5,
                  inter_token_s=(0.1, 0.3), kv_transfer_s=0.02, kv_transfer_bytes=4096, predicted_ttft_s=0.1,
                  ttft_slo_s=0.2, tpot_slo_s=0.15,
                  prefill_instance="prefill-0", decode_instance="decode-0"),
    RequestRecord(Outcome.FINISHED, "stop", 5, 1, queue_s=0.01, prefill_s=0.2, ttft_s=0.3, e2e_s=0.3,
                  ttft_slo_s=0.2, prefill_instance="prefill-0"),
    RequestRecord(Outcome.FINISHED, "length", 7, 2, ttft_s=0.05, e2e_s=0.1, inter_token_s=(0.05,),
                  kv_transfer_s=0.5, kv_transfer_bytes=0, kv_transfer_failed=True),
    RequestRecord(Outcome.CANCELLED, "", 0, 2, ttft_s=0.4, inter_token_s=(0.2,)),
    RequestRecord(Outcome.REJECTED),
]


def _pools():
    prefill = SimpleNamespace(role="prefill", snapshots=lambda: [LoadSnapshot("prefill-0", 1, 2, 0.25, 100, 40)])
    decode = SimpleNamespace(role="decode", snapshots=lambda: [LoadSnapshot("decode-0", 0, 3, 0.5, 10, 0, alive=False)])
    return [prefill, decode]


@pytest.fixture(scope="module")
def exporter():
    exp = PrometheusExporter(_pools())
    for rec in RECORDS:
        exp.on_request(rec)
    exp.on_decision(RouteDecision("prefill", "round_robin", "prefill-0", "rotation"))
    exp.on_decision(RouteDecision("prefill", "round_robin", "prefill-0", "rotation"))
    return exp


@pytest.mark.parametrize("name,labels,value", [
    ("pdserve_requests_total", {"outcome": "finished"}, 3),
    ("pdserve_requests_total", {"outcome": "cancelled"}, 1),
    ("pdserve_requests_total", {"outcome": "rejected"}, 1),
    ("pdserve_requests_finished_total", {"finish_reason": "length"}, 2),
    ("pdserve_requests_finished_total", {"finish_reason": "stop"}, 1),
    ("pdserve_prompt_tokens_total", {}, 22),
    ("pdserve_generation_tokens_total", {}, 8),
    ("pdserve_time_to_first_token_seconds_count", {}, 4),
    ("pdserve_time_to_first_token_seconds_bucket", {"le": "0.25"}, 2),
    ("pdserve_inter_token_latency_seconds_count", {}, 4),
    ("pdserve_time_per_output_token_seconds_count", {}, 2),
    ("pdserve_time_per_output_token_seconds_sum", {}, 0.25),
    ("pdserve_e2e_request_latency_seconds_count", {}, 3),
    ("pdserve_kv_transfer_time_seconds_count", {}, 2),
    ("pdserve_kv_transfer_size_bytes_sum", {}, 4096),
    ("pdserve_kv_transfer_failures_total", {}, 1),
    ("pdserve_slo_checks_total", {"slo": "ttft", "result": "met"}, 1),
    ("pdserve_slo_checks_total", {"slo": "ttft", "result": "missed"}, 1),
    ("pdserve_slo_checks_total", {"slo": "tpot", "result": "missed"}, 1),
    ("pdserve_goodput_requests_total", {}, 1),
    ("pdserve_slo_attainment_ratio", {"slo": "both"}, 1 / 3),
    ("pdserve_router_decisions_total", {"pool": "prefill", "policy": "round_robin", "reason": "rotation"}, 2),
    ("pdserve_router_predicted_ttft_seconds_count", {}, 1),
    ("pdserve_router_predicted_ttft_seconds_sum", {}, 0.1),
    ("pdserve_router_ttft_prediction_ratio_sum", {}, 1.2),
    ("pdserve_router_ttft_prediction_ratio_bucket", {"le": "1.1"}, 0),
    ("pdserve_router_ttft_prediction_ratio_bucket", {"le": "1.25"}, 1),
    ("pdserve_instance_up", {"pool": "decode", "worker": "decode-0"}, 0),
    ("pdserve_instance_requests_running", {"pool": "decode", "worker": "decode-0"}, 3),
    ("pdserve_instance_kv_cache_usage_ratio", {"pool": "prefill", "worker": "prefill-0"}, 0.25),
    ("pdserve_instance_prefix_cache_hits_total", {"pool": "prefill", "worker": "prefill-0"}, 40),
])
def test_exported_values(exporter, name, labels, value):
    assert exporter.registry.get_sample_value(name, labels) == pytest.approx(value)


def _exported_names(exporter) -> set[str]:
    return {s.name for family in exporter.registry.collect() for s in family.samples}


def test_names_follow_conventions(exporter):
    for name in _exported_names(exporter):
        assert name.startswith("pdserve_"), name
        assert re.fullmatch(r"[a-z0-9_]+", name), name


def test_dashboard_queries_use_exported_metrics(exporter):
    dash = json.loads((DEPLOY / "grafana" / "pdserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    referenced = {n for e in exprs for n in re.findall(r"pdserve_[a-z0-9_]+", e)}
    assert len(dash["panels"]) >= 10 and referenced
    assert referenced <= _exported_names(exporter), referenced - _exported_names(exporter)
    for needed in ("time_to_first_token", "inter_token", "slo_attainment", "goodput", "kv_cache_usage",
                   "prefix_cache_hits", "kv_transfer_time", "kv_transfer_size", "requests_running"):
        assert any(needed in n for n in referenced), needed


@pytest.mark.parametrize("path", sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.y*ml")))
def test_deploy_yaml_parses(path):
    docs = list(yaml.safe_load_all((DEPLOY / path).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("name", ["local.yaml", "cluster.yaml"])
def test_serve_configs_are_valid(name):
    cfg = load(DEPLOY / name)
    assert cfg.metrics_port == 9400


def test_cluster_configs_name_gpu_groups():
    launcher = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())["available_node_types"]
    assert launcher["prefill_gpu"]["resources"]["GPU"] == 1 and launcher["prefill_gpu"]["resources"]["pdserve_prefill"] == 1
    assert launcher["decode_gpu"]["resources"]["GPU"] == 1 and launcher["decode_gpu"]["resources"]["pdserve_decode"] == 1
    kuberay = next(yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster.yaml").read_text()))
    groups = {g["groupName"]: g for g in kuberay["spec"]["workerGroupSpecs"]}
    assert kuberay["kind"] == "RayCluster" and set(groups) == {"prefill", "decode"}
    for name, group in groups.items():
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1
        assert f"pdserve_{name}" in group["rayStartParams"]["resources"]
    cluster = load(DEPLOY / "cluster.yaml")
    assert cluster.prefill.ray_resources == {"pdserve_prefill": 1} and cluster.decode.ray_resources == {"pdserve_decode": 1}


@pytest.mark.parametrize("name", ["local.yml", "ray-cluster.yml"])
def test_prometheus_configs_scrape_the_router(name):
    cfg = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "pdserve")
    assert job["static_configs"][0]["targets"][0].endswith(":9400")
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus" / name)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
