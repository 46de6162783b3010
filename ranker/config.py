"""Service settings: read once from RANKER_* environment variables at start-up, validated, frozen."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

ENV_PREFIX = "RANKER_"


class Settings(BaseSettings):
    """Every knob of the online service. Nothing else in ranker/ reads the environment."""

    # hide_input_in_errors: a validation error must not echo the settings, tokens and URLs among them.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", hide_input_in_errors=True)

    release: Path | None = Field(default=None, description="release folder written by offline.export")
    host: str = Field(default="0.0.0.0", description="address the gRPC server binds")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    grace_s: float = Field(default=10.0, ge=0, description="drain time for in-flight RPCs on SIGTERM")
    drain_s: float = Field(
        default=0.0,
        ge=0,
        le=600,
        description="on SIGTERM, report NOT_SERVING and keep serving this long before the stop, so that clients "
        "move away first: calls still arriving when the server stops come back CANCELLED",
    )
    max_connection_age_s: float | None = Field(
        default=None,
        gt=0,
        description="close each client connection gracefully (GOAWAY) after about this long, so that clients "
        "behind an L4 balancer reconnect and spread over replicas, and leave a draining one; unset: never",
    )

    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="ranker processes sharing the gRPC port (SO_REUSEPORT: the kernel spreads connections, not calls, "
        "over them) and one Triton. Above 1: Redis profile and catalog stores, a fixed port, worker i's metrics on "
        "metrics_port + i; RankerAdmin.LoadRelease rolls the whole set to the new release",
    )
    worker_index: int | None = Field(
        default=None, ge=0, description="set by `ranker serve` for each of its worker processes, not by operators"
    )
    worker_control_fd: int | None = Field(
        default=None, ge=0, description="set by `ranker serve` for each worker: its socket to the supervisor"
    )

    triton_url: str = Field(
        default="embedded",
        description="host:port of Triton's gRPC endpoint, or 'embedded' to start a local CPU tritonserver",
    )
    triton_models: Literal["auto", "push", "preloaded"] = Field(
        default="auto",
        description="push: the ranker loads each release's models into Triton under per-release names (needs "
        "--model-control-mode=explicit; what RankerAdmin.LoadRelease needs); preloaded: Triton already serves the "
        "release's models under their own names; auto: push, or preloaded when Triton refuses loads",
    )
    triton_config_name: str | None = Field(
        default=None,
        description="which config of each model the ranker loads: configs/<name>.pbtxt when the model has it, else "
        "config.pbtxt; 'default': config.pbtxt; unset: 'cpu' for the embedded server, 'default' for an external one",
    )
    scorer: Literal["triton", "inprocess"] = Field(
        default="triton",
        description="where the ranker model runs: on Triton, or in this process with ONNX Runtime (a small ranker: "
        "no round trip; the release's own ONNX file, the one Triton serves)",
    )
    triton_load_timeout_s: float = Field(
        default=300.0, gt=0, description="limit for loading one model into Triton (a release swap, the start)"
    )
    release_verify: Literal["none", "models", "all"] = Field(
        default="models",
        description="what a release load checks against the manifest's sha256s: models (the Triton models, "
        "tokenizer and policy; a fraction of a second), all (the index and vectors too: seconds at 1M items), "
        "none (only that every file is there)",
    )
    release_mapped: bool = Field(
        default=True,
        description="map the release's FAISS, title and BM25 indexes into memory instead of copying them, so that "
        "processes serving the same release (RANKER_WORKERS, and both sets during a roll) share one copy. Turn it off "
        "for a release on a network filesystem, where a page read could wait on the network",
    )
    release_drain_s: float = Field(
        default=30.0, ge=0, description="a release swap waits this long for the old release's in-flight RPCs"
    )
    release_keep_previous: int = Field(
        default=0,
        ge=0,
        le=3,
        description="a release swap keeps the models of this many replaced releases loaded in Triton (several "
        "rankers sharing one Triton swap one by one); older ones are unloaded",
    )
    triton_startup_wait_s: float = Field(
        default=120.0, ge=0, description="how long to wait for Triton's models at start before serving degraded"
    )
    triton_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="per-call limit when the caller sets no deadline"
    )

    dense_k: int | None = Field(
        default=None, ge=1, le=4000, description="ANN candidates; default ranker.pipeline.SERVING_DEPTH"
    )
    lexical_k: int | None = Field(
        default=None, ge=1, le=4000, description="BM25 candidates; default ranker.pipeline.SERVING_DEPTH"
    )
    # Equal to ranker.retrieval.EF_SEARCH (tests/unit/test_retrieval.py keeps them so).
    ef_search: int = Field(default=128, ge=16, le=8192, description="HNSW search breadth")
    query_cache_size: int = Field(
        default=0,
        ge=0,
        le=10_000_000,
        description="query embeddings kept in a least-recently-used cache (about 2 kB each for MiniLM): a repeated "
        "query skips the encoder; 0 turns the cache off",
    )
    dense_backend: Literal["faiss", "qdrant"] = Field(
        default="faiss", description="the release's FAISS index, or its collection in a Qdrant engine"
    )
    vector_engine_url: str | None = Field(
        default=None, description="with dense_backend=qdrant: http(s)://host:6333, or local:/path (in-process)"
    )

    default_top_k: int = Field(default=20, ge=1, le=200)
    max_top_k: int = Field(default=200, ge=1, le=1000)
    max_query_chars: int = Field(default=1000, ge=1)
    max_candidate_ids: int = Field(default=1000, ge=1, le=8192)
    max_receive_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    policy_file: Path | None = Field(default=None, description="ranking policy TOML replacing the release's")
    max_concurrent_rpcs: int = Field(default=256, ge=1, description="beyond this, RPCs are refused")
    state_dir: Path = Field(
        default=Path("state"),
        description="writable folder for what outlives a restart, e.g. catalog/journal.jsonl (online catalog updates)",
    )

    catalog_store: str = Field(
        default="embedded",
        pattern=r"^(embedded|(redis|rediss|unix)://.*)$",
        description="where online catalog changes are kept: 'embedded' (a journal file under state_dir, this "
        "replica only) or a Redis URL, a change log every replica appends to and applies "
        "(docs/catalog-updates.md)",
    )
    catalog_store_password_file: FilePath | None = Field(
        default=None, description="file holding the Redis catalog store's password (AUTH), read at start-up"
    )

    # TLS to Redis (both stores above, with rediss:// URLs): managed Redis services usually require it.
    redis_tls_ca_file: FilePath | None = Field(
        default=None, description="PEM CA bundle that verifies a rediss:// server (default: the system's CAs)"
    )
    redis_tls_cert_file: FilePath | None = Field(
        default=None, description="PEM client certificate for a rediss:// server that requires one (mTLS)"
    )
    redis_tls_key_file: FilePath | None = Field(default=None, description="PEM private key of redis_tls_cert_file")

    # User profiles and RecordEvents (docs/personalization.md).
    profile_store: str = Field(
        default="embedded",
        pattern=r"^(embedded|(redis|rediss|unix)://.*)$",
        description="'embedded' (sqlite file under state_dir/profiles) or a Redis URL, e.g. redis://host:6379/0",
    )
    profile_store_password_file: FilePath | None = Field(
        default=None,
        description="file holding the Redis profile store's password (AUTH), read at start-up: keeps it out of "
        "RANKER_PROFILE_STORE, which is logged",
    )
    profile_ttl_s: float = Field(default=30 * 86400.0, ge=60, description="a profile expires this after its last event")
    profile_half_life_s: float = Field(default=7 * 86400.0, gt=0, description="an event's weight halves this often")
    profile_timeout_s: float = Field(
        default=0.1, gt=0, le=10, description="a profile read slower than this answers Rank without personalisation"
    )
    event_dedup_ttl_s: float = Field(default=7 * 86400.0, ge=60, description="how long an event_id is remembered")
    event_dedup_max_ids: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Redis store: event ids remembered per user (beyond this the oldest are forgotten early)",
    )
    max_events_per_request: int = Field(default=1000, ge=1, le=100_000)
    event_max_future_s: float = Field(default=300.0, ge=0, description="clock skew tolerated for event timestamps")

    log_level: str = Field(default="INFO")

    # Security and observability (docs/operations.md). Secrets are file paths or SecretStr: repr(settings)
    # and the logs never show a token.
    tls_cert_file: FilePath | None = Field(default=None, description="PEM certificate chain; enables TLS on the port")
    tls_key_file: FilePath | None = Field(default=None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: FilePath | None = Field(
        default=None, description="PEM CA bundle; when set, clients must present a certificate it signed (mTLS)"
    )
    auth_token_file: FilePath | None = Field(
        default=None, description="bearer tokens, one per line (several during a rotation); re-read when it changes"
    )
    auth_tokens: SecretStr | None = Field(default=None, description="bearer tokens, comma-separated (prefer the file)")
    auth_required_for_rank: bool = Field(
        default=False, description="Rank needs a token too (mutating and admin RPCs always do when tokens are set)"
    )
    user_ref_key_file: FilePath | None = Field(
        default=None,
        description="secret key (≥ 16 bytes) of the hashed user ids in logs; share it across replicas to correlate "
        "a user's lines. Unset: a random key per process",
    )
    health_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="a second, plaintext port serving only grpc.health.v1, for probes that cannot speak the main "
        "port's TLS or mTLS (Kubernetes grpc probes); 0 picks a free one. Unset: health on the main port only",
    )
    metrics_port: int = Field(default=9464, ge=0, le=65535, description="Prometheus /metrics port; 0 disables")
    log_format: Literal["text", "json"] = Field(default="text", description="json: one JSON object per line")
    access_log: bool = Field(default=True, description="one log line per RPC (health checks excepted)")
    otel_exporter: Literal["none", "otlp", "console"] = Field(
        default="none", description="OpenTelemetry tracing: otlp (to otel_endpoint), console (stdout) or none"
    )
    otel_endpoint: str | None = Field(default=None, description="OTLP gRPC endpoint, e.g. http://otel-collector:4317")
    otel_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0, description="share of new traces recorded")
    otel_service_name: str = Field(default="ranker", min_length=1, description="service.name of the spans")

    @model_validator(mode="after")
    def _security_consistent(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        if (self.redis_tls_cert_file is None) != (self.redis_tls_key_file is None):
            raise ValueError("redis_tls_cert_file and redis_tls_key_file must be set together")
        redis_tls = (self.redis_tls_ca_file, self.redis_tls_cert_file)
        stores = (self.profile_store, self.catalog_store)
        if any(f is not None for f in redis_tls) and not any(s.startswith("rediss://") for s in stores):
            raise ValueError("redis_tls_* settings need a rediss:// profile_store or catalog_store")
        if self.auth_tokens is not None and not self.auth_tokens.get_secret_value().replace(",", " ").split():
            # An empty secret (say, a template whose value was missing) must not quietly turn auth off.
            raise ValueError("auth_tokens is set but holds no token; unset it to run without tokens")
        if self.auth_required_for_rank and self.auth_token_file is None and self.auth_tokens is None:
            raise ValueError("auth_required_for_rank needs auth_token_file or auth_tokens")
        return self

    @model_validator(mode="after")
    def _workers_consistent(self) -> Settings:
        if self.workers == 1:
            return self
        # Every worker must see every change, whichever worker took it: state lives in the stores they share.
        for field in ("catalog_store", "profile_store"):
            if getattr(self, field) == "embedded":
                raise ValueError(f"workers > 1 ({self.workers}) needs {field} on Redis, not 'embedded'")
        if self.port == 0:
            raise ValueError(f"workers > 1 ({self.workers}) needs a fixed port: port 0 would give each its own")
        if self.worker_index is not None and self.worker_index >= self.workers:
            raise ValueError(f"worker_index ({self.worker_index}) must be below workers ({self.workers})")
        return self

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if self.default_top_k > self.max_top_k:
            raise ValueError(f"default_top_k ({self.default_top_k}) must be at most max_top_k ({self.max_top_k})")
        if self.max_events_per_request > self.event_dedup_max_ids:
            # one request's own event ids must all stay remembered, or its retry would count some twice
            raise ValueError(
                f"max_events_per_request ({self.max_events_per_request}) must be at most "
                f"event_dedup_max_ids ({self.event_dedup_max_ids})"
            )
        return self


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (e.g. from the command line) on top."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for key in sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k not in known):
        log.warning("ignoring unknown setting %s", key)
    env: dict[str, object] = {
        name: os.environ[ENV_PREFIX + name.upper()]
        for name in Settings.model_fields
        if ENV_PREFIX + name.upper() in os.environ
    }
    env.update({k: v for k, v in overrides.items() if v is not None})
    return Settings.model_validate(env)
