"""Release swaps over fakes: atomic, in-flight RPCs finish on their release's models, failures change nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ranker.catalog_journal import JournalError, Upsert, read
from ranker.domain import CatalogItem, RankQuery, RankResult
from ranker.errors import (
    BackendFailed,
    BackendUnavailable,
    Busy,
    NotConfigured,
    NotFound,
    RankerError,
    status_code,
)
from ranker.live_catalog import JOURNAL_DIR, LiveCatalog, encoder_fingerprint
from ranker.pipeline import PipelineSettings, Ranker
from ranker.release import Release
from ranker.retrieval import DenseRetriever, HybridRetriever
from ranker.service import RankerAdminServicer
from ranker.swap import (
    ReleaseLeases,
    ReleaseParts,
    ReleaseSwitch,
    Swapped,
    SwitchSettings,
    config_file,
    holding,
    read_bundles,
    triton_name,
)
from ranker.v1 import ranker_pb2
from tests.unit.fakes import FakeEncoder, FakeScorer, FakeTokenizer, ListLog, embed, tiny_release

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "triton_models"
MODELS = ("text_encoder", "ranker")


class FakeTriton:
    """ModelRepository over a dict of loaded models; `up`, `refuses` and `fail` break it on purpose."""

    def __init__(self) -> None:
        self.loaded: dict[str, dict[str, Any]] = {}
        self.files: dict[str, set[str]] = {}
        self.up = True
        self.refuses = False  # not in explicit model-control mode
        self.fail: set[str] = set()  # model names whose load fails
        self.unloads: list[str] = []

    async def load_model(
        self, name: str, *, config: str, files: Mapping[str, bytes], timeout: float | None = None
    ) -> None:
        await asyncio.sleep(0)
        if not self.up:
            raise BackendUnavailable(f"triton:{name}", "failed to connect")
        if self.refuses:
            raise NotConfigured("Triton at fake does not load models on request")
        if name in self.fail:
            raise BackendFailed(f"triton:{name}", "load failed")
        self.loaded[name] = json.loads(config)
        self.files[name] = set(files)

    async def unload_model(self, name: str, *, timeout: float | None = None) -> None:
        if not self.up:
            raise BackendUnavailable(f"triton:{name}", "failed to connect")
        self.unloads.append(name)
        self.loaded.pop(name, None)

    async def live(self) -> bool:
        return self.up

    async def models_ready(self, models: Iterable[str]) -> bool:
        return self.up and all(m in self.loaded for m in models)


class OnTriton:
    """An encoder or scorer that only works while its Triton model is loaded; `gate` holds calls in flight."""

    def __init__(self, triton: FakeTriton, name: str, inner: Any) -> None:
        self.triton, self.name, self.inner = triton, name, inner
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.broken = False

    def _check(self) -> None:
        if self.broken or self.name not in self.triton.loaded:
            raise BackendUnavailable(f"triton:{self.name}", "Request for unknown model: is not at ready state")

    async def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, timeout: float | None) -> np.ndarray:
        self._check()
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self._check()
        result: np.ndarray = await self.inner.encode(input_ids, attention_mask, timeout=timeout)
        return result

    async def score(self, features: np.ndarray, *, timeout: float | None) -> np.ndarray:
        self._check()
        result: np.ndarray = await self.inner.score(features, timeout=timeout)
        return result


def write_models(path: Path, release: Release) -> None:
    """The release's Triton model folders: the shipped configuration templates and stand-in model files."""
    for info in (release.manifest.encoder, release.manifest.ranker):
        model = path / "triton_models" / info.name
        (model / "configs").mkdir(parents=True)
        (model / "config.pbtxt").write_text((TEMPLATES / info.name / "config.pbtxt").read_text())
        (model / "configs" / "cpu.pbtxt").write_text((TEMPLATES / info.name / "configs" / "cpu.pbtxt").read_text())
        (model / info.version / "__pycache__").mkdir(parents=True)
        (model / info.version / "model.onnx").write_bytes(b"onnx " + info.name.encode())
        (model / info.version / "model.py").write_text("# python backend\n")
        (model / info.version / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"stale")


def fake_release(root: Path, release_id: str) -> Release:
    base = tiny_release()
    path = root / release_id
    release = dataclasses.replace(base, path=path, manifest=dataclasses.replace(base.manifest, release_id=release_id))
    write_models(path, release)
    return release


