"""Release swap: load a release next to the serving one, switch to it atomically, unload the old one.

The ranker loads each release's models into Triton itself, under names of that release
(`text_encoder-1a2b3c4d`, `ranker-1a2b3c4d`: see triton_name), through Triton's repository API
(explicit model-control mode). The load request carries the model's configuration (the variant
RANKER_TRITON_CONFIG_NAME picks) and its files, so Triton needs no access to the release folder (the
embedded server and a Triton in another pod alike), and two releases that both call their models
`text_encoder` and `ranker` version 1 are loaded side by side.

RankerAdmin.LoadRelease(path) runs these steps, one load at a time (a second call meanwhile: ABORTED):

  1. load     Release.load in a worker thread                     NOT_FOUND: no valid release at the path
  2. push     its models into Triton, ready                        UNAVAILABLE, FAILED_PRECONDITION
  3. warm up  Rank calls on the new pipeline, none degraded        UNAVAILABLE
  4. catalog  online catalog updates pause; the catalog journal is replayed onto the new release
  5. switch   one assignment: every Rank from then on takes the new release
  6. retire   the old release's live catalog refuses updates (ReleaseSwitch.upsert retries them on the new
              one); once no RPC holds the old release any more (at most RANKER_RELEASE_DRAIN_S), its models
              are unloaded from Triton, and LoadRelease answers. With RANKER_RELEASE_KEEP_PREVIOUS=n the models
              of the last n replaced releases stay loaded (for other rankers that share the Triton and have not
              swapped yet, and a quick roll-back); older ones are unloaded.

A failure in steps 1-4 unloads what step 2 loaded and leaves the old release serving, untouched; once step 5 has
run the swap has happened (an unload that fails is logged and retried by keep_loaded). A caller that goes away
does not stop a swap half way: it runs to its end, and the log says how it ended.

An RPC *holds* each release it takes from ReleaseSwitch.current() until it returns: the ReleaseLeases interceptor
runs every RPC inside holding(). So a Rank that started on the old release finishes on the old release's models,
and every response is stamped with exactly the one release that answered it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import grpc

from ranker import observability
from ranker.catalog_journal import JournalError
from ranker.catalog_overlay import Applied
from ranker.domain import CatalogItem, RankQuery
from ranker.errors import BackendError, BackendUnavailable, Busy, NotConfigured, NotFound, RankerError
from ranker.live_catalog import CatalogRetired, LiveCatalog
from ranker.pipeline import Ranker
from ranker.release import Manifest, ModelInfo, Release
from ranker.triton import model_config_json

log = logging.getLogger(__name__)

T = TypeVar("T")
ModelLoading = Literal["auto", "push", "preloaded"]

CONFIG_FILE = "config.pbtxt"
CONFIG_VARIANTS = "configs"
WARM_UP_ROUNDS = 3
WARM_UP_TIMEOUT_S = 30.0  # per call: a freshly loaded model's first inferences can be slow
UNLOAD_TIMEOUT_S = 30.0
KEEP_LOADED_INTERVAL_S = 5.0
UPDATE_ATTEMPTS = 3  # an update that races swaps is retried on the serving catalog this often


def triton_name(model: str, release_id: str) -> str:
    """The name a release's model is loaded under in Triton: its own name and 8 hex digits of the release id."""
    return f"{model}-{hashlib.sha256(release_id.encode()).hexdigest()[:8]}"


# --- a release's models as Triton load requests -----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelBundle:
    """One model of a release, as a Triton load request carries it."""

    model: str  # the release's name for it: text_encoder, ranker
    version: str
    name: str  # the name it is loaded under in Triton (triton_name)
    config: str  # the configuration as JSON, named `name`
    files: Mapping[str, bytes] = field(repr=False)  # "file:<version>/<path>" -> content


def config_file(model_dir: Path, variant: str | None) -> Path:
    """configs/<variant>.pbtxt when the model has it, else config.pbtxt: Triton's --model-config-name rule."""
    if variant and variant != "default":
        candidate = model_dir / CONFIG_VARIANTS / f"{variant}.pbtxt"
        if candidate.is_file():
            return candidate
    return model_dir / CONFIG_FILE


