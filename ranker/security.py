"""Transport and caller security: TLS / mTLS credentials, bearer tokens and the interceptor enforcing them.

Tokens are compared in constant time against SHA-256 digests (the clear tokens are not kept), and a
rejected call learns only "missing or invalid token": not whether the header was absent, malformed
or wrong. Health and reflection are never protected; every Ranker RPC but Rank (unless
RANKER_AUTH_REQUIRED_FOR_RANK) and every RankerAdmin RPC is, including ones added later.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

PROTECTED_PREFIXES = ("/ranker.v1.Ranker/", "/ranker.v1.RankerAdmin/")
RANK_METHOD = "/ranker.v1.Ranker/Rank"
AUTH_HEADER = "authorization"
UNAUTHENTICATED_MESSAGE = "missing or invalid token"
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096


class TokenFileError(ValueError):
    """The token file is unreadable or holds no valid token; the message never contains a token."""


def parse_tokens(text: str, source: str) -> list[str]:
    """Tokens, one per line; blank lines and lines starting with # are ignored. Several tokens let a
    rotation overlap (add the new one, move the clients, remove the old one)."""
    tokens: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if any(c.isspace() for c in token) or not token.isprintable():
            raise TokenFileError(f"{source} line {number}: a token must be printable and contain no spaces")
        if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
            raise TokenFileError(
                f"{source} line {number}: a token must be {MIN_TOKEN_CHARS}..{MAX_TOKEN_CHARS} characters, "
                f"got {len(token)}"
            )
        tokens.append(token)
    if not tokens:
        raise TokenFileError(f"{source}: no token (one per line; # starts a comment)")
    return tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Tokens:
    """The accepted bearer tokens: a token file, re-read when it changes (checked at most every
    `reload_s`), and/or tokens given inline. A token file that becomes unreadable or invalid accepts
    nothing until fixed (fail closed: a botched revocation must not keep the old tokens valid)."""

    def __init__(
        self,
        *,
        file: Path | None = None,
        inline: Sequence[str] = (),
        reload_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if file is None and not inline:
            raise ValueError("Tokens needs a token file or inline tokens")
        self._file = file
        self._inline = [_digest(t) for t in inline]
        self._reload_s = reload_s
        self._clock = clock
        self._file_digests: list[bytes] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = -float("inf")
        if file is not None:
            self._file_digests = [_digest(t) for t in parse_tokens(self._read(file), str(file))]
            self._stamp = self._stat(file)
            self._checked_at = clock()

    @staticmethod
    def _stat(file: Path) -> tuple[int, int, int]:
        st = os.stat(file)  # follows symlinks: Kubernetes swaps a mounted secret's ..data link
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    @staticmethod
    def _read(file: Path) -> str:
        try:
            return file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenFileError(f"{file}: cannot read ({type(e).__name__})") from None

    def _maybe_reload(self) -> None:
        if self._file is None or self._clock() - self._checked_at < self._reload_s:
            return
        self._checked_at = self._clock()
        try:
            stamp = self._stat(self._file)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._file_digests = [_digest(t) for t in parse_tokens(self._read(self._file), str(self._file))]
        except TokenFileError as e:
            self._file_digests = []
            log.error("token file rejected, accepting no token from it until fixed: %s", e)
            return
        log.info("token file reloaded: %d token(s)", len(self._file_digests))

    def __len__(self) -> int:
        self._maybe_reload()
        return len(self._file_digests) + len(self._inline)

    def check(self, presented: str | None) -> bool:
        """True when `presented` is one of the tokens. Compares against every token, in constant time."""
        self._maybe_reload()
        if not presented or len(presented) > MAX_TOKEN_CHARS:
            return False
        candidate = _digest(presented)
        match = False
        for known in (*self._file_digests, *self._inline):
            match |= hmac.compare_digest(candidate, known)
        return match


def split_inline_tokens(value: str) -> list[str]:
    """RANKER_AUTH_TOKENS: tokens separated by commas or whitespace."""
    return parse_tokens("\n".join(value.replace(",", " ").split()), "RANKER_AUTH_TOKENS")


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of the first `authorization: Bearer <token>` header, or None."""
    for key, value in metadata or ():
        if key != AUTH_HEADER:
            continue
        if not isinstance(value, str):
            return None
        scheme, _, token = value.strip().partition(" ")
        return (token.strip() or None) if scheme.lower() == "bearer" else None
    return None