class World:
    """A switch over fakes: releases A and B on disk (models only), a fake Triton, a state folder."""

    def __init__(
        self, tmp_path: Path, *, models: str = "auto", keep_previous: int = 0, score_on_triton: bool = True
    ) -> None:
        self.triton = FakeTriton()
        self.score_on_triton = score_on_triton
        self.tokenizer = FakeTokenizer()
        ids = ("rel-A", "rel-B", "rel-C")
        self.releases = {r.path: r for r in (fake_release(tmp_path, i) for i in ids)}
        self.a, self.b, self.c = (tmp_path / i for i in ids)
        self.state_dir: Path | None = tmp_path / "state"
        self.shared: ListLog | None = None  # a catalog log shared with other replicas, instead of the journal
        self.encoders: dict[str, OnTriton] = {}
        self.scorers: dict[str, OnTriton] = {}
        self.load_gate: threading.Event | None = None
        self.catalog_gate: asyncio.Event | None = None
        self.catalog_fails = False
        self.broken_scorer: str | None = None  # this release's scorer fails once built
        self.copies = False  # each load returns a fresh copy whose close() is recorded in `closed`
        self.loads = 0
        self.closed: list[str] = []
        self.switch = ReleaseSwitch(
            ReleaseParts(load=self._load, build=self._build, open_catalog=self._open_catalog),
            self.triton,
            SwitchSettings(
                models=models,  # type: ignore[arg-type]
                config_variant="cpu",
                startup_wait_s=0.0,
                drain_s=5.0,
                keep_previous=keep_previous,
                score_on_triton=score_on_triton,
            ),
        )

    def _load(self, path: Path) -> Release:
        if self.load_gate is not None:
            self.load_gate.wait(10)
        if path.name == "damaged":
            raise ValueError("items.parquet: not a parquet file")
        if path not in self.releases:
            raise NotFound(f"no release at {path}: manifest.json is missing")
        release = self.releases[path]
        if not self.copies:
            return release
        self.loads += 1
        dense = ClosingDense(release.retriever.dense, f"{release.manifest.release_id}#{self.loads}", self.closed)
        return dataclasses.replace(release, retriever=HybridRetriever(dense, release.retriever.lexical))

    def _build(self, release: Release, names: Mapping[str, str]) -> Ranker:
        rid = release.manifest.release_id
        self.encoders[rid] = OnTriton(self.triton, names["text_encoder"], FakeEncoder(self.tokenizer.texts))
        self.scorers[rid] = OnTriton(self.triton, names.get("ranker", ""), FakeScorer())
        self.scorers[rid].broken = rid == self.broken_scorer
        return Ranker(
            release,
            encoder=self.encoders[rid],
            scorer=self.scorers[rid] if self.score_on_triton else FakeScorer(),  # RANKER_SCORER=inprocess
            tokenizer=self.tokenizer,  # type: ignore[arg-type]
            settings=PipelineSettings(dense_k=5, lexical_k=5),
        )

    async def _open_catalog(self, ranker: Ranker) -> LiveCatalog:
        if self.catalog_gate is not None:
            await self.catalog_gate.wait()
        if self.catalog_fails:
            raise JournalError("journal.jsonl: line 3 is damaged")
        if self.shared is not None:
            return await LiveCatalog.open_shared(ranker, tokenizer=self.tokenizer, shared=self.shared)
        return await LiveCatalog.open(ranker, tokenizer=self.tokenizer, state_dir=self.state_dir)

    async def start(self) -> None:
        await self.switch.start(self._load(self.a) if self.copies else self.releases[self.a])

    def names(self, path: Path) -> set[str]:
        rid = self.releases[path].manifest.release_id
        return {triton_name(m, rid) for m in MODELS}


