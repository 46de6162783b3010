"""The grpc.aio server: Ranker service, standard health and reflection, load shedding, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ranker.config import Settings
from ranker.domain import RankQuery
from ranker.errors import BackendUnavailable
from ranker.models import QueryTokenizer
from ranker.pipeline import PipelineSettings, Ranker
from ranker.release import TOKENIZER, Release
from ranker.service import RankerServicer
from ranker.triton import TritonEncoder, TritonModels, TritonScorer
from ranker.tritonserver import LocalTritonServer
from ranker.v1 import ranker_pb2, ranker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING first so load balancers drain us, then finish in-flight RPCs."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(settings: Settings, current: Callable[[], Ranker]) -> RunningServer:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_bytes),
            ("grpc.max_concurrent_streams", settings.max_concurrent_rpcs),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    ranker_pb2_grpc.add_RankerServicer_to_server(RankerServicer(current, settings), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, port=port, health=health)


@contextlib.asynccontextmanager
async def triton_endpoint(settings: Settings, release: Release) -> AsyncIterator[str]:
    """The Triton gRPC URL to use: the configured one, or an embedded local server for the release."""
    if settings.triton_url != "embedded":
        yield settings.triton_url
        return
    local = LocalTritonServer(
        release.model_repository,
        models=[release.manifest.encoder.name, release.manifest.ranker.name],
        model_config_name=settings.triton_config_name,
    )
    await asyncio.to_thread(local.start)
    log.info("embedded tritonserver ready at %s (pid %s)", local.grpc_url, local.pid)
    try:
        yield local.grpc_url
    finally:
        await asyncio.to_thread(local.stop)


def build_ranker(release: Release, models: TritonModels, settings: Settings) -> Ranker:
    manifest = release.manifest
    return Ranker(
        release,
        encoder=TritonEncoder(models, model=manifest.encoder.name, version=manifest.encoder.version),
        scorer=TritonScorer(models, model=manifest.ranker.name, version=manifest.ranker.version),
        tokenizer=QueryTokenizer(release.path / TOKENIZER, manifest.max_query_tokens),
        settings=PipelineSettings.for_release(manifest, dense_k=settings.dense_k, lexical_k=settings.lexical_k),
    )


async def warm_up(ranker: Ranker, timeout: float, rounds: int = 3) -> None:
    """Run a few Rank calls before reporting SERVING: first inferences pay for lazy initialisation."""
    sample = " ".join(ranker.release.catalog.titles[0].split()[:3]) or "warm up"
    for i in range(rounds):
        result = await ranker.rank(RankQuery(request_id=f"warm-up-{i}", query=sample, top_k=10), timeout=timeout)
    if result.degraded:
        log.warning("warm-up answered degraded: %s", result.degraded_reason)


async def serve(settings: Settings) -> None:
    """Load the release, connect to Triton, serve until SIGTERM/SIGINT, then drain and stop."""
    if settings.release is None:
        raise SystemExit("no release: pass --release DIR or set RANKER_RELEASE")
    release = await asyncio.to_thread(
        Release.load, settings.release, ef_search=settings.ef_search, policy_override=settings.policy_file
    )
    log.info("release %s loaded: %d items", release.manifest.release_id, len(release.catalog))
    async with triton_endpoint(settings, release) as url:
        models = TritonModels(url)
        try:
            try:
                await models.wait_ready(
                    [release.manifest.encoder.name, release.manifest.ranker.name],
                    timeout=settings.triton_startup_wait_s,
                )
            except BackendUnavailable as e:
                # Serve anyway: Rank degrades to lexical retrieval until Triton is back.
                log.warning("starting without Triton: %s", e)
            ranker = build_ranker(release, models, settings)
            await warm_up(ranker, settings.triton_timeout_s)
            running = await start_server(settings, lambda: ranker)
            log.info(
                "ranker.v1.Ranker serving on %s:%d (release %s, triton %s)",
                settings.host,
                running.port,
                release.manifest.release_id,
                url,
            )
            await _wait_for_signal()
            log.info("stopping: draining in-flight RPCs for up to %.1fs", settings.grace_s)
            await running.stop(settings.grace_s)
        finally:
            await models.close()


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
