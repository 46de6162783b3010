"""`python -m ranker serve` with TLS, mTLS and tokens, its Prometheus endpoint and its JSON logs, end to end
(real tritonserver, the real server as a subprocess, throwaway certificates made with openssl)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from ranker.security import client_channel
from ranker.tritonserver import LocalTritonServer
from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.certs import Pki, make_pki
from tests.integration.conftest import ROOT, free_port, wait_serving
from tests.unit.fakes import SEARCH_STAGES

pytestmark = [pytest.mark.triton, pytest.mark.slow]

TOKEN = "it-token-3f9a0c1e5b7d2468"
SECOND_TOKEN = "it-token-rotated-13579bdf"
INLINE_TOKEN = "it-inline-token-02468ace"
RAW_USER = "shopper-raw-id-4711@example.com"
USER_REF_KEY = b"it-user-ref-key-6b1e9d03a5c7f842"


@dataclass(frozen=True)
class Served:
    target: str
    log: Path
    pki: Pki
    token_file: Path
    metrics_port: int
    health_port: int | None = None

    def channel(self, *, client_cert: bool = False, rogue: bool = False) -> grpc.Channel:
        if rogue:
            return client_channel(self.target, ca_file=self.pki.ca, cert_file=self.pki.rogue_cert,
                                  key_file=self.pki.rogue_key)  # fmt: skip
        if client_cert:
            return client_channel(self.target, ca_file=self.pki.ca, cert_file=self.pki.client_cert,
                                  key_file=self.pki.client_key)  # fmt: skip
        return client_channel(self.target, ca_file=self.pki.ca)

    def cli(self, *args: str, client_cert: bool = False) -> subprocess.CompletedProcess[str]:
        tls = ["--target", self.target, "--ca-file", str(self.pki.ca)]
        if client_cert:
            tls += ["--cert-file", str(self.pki.client_cert), "--key-file", str(self.pki.client_key)]
        command = [sys.executable, "-m", "ranker", *args[:1], *tls, *args[1:]]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _serve(
    release: Path,
    triton: LocalTritonServer,
    folder: Path,
    pki: Pki,
    env: dict[str, str],
    ready: Callable[[str], grpc.Channel],
) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    port = free_port()
    log = folder / "ranker.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "ranker", "serve", "--release", str(release), "--port", str(port),
             "--host", "127.0.0.1", "--triton-url", triton.grpc_url],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            # Its own state folder: the token-bearing calls below may write the catalog journal.
            env={**os.environ, "RANKER_TRITON_TIMEOUT_S": "5", "RANKER_TLS_CERT_FILE": str(pki.server_cert),
                 "RANKER_TLS_KEY_FILE": str(pki.server_key), "RANKER_STATE_DIR": str(folder / "state"), **env},
        )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process, log, timeout=180, channel=ready)
        yield target, log, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def tls_server(
    example_release: Path, triton: LocalTritonServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """TLS (server certificate only), a token file with two tokens, JSON logs, metrics on a free port."""
    folder = tmp_path_factory.mktemp("tls-ranker")
    token_file = folder / "tokens"
    token_file.write_text(f"# two tokens: a rotation in progress\n{TOKEN}\n{SECOND_TOKEN}\n")
    user_ref_key = folder / "user-ref-key"
    user_ref_key.write_bytes(USER_REF_KEY + b"\n")
    metrics_port = free_port()
    env = {
        "RANKER_AUTH_TOKEN_FILE": str(token_file),
        "RANKER_USER_REF_KEY_FILE": str(user_ref_key),
        "RANKER_METRICS_PORT": str(metrics_port),
        "RANKER_LOG_FORMAT": "json",
    }
    ready = lambda target: client_channel(target, ca_file=pki.ca)  # noqa: E731
    for target, log, _ in _serve(example_release, triton, folder, pki, env, ready):
        yield Served(target=target, log=log, pki=pki, token_file=token_file, metrics_port=metrics_port)


@pytest.fixture(scope="module")
def mtls_server(
    example_release: Path, triton: LocalTritonServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """mTLS (clients need a certificate from the test CA), tokens inline and required for Rank too."""
    folder = tmp_path_factory.mktemp("mtls-ranker")
    token_file = folder / "client-token"
    token_file.write_text(INLINE_TOKEN + "\n")
    health_port = free_port()
    env = {
        "RANKER_HEALTH_PORT": str(health_port),  # plaintext health for probes that cannot do mTLS
        "RANKER_TLS_CLIENT_CA_FILE": str(pki.ca),
        "RANKER_AUTH_TOKENS": f"{INLINE_TOKEN},{SECOND_TOKEN}",
        "RANKER_AUTH_REQUIRED_FOR_RANK": "true",
        "RANKER_METRICS_PORT": "0",
        "RANKER_LOG_FORMAT": "text",
    }
    ready = lambda target: client_channel(  # noqa: E731
        target, ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key
    )
    for target, log, _ in _serve(example_release, triton, folder, pki, env, ready):
        yield Served(target=target, log=log, pki=pki, token_file=token_file, metrics_port=0, health_port=health_port)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def rank(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = (), **fields: Any) -> Any:
    request = ranker_pb2.RankRequest(**{"query": "drill", "top_k": 5, **fields})
    return ranker_pb2_grpc.RankerStub(channel).Rank(request, metadata=metadata, timeout=30)


# Harmless calls: whatever the handlers do with them, only UNAUTHENTICATED matters here.
def _mutating_calls(channel: grpc.Channel) -> dict[str, Callable[[tuple[tuple[str, str], ...]], Any]]:
    stub, admin = ranker_pb2_grpc.RankerStub(channel), ranker_pb2_grpc.RankerAdminStub(channel)
    return {
        "RecordEvents": lambda md: stub.RecordEvents(ranker_pb2.RecordEventsRequest(), metadata=md, timeout=30),
        "ForgetUser": lambda md: stub.ForgetUser(
            ranker_pb2.ForgetUserRequest(user_id=RAW_USER), metadata=md, timeout=30
        ),
        "UpsertItems": lambda md: stub.UpsertItems(ranker_pb2.UpsertItemsRequest(), metadata=md, timeout=30),
        "DeleteItems": lambda md: stub.DeleteItems(
            ranker_pb2.DeleteItemsRequest(item_ids=["no-such-item-id"]), metadata=md, timeout=30
        ),
        "LoadRelease": lambda md: admin.LoadRelease(
            ranker_pb2.LoadReleaseRequest(path="/no/such/release"), metadata=md, timeout=30
        ),
    }


# --- TLS + tokens ----------------------------------------------------------------------------------


def test_tls_port_refuses_plaintext(tls_server: Served) -> None:
    with grpc.insecure_channel(tls_server.target) as plaintext:
        assert code_of(lambda: rank(plaintext)) is grpc.StatusCode.UNAVAILABLE
    with tls_server.channel() as channel:
        assert len(rank(channel).items) == 5


def test_rank_is_open_and_mutating_rpcs_need_a_token(tls_server: Served) -> None:
    with tls_server.channel() as channel:
        assert rank(channel).items, "Rank needs no token by default"
        for name, call in _mutating_calls(channel).items():
            for metadata in ((), bearer("it-wrong-token-000000000"), (("authorization", TOKEN),)):
                with pytest.raises(grpc.RpcError) as caught:
                    call(metadata)
                assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
                assert caught.value.details() == "missing or invalid token"
            for token in (TOKEN, SECOND_TOKEN):
                try:
                    call(bearer(token))
                except grpc.RpcError as e:  # the handler's own verdict on a harmless request is fine
                    assert e.code() is not grpc.StatusCode.UNAUTHENTICATED, name


def test_health_and_reflection_stay_open(tls_server: Served) -> None:
    with tls_server.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert "ranker.v1.Ranker" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_requests_over_the_size_limit_are_refused(tls_server: Served) -> None:
    with tls_server.channel() as channel:
        too_big = "x" * (5 * 1024 * 1024)  # RANKER_MAX_RECEIVE_BYTES defaults to 4 MiB
        assert code_of(lambda: rank(channel, query=too_big)) is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rank(channel).items


def test_cli_talks_tls(tls_server: Served) -> None:
    health = tls_server.cli("health")
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    query = tls_server.cli("query", "cordless drill", "--top-k", "3")
    assert query.returncode == 0, query.stderr
    assert "release " in query.stdout and " 3. " in query.stdout


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def _sample(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for have, v in samples.get(name, []) if all(have.get(k) == x for k, x in labels.items()))


def test_metrics_endpoint_shows_rpcs_stages_triton_and_the_release(tls_server: Served, example_release: Path) -> None:
    manifest = json.loads((example_release / "manifest.json").read_text())
    with tls_server.channel() as channel:
        before = _scrape(tls_server.metrics_port)
        for query in ("drill", "paint", "garden hose"):
            rank(channel, query=query)
        assert code_of(lambda: _mutating_calls(channel)["RecordEvents"](())) is grpc.StatusCode.UNAUTHENTICATED
    after = _scrape(tls_server.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    rank_method = "/ranker.v1.Ranker/Rank"
    assert delta("ranker_rpcs_total", method=rank_method, code="OK") == 3
    assert delta("ranker_rpcs_total", method="/ranker.v1.Ranker/RecordEvents", code="UNAUTHENTICATED") == 1
    assert delta("ranker_rpc_duration_seconds_count", method=rank_method) == 3
    for stage in SEARCH_STAGES:
        assert delta("ranker_rank_stage_duration_seconds_count", stage=stage) == 3, stage
        assert _sample(after, "ranker_rank_stage_duration_seconds_bucket", stage=stage, le="+Inf") >= 3
    assert delta("ranker_rank_candidates_count") == 3
    for model in ("text_encoder", "ranker"):
        assert delta("ranker_triton_request_duration_seconds_count", model=model) == 3, model
    info = after["ranker_release_info"]
    assert [labels for labels, v in info if v == 1] == [
        {"release_id": manifest["release_id"], "text_encoder_version": "1", "ranker_version": "1"}
    ]


def _json_log(log: Path) -> list[dict[str, Any]]:
    entries = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))  # every structured line is one whole JSON object
    return entries


def test_logs_are_json_lines_with_request_ids_and_no_raw_user_id(tls_server: Served) -> None:
    with tls_server.channel() as channel:
        rank(channel, request_id="it-req-json-1", user_id=RAW_USER)
        generated = rank(channel, user_id=RAW_USER).request_id
        code_of(lambda: _mutating_calls(channel)["ForgetUser"](bearer(TOKEN)))
    time.sleep(0.5)
    text = tls_server.log.read_text()
    entries = _json_log(tls_server.log)
    assert any(e["logger"] == "ranker.server" and "serving on" in e["msg"] for e in entries), "start-up is JSON too"
    access = {e.get("request_id"): e for e in entries if e["logger"] == "ranker.access"}
    for request_id in ("it-req-json-1", generated):
        entry = access[request_id]
        assert entry["method"] == "/ranker.v1.Ranker/Rank" and entry["code"] == "OK"
        # The reference is HMAC-SHA256 under the server's key file, not a hash anyone could recompute.
        assert entry["user"] == "u:" + hmac.new(USER_REF_KEY, RAW_USER.encode(), hashlib.sha256).hexdigest()[:16]
        assert {"ts", "level", "msg", "ms", "candidates"} <= set(entry)
    assert RAW_USER not in text and "shopper-raw-id" not in text
    assert TOKEN not in text and SECOND_TOKEN not in text


# --- mTLS ------------------------------------------------------------------------------------------


def test_mtls_needs_a_client_certificate_from_the_ca(mtls_server: Served) -> None:
    with mtls_server.channel() as no_cert:
        assert code_of(lambda: rank(no_cert, bearer(INLINE_TOKEN))) is grpc.StatusCode.UNAVAILABLE
    with mtls_server.channel(rogue=True) as rogue:
        assert code_of(lambda: rank(rogue, bearer(INLINE_TOKEN))) is grpc.StatusCode.UNAVAILABLE
    with mtls_server.channel(client_cert=True) as channel:
        assert code_of(lambda: rank(channel)) is grpc.StatusCode.UNAUTHENTICATED, "Rank requires a token here"
        assert len(rank(channel, bearer(INLINE_TOKEN), request_id="it-mtls-1").items) == 5
        assert len(rank(channel, bearer(SECOND_TOKEN)).items) == 5
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, "health needs no token"
    time.sleep(0.5)
    text = mtls_server.log.read_text()
    assert "[it-mtls-1]" in text, "text logs tag request lines with the request id"
    assert INLINE_TOKEN not in text and SECOND_TOKEN not in text


def test_cli_talks_mtls_with_a_token(mtls_server: Served) -> None:
    health = mtls_server.cli("health", client_cert=True)
    assert health.returncode == 0, health.stderr
    without_token = mtls_server.cli("query", "paint", "--top-k", "2", client_cert=True)
    assert without_token.returncode == 1 and "UNAUTHENTICATED" in without_token.stderr
    with_token = mtls_server.cli("query", "paint", "--top-k", "2", "--token-file", str(mtls_server.token_file),
                                 client_cert=True)  # fmt: skip
    assert with_token.returncode == 0, with_token.stderr
    assert " 2. " in with_token.stdout


def test_the_health_port_answers_health_in_plaintext_and_nothing_else(mtls_server: Served) -> None:
    assert mtls_server.health_port is not None
    target = f"127.0.0.1:{mtls_server.health_port}"
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ranker.v1.Ranker"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert code_of(lambda: rank(channel)) is grpc.StatusCode.UNIMPLEMENTED
        assert code_of(lambda: rank(channel, metadata=bearer(INLINE_TOKEN))) is grpc.StatusCode.UNIMPLEMENTED
    done = subprocess.run(
        [sys.executable, "-m", "ranker", "health", "--target", target], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "SERVING" in done.stdout
    with grpc.insecure_channel(mtls_server.target) as plaintext:  # the main port still takes mTLS only
        assert code_of(lambda: rank(plaintext, metadata=bearer(INLINE_TOKEN))) is grpc.StatusCode.UNAVAILABLE