class ClosingDense:
    """A release's dense retriever that records its close() under a name."""

    def __init__(self, inner: DenseRetriever, name: str, closed: list[str]) -> None:
        self.inner, self.name, self.closed = inner, name, closed
        self.num_items = inner.num_items
        self.embeddings = inner.embeddings
        self.remote = inner.remote

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
        return self.inner.search(query, k, allowed)

    def similarities(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self.inner.similarities(query, rows)

    def close(self) -> None:
        self.closed.append(self.name)


async def rank(switch: ReleaseSwitch, query: str = "cordless drill") -> RankResult:
    """One Rank as an RPC does it: inside holding(), the Ranker taken once."""
    with holding():
        return await switch.current().rank(RankQuery(request_id="r", query=query, top_k=5), timeout=1.0)


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


# --- loading models under per-release names ----------------------------------------------------------------


def test_triton_names_are_per_release_and_stable() -> None:
    assert triton_name("text_encoder", "rel-A") == triton_name("text_encoder", "rel-A")
    assert triton_name("text_encoder", "rel-A") != triton_name("text_encoder", "rel-B")
    assert triton_name("ranker", "rel-A").startswith("ranker-") and len(triton_name("ranker", "rel-A")) == 15


def test_bundles_carry_the_chosen_config_renamed_and_the_version_folder(tmp_path: Path) -> None:
    release = fake_release(tmp_path, "rel-A")
    cpu = {b.model: b for b in read_bundles(release, "cpu")}
    gpu = {b.model: b for b in read_bundles(release, None)}
    for model, version in (("text_encoder", "3"), ("ranker", "5")):
        config = json.loads(cpu[model].config)
        assert config["name"] == cpu[model].name == triton_name(model, "rel-A")
        assert config["backend"] == "python" and config["instance_group"][0]["kind"] == "KIND_CPU"
        assert json.loads(gpu[model].config)["platform"] == "onnxruntime_onnx"
        assert json.loads(gpu[model].config)["name"] == triton_name(model, "rel-A")
        assert set(cpu[model].files) == {f"file:{version}/model.onnx", f"file:{version}/model.py"}  # no __pycache__
        assert cpu[model].version == version
    assert config_file(release.model_repository / "ranker", "gpu-a100").name == "config.pbtxt"  # no such variant
    assert config_file(release.model_repository / "ranker", "default").name == "config.pbtxt"


def test_a_release_without_its_models_or_with_a_broken_config_is_not_found(tmp_path: Path) -> None:
    release = fake_release(tmp_path, "rel-A")
    (release.model_repository / "ranker" / "configs" / "cpu.pbtxt").write_text("name: [unclosed")
    with pytest.raises(NotFound, match=r"cpu\.pbtxt"):
        read_bundles(release, "cpu")
    for path in (release.model_repository / "ranker" / "5").iterdir():
        if path.is_file():
            path.unlink()
    (release.model_repository / "ranker" / "5" / "__pycache__" / "model.cpython-311.pyc").unlink()
    (release.model_repository / "ranker" / "5" / "__pycache__").rmdir()
    (release.model_repository / "ranker" / "5").rmdir()
    with pytest.raises(NotFound, match="no Triton model ranker version 5"):
        read_bundles(release, None)


def test_start_loads_the_release_models_under_its_own_names(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def body() -> None:
        await world.start()
        assert set(world.triton.loaded) == world.names(world.a)
        assert world.switch.model_loading == "push"
        result = await rank(world.switch)
        assert not result.degraded and result.release_id == "rel-A"
        assert result.model_versions == {"text_encoder": "3", "ranker": "5"}  # the release's names and versions

    run(body)


def test_a_triton_that_takes_no_loads_serves_preloaded_models_and_refuses_swaps(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.triton.refuses = True
    world.triton.loaded = {"text_encoder": {}, "ranker": {}}  # its own repository, loaded at its start

    async def body() -> None:
        await world.start()
        assert world.switch.model_loading == "preloaded"
        assert world.encoders["rel-A"].name == "text_encoder"
        assert not (await rank(world.switch)).degraded
        with pytest.raises(NotConfigured, match="--model-control-mode=explicit"):
            await world.switch.load(world.b)
        assert world.switch.serving.release_id == "rel-A"

    run(body)


def test_push_mode_insists_on_a_triton_that_takes_loads(tmp_path: Path) -> None:
    world = World(tmp_path, models="push")
    world.triton.refuses = True
    with pytest.raises(NotConfigured, match="RANKER_TRITON_MODELS=push"):
        asyncio.run(world.start())


def test_without_triton_at_start_rank_degrades_until_the_models_are_loaded(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.triton.up = False

    async def body() -> None:
        await world.start()
        assert (await rank(world.switch)).degraded
        world.triton.up = True
        await world.switch.repair()
        assert set(world.triton.loaded) == world.names(world.a)
        assert not (await rank(world.switch)).degraded

    run(body)


def test_keep_loaded_loads_the_models_again_after_a_triton_restart(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def body() -> None:
        await world.start()
        world.triton.loaded.clear()  # Triton restarted: nothing loaded
        assert (await rank(world.switch)).degraded
        await world.switch.repair()
        assert set(world.triton.loaded) == world.names(world.a)
        assert not (await rank(world.switch)).degraded

    run(body)


def test_a_ranker_that_scores_in_process_loads_only_the_encoder(tmp_path: Path) -> None:
    world = World(tmp_path, score_on_triton=False)
    encoder = {triton_name("text_encoder", "rel-A")}

    async def body() -> None:
        await world.start()
        assert set(world.triton.loaded) == encoder
        assert not (await rank(world.switch)).degraded
        world.triton.loaded.clear()  # Triton restarted: the repair loads the encoder again, and only it
        await world.switch.repair()
        assert set(world.triton.loaded) == encoder
        await world.switch.load(world.b)
        assert set(world.triton.loaded) == {triton_name("text_encoder", "rel-B")}
        assert not (await rank(world.switch)).degraded

    run(body)


# --- the swap ----------------------------------------------------------------------------------------------


def test_load_switches_to_the_new_release_and_unloads_the_old_one(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def body() -> None:
        await world.start()
        swapped = await world.switch.load(world.b)
        assert isinstance(swapped, Swapped)
        assert swapped.previous.release_id == "rel-A" and swapped.current.release_id == "rel-B"
        assert swapped.current.model_versions == {"text_encoder": "3", "ranker": "5"}
        assert swapped.millis > 0 and list(swapped.steps_ms) == [
            "load",
            "push",
            "warm_up",
            "catalog",
            "drain",
            "unload",
        ]
        assert set(world.triton.loaded) == world.names(world.b)
        result = await rank(world.switch)
        assert not result.degraded and result.release_id == "rel-B"
        back = await world.switch.load(world.a)  # and back: A's models are loaded again under A's names
        assert back.current.release_id == "rel-A" and set(world.triton.loaded) == world.names(world.a)

    run(body)


def test_an_rpc_that_started_on_the_old_release_finishes_on_its_models(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def body() -> None:
        await world.start()
        encoder = world.encoders["rel-A"]
        encoder.gate = asyncio.Event()
        in_flight = asyncio.create_task(rank(world.switch))
        await encoder.entered.wait()
        swap = asyncio.create_task(world.switch.load(world.b))
        while world.switch.serving.release_id != "rel-B":
            await asyncio.sleep(0.01)
        assert not (await rank(world.switch)).degraded  # new RPCs: the new release
        await asyncio.sleep(0.05)
        assert not swap.done() and world.names(world.a) <= set(world.triton.loaded)  # A still held
        encoder.gate.set()
        result = await in_flight
        assert not result.degraded and result.release_id == "rel-A"
        swapped = await swap
        assert swapped.current.release_id == "rel-B" and set(world.triton.loaded) == world.names(world.b)

    run(body)


def test_ranks_during_swaps_never_fail_and_each_comes_from_one_release(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def body() -> None:
        await world.start()
        results: list[RankResult] = []
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                results.append(await rank(world.switch))
                await asyncio.sleep(0)

        clients = [asyncio.create_task(client()) for _ in range(8)]
        for path in (world.b, world.a, world.b):
            await world.switch.load(path)
        stop.set()
        await asyncio.gather(*clients)
        assert len(results) > 20
        assert not [r.degraded_reason for r in results if r.degraded]
        assert {r.release_id for r in results} == {"rel-A", "rel-B"}
        assert (await rank(world.switch)).release_id == "rel-B"

    run(body)


def test_keep_previous_leaves_the_last_replaced_release_loaded(tmp_path: Path) -> None:
    world = World(tmp_path, keep_previous=1)

    async def body() -> None:
        await world.start()
        await world.switch.load(world.b)
        assert set(world.triton.loaded) == world.names(world.a) | world.names(world.b)
        await world.switch.load(world.a)  # roll back: A's models are still there; B's stay as the previous one
        assert set(world.triton.loaded) == world.names(world.a) | world.names(world.b) and world.triton.unloads == []
        world.triton.fail.add(triton_name("ranker", "rel-C"))
        with pytest.raises(BackendFailed):
            await world.switch.load(world.c)
        assert set(world.triton.loaded) == world.names(world.a) | world.names(world.b)  # the kept one survives
        world.triton.fail.clear()
        await world.switch.load(world.c)
        assert set(world.triton.loaded) == world.names(world.c) | world.names(world.a)  # B, two back, unloaded

    run(body)


def test_loading_the_serving_release_again_changes_nothing(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def body() -> None:
        await world.start()
        swapped = await world.switch.load(world.a)
        assert swapped.previous == swapped.current and swapped.current.release_id == "rel-A"
        assert world.triton.unloads == [] and set(world.triton.loaded) == world.names(world.a)

    run(body)


def test_a_second_load_while_one_runs_is_aborted(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def body() -> None:
        await world.start()
        world.load_gate = threading.Event()
        first = asyncio.create_task(world.switch.load(world.b))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy, match="already running") as caught:
            await world.switch.load(world.b)
        assert status_code(caught.value) is grpc.StatusCode.ABORTED
        world.load_gate.set()
        assert (await first).current.release_id == "rel-B"
        assert (await world.switch.load(world.a)).current.release_id == "rel-A"  # free again

    run(body)


def folder(world: World, name: str) -> Path:
    path = world.a.parent / name
    path.mkdir()
    return path


def failing_load(world: World, name: str) -> Path:
    world.triton.fail.add(triton_name(name, "rel-B"))
    return world.b


def triton_down(world: World) -> Path:
    world.triton.up = False
    return world.b


def degraded_warm_up(world: World) -> Path:
    world.broken_scorer = "rel-B"
    return world.b


def damaged_journal(world: World) -> Path:
    world.catalog_fails = True
    return world.b


FAILURES: dict[str, tuple[Callable[[World], Path], type[RankerError], str]] = {
    "no such folder": (lambda w: w.a.parent / "missing", NotFound, "no release at"),
    "a name the OS refuses": (lambda w: w.a.parent / ("x" * 300), NotFound, "no release at"),
    "no release in the folder": (lambda w: folder(w, "empty"), NotFound, "manifest"),
    "damaged release": (lambda w: folder(w, "damaged"), NotFound, "parquet"),
    "triton cannot load a model": (lambda w: failing_load(w, "ranker"), BackendFailed, "load failed"),
    "triton is down": (triton_down, BackendUnavailable, "connect"),
    "warm-up degrades": (degraded_warm_up, BackendUnavailable, "warm-up answered degraded"),
    "journal cannot be replayed": (damaged_journal, NotConfigured, "catalog"),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failed_load_leaves_the_old_release_serving(tmp_path: Path, failure: str) -> None:
    world = World(tmp_path)
    arrange, error, message = FAILURES[failure]

    async def body() -> None:
        await world.start()
        with pytest.raises(error, match=message):
            await world.switch.load(arrange(world))
        world.triton.up = True
        assert world.switch.serving.release_id == "rel-A"
        assert set(world.triton.loaded) == world.names(world.a)  # B's models unloaded, A's kept
        assert not (await rank(world.switch)).degraded
        item = CatalogItem(item_id="n1", title="Werner step ladder")
        assert (await world.switch.upsert([item], timeout=5)).inserted == 1  # A's catalog still takes updates
        world.catalog_fails, world.broken_scorer = False, None
        world.triton.fail.clear()
        assert (await world.switch.load(world.b)).current.release_id == "rel-B"  # and a retry works

    run(body)


def test_releases_no_longer_wanted_let_go_of_their_vector_engine(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.copies = True

    async def body() -> None:
        await world.start()  # copy 1: A
        await world.switch.load(world.b)  # copy 2: B replaces A, which drained and is closed
        assert world.closed == ["rel-A#1"]
        await world.switch.load(world.b)  # copy 3: B is already serving; the new copy is closed
        assert world.closed == ["rel-A#1", "rel-B#3"]
        world.broken_scorer = "rel-C"
        with pytest.raises(BackendUnavailable, match="warm-up"):
            await world.switch.load(world.c)  # copy 4: fails, and is closed
        assert world.closed == ["rel-A#1", "rel-B#3", "rel-C#4"]
        assert not (await rank(world.switch)).degraded  # B, still open, still serving
        world.switch.close()
        assert world.closed == ["rel-A#1", "rel-B#3", "rel-C#4", "rel-B#2"]

    run(body)


def test_a_catalog_update_during_a_swap_lands_in_the_new_release(tmp_path: Path) -> None:
    world = World(tmp_path)
    ladder = CatalogItem(item_id="n1", title="Werner folding step ladder", category="ladders")

    async def body() -> None:
        await world.start()
        world.catalog_gate = asyncio.Event()
        swap = asyncio.create_task(world.switch.load(world.b))
        while not world.switch._lock.locked() or "rel-B" not in world.scorers:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the swap is replaying the journal: updates wait
        update = asyncio.create_task(world.switch.upsert([ladder], timeout=5))
        await asyncio.sleep(0.05)
        assert not update.done()
        world.catalog_gate.set()
        assert (await update).inserted == 1
        await swap
        ranker = world.switch.current()
        assert ranker.release.manifest.release_id == "rel-B" and ranker.release.catalog.live_row("n1") is not None
        assert world.state_dir is not None
        header, changes, _ = read(world.state_dir / JOURNAL_DIR / "journal.jsonl")
        assert header is not None and header.release_id == "rel-B" and len(changes) == 1

    run(body)


def test_with_a_shared_catalog_log_the_new_release_applies_what_other_replicas_write(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.shared = ListLog()
    ladder = CatalogItem(item_id="n1", title="Werner folding step ladder", category="ladders")
    reel = CatalogItem(item_id="n2", title="Garden hose reel cart")

    async def another_replica_upserts(item: CatalogItem) -> None:
        assert world.shared is not None
        fingerprint = encoder_fingerprint(world.releases[world.a].manifest)
        await world.shared.append(Upsert((item,), embed(item.title)[None, :]), encoder=fingerprint, dim=16)

    async def body() -> None:
        await world.start()
        await world.switch.upsert([ladder], timeout=5)
        assert world.switch._active is not None
        old = world.switch._active.catalog
        await world.switch.load(world.b)
        ranker = world.switch.current()
        assert ranker.release.manifest.release_id == "rel-B" and ranker.release.catalog.live_row("n1") is not None
        await another_replica_upserts(reel)
        for _ in range(200):  # the new release's catalog tails the log
            if world.switch.current().release.catalog.live_row("n2") is not None:
                break
            await asyncio.sleep(0.01)
        assert world.switch.current().release.catalog.live_row("n2") is not None
        assert old.current().release.catalog.live_row("n2") is None  # the retired catalog stopped following
        assert world.state_dir is not None and not (world.state_dir / JOURNAL_DIR).exists()

    run(body)


def test_the_lease_interceptor_holds_the_release_for_the_rpc(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def body() -> None:
        await world.start()
        seen: list[int] = []

        async def handler(request: Any, context: Any) -> str:
            world.switch.current()
            world.switch.current()  # taken twice, held once
            seen.append(world.switch._serving().holders)
            return "ok"

        async def continuation(details: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(handler)

        wrapped = await ReleaseLeases().intercept_service(continuation, None)
        assert await wrapped.unary_unary(None, None) == "ok"
        assert seen == [1] and world.switch._serving().holders == 0
        world.switch.current()  # outside an RPC (warm-up): holds nothing
        assert world.switch._serving().holders == 0

    run(body)


# --- the RPC -----------------------------------------------------------------------------------------------


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted(details)


def test_load_release_rpc_answers_both_releases_and_maps_errors(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def body() -> None:
        await world.start()
        admin = RankerAdminServicer(world.switch)
        reply = await admin.LoadRelease(ranker_pb2.LoadReleaseRequest(path=str(world.b)), FakeContext())
        assert reply.previous.release_id == "rel-A" and reply.current.release_id == "rel-B"
        assert dict(reply.current.model_versions) == {"text_encoder": "3", "ranker": "5"} and reply.millis > 0
        for path, code in (("", grpc.StatusCode.INVALID_ARGUMENT), ("/no/such/release", grpc.StatusCode.NOT_FOUND)):
            context = FakeContext()
            with pytest.raises(Aborted):
                await admin.LoadRelease(ranker_pb2.LoadReleaseRequest(path=path), context)
            assert context.code is code, context.details
        world.triton.fail.add(triton_name("text_encoder", "rel-A"))
        context = FakeContext()
        with pytest.raises(Aborted):
            await admin.LoadRelease(ranker_pb2.LoadReleaseRequest(path=str(world.a)), context)
        assert context.code is grpc.StatusCode.UNAVAILABLE

    run(body)
