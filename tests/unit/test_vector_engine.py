"""The Qdrant dense retriever: same results as exact FAISS, filters inside the engine, loading, errors."""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import json
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl
import pytest
from qdrant_client import QdrantClient

from ranker import vector_engine
from ranker.config import load_settings
from ranker.domain import Personalization, RankQuery
from ranker.errors import BackendFailed, BackendTimeout, BackendUnavailable, NotFound
from ranker.features import FEATURE_NAMES
from ranker.neighbours import ItemNeighbours
from ranker.observability import degraded_reason_codes
from ranker.personal import Personalizer
from ranker.pipeline import PipelineSettings, Ranker
from ranker.profiles import EmbeddedProfileStore, ItemSpace
from ranker.release import DENSE_INDEX, EMBEDDINGS, ITEMS, LEXICAL_DIR, MANIFEST, Release
from ranker.retrieval import Analyzer, DenseIndex, DenseRetriever, HybridRetriever, LexicalIndex
from ranker.vector_engine import QdrantDenseIndex
from tests.unit import fakes
from tests.unit.test_personal import make_ranker, purchases

pytestmark = [
    # Local mode warns that search params (hnsw_ef) do nothing there (it is always exact) and that it
    # is not meant for large collections.
    pytest.mark.filterwarnings("ignore:Local mode:UserWarning"),
]


def random_unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


T = TypeVar("T")
EMB = random_unit(2000, 32)
QUERIES = random_unit(20, 32, seed=1)


@pytest.fixture(scope="module")
def flat() -> DenseIndex:
    return DenseIndex.build(EMB, hnsw_threshold=10**9)


@pytest.fixture(scope="module")
def engine() -> Iterator[QdrantDenseIndex]:
    client = vector_engine.connect(vector_engine.MEMORY)
    vector_engine.upload(client, "items", EMB, batch_size=300, progress=False)
    index = QdrantDenseIndex.open(client, "items", EMB)
    yield index
    index.close()


def test_both_backends_satisfy_the_dense_retriever_protocol(flat: DenseIndex, engine: QdrantDenseIndex) -> None:
    for index in (flat, engine):
        assert isinstance(index, DenseRetriever)
        assert index.num_items == len(EMB)
    typed: list[DenseRetriever] = [flat, engine]  # what mypy checks: both fit where the pipeline takes one
    assert len(typed) == 2


def test_top_k_is_identical_to_exact_faiss(flat: DenseIndex, engine: QdrantDenseIndex) -> None:
    for q in QUERIES:
        got = engine.search(q, 50)
        assert got.dtype == np.int64
        assert got.tolist() == flat.search(q, 50).tolist()
    assert len(engine.search(QUERIES[0], 5000)) == len(EMB)  # k beyond the catalog: every item
    assert engine.search(QUERIES[0], 0).tolist() == []


@pytest.mark.parametrize("fraction", [0.1, 0.9], ids=["keep-few", "drop-few"])
def test_filters_are_applied_by_the_engine(flat: DenseIndex, engine: QdrantDenseIndex, fraction: float) -> None:
    allowed = np.random.default_rng(2).random(len(EMB)) < fraction
    for q in QUERIES[:5]:
        got = engine.search(q, 30, allowed)
        assert allowed[got].all()
        assert got.tolist() == flat.search(q, 30, allowed).tolist()


def test_filter_is_sent_as_a_point_id_condition_on_the_smaller_side() -> None:
    allowed = np.zeros(10, dtype=bool)
    allowed[[2, 5]] = True
    keep = vector_engine.row_filter(allowed)
    assert keep.must is not None and keep.must[0].has_id == [2, 5]  # type: ignore[index, union-attr]
    drop = vector_engine.row_filter(~allowed)
    assert drop.must_not is not None and drop.must_not[0].has_id == [2, 5]  # type: ignore[index, union-attr]


def test_empty_and_full_masks(flat: DenseIndex, engine: QdrantDenseIndex) -> None:
    assert engine.search(QUERIES[0], 10, np.zeros(len(EMB), dtype=bool)).tolist() == []
    everything = np.ones(len(EMB), dtype=bool)
    assert engine.search(QUERIES[0], 10, everything).tolist() == flat.search(QUERIES[0], 10).tolist()


