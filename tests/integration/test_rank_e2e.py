"""Rank end to end: exported release -> real tritonserver -> `python -m ranker serve` -> gRPC client."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import polars as pl
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from ranker.triton import TritonModels
from ranker.tritonserver import LocalTritonServer
from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.integration.conftest import EXAMPLES, RankerProcess
from tests.unit.fakes import SEARCH_STAGES

pytestmark = [pytest.mark.triton, pytest.mark.slow]


@pytest.fixture(scope="module")
def stub(ranker_target: str) -> Iterator[ranker_pb2_grpc.RankerStub]:
    with grpc.insecure_channel(ranker_target) as channel:
        yield ranker_pb2_grpc.RankerStub(channel)


def judged_queries(n: int = 6) -> dict[str, dict[str, float]]:
    """The first n example queries (sorted) that have at least one highly relevant item."""
    judgments = pl.read_csv(EXAMPLES / "judgments.csv", infer_schema_length=0).with_columns(
        pl.col("relevance").cast(pl.Float64)
    )
    query_col = "query" if "query" in judgments.columns else "search_term"
    item_col = "item_id" if "item_id" in judgments.columns else "product_uid"
    grouped: dict[str, dict[str, float]] = {}
    for query, item, relevance in judgments.select(query_col, item_col, "relevance").iter_rows():
        grouped.setdefault(query, {})[item] = relevance
    good = sorted(q for q, items in grouped.items() if max(items.values()) >= 2.5)
    return {q: grouped[q] for q in good[:n]}


def test_rank_puts_relevant_products_first(stub: ranker_pb2_grpc.RankerStub) -> None:
    queries = judged_queries()
    assert len(queries) >= 3
    for query, judged in queries.items():
        response = stub.Rank(ranker_pb2.RankRequest(query=query, top_k=5), timeout=30)
        ids = [item.item_id for item in response.items]
        assert len(ids) == 5, query
        assert max(judged.get(i, 1.0) for i in ids) >= 2.5, (query, [i.title for i in response.items])


def test_response_is_explainable_and_stamped(stub: ranker_pb2_grpc.RankerStub, example_release: Path) -> None:
    manifest = json.loads((example_release / "manifest.json").read_text())
    response = stub.Rank(ranker_pb2.RankRequest(request_id="req-1", query="drill", top_k=10), timeout=30)
    assert response.request_id == "req-1"
    assert not response.degraded and response.degraded_reason == ""
    assert response.release.release_id == manifest["release_id"]
    assert dict(response.release.model_versions) == {"text_encoder": "1", "ranker": "1"}
    assert [t.stage for t in response.timings] == SEARCH_STAGES
    assert response.candidates >= len(response.items) == 10
    scores = [item.score for item in response.items]
    assert scores == sorted(scores, reverse=True)
    for item in response.items:
        assert item.title
        assert math.isclose(sum(c.contribution for c in item.breakdown), item.score, abs_tol=1e-6)
        assert {c.name for c in item.breakdown} >= {"ranker", "dense", "lexical", "diversity"}


def test_candidate_ids_are_reranked_exactly(stub: ranker_pb2_grpc.RankerStub) -> None:
    some = [item.item_id for item in stub.Rank(ranker_pb2.RankRequest(query="paint", top_k=8), timeout=30).items]
    chosen = list(reversed(some[2:6]))
    response = stub.Rank(ranker_pb2.RankRequest(query="paint", candidate_ids=chosen, top_k=20), timeout=30)
    assert sorted(item.item_id for item in response.items) == sorted(chosen)


BAD_REQUESTS = {
    "empty query": (ranker_pb2.RankRequest(query=""), "query"),
    "top_k 0": (ranker_pb2.RankRequest(query="drill", top_k=0), "top_k: must be 1..200, got 0"),
    "top_k 10000": (ranker_pb2.RankRequest(query="drill", top_k=10_000), "top_k: must be 1..200, got 10000"),
    "unknown id": (ranker_pb2.RankRequest(query="drill", candidate_ids=["no-such-item"]), "candidate_ids[0]"),
    "NaN weight": (
        ranker_pb2.RankRequest(query="drill", blend=ranker_pb2.BlendOverrides(weights={"ranker": math.nan})),
        "blend.weights['ranker']",
    ),
    "negative weight": (
        ranker_pb2.RankRequest(query="drill", blend=ranker_pb2.BlendOverrides(weights={"dense": -1.0})),
        "blend.weights['dense']",
    ),
    "1 MB query": (ranker_pb2.RankRequest(query="x" * 1_000_000), "query: must be at most 1000 characters"),
    "window 500": (
        ranker_pb2.RankRequest(query="drill", diversity=ranker_pb2.DiversityOptions(window=500)),
        "diversity.window: must be 0..200, got 500",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(
    stub: ranker_pb2_grpc.RankerStub, case: str
) -> None:
    request, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Rank(request, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert message in caught.value.details()
    assert stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=3), timeout=30).items


def test_health_and_reflection(ranker_target: str) -> None:
    with grpc.insecure_channel(ranker_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ranker.v1.Ranker"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "ranker.v1.Ranker" in services and "grpc.health.v1.Health" in services
        descriptor = ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol("ranker.v1.Ranker")
        assert descriptor.package == "ranker.v1"


async def _concurrent_ranks(target: str, n: int) -> list[ranker_pb2.RankResponse]:
    queries = ["drill", "paint", "hose", "saw", "ladder", "light bulb", "faucet", "screws"]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        calls = [
            stub.Rank(ranker_pb2.RankRequest(query=queries[i % len(queries)], top_k=10), timeout=60) for i in range(n)
        ]
        return list(await asyncio.gather(*calls))


async def _batch_sizes(url: str) -> dict[str, dict[int, int]]:
    models = TritonModels(url)
    try:
        return {m: await models.batch_statistics(m) for m in ("text_encoder", "ranker")}
    finally:
        await models.close()


def test_triton_batches_concurrent_rank_calls(ranker_target: str, triton: LocalTritonServer) -> None:
    responses = asyncio.run(_concurrent_ranks(ranker_target, 64))
    assert all(r.items and not r.degraded for r in responses)
    sizes = asyncio.run(_batch_sizes(triton.grpc_url))
    merged = [size for per_model in sizes.values() for size, count in per_model.items() if count > 0]
    assert max(merged) > 1, sizes


def test_served_top_10_equals_the_offline_evaluation(stub: ranker_pb2_grpc.RankerStub, example_release: Path) -> None:
    """offline.evaluate ranks in-process with ONNX Runtime; the server ranks on Triton: same top 10."""
    from offline.evaluate import local_ranker, run_queries
    from ranker.release import Release

    queries = list(judged_queries(n=12))
    offline_runs = asyncio.run(run_queries(local_ranker(Release.load(example_release)), queries, progress=False))
    for query in queries:
        served = stub.Rank(ranker_pb2.RankRequest(query=query, top_k=10), timeout=30)
        assert [item.item_id for item in served.items] == offline_runs[query][:10], query


def test_inprocess_scorer_ranks_like_the_triton_ranker(
    stub: ranker_pb2_grpc.RankerStub, example_release: Path, triton: LocalTritonServer, tmp_path: Path
) -> None:
    """RANKER_SCORER=inprocess runs the release's ranker ONNX file in the service: same items, same scores,
    and no ranker inference reaches Triton."""
    requests = [ranker_pb2.RankRequest(query=query, top_k=10) for query in judged_queries(n=8)]
    on_triton = [stub.Rank(request, timeout=30) for request in requests]
    process = RankerProcess(example_release, triton.grpc_url, tmp_path, env={"RANKER_SCORER": "inprocess"})
    with process as target, grpc.insecure_channel(target) as channel:
        before = asyncio.run(_inferences(triton.grpc_url))
        in_process = [ranker_pb2_grpc.RankerStub(channel).Rank(request, timeout=30) for request in requests]
        after = asyncio.run(_inferences(triton.grpc_url))
    assert after["ranker"] == before["ranker"] and after["text_encoder"] > before["text_encoder"]
    for request, local, served in zip(requests, in_process, on_triton, strict=True):
        assert not local.degraded
        assert [i.item_id for i in local.items] == [i.item_id for i in served.items], request.query
        for a, b in zip(local.items, served.items, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-4)


def test_query_cache_skips_the_encoder_for_repeated_queries(
    example_release: Path, triton: LocalTritonServer, tmp_path: Path
) -> None:
    """RANKER_QUERY_CACHE_SIZE: a repeated query is ranked the same without a second encoder inference."""
    requests = [ranker_pb2.RankRequest(query=query, top_k=10) for query in judged_queries(n=4)]
    process = RankerProcess(example_release, triton.grpc_url, tmp_path, env={"RANKER_QUERY_CACHE_SIZE": "100"})
    with process as target, grpc.insecure_channel(target) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        before = asyncio.run(_inferences(triton.grpc_url))
        first = [stub.Rank(request, timeout=30) for request in requests]
        again = [stub.Rank(request, timeout=30) for request in requests]
        after = asyncio.run(_inferences(triton.grpc_url))
    assert after["text_encoder"] - before["text_encoder"] == len(requests)
    assert after["ranker"] - before["ranker"] == 2 * len(requests)
    for a, b in zip(first, again, strict=True):
        assert not a.degraded and not b.degraded
        assert [(i.item_id, i.score) for i in a.items] == [(i.item_id, i.score) for i in b.items]


async def _inferences(url: str) -> dict[str, int]:
    """Successful inferences per model family on Triton (per-release copies of a model count together)."""
    models = TritonModels(url)
    try:
        stats = await models.client.get_inference_statistics(as_json=True)
    finally:
        await models.close()
    counts = {"text_encoder": 0, "ranker": 0}
    for model in stats.get("model_stats", []):
        family = "text_encoder" if model["name"].startswith("text_encoder") else "ranker"
        counts[family] += int(model.get("inference_stats", {}).get("success", {}).get("count", 0))
    return counts


def test_brand_caps_hold_through_the_server(stub: ranker_pb2_grpc.RankerStub) -> None:
    for method in (ranker_pb2.DIVERSITY_METHOD_NONE, ranker_pb2.DIVERSITY_METHOD_MMR, ranker_pb2.DIVERSITY_METHOD_DPP):
        diversity = ranker_pb2.DiversityOptions(method=method, strength=0.4, max_per_brand=1, max_per_category=3)
        response = stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=10, diversity=diversity), timeout=30)
        brands = [item.brand for item in response.items if item.brand]
        categories = [item.category for item in response.items if item.category]
        assert len(brands) == len(set(brands)), (method, brands)
        assert max(categories.count(c) for c in set(categories)) <= 3
        for item in response.items:
            assert math.isclose(sum(c.contribution for c in item.breakdown), item.score, abs_tol=1e-6)


def test_max_sum_by_windows_through_the_server(stub: ranker_pb2_grpc.RankerStub) -> None:
    plain = stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=10), timeout=30)
    diversity = ranker_pb2.DiversityOptions(method=ranker_pb2.DIVERSITY_METHOD_MAX_SUM, strength=0.3, window=5)
    response = stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=10, diversity=diversity), timeout=30)
    assert len(response.items) == 10 and response.items[0].item_id == plain.items[0].item_id
    assert [item.item_id for item in response.items] != [item.item_id for item in plain.items]
    assert [item.score for item in response.items] == sorted((item.score for item in response.items), reverse=True)
    for item in response.items:
        assert math.isclose(sum(c.contribution for c in item.breakdown), item.score, abs_tol=1e-6)


def test_rules_through_the_server(stub: ranker_pb2_grpc.RankerStub) -> None:
    plain = stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=5), timeout=30)
    far = stub.Rank(ranker_pb2.RankRequest(query="garden hose", top_k=30), timeout=30).items[-1].item_id
    rules = [
        ranker_pb2.Rule(action=ranker_pb2.RULE_ACTION_PIN, item_ids=[far], position=1),
        ranker_pb2.Rule(action=ranker_pb2.RULE_ACTION_EXCLUDE, item_ids=[plain.items[0].item_id]),
    ]
    response = stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=5, rules=rules), timeout=30)
    ids = [item.item_id for item in response.items]
    assert ids[0] == far and plain.items[0].item_id not in ids
    assert [item.score for item in response.items] == sorted((item.score for item in response.items), reverse=True)
    with pytest.raises(grpc.RpcError) as caught:
        bad = ranker_pb2.Rule(action=ranker_pb2.RULE_ACTION_BOOST, item_ids=[far], amount=-1)
        stub.Rank(ranker_pb2.RankRequest(query="drill", rules=[bad]), timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "rules[0].amount" in caught.value.details()


def test_bench_cli_drives_real_traffic(ranker_target: str) -> None:
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "ranker.bench",
        "--target",
        ranker_target,
        "--queries",
        str(EXAMPLES / "judgments.csv"),
        "--channels",
        "2",  # the 4 clients over 2 connections (1 client: 1)
        "--concurrency",
        "1,4",
        "--duration",
        "1",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    levels = json.loads(done.stdout)["levels"]
    assert [level["concurrency"] for level in levels] == [1, 4]
    assert all(level["requests"] > 0 and level["errors"] == 0 for level in levels)

    # Paired mode: the same server under both names, in alternation; medians over rounds and per-round ratios.
    paired = [*command[:-5], "--concurrency", "2", "--duration", "0.5", "--rounds", "2", "--compare", ranker_target]
    done = subprocess.run([*paired, "--json"], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(done.stdout)
    for side in (result, result["compare"]):
        (level,) = side["levels"]
        assert level["rounds"] == 2 and len(level["qps_runs"]) == 2 and level["errors"] == 0
        assert level["requests"] > 0 and level["qps"] > 0
    (pair,) = result["paired"]
    assert pair["concurrency"] == 2 and pair["rounds"] == 2 and pair["qps_ratio"] > 0


def test_rank_degrades_while_triton_is_down_and_recovers(
    stub: ranker_pb2_grpc.RankerStub, triton: LocalTritonServer
) -> None:
    # Runs last in this module: it stops and restarts the shared tritonserver.
    triton.stop()
    try:
        response = stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=5), timeout=30)
        assert response.degraded and "text_encoder unavailable" in response.degraded_reason
        assert len(response.items) == 5
    finally:
        triton.start()
    # The ranker reconnects by itself (reconnect backoff is capped at 1 s).
    deadline = time.monotonic() + 10
    while True:
        response = stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=5), timeout=30)
        if not response.degraded or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not response.degraded and len(response.items) == 5


def test_bench_models_drives_the_encoder_under_load(
    example_release: Path, triton: LocalTritonServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ranker.bench_models --concurrency`: the encoder alone under concurrent clients, as JSON."""
    from ranker import bench_models

    argv = ["--release", str(example_release), "--triton-url", triton.grpc_url, "--repeats", "5"]
    argv += ["--concurrency", "4", "--duration", "1", "--queries", str(EXAMPLES / "judgments.csv"), "--json"]
    assert bench_models.main(argv) == 0
    loaded = json.loads(capsys.readouterr().out)["text_encoder"]["under_load"]
    assert loaded["concurrency"] == 4 and loaded["queries"] > 4 and loaded["qps"] > 0
    assert 0 < loaded["p50_ms"] <= loaded["p99_ms"]
