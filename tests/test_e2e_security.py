"""The public APIs guarded: TLS, mutual TLS and a bearer token, on gRPC and on the OpenAI HTTP API,
each both refused and accepted, in front of the session's real engines. Certificates are made
here with the ``openssl`` command (a CA, a server certificate for 127.0.0.1, a client one)."""
from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import start_router, stop_router
from pdserve.base.config import SecurityConfig
from pdserve.client import ClientAuth, PdServeClient, build_request

TOKEN = "tok-3f9a2c"
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(name: str, cn: str, ext: str, cwd: Path) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=cwd)
    (cwd / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=pdserve-test-ca", cwd=d)
    _issue("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n", d)
    _issue("client", "pdserve-test-client", "extendedKeyUsage=clientAuth\n", d)
    (d / "token").write_text(TOKEN + "\n")
    return d


def _trust(pki: Path, client_cert: bool = False) -> ssl.SSLContext:
    """An HTTPS client context trusting the test CA (presenting the client certificate)."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client_cert:
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return context


def _router(cluster, pki: Path, mutual: bool):
    security = SecurityConfig(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                              tls_client_ca=str(pki / "ca.pem") if mutual else "",
                              auth_token_file="" if mutual else str(pki / "token"))
    return start_router(cluster.prefill, cluster.decode, cluster.model_info, metrics=False, http=True,
                        request_timeout_s=60, security=security)


def _generate(target: str, auth: ClientAuth) -> grpc.StatusCode | int:
    """OK's completion-token count, or the status code of the failure."""
    client = PdServeClient(target, auth)
    try:
        return len(client.complete(build_request(prompt="Hello", max_tokens=4, ignore_eos=True), timeout_s=60).token_ids)
    except grpc.RpcError as err:
        return err.code()
    finally:
        client.close()


@pytest.fixture(scope="module")
def tls_router(cluster, pki):
    r = _router(cluster, pki, mutual=False)
    yield r
    stop_router(r)


@pytest.mark.parametrize("auth,expected", [
    (ClientAuth(), grpc.StatusCode.UNAVAILABLE),                                   # plaintext: no handshake
    (ClientAuth(tls_ca="ca.pem"), grpc.StatusCode.UNAUTHENTICATED),                # no token
    (ClientAuth(tls_ca="ca.pem", token="guess"), grpc.StatusCode.UNAUTHENTICATED),
    (ClientAuth(tls_ca="ca.pem", token=TOKEN), 4),
])
def test_grpc_needs_tls_and_the_token(tls_router, pki, auth, expected):
    if auth.tls_ca:
        auth = ClientAuth(str(pki / auth.tls_ca), token=auth.token)
    assert _generate(tls_router.target, auth) == expected


def test_grpc_health_checks_stay_open(tls_router, pki):
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(tls_router.target, creds) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("api_key,ok", [("guess", False), (TOKEN, True)])
def test_openai_client_over_https_needs_the_token(tls_router, pki, api_key, ok):
    base = tls_router.http.replace("http://", "https://") + "/v1"
    with httpx.Client(verify=_trust(pki)) as http:
        client = openai.OpenAI(base_url=base, api_key=api_key, http_client=http, max_retries=0)
        if not ok:
            with pytest.raises(openai.AuthenticationError):
                client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hello", max_tokens=4)
            assert http.get(base.removesuffix("/v1") + "/health").status_code == 200   # open to probes
            return
        answer = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hello", max_tokens=4,
                                           extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 4


def test_mutual_tls_needs_a_client_certificate(cluster, pki):
    router = _router(cluster, pki, mutual=True)
    try:
        without = _generate(router.target, ClientAuth(str(pki / "ca.pem")))
        with_cert = _generate(router.target, ClientAuth(str(pki / "ca.pem"), str(pki / "client.pem"),
                                                        str(pki / "client.key")))
        base = router.http.replace("http://", "https://")
        with httpx.Client(verify=_trust(pki, client_cert=True)) as http:
            https_status = http.get(base + "/health").status_code
        with httpx.Client(verify=_trust(pki)) as http, pytest.raises(httpx.HTTPError):
            http.get(base + "/health")
    finally:
        stop_router(router)
    assert without == grpc.StatusCode.UNAVAILABLE
    assert with_cert == 4
    assert https_status == 200