def test_similarities_are_exact_cosines(engine: QdrantDenseIndex) -> None:
    rows = np.array([3, 1, 4])
    assert engine.similarities(QUERIES[0], rows) == pytest.approx(EMB[rows] @ QUERIES[0], abs=1e-6)


def test_upload_is_idempotent_and_open_checks_the_collection() -> None:
    client = vector_engine.connect(vector_engine.MEMORY)
    assert vector_engine.upload(client, "c", EMB[:100], batch_size=40, progress=False) == 100
    assert vector_engine.upload(client, "c", EMB[:100], progress=False) == 100
    with pytest.raises(NotFound, match="no collection 'missing'"):
        QdrantDenseIndex.open(client, "missing", EMB[:100])
    with pytest.raises(NotFound, match="holds 100 vectors of 32 dims, the release 50 of 32"):
        QdrantDenseIndex.open(client, "c", EMB[:50])
    with pytest.raises(NotFound, match="--recreate"):
        vector_engine.upload(client, "c", EMB[:50], progress=False)  # 50 fresh points, 50 stale ones
    assert vector_engine.upload(client, "c", EMB[:50], recreate=True, progress=False) == 50
    with pytest.raises(NotFound, match="32-dim"):
        vector_engine.upload(client, "c", random_unit(10, 8), progress=False)
    client.close()


@pytest.mark.parametrize("url", ["qdrant:6333", "local:", "grpc://qdrant:6334"])
def test_connect_rejects_unknown_urls(url: str) -> None:
    with pytest.raises(ValueError, match="vector engine url"):
        vector_engine.connect(url)


