"""Service settings: read once from RANKER_* environment variables at start-up, validated, frozen."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

ENV_PREFIX = "RANKER_"


class Settings(BaseSettings):
    """Every knob of the online service. Nothing else in ranker/ reads the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    release: Path | None = Field(default=None, description="release folder written by offline.export")
    host: str = Field(default="0.0.0.0", description="address the gRPC server binds")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    grace_s: float = Field(default=10.0, ge=0, description="drain time for in-flight RPCs on SIGTERM")

    triton_url: str = Field(
        default="embedded",
        description="host:port of Triton's gRPC endpoint, or 'embedded' to start a local CPU tritonserver",
    )
    triton_config_name: str = Field(default="cpu", description="--model-config-name for the embedded server")
    triton_startup_wait_s: float = Field(
        default=120.0, ge=0, description="how long to wait for Triton's models at start before serving degraded"
    )
    triton_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="per-call limit when the caller sets no deadline"
    )

    dense_k: int | None = Field(default=None, ge=1, le=4000, description="ANN candidates; default from the release")
    lexical_k: int | None = Field(default=None, ge=1, le=4000, description="BM25 candidates; default from the release")
    ef_search: int = Field(default=512, ge=16, le=8192, description="HNSW search breadth")

    default_top_k: int = Field(default=20, ge=1, le=200)
    max_top_k: int = Field(default=200, ge=1, le=1000)
    max_query_chars: int = Field(default=1000, ge=1)
    max_candidate_ids: int = Field(default=1000, ge=1, le=8192)
    max_receive_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    policy_file: Path | None = Field(default=None, description="ranking policy TOML replacing the release's")
    max_concurrent_rpcs: int = Field(default=256, ge=1, description="beyond this, RPCs are refused")

    log_level: str = Field(default="INFO")


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
