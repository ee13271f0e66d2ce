"""A real Prometheus (Debian's package, installed by `make test`) scrapes a real router on loopback;
its query API shows the TTFT histogram, per-instance load and KV-transfer series with the counts
of the requests sent, a cancelled one counted as cancelled."""
from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest

from conftest import start_router, stop_router, wait_until
from helpers import idle
from pdserve.base.net import free_port
from pdserve.client import PdServeClient, build_request

FINISHED = 4

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="Debian's prometheus package is not installed and could not be (`make test` tries apt-get)")



@pytest.fixture(scope="module")
def metered_router(cluster):
    """A fresh router (fresh counters) on the session's workers, metrics on a free port."""
    router = start_router(cluster.prefill, cluster.decode, cluster.model_info)
    yield router
    stop_router(router)


@pytest.fixture(scope="module")
def prometheus(metered_router, tmp_path_factory):
    """A Prometheus server on loopback scraping the router every second; ended by its pid."""
    tmp = tmp_path_factory.mktemp("prometheus")
    port, metrics_port = free_port(), metered_router.server.service.metrics_port
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: pdserve\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _ready(url), 60), (tmp / "prometheus.log").read_text()[-2000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _ready(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200
    except OSError:
        return False


def _query(url: str, expr: str) -> dict[str, float]:
    """Instant query; {worker label (or '' for aggregates): value}."""
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10) as resp:
        data = json.load(resp)["data"]["result"]
    return {r["metric"].get("worker", ""): float(r["value"][1]) for r in data}


@pytest.fixture(scope="module")
def traffic(cluster, metered_router):
    """FINISHED finished requests and one cancelled mid-decode."""
    client = PdServeClient(metered_router.target)
    for i in range(FINISHED):
        client.complete(build_request(prompt=f"Count to {i + 3}:", max_tokens=8, ignore_eos=True))
    call = client.stream(build_request(prompt="Tell me a long story.", max_tokens=300, ignore_eos=True))
    stream = iter(call)
    next(stream), next(stream)
    call.cancel()
    assert wait_until(lambda: idle(cluster), 30)
    client.close()


def test_prometheus_sees_request_counts(prometheus, traffic):
    expected = {
        "sum(pdserve_time_to_first_token_seconds_count)": FINISHED + 1,  # the cancelled one had its first token
        "sum(pdserve_kv_transfer_time_seconds_count)": FINISHED,
        "sum(pdserve_e2e_request_latency_seconds_count)": FINISHED,
        'sum(pdserve_requests_total{outcome="finished"})': FINISHED,
        'sum(pdserve_requests_total{outcome="cancelled"})': 1,
        "sum(pdserve_prompt_tokens_total) > 0": None,
        'sum(pdserve_router_decisions_total{pool="decode"})': FINISHED + 1,
        "sum(pdserve_router_predicted_ttft_seconds_count)": FINISHED + 1,   # dualmap predicts every TTFT
    }
    def scraped() -> bool:
        return all(_query(prometheus, e).get("") == v if v is not None else _query(prometheus, e)
                   for e, v in expected.items())
    assert wait_until(scraped, 30), {e: _query(prometheus, e) for e in expected}


def test_prometheus_sees_per_instance_load(prometheus, traffic):
    expr = "pdserve_instance_kv_cache_usage_ratio"
    assert wait_until(lambda: set(_query(prometheus, expr)) == {"prefill-0", "decode-0"}, 30)
    assert wait_until(lambda: _query(prometheus, expr) == {"prefill-0": 0.0, "decode-0": 0.0}, 30)
    up = "pdserve_instance_up"
    assert _query(prometheus, up) == {"prefill-0": 1.0, "decode-0": 1.0}
    running = "pdserve_instance_requests_running"
    assert set(_query(prometheus, running)) == {"prefill-0", "decode-0"}