def triton_models(manifest: Manifest, *, score_on_triton: bool = True) -> tuple[ModelInfo, ...]:
    """The release's models a ranker runs on Triton: both, or only the encoder when it scores in-process
    (RANKER_SCORER=inprocess)."""
    return (manifest.encoder, manifest.ranker) if score_on_triton else (manifest.encoder,)


def read_bundles(release: Release, variant: str | None, models: Sequence[ModelInfo] | None = None) -> list[ModelBundle]:
    """The release's models (default: both) as load requests. Reads every file of their version folders (run it in
    a worker thread); NotFound when a model's configuration or version folder is missing or invalid."""
    release_id = release.manifest.release_id
    bundles = []
    for info in triton_models(release.manifest) if models is None else models:
        model_dir = release.model_repository / info.name
        version_dir = model_dir / info.version
        config = config_file(model_dir, variant)
        if not config.is_file() or not version_dir.is_dir():
            raise NotFound(
                f"release {release_id} has no Triton model {info.name} version {info.version} in {model_dir}"
            )
        name = triton_name(info.name, release_id)
        try:
            config_json = model_config_json(config.read_text(), name)
        except ValueError as e:
            raise NotFound(f"release {release_id}: {config}: {e}") from e
        files = {
            f"file:{info.version}/{path.relative_to(version_dir).as_posix()}": path.read_bytes()
            for path in sorted(version_dir.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts
        }
        bundles.append(ModelBundle(model=info.name, version=info.version, name=name, config=config_json, files=files))
    return bundles


class ModelRepository(Protocol):
    """The part of ranker.triton.TritonModels a swap uses."""

    async def load_model(
        self, name: str, *, config: str, files: Mapping[str, bytes], timeout: float | None = None
    ) -> None: ...

    async def unload_model(self, name: str, *, timeout: float | None = None) -> None: ...

    async def live(self) -> bool: ...

    async def models_ready(self, models: Iterable[str]) -> bool: ...


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll `check` until it is true; BackendUnavailable naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() >= deadline:
            raise BackendUnavailable("triton", f"{what} after {timeout:.0f} s")
        await asyncio.sleep(0.2)


# --- which RPCs hold which release ------------------------------------------------------------------------


class Serving:
    """One release in the switch: its live catalog (whose current() is the Ranker), its Triton model names,
    and how many RPCs hold it."""

    def __init__(self, release: Release, catalog: LiveCatalog, names: Mapping[str, str]) -> None:
        self.release = release
        self.catalog = catalog
        self.names = dict(names)  # the release's model name -> the Triton model name
        self.holders = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def release_id(self) -> str:
        return self.release.manifest.release_id

    def stamp(self) -> ReleaseStamp:
        return ReleaseStamp(release_id=self.release_id, model_versions=dict(self.catalog.current().model_versions))

    def hold(self) -> None:
        self.holders += 1
        self._idle.clear()

    def let_go(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            self._idle.set()

    async def drained(self, timeout: float) -> bool:
        """True once no RPC holds this release; False when some still do after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


_HELD: contextvars.ContextVar[list[Serving] | None] = contextvars.ContextVar("ranker_swap_held", default=None)


@contextlib.contextmanager
def holding() -> Iterator[None]:
    """The scope of one RPC: each release it takes from ReleaseSwitch.current() stays loaded until the scope ends."""
    held: list[Serving] = []
    token = _HELD.set(held)
    try:
        yield
    finally:
        _HELD.reset(token)
        for serving in held:
            serving.let_go()


def _holding(inner: observability.Behavior) -> observability.Behavior:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with holding():
            return await inner(request, context)

    return behavior


class ReleaseLeases(grpc.aio.ServerInterceptor):
    """Runs every unary RPC inside holding(), so that a release swap knows when the old release's RPCs are done."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        return observability.around_unary(await continuation(handler_call_details), _holding)


# --- the switch -------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ReleaseStamp:
    release_id: str
    model_versions: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class Swapped:
    """What LoadRelease answers: the release before and after, how long it took, and each step's share (ms)."""

    previous: ReleaseStamp
    current: ReleaseStamp
    millis: float
    steps_ms: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ReleaseParts:
    """How the service turns a release into a serving pipeline (ranker.server supplies them; tests, fakes)."""

    load: Callable[[Path], Release]  # blocking: runs in a worker thread
    build: Callable[[Release, Mapping[str, str]], Ranker]  # the pipeline over {model: Triton model name}
    open_catalog: Callable[[Ranker], Awaitable[LiveCatalog]]  # its live catalog, the journal replayed


@dataclass(frozen=True, kw_only=True)
class SwitchSettings:
    models: ModelLoading = "auto"  # RANKER_TRITON_MODELS
    config_variant: str | None = "cpu"  # which configuration of each model to load (config_file)
    load_timeout_s: float = 300.0  # one model load
    startup_wait_s: float = 120.0  # for Triton at start, before serving degraded
    drain_s: float = 30.0  # for the old release's RPCs, before unloading its models anyway
    keep_previous: int = 0  # replaced releases whose models stay loaded (several rankers sharing one Triton)
    score_on_triton: bool = True  # False (RANKER_SCORER=inprocess): the ranker model is not loaded into Triton


class ReleaseSwitch:
    """The serving release, and loading the next one next to it (see the module docstring).

    current() is what RPCs rank with; upsert() / delete() apply catalog updates to the serving release's
    live catalog; load() swaps releases; keep_loaded() keeps the serving release's models in Triton."""

    def __init__(self, parts: ReleaseParts, models: ModelRepository, settings: SwitchSettings) -> None:
        self._parts = parts
        self._models = models
        self._settings = settings
        self._mode: Literal["push", "preloaded"] | None = None if settings.models == "auto" else settings.models
        self._active: Serving | None = None
        self._lock = asyncio.Lock()  # swaps and keep_loaded's repairs, one at a time
        self._loading: str | None = None  # the path of the load in progress
        self._unload_later: set[str] = set()  # Triton models whose unload failed
        self._kept: list[Serving] = []  # replaced releases whose models stay loaded (keep_previous), oldest first

    def _triton_models(self, manifest: Manifest) -> tuple[ModelInfo, ...]:
        return triton_models(manifest, score_on_triton=self._settings.score_on_triton)

    def _pushed_names(self, manifest: Manifest) -> dict[str, str]:
        """The release's model name -> the per-release name the ranker loads it into Triton under."""
        return {m.name: triton_name(m.name, manifest.release_id) for m in self._triton_models(manifest)}

    # --- what the RPCs use ---

    def current(self) -> Ranker:
        """The serving Ranker; inside holding() (every RPC), its release stays loaded until the RPC ends."""
        serving = self._serving()
        held = _HELD.get()
        if held is not None and serving not in held:
            serving.hold()
            held.append(serving)
        return serving.catalog.current()

    @property
    def serving(self) -> ReleaseStamp:
        return self._serving().stamp()

    @property
    def triton_names(self) -> tuple[str, ...]:
        """The names the serving release's models have in Triton."""
        return tuple(self._serving().names.values())

    @property
    def model_loading(self) -> Literal["push", "preloaded"] | None:
        """How models reach Triton: pushed by the ranker, or preloaded; None before start() decided."""
        return self._mode

    async def upsert(self, items: Sequence[CatalogItem], *, timeout: float | None) -> Applied:
        return await self._update(lambda catalog, remaining: catalog.upsert(items, timeout=remaining), timeout)

    async def delete(self, item_ids: Sequence[str]) -> Applied:
        return await self._update(lambda catalog, _: catalog.delete(item_ids), None)

    async def _update(
        self, call: Callable[[LiveCatalog, float | None], Awaitable[Applied]], timeout: float | None
    ) -> Applied:
        """`call` on the serving live catalog; when a swap retires that catalog before the change is applied (the
        change waited for the swap), again on the new one, which embeds the titles with its own encoder."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        for _ in range(UPDATE_ATTEMPTS):
            serving = self._serving()
            serving.hold()  # its encoder stays loaded while the titles are embedded
            try:
                remaining = None if deadline is None else max(0.001, deadline - loop.time())
                return await call(serving.catalog, remaining)
            except CatalogRetired:
                if serving is self._active:  # closed (the server is stopping), not replaced
                    raise
                log.info("a catalog update met a release swap; applying it to release %s", self._serving().release_id)
            finally:
                serving.let_go()
        raise BackendUnavailable("catalog", f"releases were swapped {UPDATE_ATTEMPTS} times during the update; retry")

    # --- start, swap ---

    async def start(self, release: Release) -> Ranker:
        """Serve `release` first. Its models are loaded into Triton (waiting up to startup_wait_s for Triton; when
        it is not there, Rank degrades until keep_loaded has loaded them); its catalog journal is replayed.
        Raises NotConfigured when RANKER_TRITON_MODELS=push and Triton takes no loads, NotFound when the release's
        model files are missing or invalid, and what opening the catalog raises."""
        names = await self._start_models(release)
        ranker = self._parts.build(release, names)
        catalog = await self._parts.open_catalog(ranker)
        self._active = Serving(release, catalog, names)
        return catalog.current()

    async def _start_models(self, release: Release) -> dict[str, str]:
        """The Triton names of the release's models, loaded when Triton is there (NotFound: broken model files)."""
        wait = self._settings.startup_wait_s
        deadline = time.monotonic() + wait
        manifest = release.manifest
        pushed_names = self._pushed_names(manifest)
        own_names = {name: name for name in pushed_names}
        try:
            await wait_until(self._models.live, wait, "no answer")
        except BackendUnavailable as e:
            log.warning("starting without Triton, Rank degrades until it is back: %s", e)
            self._mode = self._mode or "push"
            return own_names if self._mode == "preloaded" else pushed_names
        if self._mode != "preloaded":
            try:
                await self._push(release)
            except NotConfigured as e:
                if self._mode == "push":
                    raise NotConfigured(f"{e} (RANKER_TRITON_MODELS=push)") from e
                log.warning(
                    "%s: serving the models it has under the release's names %s; RankerAdmin.LoadRelease is off",
                    e,
                    sorted(own_names),
                )
                self._mode = "preloaded"
            except BackendError as e:
                log.warning("loading release %s's models into Triton failed, Rank degrades: %s", manifest.release_id, e)
                self._mode = "push"
                return pushed_names
            else:
                self._mode = "push"
                log.info(
                    "release %s's models loaded into Triton as %s", manifest.release_id, sorted(pushed_names.values())
                )
                return pushed_names
        try:
            names = list(own_names.values())
            await wait_until(
                lambda: self._models.models_ready(names), max(0.0, deadline - time.monotonic()), f"{names} not ready"
            )
        except BackendUnavailable as e:
            log.warning("starting without Triton's models, Rank degrades until they are ready: %s", e)
        return own_names

    async def load(self, path: Path) -> Swapped:
        """Swap to the release at `path` (see the module docstring). Busy while another load runs; loading the
        serving release again changes nothing. The swap runs on even if the caller goes away."""
        if self._loading is not None:
            raise Busy(f"a release load is already running ({self._loading}); retry when it has finished")
        self._loading = str(path)
        task = asyncio.create_task(self._swap(path))
        task.add_done_callback(self._load_done)
        return await asyncio.shield(task)

    def _load_done(self, task: asyncio.Task[Swapped]) -> None:
        self._loading = None
        if not task.cancelled():
            task.exception()  # retrieved here too: the caller may have gone away; _swap logged it

    async def _swap(self, path: Path) -> Swapped:
        async with self._lock:
            started = time.perf_counter()
            step = _Steps()
            old = self._serving()
            try:
                if self._mode == "preloaded":
                    raise NotConfigured(
                        "release swaps need the ranker to load models into Triton: run Triton with "
                        "--model-control-mode=explicit (RANKER_TRITON_MODELS=push or auto)"
                    )
                release = await self._load_release(path)
                step("load")
            except RankerError as e:
                log.warning("release load from %s refused: %s", path, e)
                raise
            release_id = release.manifest.release_id
            if release_id == old.release_id:
                log.info("release %s from %s is already serving; nothing to swap", release_id, path)
                _close(release, old)
                return Swapped(previous=old.stamp(), current=old.stamp(), millis=_ms(started), steps_ms=step.ms)
            log.info("release swap %s -> %s (%s) started", old.release_id, release_id, path)
            try:
                new = await self._prepare(release, old, step)
            except BaseException:
                _close(release, old)
                raise
            observability.METRICS.set_release(release_id, new.catalog.current().model_versions)
            log.info("release %s is serving (was %s) after %.0f ms", release_id, old.release_id, _ms(started))
            self._kept = [s for s in self._kept if s.release_id != release_id] + [old]
            keep = self._settings.keep_previous
            retired, self._kept = self._kept[: len(self._kept) - keep], self._kept[len(self._kept) - keep :]
            drained = []
            for serving in retired:
                if await serving.drained(self._settings.drain_s):
                    drained.append(serving)
                else:
                    log.warning(
                        "%d RPCs still hold release %s after %.0f s; unloading its models anyway, keeping its "
                        "vector engine client for them",
                        serving.holders,
                        serving.release_id,
                        self._settings.drain_s,
                    )
            step("drain")
            for serving in retired:
                await self._unload(serving.names.values())
            for serving in drained:
                _close(serving.release, new)
            step("unload")
            swapped = Swapped(previous=old.stamp(), current=new.stamp(), millis=_ms(started), steps_ms=step.ms)
            log.info("release swap %s -> %s done in %.0f ms: %s", old.release_id, release_id, swapped.millis, step.ms)
            return swapped

    async def _prepare(self, release: Release, old: Serving, step: Callable[[str], None]) -> Serving:
        """Steps 2 to 5: after it returns, `release` serves; when it raises, nothing has changed."""
        manifest = release.manifest
        names = self._pushed_names(manifest)
        if set(names.values()) & set(old.names.values()):  # 32 bits of two release ids' hashes collide
            raise NotConfigured(f"release {manifest.release_id}'s Triton model names {names} are the serving ones'")
        kept = {name for serving in self._kept for name in serving.names.values()}
        try:
            await self._push(release)
            step("push")
            ranker = self._parts.build(release, names)
            await self._warm_up(ranker)
            step("warm_up")
            async with old.catalog.updates_paused():
                catalog = await self._open_catalog(ranker)
                new = Serving(release, catalog, names)
                self._active = new  # the switch: every current() from here on returns the new release
                old.catalog.retire(f"release {old.release_id} was replaced by {manifest.release_id}")
            step("catalog")
            return new
        except BaseException as e:
            log.warning("release swap to %s failed, %s keeps serving: %s", manifest.release_id, old.release_id, e)
            await self._unload(n for n in names.values() if n not in kept)  # a kept previous release stays loaded
            raise

    async def _load_release(self, path: Path) -> Release:
        try:
            is_dir = path.is_dir()
        except OSError as e:  # a name too long, a folder the ranker may not read
            raise NotFound(f"no release at {path}: {e.strerror or type(e).__name__}") from e
        if not is_dir:
            raise NotFound(f"no release at {path}: not a folder the ranker can read")
        try:
            return await asyncio.to_thread(self._parts.load, path)
        except RankerError:
            raise
        except Exception as e:  # a missing or damaged file: the path holds no release this ranker can serve
            raise NotFound(f"no valid release at {path}: {type(e).__name__}: {e}") from e

    async def _push(self, release: Release) -> None:
        """Load the release's models this ranker runs on Triton (all at once) and wait until they are ready."""
        models = self._triton_models(release.manifest)
        try:
            bundles = await asyncio.to_thread(read_bundles, release, self._settings.config_variant, models)
        except OSError as e:
            raise NotFound(f"release {release.path}: its model files cannot be read: {e}") from e
        timeout = self._settings.load_timeout_s
        results = await asyncio.gather(
            *(self._models.load_model(b.name, config=b.config, files=b.files, timeout=timeout) for b in bundles),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        names = [b.name for b in bundles]
        await wait_until(lambda: self._models.models_ready(names), timeout, f"{names} not ready")

    async def _warm_up(self, ranker: Ranker) -> None:
        """A few Rank calls on the new pipeline; any degraded answer fails the swap."""
        titles = ranker.release.catalog.titles
        sample = " ".join(titles[0].split()[:3]) if titles else "warm up"
        for i in range(WARM_UP_ROUNDS):
            query = RankQuery(request_id=f"swap-warm-up-{i}", query=sample or "warm up", top_k=10)
            result = await ranker.rank(query, timeout=WARM_UP_TIMEOUT_S)
            if result.degraded:
                raise BackendUnavailable(
                    f"release {ranker.release.manifest.release_id}",
                    f"warm-up answered degraded: {result.degraded_reason}",
                )

    async def _open_catalog(self, ranker: Ranker) -> LiveCatalog:
        try:
            return await self._parts.open_catalog(ranker)
        except (JournalError, OSError) as e:
            raise NotConfigured(f"cannot replay the catalog updates onto the new release: {e}") from e

    async def _unload(self, names: Iterable[str]) -> None:
        for name in names:
            try:
                await self._models.unload_model(name, timeout=UNLOAD_TIMEOUT_S)
                self._unload_later.discard(name)
            except BackendError as e:
                log.warning("unloading %s from Triton failed, retrying later: %s", name, e)
                self._unload_later.add(name)

    # --- upkeep ---

    async def keep_loaded(self, interval: float = KEEP_LOADED_INTERVAL_S) -> None:
        """Until cancelled: load the serving release's models again when Triton does not have them (Triton was not
        there at start, or restarted, or another ranker unloaded them), and retry unloads that failed."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.repair()
            except Exception:  # the next round tries again
                log.exception("keeping the release's models loaded in Triton failed")

    async def repair(self) -> None:
        """One round of keep_loaded."""
        if self._mode != "push" or self._lock.locked() or self._active is None:
            return
        async with self._lock:
            serving = self._serving()
            names = list(serving.names.values())
            if not await self._models.live():
                return  # Triton is not there: nothing to do until it is
            if not await self._models.models_ready(names):
                log.warning("Triton does not have release %s's models %s; loading them", serving.release_id, names)
                try:
                    await self._push(serving.release)
                except RankerError as e:
                    log.warning("loading release %s's models failed, Rank degrades: %s", serving.release_id, e)
                    return
                log.info("release %s's models are loaded again", serving.release_id)
            self._unload_later -= set(names)  # serving (again): not to be unloaded
            await self._unload(sorted(self._unload_later))

    def close(self) -> None:
        """Close the serving release's live catalog (its journal), and let go of the vector engine clients of it and
        the kept releases. Its models stay in Triton: with an external Triton, the next ranker on the same release
        finds them loaded."""
        if self._active is not None:
            self._active.catalog.close()
            for serving in [*self._kept, self._active]:
                serving.release.close()

    def _serving(self) -> Serving:
        if self._active is None:
            raise RuntimeError("no release is serving yet: ReleaseSwitch.start() first")
        return self._active


def _close(release: Release, serving: Serving) -> None:
    """Close a release that is no longer wanted, unless it is the very object `serving` ranks with."""
    if release is not serving.release:
        release.close()


class _Steps:
    """Milliseconds per step of a swap, each since the previous step."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._since = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = round((now - self._since) * 1000.0, 1)
        self._since = now


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000.0, 1)
