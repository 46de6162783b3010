"""The grpc.aio server: Ranker service, standard health and reflection, load shedding, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from threadpoolctl import threadpool_limits

from ranker import observability, privacy, profiles, security, tracing, workers
from ranker.catalog_journal import JournalError
from ranker.catalog_log import CatalogLog, RedisCatalogLog
from ranker.config import Settings
from ranker.domain import RankQuery
from ranker.errors import BackendError, BackendRefused, NotConfigured, NotFound
from ranker.live_catalog import FOLLOW_BLOCK_S, CatalogUpdates, LiveCatalog, item_tokenizer
from ranker.models import ONNX_FILE, CachedEncoder, Encoder, OnnxScorer, QueryTokenizer, Scorer
from ranker.personal import Personalizer
from ranker.pipeline import PipelineSettings, Ranker
from ranker.release import MODEL_REPOSITORY, TOKENIZER, Release
from ranker.service import RankerAdminServicer, RankerServicer, ReleaseLoader
from ranker.swap import ReleaseLeases, ReleaseParts, ReleaseSwitch, SwitchSettings
from ranker.triton import TritonEncoder, TritonModels, TritonScorer
from ranker.tritonserver import KeepRunning, LocalTritonServer
from ranker.v1 import ranker_pb2, ranker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name
ADMIN_SERVICE_NAME = ranker_pb2.DESCRIPTOR.services_by_name["RankerAdmin"].full_name


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    metrics: observability.MetricsServer | None = None
    health_server: grpc.aio.Server | None = None  # settings.health_port: the same health, in plaintext
    health_port: int | None = None

    async def stop(self, grace: float, *, drain: float = 0.0, cut_short: asyncio.Event | None = None) -> None:
        """Report NOT_SERVING, keep serving for `drain` seconds (until `cut_short` is set, if given), then stop
        and give in-flight RPCs `grace` seconds.

        The stop itself cancels every call that has arrived but not yet reached a handler, and clients keep
        sending on an open connection until they hear of the stop. The drain is the time for them to move away
        first: clients that watch health (round robin with healthCheckConfig) leave on NOT_SERVING, and clients
        behind an L4 balancer leave when their connection reaches its maximum age (`max_connection_age_s`)."""
        await self.health.enter_graceful_shutdown()
        if drain > 0:
            log.info("draining: NOT_SERVING, still serving for %.1fs before the stop", drain)
            waiter = asyncio.Event() if cut_short is None else cut_short
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), drain)
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.metrics is not None:
            self.metrics.stop()


def interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """Outermost first, so metrics and the access log see every outcome, UNAUTHENTICATED included."""
    chain: list[grpc.aio.ServerInterceptor] = [observability.ObservabilityInterceptor(access_log=settings.access_log)]
    inline = settings.auth_tokens.get_secret_value() if settings.auth_tokens is not None else None
    tokens = security.load_tokens(settings.auth_token_file, inline)
    if tokens is None:
        log.warning("no RANKER_AUTH_TOKEN_FILE or RANKER_AUTH_TOKENS: mutating and admin RPCs are open to anyone")
        return chain
    if settings.tls_cert_file is None:
        log.warning("tokens travel in clear without TLS: set RANKER_TLS_CERT_FILE or terminate TLS in front")
    chain.append(security.AuthInterceptor(tokens, protect_rank=settings.auth_required_for_rank))
    return chain


async def start_server(
    settings: Settings,
    current: Callable[[], Ranker],
    *,
    catalog: CatalogUpdates | None = None,
    switch: ReleaseSwitch | None = None,
    releases: ReleaseLoader | None = None,
) -> RunningServer:
    """Serve Ranker over `current`; with `switch`, RankerAdmin too: release swaps by `switch`, or by `releases`
    (a worker of RANKER_WORKERS: the supervisor rolls the set)."""
    chain = interceptors(settings)
    if switch is not None:
        chain.append(ReleaseLeases())  # innermost: an RPC holds its release while its handler runs
    server = grpc.aio.server(
        interceptors=chain, options=server_options(settings), maximum_concurrent_rpcs=settings.max_concurrent_rpcs
    )
    ranker_pb2_grpc.add_RankerServicer_to_server(RankerServicer(current, settings, catalog=catalog), server)
    services = [SERVICE_NAME]
    if switch is not None:
        ranker_pb2_grpc.add_RankerAdminServicer_to_server(RankerAdminServicer(releases or switch), server)
        services.append(ADMIN_SERVICE_NAME)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    credentials = security.server_credentials(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    await server.start()
    health_server, health_port = await start_health_server(settings, health)
    metrics = observability.serve_metrics(
        settings.metrics_port, settings.host, share_port=settings.worker_index is not None
    )
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(
        server=server, port=port, health=health, metrics=metrics, health_server=health_server, health_port=health_port
    )


async def start_health_server(
    settings: Settings, health: health_aio.HealthServicer
) -> tuple[grpc.aio.Server | None, int | None]:
    """With settings.health_port: a plaintext server of grpc.health.v1 alone, answering from `health`, the main
    port's own servicer (so it reports NOT_SERVING when the drain starts). Nothing else is reachable on it, so
    a probe needs no certificate while every client of the ranker still does."""
    if settings.health_port is None:
        return None, None
    # Small limits: the port answers anyone who reaches it, and a probe sends one small Check at a time.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4096)], maximum_concurrent_rpcs=32)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(f"{settings.host}:{settings.health_port}")
    await server.start()
    log.info("grpc.health.v1 also on plaintext port %d (RANKER_HEALTH_PORT)", port)
    return server, port


# How long an aged connection (max_connection_age_s) stays open for the calls already running on it: as long as
# a release load may take (the `admin load-release` deadline). Rank calls end in milliseconds, so a connection
# without a load on it closes as soon as its calls have; a shorter grace cut a LoadRelease running on a
# connection that aged under it (UNAVAILABLE "max connection age", while the swap itself went on).
AGED_CONNECTION_GRACE_S = 900.0


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC core options: message and stream limits, and connection aging when `max_connection_age_s` is set.
    An aged connection gets GOAWAY, takes no new calls and closes once the calls on it have ended (within
    AGED_CONNECTION_GRACE_S); the client reconnects on its own and retries transparently whatever the GOAWAY
    refused."""
    options = [
        ("grpc.max_receive_message_length", settings.max_receive_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_rpcs),
    ]
    if settings.max_connection_age_s is not None:
        options += [
            ("grpc.max_connection_age_ms", max(1, round(settings.max_connection_age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", round(max(settings.grace_s, AGED_CONNECTION_GRACE_S) * 1000)),
        ]
    return options


@contextlib.asynccontextmanager
async def triton_endpoint(settings: Settings, release: Release) -> AsyncIterator[str]:
    """The Triton gRPC URL to use: the configured one, or an embedded local server. The embedded one starts empty
    in explicit model-control mode (the ranker loads each release's models: ranker.swap); with
    RANKER_TRITON_MODELS=preloaded it serves the release's model repository instead."""
    if settings.triton_url != "embedded":
        yield settings.triton_url
        return
    if settings.triton_models == "preloaded":
        local = LocalTritonServer(
            release.model_repository,
            models=[release.manifest.encoder.name, release.manifest.ranker.name],
            model_config_name=config_variant(settings),
        )
    else:
        local = LocalTritonServer(None, model_control_mode="explicit", model_config_name=None)
    await asyncio.to_thread(local.start)
    log.info("embedded tritonserver ready at %s (pid %s)", local.grpc_url, local.pid)
    keeper = KeepRunning(local)
    watch = asyncio.create_task(_keep_running(keeper))
    try:
        yield local.grpc_url
    finally:
        watch.cancel()
        await asyncio.to_thread(keeper.close)  # after a start in progress, if any


async def _keep_running(keeper: KeepRunning, every_s: float = 1.0) -> None:
    """Start the embedded tritonserver again when it has exited (ranker.tritonserver.KeepRunning)."""
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(keeper.check)


def config_variant(settings: Settings) -> str | None:
    """Which configuration of each model Triton gets: RANKER_TRITON_CONFIG_NAME, else 'cpu' for the embedded
    server (python backend only) and config.pbtxt (None) for an external one."""
    if settings.triton_config_name is not None:
        return settings.triton_config_name if settings.triton_config_name not in ("", "default") else None
    return "cpu" if settings.triton_url == "embedded" else None


def build_ranker(
    release: Release,
    models: TritonModels,
    settings: Settings,
    personalizer: Personalizer | None = None,
    names: Mapping[str, str] | None = None,
) -> Ranker:
    """The pipeline for a release over Triton; `names` maps the release's model names to the names Triton serves
    them under (ranker.swap.triton_name; default: the same names)."""
    manifest = release.manifest
    enc, rnk = manifest.encoder, manifest.ranker
    names = names or {}
    scorer: Scorer
    if settings.scorer == "inprocess":
        # About 0.1 ms for 200-400 rows of the MLP on the event loop, against ~1.2 ms for a Triton round trip.
        scorer = OnnxScorer(release.path / MODEL_REPOSITORY / rnk.name / rnk.version / ONNX_FILE, threads=1)
    else:
        scorer = TritonScorer(models, model=names.get(rnk.name, rnk.name), label=rnk.name, version=rnk.version)
    encoder: Encoder = TritonEncoder(models, model=names.get(enc.name, enc.name), label=enc.name, version=enc.version)
    if settings.query_cache_size:
        encoder = CachedEncoder(
            encoder,
            settings.query_cache_size,
            on_lookup=observability.observe_query_cache,
            fetch_timeout=settings.triton_timeout_s,
        )
    return Ranker(
        release,
        encoder=encoder,
        scorer=scorer,
        tokenizer=QueryTokenizer(release.path / TOKENIZER, manifest.max_query_tokens),
        settings=PipelineSettings.for_release(manifest, dense_k=settings.dense_k, lexical_k=settings.lexical_k),
        personalizer=personalizer,
    )


async def open_personalizer(settings: Settings) -> Personalizer | None:
    """User profiles in the configured store (docs/personalization.md).

    An embedded store that cannot be opened in the default state directory turns profiles off (Rank with a
    user_id answers UNAVAILABLE personalisation, RecordEvents FAILED_PRECONDITION) rather than stopping the
    server; one configured explicitly must open. An unreachable Redis is only logged: it may come back."""
    location = profiles.redacted(settings.profile_store)
    try:
        store = profiles.open_store(
            settings.profile_store,
            state_dir=settings.state_dir,
            ttl_s=settings.profile_ttl_s,
            dedup_ttl_s=settings.event_dedup_ttl_s,
            timeout_s=max(settings.profile_timeout_s, 1.0),
            max_event_ids=settings.event_dedup_max_ids,
            password=read_secret(settings.profile_store_password_file, "profile_store_password_file"),
            tls=redis_tls(settings),
        )
    except ValueError as e:
        raise SystemExit(f"cannot open the profile store {location!r}: {e}") from e
    except (BackendError, OSError) as e:
        if {"state_dir", "profile_store"} & settings.model_fields_set:
            raise SystemExit(f"cannot open the profile store {location!r}: {e}") from e
        log.error("user profiles are off: %s (set RANKER_STATE_DIR or RANKER_PROFILE_STORE)", e)
        return None
    if isinstance(store, profiles.RedisProfileStore):
        try:
            await store.ping()
        except BackendRefused as e:
            await store.close()
            raise SystemExit(f"cannot open the profile store {location!r}: {e}") from e
        except BackendError as e:
            log.warning("profile store not reachable yet, Rank answers without profiles until it is: %s", e)
    log.info("user profiles in %s", "redis" if isinstance(store, profiles.RedisProfileStore) else store.path)
    return Personalizer(
        store=store,
        config=profiles.ProfileConfig(half_life_s=settings.profile_half_life_s),
        timeout_s=settings.profile_timeout_s,
    )


async def open_catalog_log(settings: Settings) -> RedisCatalogLog | None:
    """The catalog change log the replicas share (RANKER_CATALOG_STORE), checked; None for 'embedded'.
    SystemExit when it is configured but cannot be reached: a replica that has not applied the log would
    serve a catalog the others do not."""
    if settings.catalog_store == "embedded":
        if settings.catalog_store_password_file is not None:
            raise SystemExit("RANKER_CATALOG_STORE_PASSWORD_FILE needs a Redis catalog store, not 'embedded'")
        return None
    location = profiles.redacted(settings.catalog_store)
    shared = RedisCatalogLog.from_url(
        settings.catalog_store,
        timeout_s=max(settings.triton_timeout_s, 2.0),
        block_s=FOLLOW_BLOCK_S,
        password=read_secret(settings.catalog_store_password_file, "catalog_store_password_file"),
        tls=redis_tls(settings),
    )
    try:
        await shared.check()
    except BackendError as e:
        await shared.close()
        raise SystemExit(f"cannot open the catalog store {location!r}: {e}") from e
    log.info("catalog changes shared through %s (%s)", location, shared.key)
    return shared


@contextlib.asynccontextmanager
async def shared_catalog_log(settings: Settings) -> AsyncIterator[RedisCatalogLog]:
    """open_catalog_log for a command that needs the log (catalog-log-position, offline.catalog_dump), closed
    after; SystemExit when RANKER_CATALOG_STORE is 'embedded'."""
    shared = await open_catalog_log(settings)
    if shared is None:
        raise SystemExit("RANKER_CATALOG_STORE is 'embedded': there is no shared catalog log")
    try:
        yield shared
    finally:
        await shared.close()


def redis_tls(settings: Settings) -> profiles.RedisTls:
    """The RANKER_REDIS_TLS_* files, for whichever store's URL is rediss://."""
    return profiles.RedisTls(
        ca_file=settings.redis_tls_ca_file, cert_file=settings.redis_tls_cert_file, key_file=settings.redis_tls_key_file
    )


def read_secret(path: Path | None, setting: str) -> str | None:
    """A one-line secret from a file (a mounted Secret), without its trailing newline; SystemExit when the file
    is unreadable or empty, naming the setting and never the content."""
    if path is None:
        return None
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"{setting}: cannot read {path}: {e}") from e
    if not secret:
        raise SystemExit(f"{setting}: {path} is empty")
    return secret


async def live_catalog(ranker: Ranker, settings: Settings, shared: CatalogLog | None = None) -> LiveCatalog:
    """The ranker with the catalog changes replayed (docs/catalog-updates.md): those of the change log the
    replicas share, when there is one, otherwise those journaled in the state directory.

    An unwritable default state directory turns catalog updates off (FAILED_PRECONDITION) rather than
    stopping the server; one set explicitly (RANKER_STATE_DIR) must be writable (OSError otherwise)."""
    call_timeout = max(settings.triton_timeout_s, 30.0)
    if shared is not None:
        return await LiveCatalog.open_shared(
            ranker, tokenizer=item_tokenizer(ranker.release), shared=shared, call_timeout=call_timeout
        )
    return await LiveCatalog.open(
        ranker,
        tokenizer=item_tokenizer(ranker.release),
        state_dir=settings.state_dir,
        call_timeout=call_timeout,
        writable="state_dir" in settings.model_fields_set,
    )


def release_switch(
    settings: Settings,
    models: TritonModels,
    personalizer: Personalizer | None,
    catalog_log: CatalogLog | None = None,
) -> ReleaseSwitch:
    """The serving release and its swaps (ranker.swap), with these settings' pipeline and catalog."""
    parts = ReleaseParts(
        load=lambda path: load_release(settings, path),
        build=lambda release, names: build_ranker(release, models, settings, personalizer, names),
        open_catalog=lambda ranker: live_catalog(ranker, settings, catalog_log),
    )
    return ReleaseSwitch(
        parts,
        models,
        SwitchSettings(
            models=settings.triton_models,
            config_variant=config_variant(settings),
            load_timeout_s=settings.triton_load_timeout_s,
            startup_wait_s=settings.triton_startup_wait_s,
            drain_s=settings.release_drain_s,
            keep_previous=settings.release_keep_previous,
            score_on_triton=settings.scorer == "triton",
        ),
    )


async def warm_up(ranker: Ranker, timeout: float, rounds: int = 3) -> None:
    """Run a few Rank calls before reporting SERVING: first inferences pay for lazy initialisation."""
    sample = " ".join(ranker.release.catalog.titles[0].split()[:3]) or "warm up"
    for i in range(rounds):
        result = await ranker.rank(RankQuery(request_id=f"warm-up-{i}", query=sample, top_k=10), timeout=timeout)
    if result.degraded:
        log.warning("warm-up answered degraded: %s", result.degraded_reason)


def load_release(settings: Settings, path: Path) -> Release:
    """A release as these settings serve it: ANN backend, search breadth, policy override."""
    return Release.load(
        path,
        ef_search=settings.ef_search,
        policy_override=settings.policy_file,
        dense_backend=settings.dense_backend,
        vector_engine_url=settings.vector_engine_url,
        verify=settings.release_verify,
        mapped=settings.release_mapped,
    )


async def serve(settings: Settings) -> None:
    """Load the release, connect to Triton, serve until SIGTERM/SIGINT, then drain and stop."""
    if settings.release is None:
        raise SystemExit("no release: pass --release DIR or set RANKER_RELEASE")
    if settings.user_ref_key_file is not None:
        privacy.use_key_file(settings.user_ref_key_file)
    # Each Rank runs its numpy and FAISS work on the event loop's thread, one query per call: BLAS and
    # OpenMP pools add nothing to that but idle threads that spin between calls (measured on 2 cores:
    # one spinning BLAS thread took as much CPU as the Rank pipeline itself).
    threadpool_limits(limits=1)
    provider = tracing.configure(
        settings.otel_exporter,
        endpoint=settings.otel_endpoint,
        sample_ratio=settings.otel_sample_ratio,
        service_name=settings.otel_service_name,
    )
    try:
        await _serve_release(settings, settings.release)
    finally:
        if provider is not None:
            provider.shutdown()  # exports the spans still buffered


async def _serve_release(settings: Settings, path: Path) -> None:
    release = await asyncio.to_thread(load_release, settings, path)
    log.info("release %s loaded: %d items", release.manifest.release_id, len(release.catalog))
    async with triton_endpoint(settings, release) as url:
        models = TritonModels(url)
        try:
            personalizer = await open_personalizer(settings)
            catalog_log = await open_catalog_log(settings)
            switch = release_switch(settings, models, personalizer, catalog_log)
            try:
                # Without Triton it serves anyway: Rank degrades to lexical retrieval until Triton is back.
                ranker = await switch.start(release)
            except (NotConfigured, NotFound) as e:
                raise SystemExit(str(e)) from e
            except (JournalError, BackendError, OSError) as e:
                where = profiles.redacted(settings.catalog_store) if catalog_log else settings.state_dir
                raise SystemExit(f"cannot replay the catalog updates in {where}: {e}") from e
            observability.METRICS.set_release(release.manifest.release_id, ranker.model_versions)
            await warm_up(ranker, settings.triton_timeout_s)
            link = None if settings.worker_control_fd is None else workers.SupervisorLink(settings.worker_control_fd)
            releases = None if link is None else workers.WorkerReleases(switch, link)  # LoadRelease: a roll of the set
            running = await start_server(settings, switch.current, catalog=switch, switch=switch, releases=releases)
            keeper = asyncio.create_task(switch.keep_loaded())
            log.info(
                "ranker.v1.Ranker serving on %s:%d (release %s, triton %s, models %s)",
                settings.host,
                running.port,
                release.manifest.release_id,
                url,
                switch.model_loading,
            )
            signals = Signals()
            supervisor = None
            if settings.worker_index is not None:  # one of `ranker serve`'s workers (ranker.workers)
                supervisor = asyncio.create_task(workers.watch_supervisor())
                if link is not None:
                    await link.serving(switch)
            await signals.next()
            if supervisor is not None:
                supervisor.cancel()
            # A second SIGTERM/SIGINT cuts the drain short.
            await running.stop(settings.grace_s, drain=settings.drain_s, cut_short=signals.next_event())
            log.info("stopped: in-flight RPCs finished or their %.1fs grace ran out", settings.grace_s)
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            switch.close()
            if personalizer is not None:
                await personalizer.store.close()
            if catalog_log is not None:
                await catalog_log.close()
        finally:
            await models.close()


class Signals:
    """SIGTERM and SIGINT, handled on the running loop: each arrival sets the event of the current wait."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._arrived)

    def _arrived(self) -> None:
        self._event.set()

    async def next(self) -> None:
        """Until a signal arrives, then ready for the next one."""
        await self._event.wait()
        self._event = asyncio.Event()

    def next_event(self) -> asyncio.Event:
        """The event the next signal sets."""
        return self._event