def requires_token(method: str, *, protect_rank: bool) -> bool:
    """Mutating and admin RPCs need a token; Rank only when `protect_rank`; health, reflection never."""
    if method == RANK_METHOD:
        return protect_rank
    return method.startswith(PROTECTED_PREFIXES)


async def _deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


async def _deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
    yield  # pragma: no cover - makes this an async generator, as streaming handlers must be


def _rejection(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call without reading the request."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny_unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny_stream)
    return grpc.unary_unary_rpc_method_handler(_deny_unary)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses protected RPCs without a valid bearer token with UNAUTHENTICATED."""

    def __init__(self, tokens: Tokens, *, protect_rank: bool = False) -> None:
        self._tokens = tokens
        self._protect_rank = protect_rank

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if not requires_token(method, protect_rank=self._protect_rank) or self._tokens.check(
            bearer_token(handler_call_details.invocation_metadata)
        ):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        # An unregistered protected method is refused the same way: no probing for which ones exist.
        return grpc.unary_unary_rpc_method_handler(_deny_unary) if handler is None else _rejection(handler)


# --- TLS -----------------------------------------------------------------------------------------


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SystemExit(f"cannot read {what} {path}: {e.strerror}") from None


def server_credentials(
    cert_file: Path | None, key_file: Path | None, client_ca_file: Path | None
) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plaintext. With `client_ca_file`, clients must
    present a certificate signed by that CA (mTLS)."""
    if cert_file is None or key_file is None:
        return None
    pair = (_read_pem(key_file, "TLS key"), _read_pem(cert_file, "TLS certificate"))
    if client_ca_file is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read_pem(client_ca_file, "client CA"), require_client_auth=True
    )


# --- client side (the CLI, tests) ----------------------------------------------------------------


def client_channel(
    target: str,
    *,
    tls: bool = False,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A blocking channel to a ranker: plaintext, or TLS when `tls` or any file is given (the system
    roots unless `ca_file`; a client certificate for mTLS with `cert_file` and `key_file`)."""
    if not (tls or ca_file or cert_file or key_file):
        return grpc.insecure_channel(target)
    if (cert_file is None) != (key_file is None):
        raise SystemExit("--cert-file and --key-file go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_file, "CA") if ca_file else None,
        private_key=_read_pem(key_file, "client key") if key_file else None,
        certificate_chain=_read_pem(cert_file, "client certificate") if cert_file else None,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def token_metadata(token_file: Path | None) -> tuple[tuple[str, str], ...]:
    """`authorization: Bearer <first token of the file>`, or nothing without a file."""
    if token_file is None:
        return ()
    try:
        token = parse_tokens(token_file.read_text(encoding="utf-8"), str(token_file))[0]
    except OSError as e:
        raise SystemExit(f"cannot read token file {token_file}: {e.strerror}") from None
    except TokenFileError as e:
        raise SystemExit(str(e)) from None
    return ((AUTH_HEADER, f"Bearer {token}"),)


def load_tokens(file: Path | None, inline: str | None) -> Tokens | None:
    """The configured tokens (RANKER_AUTH_TOKEN_FILE, RANKER_AUTH_TOKENS), or None when there are none.
    A token file that is unreadable or invalid stops the start-up."""
    if file is None and inline is None:
        return None
    try:
        return Tokens(file=file, inline=split_inline_tokens(inline) if inline is not None else ())
    except TokenFileError as e:
        raise SystemExit(f"auth: {e}") from None