def write_release(directory: Path, embeddings: np.ndarray, release_id: str = "20260101T000000Z-test") -> Path:
    """A minimal release on disk: the example items, the given embeddings, FAISS and BM25 indexes."""
    directory.mkdir(parents=True)
    frame = pl.DataFrame(fakes.ITEMS, schema=["item_id", "title", "category", "brand", "price"], orient="row")
    frame.write_parquet(directory / ITEMS)
    DenseIndex.build(embeddings).save(directory / DENSE_INDEX, directory / EMBEDDINGS)
    (directory / LEXICAL_DIR).mkdir()
    LexicalIndex.build(Analyzer().analyze_many(frame["title"].to_list())).save(directory / LEXICAL_DIR)
    manifest = {
        "format": 1,
        "release_id": release_id,
        "created_at": "2026-01-01T00:00:00Z",
        "models": {
            "text_encoder": {"version": 1, "dim": embeddings.shape[1], "max_query_tokens": 8},
            "ranker": {"version": 1, "features": list(FEATURE_NAMES)},
        },
        "index": {"items": len(embeddings)},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


def test_load_cli_then_release_load_selects_the_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    embeddings = random_unit(len(fakes.ITEMS), 16, seed=4)
    release_dir = write_release(tmp_path / "release", embeddings)
    url = f"local:{tmp_path / 'qdrant'}"
    vector_engine.main(["load", "--release", str(release_dir), "--url", url, "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["collection"] == "ranker-20260101T000000Z-test" and summary["points"] == len(fakes.ITEMS)

    faiss_release = Release.load(release_dir)
    engine_release = Release.load(release_dir, dense_backend="qdrant", vector_engine_url=url)
    dense = engine_release.retriever.dense
    assert isinstance(dense, QdrantDenseIndex) and isinstance(faiss_release.retriever.dense, DenseIndex)
    query = random_unit(1, 16, seed=5)[0]
    allowed = engine_release.catalog.mask(categories=frozenset({"power tools"}), min_price=None, max_price=None)
    tokens = engine_release.analyzer.analyze("cordless drill")
    for mask in (None, allowed):
        got = engine_release.retriever.retrieve(tokens, query, dense_k=3, lexical_k=3, allowed=mask)
        want = faiss_release.retriever.retrieve(tokens, query, dense_k=3, lexical_k=3, allowed=mask)
        assert got.rows.tolist() == want.rows.tolist()
        assert got.dense == pytest.approx(want.dense)
    dense.close()


def test_release_load_without_url_or_collection(tmp_path: Path) -> None:
    release_dir = write_release(tmp_path / "release", random_unit(len(fakes.ITEMS), 16))
    with pytest.raises(ValueError, match="needs vector_engine_url"):
        Release.load(release_dir, dense_backend="qdrant")
    with pytest.raises(NotFound, match="no collection 'ranker-20260101T000000Z-test'"):
        Release.load(release_dir, dense_backend="qdrant", vector_engine_url=f"local:{tmp_path / 'empty'}")
    # The failed load released the folder's lock: another client can open it.
    vector_engine.connect(f"local:{tmp_path / 'empty'}").close()


def test_two_releases_on_one_local_engine_share_its_client(tmp_path: Path) -> None:
    # A swap loads the next release while the serving one is open: a local folder admits one client.
    url = f"local:{tmp_path / 'qdrant'}"
    releases = {}
    for name, seed in (("A", 6), ("B", 7)):
        directory = write_release(tmp_path / name, random_unit(len(fakes.ITEMS), 16, seed=seed), f"rel-{name}")
        vector_engine.load_release(url, directory, progress=False)
        releases[name] = directory
    query = random_unit(1, 16, seed=8)[0]
    serving = Release.load(releases["A"], dense_backend="qdrant", vector_engine_url=url)
    before = serving.retriever.dense.search(query, 3).tolist()
    following = Release.load(releases["B"], dense_backend="qdrant", vector_engine_url=f"local:{tmp_path}/x/../qdrant")
    assert vector_engine.SHARED.users(url) == 2
    serving.close()
    serving.close()  # once only: the other release keeps the client
    assert vector_engine.SHARED.users(url) == 1
    assert len(following.retriever.dense.search(query, 3)) == 3
    assert Release.load(releases["A"], dense_backend="faiss").retriever.dense.search(query, 3).tolist() == before
    following.close()
    assert vector_engine.SHARED.users(url) == 0
    vector_engine.connect(url).close()  # the last close released the folder's lock


def test_a_release_that_fails_after_opening_the_engine_lets_go_of_it(tmp_path: Path) -> None:
    url = f"local:{tmp_path / 'qdrant'}"
    directory = write_release(tmp_path / "release", random_unit(len(fakes.ITEMS), 16))
    vector_engine.load_release(url, directory, progress=False)
    for path in (directory / LEXICAL_DIR).iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError):
        Release.load(directory, dense_backend="qdrant", vector_engine_url=url)
    assert vector_engine.SHARED.users(url) == 0
    vector_engine.connect(url).close()


def test_settings_choose_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().dense_backend == "faiss"
    monkeypatch.setenv("RANKER_DENSE_BACKEND", "qdrant")
    monkeypatch.setenv("RANKER_VECTOR_ENGINE_URL", "http://qdrant:6333")
    settings = load_settings()
    assert (settings.dense_backend, settings.vector_engine_url) == ("qdrant", "http://qdrant:6333")
    monkeypatch.setenv("RANKER_DENSE_BACKEND", "milvus")
    with pytest.raises(ValueError, match="dense_backend"):
        load_settings()


class _Handler(http.server.BaseHTTPRequestHandler):
    delay_s = 0.0
    status = 500

    def do_GET(self) -> None:
        time.sleep(self.delay_s)
        try:
            self.send_response(self.status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"status": {"error": "boom"}}')
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting: what the timeout test wants

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def unreachable_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


def remote(url: str) -> QdrantClient:
    # connect()'s client, minus the server-version check it runs in a background thread (its warning
    # would land in whichever test runs next).
    return QdrantClient(url=url, timeout=1, check_compatibility=False)


def test_client_errors_become_backend_errors(fake_server: tuple[str, type[_Handler]]) -> None:
    url, handler = fake_server
    down = QdrantDenseIndex(remote(unreachable_url()), "c", EMB, num_items=len(EMB))
    with pytest.raises(BackendUnavailable, match="qdrant: query_points"):
        down.search(QUERIES[0], 10)
    failing = QdrantDenseIndex(remote(url), "c", EMB, num_items=len(EMB))
    with pytest.raises(BackendFailed, match="HTTP 500"):
        failing.search(QUERIES[0], 10)
    with pytest.raises(BackendFailed):
        QdrantDenseIndex.open(remote(url), "c", EMB)
    handler.delay_s = 2.0
    slow = QdrantDenseIndex(remote(url), "c", EMB, num_items=len(EMB))
    with pytest.raises(BackendTimeout, match="timed out"):
        slow.search(QUERIES[0], 10)


async def timed(call: Awaitable[T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = await call
    return result, time.perf_counter() - started


def engine_ranker(client: QdrantClient) -> Ranker:
    """The pipeline over the tiny release, its dense retrieval on a Qdrant engine at `client`."""
    release = fakes.tiny_release()
    embeddings = np.asarray(release.retriever.dense.embeddings)
    dense = QdrantDenseIndex(client, "items", embeddings, num_items=len(embeddings))
    tokenizer = fakes.FakeTokenizer()
    return Ranker(
        dataclasses.replace(release, retriever=HybridRetriever(dense, release.retriever.lexical)),
        encoder=fakes.FakeEncoder(tokenizer.texts),
        scorer=fakes.FakeScorer(),
        tokenizer=tokenizer,  # type: ignore[arg-type]
        settings=PipelineSettings(dense_k=5, lexical_k=5),
    )


def test_rank_answers_from_bm25_candidates_when_the_engine_fails_or_is_slow(
    fake_server: tuple[str, type[_Handler]],
) -> None:
    url, handler = fake_server
    query = RankQuery(request_id="r", query="cordless drill", top_k=5)
    memory = vector_engine.connect(vector_engine.MEMORY)
    vector_engine.upload(memory, "items", np.asarray(fakes.tiny_release().retriever.dense.embeddings), progress=False)
    healthy = asyncio.run(engine_ranker(memory).rank(query, timeout=5.0))
    assert not healthy.degraded and healthy.items
    memory.close()
    handler.delay_s = 2.0
    for client, code in ((remote(unreachable_url()), "unavailable"), (remote(url), "timeout")):
        result, seconds = asyncio.run(timed(engine_ranker(client).rank(query, timeout=0.3)))
        assert seconds < 0.6  # within the caller's deadline, not the client's 1 s timeout
        assert result.degraded and degraded_reason_codes(result.degraded_reason) == [f"vector_engine_{code}"]
        assert "lexical candidates only" in result.degraded_reason
        titles = {item_id: title.lower().split() for item_id, title, *_ in fakes.ITEMS}
        assert result.items and all({"cordless", "drill"} & set(titles[item.item_id]) for item in result.items)
        assert result.items[0].item_id.startswith("d")  # still ranked: the dense features come from embeddings
        client.close()


def test_recommendations_answer_from_neighbours_when_the_engine_fails(
    tmp_path: Path, fake_server: tuple[str, type[_Handler]]
) -> None:
    """No query, a profile: the engine's search near the profile runs off the event loop within the deadline,
    and when it fails the behavioural neighbours still recommend (degraded, saying so)."""
    url, handler = fake_server
    handler.delay_s = 2.0
    store = EmbeddedProfileStore(tmp_path / "p.sqlite3", ttl_s=3600, dedup_ttl_s=3600)
    personalizer = Personalizer(store=store, timeout_s=1.0)
    neighbours = ItemNeighbours.build([[5, 6], [5, 6], [0, 7]], num_items=8)  # p1 -> p2 bought together
    healthy = make_ranker(personalizer, neighbours=neighbours)
    embeddings = np.asarray(healthy.release.retriever.dense.embeddings)
    query = RankQuery(request_id="r", query="", user_id="u1", top_k=3, exclude_purchased=True)

    async def scenario() -> None:
        await personalizer.record(ItemSpace.of(healthy.release), purchases("u1", ["p1"]))
        for client, code in ((remote(unreachable_url()), "unavailable"), (remote(url), "timeout")):
            dense = QdrantDenseIndex(client, "items", embeddings, num_items=len(embeddings))
            retriever = HybridRetriever(dense, healthy.release.retriever.lexical)
            ranker = healthy.with_release(dataclasses.replace(healthy.release, retriever=retriever))
            result, seconds = await timed(ranker.rank(query, timeout=0.3))
            assert seconds < 0.6
            assert result.degraded and degraded_reason_codes(result.degraded_reason) == [f"vector_engine_{code}"]
            assert "behavioural candidates only" in result.degraded_reason
            assert result.personalization is Personalization.APPLIED and result.items[0].item_id == "p2"
            client.close()

    asyncio.run(scenario())
