"""Token files, the auth interceptor, TLS / mTLS credentials and secret-free settings, over a real in-process
gRPC server with fake servicers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from pydantic import ValidationError

from ranker.config import Settings
from ranker.security import (
    UNAUTHENTICATED_MESSAGE,
    AuthInterceptor,
    TokenFileError,
    Tokens,
    bearer_token,
    client_channel,
    load_tokens,
    parse_tokens,
    requires_token,
    server_credentials,
    token_metadata,
)
from ranker.server import start_health_server
from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.certs import Pki, make_pki
from tests.unit.inprocess import running_server

OLD = "old-token-0123456789abcdef"
NEW = "new-token-fedcba9876543210"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# --- token files -----------------------------------------------------------------------------------


def test_token_file_has_one_token_per_line_with_comments_and_blank_lines() -> None:
    text = f"# rotated 2025-01-01\n\n  {OLD}  \n{NEW}\n"
    assert parse_tokens(text, "tokens") == [OLD, NEW]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "no token"),
        ("# only a comment\n", "no token"),
        ("s3cr3t\n", "line 1: a token must be 16..4096 characters, got 6"),
        (f"{OLD}\ns3cr3t with spaces 0123456789\n", "line 2: a token must be printable and contain no spaces"),
    ],
)
def test_bad_token_files_are_refused_without_echoing_the_token(text: str, expected: str) -> None:
    with pytest.raises(TokenFileError) as caught:
        parse_tokens(text, "tokens.txt")
    assert expected in str(caught.value)
    assert "s3cr3t" not in str(caught.value) and OLD not in str(caught.value)


def test_tokens_accept_each_configured_token_and_nothing_else(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text(f"{OLD}\n{NEW}\n")
    tokens = Tokens(file=file, inline=["inline-token-0123456789"])
    assert len(tokens) == 3
    assert tokens.check(OLD) and tokens.check(NEW) and tokens.check("inline-token-0123456789")
    for wrong in (None, "", OLD[:-1], OLD + "x", OLD.upper(), "x" * 10_000):
        assert not tokens.check(wrong)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_file_rotation_is_picked_up_without_a_restart(tmp_path: Path) -> None:
    file, clock = tmp_path / "tokens", Clock()
    file.write_text(OLD + "\n")
    tokens = Tokens(file=file, reload_s=2.0, clock=clock)
    assert tokens.check(OLD) and not tokens.check(NEW)

    file.write_text(f"{OLD}\n{NEW}\n")  # rotation step 1: both valid
    clock.now = 1.0
    assert not tokens.check(NEW), "re-read at most every reload_s"
    clock.now = 2.5
    assert tokens.check(NEW) and tokens.check(OLD)

    file.write_text(NEW + "\n")  # step 2: the old one revoked
    clock.now = 5.0
    assert tokens.check(NEW) and not tokens.check(OLD)


def test_a_token_file_broken_during_rotation_fails_closed(tmp_path: Path) -> None:
    file, clock = tmp_path / "tokens", Clock()
    file.write_text(OLD + "\n")
    tokens = Tokens(file=file, reload_s=1.0, clock=clock, inline=[NEW])
    file.write_text("oops\n")
    clock.now = 2.0
    assert not tokens.check(OLD), "an invalid file must not keep the previous tokens valid"
    assert tokens.check(NEW), "inline tokens are independent of the file"
    file.unlink()
    clock.now = 4.0
    assert not tokens.check(OLD)
    file.write_text(OLD + "\n")
    clock.now = 6.0
    assert tokens.check(OLD)


def test_load_tokens(tmp_path: Path) -> None:
    assert load_tokens(None, None) is None
    assert load_tokens(None, f"{OLD}, {NEW}") is not None
    bad = tmp_path / "bad"
    bad.write_text("tooshort\n")
    with pytest.raises(SystemExit) as caught:
        load_tokens(bad, None)
    assert "tooshort" not in str(caught.value) and "line 1" in str(caught.value)


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", f"Bearer {OLD}"),), OLD),
        ((("authorization", f"bearer   {OLD} "),), OLD),
        ((("x-other", "1"), ("authorization", f"Bearer {OLD}")), OLD),
        ((("authorization", f"Basic {OLD}"),), None),
        ((("authorization", OLD),), None),
        ((("authorization", "Bearer "),), None),
        ((), None),
        (None, None),
    ],
)
def test_bearer_token(metadata: Any, token: str | None) -> None:
    assert bearer_token(metadata) == token


def test_which_rpcs_need_a_token() -> None:
    for method in ("RecordEvents", "ForgetUser", "UpsertItems", "DeleteItems", "SomeFutureRpc"):
        assert requires_token(f"/ranker.v1.Ranker/{method}", protect_rank=False)
    assert requires_token("/ranker.v1.RankerAdmin/LoadRelease", protect_rank=False)
    assert not requires_token("/ranker.v1.Ranker/Rank", protect_rank=False)
    assert requires_token("/ranker.v1.Ranker/Rank", protect_rank=True)
    for open_method in (
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        assert not requires_token(open_method, protect_rank=True)


def test_cli_token_metadata(tmp_path: Path) -> None:
    file = tmp_path / "client-token"
    file.write_text(f"# mine\n{NEW}\n")
    assert token_metadata(file) == bearer(NEW)
    assert token_metadata(None) == ()


# --- settings --------------------------------------------------------------------------------------


def test_settings_never_show_tokens(tmp_path: Path) -> None:
    settings = Settings.model_validate({"auth_tokens": OLD, "auth_required_for_rank": True})
    assert OLD not in repr(settings) and OLD not in str(settings)
    assert OLD not in settings.model_dump_json()
    assert settings.auth_tokens is not None and settings.auth_tokens.get_secret_value() == OLD


def test_settings_reject_inconsistent_security(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-")
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file"):
        Settings(tls_cert_file=pem)
    with pytest.raises(ValidationError, match="mTLS"):
        Settings(tls_client_ca_file=pem)
    with pytest.raises(ValidationError, match="auth_required_for_rank"):
        Settings(auth_required_for_rank=True)
    with pytest.raises(ValidationError):
        Settings(auth_token_file=tmp_path / "missing")
    with pytest.raises(ValidationError):
        Settings.model_validate({"log_format": "yaml"})
    for empty in ("", " , "):  # an empty secret must not quietly turn auth off
        with pytest.raises(ValidationError, match="auth_tokens is set but holds no token"):
            Settings.model_validate({"auth_tokens": empty})


def test_a_settings_error_does_not_echo_a_token(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-")
    with pytest.raises(ValidationError) as caught:
        Settings.model_validate({"tls_client_ca_file": pem, "auth_tokens": OLD})
    assert "mTLS" in str(caught.value) and OLD not in str(caught.value)


# --- the interceptor through the wire -------------------------------------------------------------

MUTATING: dict[str, Callable[[Any, Any], Any]] = {
    "RecordEvents": lambda stub, md: stub.RecordEvents(ranker_pb2.RecordEventsRequest(), metadata=md, timeout=10),
    "ForgetUser": lambda stub, md: stub.ForgetUser(ranker_pb2.ForgetUserRequest(user_id="u1"), metadata=md, timeout=10),
    "UpsertItems": lambda stub, md: stub.UpsertItems(ranker_pb2.UpsertItemsRequest(), metadata=md, timeout=10),
    "DeleteItems": lambda stub, md: stub.DeleteItems(ranker_pb2.DeleteItemsRequest(), metadata=md, timeout=10),
}


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def protected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    file = tmp_path_factory.mktemp("auth") / "tokens"
    file.write_text(f"{OLD}\n{NEW}\n")
    with running_server([AuthInterceptor(Tokens(file=file))]) as target:
        yield target


@pytest.mark.parametrize("method", sorted(MUTATING))
def test_mutating_rpcs_need_a_valid_token(protected: str, method: str) -> None:
    with grpc.insecure_channel(protected) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        details = set()
        for metadata in ((), bearer("wrong-token-0123456789"), (("authorization", OLD),), bearer("")):
            with pytest.raises(grpc.RpcError) as caught:
                MUTATING[method](stub, metadata)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            details.add(caught.value.details())
        assert details == {UNAUTHENTICATED_MESSAGE}, "the reply must not say which part was wrong"
        accepted = {grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED}  # Upsert/Delete: not in the fake
        assert code_of(lambda: MUTATING[method](stub, bearer(OLD))) in accepted
        assert code_of(lambda: MUTATING[method](stub, bearer(NEW))) in accepted


def test_admin_rpcs_need_a_token(protected: str) -> None:
    with grpc.insecure_channel(protected) as channel:
        admin = ranker_pb2_grpc.RankerAdminStub(channel)
        request = ranker_pb2.LoadReleaseRequest(path="/nowhere")
        assert code_of(lambda: admin.LoadRelease(request, timeout=10)) is grpc.StatusCode.UNAUTHENTICATED
        assert admin.LoadRelease(request, metadata=bearer(OLD), timeout=10).millis == 1.0


def test_rank_health_and_reflection_stay_open_by_default(protected: str) -> None:
    with grpc.insecure_channel(protected) as channel:
        assert ranker_pb2_grpc.RankerStub(channel).Rank(ranker_pb2.RankRequest(query="drill"), timeout=10).items
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert "ranker.v1.Ranker" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_rank_can_require_a_token_while_health_stays_open() -> None:
    with (
        running_server([AuthInterceptor(Tokens(inline=[OLD]), protect_rank=True)]) as target,
        grpc.insecure_channel(target) as channel,
    ):
        stub = ranker_pb2_grpc.RankerStub(channel)
        request = ranker_pb2.RankRequest(query="drill")
        assert code_of(lambda: stub.Rank(request, timeout=10)) is grpc.StatusCode.UNAUTHENTICATED
        assert stub.Rank(request, metadata=bearer(OLD), timeout=10).items
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert "grpc.health.v1.Health" in ProtoReflectionDescriptorDatabase(channel).get_services()


# --- TLS and mTLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def rank_code(channel: grpc.Channel) -> grpc.StatusCode:
    stub = ranker_pb2_grpc.RankerStub(channel)
    return code_of(lambda: stub.Rank(ranker_pb2.RankRequest(query="drill"), timeout=5))


def test_tls_server_talks_only_tls(pki: Pki) -> None:
    credentials = server_credentials(pki.server_cert, pki.server_key, None)
    with running_server([], credentials) as target:
        with client_channel(target, ca_file=pki.ca) as channel:
            assert rank_code(channel) is grpc.StatusCode.OK
        with client_channel(target.replace("127.0.0.1", "localhost"), ca_file=pki.ca) as channel:
            assert rank_code(channel) is grpc.StatusCode.OK
        with client_channel(target) as plaintext:
            assert rank_code(plaintext) is grpc.StatusCode.UNAVAILABLE
        with client_channel(target, ca_file=pki.ca, server_name="not-the-server.example") as wrong_name:
            assert rank_code(wrong_name) is grpc.StatusCode.UNAVAILABLE


def test_mtls_server_requires_a_client_certificate_from_its_ca(pki: Pki) -> None:
    credentials = server_credentials(pki.server_cert, pki.server_key, pki.ca)
    with running_server([], credentials) as target:
        with client_channel(target, ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key) as channel:
            assert rank_code(channel) is grpc.StatusCode.OK
        with client_channel(target, ca_file=pki.ca) as no_client_cert:
            assert rank_code(no_client_cert) is grpc.StatusCode.UNAVAILABLE
        with client_channel(target, ca_file=pki.ca, cert_file=pki.rogue_cert, key_file=pki.rogue_key) as rogue:
            assert rank_code(rogue) is grpc.StatusCode.UNAVAILABLE


def test_plaintext_when_no_certificate_is_configured() -> None:
    assert server_credentials(None, None, None) is None


def test_unreadable_certificate_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="cannot read TLS key"):
        server_credentials(tmp_path / "cert.pem", tmp_path / "missing.key", None)


def test_unregistered_protected_methods_are_refused_like_registered_ones(protected: str) -> None:
    with grpc.insecure_channel(protected) as channel:
        call = channel.unary_unary("/ranker.v1.RankerAdmin/NoSuchRpc")
        assert code_of(lambda: call(b"", timeout=10)) is grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: call(b"", metadata=bearer(OLD), timeout=10)) is grpc.StatusCode.UNIMPLEMENTED


def test_the_health_port_reports_the_main_ports_health_and_its_drain() -> None:
    async def scenario() -> None:
        health = health_aio.HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        server, port = await start_health_server(Settings(host="127.0.0.1", health_port=0), health)
        assert server is not None and port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            await health.enter_graceful_shutdown()  # what RunningServer.stop does first
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await ranker_pb2_grpc.RankerStub(channel).Rank(ranker_pb2.RankRequest(query="drill"), timeout=5)
            assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
        await server.stop(0)
        assert await start_health_server(Settings(), health) == (None, None)  # unset: no second port

    asyncio.run(scenario())
