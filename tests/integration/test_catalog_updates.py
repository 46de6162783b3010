"""Catalog updates end to end: UpsertItems / DeleteItems on `python -m ranker serve` with a real tritonserver,
rankable by the next Rank, gone for good when deleted, and all of it kept across a restart of the ranker."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import polars as pl
import pytest

from ranker.bench_catalog import replica_lag_ms
from ranker.tritonserver import LocalTritonServer
from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.certs import make_pki
from tests.integration.conftest import RankerProcess, free_port
from tests.redis_server import INSTALL_HINT, RedisServer, RedisTls, redis_binary

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def serve(release: Path, triton_url: str, state_dir: Path, work_dir: Path, **env: str) -> RankerProcess:
    """A ranker process on the given state directory (a context manager yielding its target)."""
    return RankerProcess(release, triton_url, work_dir, env, state_dir=state_dir)


@contextlib.contextmanager
def client(target: str) -> Iterator[ranker_pb2_grpc.RankerStub]:
    with grpc.insecure_channel(target) as channel:
        yield ranker_pb2_grpc.RankerStub(channel)


def top(stub: ranker_pb2_grpc.RankerStub, query: str, k: int = 10, **kwargs: object) -> list[ranker_pb2.RankedItem]:
    response = stub.Rank(ranker_pb2.RankRequest(query=query, top_k=k, **kwargs), timeout=30)  # type: ignore[arg-type]
    assert not response.degraded, response.degraded_reason
    return list(response.items)


def signal(item: ranker_pb2.RankedItem, name: str) -> float:
    return next(c.raw for c in item.breakdown if c.name == name)


TROWEL = ranker_pb2.CatalogItem(
    item_id="live-trowel",
    title="Quorvex titanium garden trowel with ergonomic grip",
    category="Garden",
    brand="Quorvex",
    price=24.5,
    in_stock=True,
)
TROWEL_QUERY = "quorvex titanium garden trowel"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def test_upserts_and_deletes_apply_at_once_and_survive_a_restart(
    example_release: Path, triton: LocalTritonServer, state_dir: Path, tmp_path: Path
) -> None:
    drill = "sku-00001"
    with serve(example_release, triton.grpc_url, state_dir, tmp_path) as target, client(target) as stub:
        assert TROWEL.item_id not in [i.item_id for i in top(stub, TROWEL_QUERY, 20)]
        reply = stub.UpsertItems(ranker_pb2.UpsertItemsRequest(items=[TROWEL]), timeout=60)
        assert (reply.inserted, reply.updated) == (1, 0)
        first = top(stub, TROWEL_QUERY)[0]
        assert first.item_id == TROWEL.item_id and first.title == TROWEL.title
        assert (first.category, first.brand, first.price) == ("Garden", "Quorvex", 24.5)

        # An update replaces it: the new title is what it matches, the old one is gone.
        renamed = ranker_pb2.CatalogItem(item_id=TROWEL.item_id, title="Zentrafic solar pathway lantern set")
        reply = stub.UpsertItems(ranker_pb2.UpsertItemsRequest(items=[renamed]), timeout=60)
        assert (reply.inserted, reply.updated) == (0, 1)
        lantern = top(stub, "zentrafic solar lantern")[0]
        assert lantern.item_id == TROWEL.item_id and lantern.title == renamed.title and not lantern.category
        assert [i.title for i in top(stub, TROWEL_QUERY, 50) if i.item_id == TROWEL.item_id] in ([], [renamed.title])

        # A release item deleted: gone from search, rerank, pins and filters; deleting again finds nothing.
        assert drill in [i.item_id for i in top(stub, "ryobi 20v compact cordless drill", 5)]
        reply = stub.DeleteItems(ranker_pb2.DeleteItemsRequest(item_ids=[drill, "no-such-sku"]), timeout=30)
        assert reply.deleted == 1 and list(reply.not_found) == ["no-such-sku"]
        assert drill not in [i.item_id for i in top(stub, "ryobi 20v compact cordless drill", 50)]
        pin = ranker_pb2.Rule(action=ranker_pb2.RULE_ACTION_PIN, item_ids=[drill], position=1)
        reranked = top(stub, "drill", 10, candidate_ids=[drill, "sku-00002"], rules=[pin])
        assert [i.item_id for i in reranked] == ["sku-00002"]
        assert stub.DeleteItems(ranker_pb2.DeleteItemsRequest(item_ids=[drill]), timeout=30).deleted == 0

    # A new ranker process on the same state directory: same catalog, replayed without re-embedding.
    restarted = serve(example_release, triton.grpc_url, state_dir, tmp_path / "restarted")
    with restarted as target, client(target) as stub:
        lantern = top(stub, "zentrafic solar lantern")[0]
        assert lantern.item_id == TROWEL.item_id and lantern.title == renamed.title
        assert drill not in [i.item_id for i in top(stub, "ryobi 20v compact cordless drill", 50)]
        reply = stub.UpsertItems(ranker_pb2.UpsertItemsRequest(items=[TROWEL]), timeout=60)
        assert (reply.inserted, reply.updated) == (0, 1)
        assert top(stub, TROWEL_QUERY)[0].item_id == TROWEL.item_id
    assert "replayed onto release" in restarted.logs()


def test_an_upserted_title_is_embedded_and_scored_like_the_release_embedded_it(
    example_release: Path, triton: LocalTritonServer, state_dir: Path, tmp_path: Path
) -> None:
    items = pl.read_parquet(example_release / "items.parquet").head(40)
    originals = items["item_id"].to_list()[::8]
    titles = dict(zip(items["item_id"], items["title"], strict=True))
    copies = [ranker_pb2.CatalogItem(item_id=f"copy-{i}", title=titles[i]) for i in originals]
    with serve(example_release, triton.grpc_url, state_dir, tmp_path) as target, client(target) as stub:
        reply = stub.UpsertItems(ranker_pb2.UpsertItemsRequest(items=copies), timeout=60)
        assert reply.inserted == len(copies)
        for original in originals:
            query = " ".join(titles[original].split()[:4])
            pair = [original, f"copy-{original}"]
            ranked = {i.item_id: i for i in top(stub, query, 10, candidate_ids=pair)}
            assert set(ranked) == set(pair)
            a, b = ranked[original], ranked[f"copy-{original}"]
            # Triton's CPU config embeds with the int8 copy of the encoder, the export with fp32: the
            # same title's query cosine moves by up to ~0.03 (measured 0.025). The GPU config is exact.
            assert math.isclose(signal(a, "dense"), signal(b, "dense"), abs_tol=0.05), query
            assert math.isclose(signal(a, "lexical"), signal(b, "lexical"), rel_tol=1e-5), query  # same BM25


def test_invalid_items_are_refused_whole(
    example_release: Path, triton: LocalTritonServer, state_dir: Path, tmp_path: Path
) -> None:
    bad = [TROWEL, ranker_pb2.CatalogItem(item_id="x", title="x", price=math.nan)]
    with serve(example_release, triton.grpc_url, state_dir, tmp_path) as target, client(target) as stub:
        with pytest.raises(grpc.RpcError) as caught:
            stub.UpsertItems(ranker_pb2.UpsertItemsRequest(items=bad), timeout=30)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "items[1].price: must be a number in 0..1e+12, got nan" in caught.value.details()
        assert TROWEL.item_id not in [i.item_id for i in top(stub, TROWEL_QUERY, 50)]


def test_without_the_text_encoder_an_upsert_is_unavailable_and_applies_nothing(
    example_release: Path, state_dir: Path, tmp_path: Path
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"  # no Triton there: Rank degrades, UpsertItems cannot embed
    unavailable = serve(example_release, nowhere, state_dir, tmp_path, RANKER_TRITON_STARTUP_WAIT_S="0")
    with unavailable as target, client(target) as stub:
        with pytest.raises(grpc.RpcError) as caught:
            stub.UpsertItems(ranker_pb2.UpsertItemsRequest(items=[TROWEL]), timeout=30)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert "text_encoder" in caught.value.details()
        response = stub.Rank(ranker_pb2.RankRequest(query=TROWEL_QUERY, top_k=50), timeout=30)
        assert response.degraded and TROWEL.item_id not in [i.item_id for i in response.items]
        assert stub.DeleteItems(ranker_pb2.DeleteItemsRequest(item_ids=["sku-00001"]), timeout=30).deleted == 1
    journal = (state_dir / "catalog" / "journal.jsonl").read_text().splitlines()
    assert len(journal) == 2 and '"kind":"delete"' in journal[1]  # the header and the delete, no upsert


def test_replicas_sharing_a_redis_catalog_store_serve_each_others_changes(
    example_release: Path, triton: LocalTritonServer, redis_url: str, tmp_path: Path
) -> None:
    """Two ranker processes with RANKER_CATALOG_STORE on one real redis-server: a change made on either is
    served by both, and a replica started later replays all of them."""
    store = {"RANKER_CATALOG_STORE": redis_url.replace("/0", "/3")}  # a database of its own
    drill, query = "sku-00001", "ryobi 20v compact cordless drill"

    def served(stub: ranker_pb2_grpc.RankerStub, text: str, k: int = 50) -> list[str]:
        return [i.item_id for i in top(stub, text, k)]

    def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "the other replica did not apply the change in time"
            time.sleep(0.05)

    a = serve(example_release, triton.grpc_url, tmp_path / "a-state", tmp_path / "a", **store)
    b = serve(example_release, triton.grpc_url, tmp_path / "b-state", tmp_path / "b", **store)
    with a as target_a, b as target_b, client(target_a) as stub_a, client(target_b) as stub_b:
        reply = stub_a.UpsertItems(ranker_pb2.UpsertItemsRequest(items=[TROWEL]), timeout=60)
        assert (reply.inserted, reply.updated) == (1, 0)
        assert served(stub_a, TROWEL_QUERY, 10)[0] == TROWEL.item_id  # at once on the replica that took it
        assert replica_lag_ms(stub_b, TROWEL.item_id, timeout_s=10) < 10_000  # B knows the id (bench_catalog)
        assert served(stub_b, TROWEL_QUERY, 10)[0] == TROWEL.item_id
        reply = stub_b.DeleteItems(ranker_pb2.DeleteItemsRequest(item_ids=[drill]), timeout=30)
        assert reply.deleted == 1
        eventually(lambda: drill not in served(stub_a, query))
        assert stub_a.DeleteItems(ranker_pb2.DeleteItemsRequest(item_ids=[drill]), timeout=30).deleted == 0
    assert not (tmp_path / "a-state" / "catalog").exists()  # the shared store, not the state directory

    late = serve(example_release, triton.grpc_url, tmp_path / "c-state", tmp_path / "c", **store)
    with late as target, client(target) as stub:
        assert served(stub, TROWEL_QUERY, 10)[0] == TROWEL.item_id
        assert drill not in served(stub, query)
    assert "catalog log ranker:catalog:log replayed" in late.logs()


def test_both_redis_stores_over_tls_with_a_client_certificate(
    example_release: Path, triton: LocalTritonServer, tmp_path: Path
) -> None:
    """`ranker serve` with rediss:// profile and catalog stores and RANKER_REDIS_TLS_* against a real
    redis-server that speaks TLS only and requires a client certificate."""
    pki = make_pki(tmp_path / "pki")
    binary = redis_binary()
    if binary is None:
        pytest.fail(f"redis-server is not installed: {INSTALL_HINT}")
    tls = RedisTls(pki.server_cert, pki.server_key, pki.ca, True, pki.client_cert, pki.client_key)
    redis = RedisServer(tmp_path / "redis", binary, tls=tls)
    (tmp_path / "redis").mkdir()
    redis.start()
    env = {
        "RANKER_PROFILE_STORE": redis.url,
        "RANKER_CATALOG_STORE": redis.url,
        "RANKER_REDIS_TLS_CA_FILE": str(pki.ca),
        "RANKER_REDIS_TLS_CERT_FILE": str(pki.client_cert),
        "RANKER_REDIS_TLS_KEY_FILE": str(pki.client_key),
    }
    try:
        with (
            serve(example_release, triton.grpc_url, tmp_path / "state", tmp_path, **env) as target,
            client(target) as stub,
        ):
            assert stub.UpsertItems(ranker_pb2.UpsertItemsRequest(items=[TROWEL]), timeout=60).inserted == 1
            event = ranker_pb2.Event(
                event_id="e1", user_id="u1", item_id=TROWEL.item_id, type=ranker_pb2.EVENT_TYPE_PURCHASE
            )
            assert stub.RecordEvents(ranker_pb2.RecordEventsRequest(events=[event]), timeout=30).applied == 1
            response = stub.Rank(ranker_pb2.RankRequest(query=TROWEL_QUERY, top_k=5, user_id="u1"), timeout=30)
            assert response.items[0].item_id == TROWEL.item_id and not response.degraded
            assert response.personalization == ranker_pb2.PERSONALIZATION_APPLIED
    finally:
        redis.stop()
