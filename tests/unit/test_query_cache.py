"""ranker.models.CachedEncoder: the query embedding cache in front of the encoder (RANKER_QUERY_CACHE_SIZE)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ranker import observability
from ranker.domain import RankQuery
from ranker.errors import BackendTimeout, BackendUnavailable
from ranker.models import CachedEncoder
from ranker.pipeline import PipelineSettings, Ranker
from tests.unit.fakes import FakeEncoder, FakeScorer, FakeTokenizer, tiny_release


def encode(cache: CachedEncoder, tokenizer: FakeTokenizer, text: str) -> np.ndarray:
    ids, mask = tokenizer([text])
    return asyncio.run(cache.encode(ids, mask, timeout=None))


def test_a_repeat_is_answered_from_the_cache_with_the_same_vector() -> None:
    tokenizer = FakeTokenizer()
    inner = FakeEncoder(tokenizer.texts)
    lookups: list[bool] = []
    cache = CachedEncoder(inner, 10, on_lookup=lookups.append)
    first = encode(cache, tokenizer, "cordless drill")
    again = encode(cache, tokenizer, "cordless drill")
    other = encode(cache, tokenizer, "garden hose")
    assert inner.calls == 2 and lookups == [False, True, False] and len(cache) == 2
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    with pytest.raises(ValueError, match="read-only"):
        again[0, 0] = 1.0  # one vector serves every request for the query: nobody may change it


def test_the_least_recently_used_query_is_evicted() -> None:
    tokenizer = FakeTokenizer()
    inner = FakeEncoder(tokenizer.texts)
    cache = CachedEncoder(inner, 2)
    for text in ("drill", "paint", "drill", "hose"):  # "paint" is the least recently used when "hose" arrives
        encode(cache, tokenizer, text)
    assert inner.calls == 3 and len(cache) == 2
    encode(cache, tokenizer, "drill")
    assert inner.calls == 3
    encode(cache, tokenizer, "paint")
    assert inner.calls == 4


def test_failures_are_not_cached() -> None:
    tokenizer = FakeTokenizer()
    inner = FakeEncoder(tokenizer.texts, fail=True)
    cache = CachedEncoder(inner, 10)
    for _ in range(2):
        with pytest.raises(Exception, match="connection refused"):
            encode(cache, tokenizer, "drill")
    assert inner.calls == 2 and len(cache) == 0
    inner.fail = False
    encode(cache, tokenizer, "drill")
    encode(cache, tokenizer, "drill")
    assert inner.calls == 3


def test_a_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        CachedEncoder(FakeEncoder({}), 0)


def test_rank_with_a_cached_query_keeps_its_dense_retrieval_while_the_encoder_is_down() -> None:
    tokenizer = FakeTokenizer()
    inner = FakeEncoder(tokenizer.texts)
    ranker = Ranker(
        tiny_release(),
        encoder=CachedEncoder(inner, 10),
        scorer=FakeScorer(),
        tokenizer=tokenizer,  # type: ignore[arg-type]
        settings=PipelineSettings(dense_k=5, lexical_k=5),
    )

    def rank(text: str) -> object:
        return asyncio.run(ranker.rank(RankQuery(request_id="r", query=text, top_k=5)))

    before = rank("cordless drill")
    inner.fail = True
    cached, uncached = rank("cordless drill"), rank("garden hose")
    assert not cached.degraded and [i.item_id for i in cached.items] == [i.item_id for i in before.items]
    assert uncached.degraded and "text_encoder unavailable" in uncached.degraded_reason
    assert inner.calls == 2  # the first "cordless drill" and the failed "garden hose"


def test_lookups_are_counted_by_result() -> None:
    def count(result: str) -> float:
        value = observability.METRICS.registry.get_sample_value("ranker_query_cache_lookups_total", {"result": result})
        return value or 0.0

    hits, misses = count("hit"), count("miss")
    observability.observe_query_cache(True)
    observability.observe_query_cache(False)
    observability.observe_query_cache(False)
    assert (count("hit") - hits, count("miss") - misses) == (1.0, 2.0)


class GatedEncoder:
    """An encoder whose calls wait for `gate`; counts calls and fails when `fail` is set."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls = 0
        self.fail = False
        self.timeouts: list[float | None] = []

    async def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, timeout: float | None) -> np.ndarray:
        self.calls += 1
        self.timeouts.append(timeout)
        await self.gate.wait()
        if self.fail:
            raise BackendUnavailable("triton:text_encoder", "connection refused")
        return np.full((1, 4), float(input_ids[0, 0]), dtype=np.float32)


IDS = np.array([[7, 1, 0]], dtype=np.int64)
MASK = (IDS > 0).astype(np.int64)


def test_concurrent_misses_of_one_query_share_one_encoder_call() -> None:
    async def scenario() -> None:
        inner = GatedEncoder()
        cache = CachedEncoder(inner, 10)
        callers = [asyncio.ensure_future(cache.encode(IDS, MASK, timeout=5)) for _ in range(5)]
        await asyncio.sleep(0.01)
        callers[0].cancel()  # the first caller gives up: the others still get the answer
        inner.gate.set()
        results = await asyncio.gather(*callers[1:])
        assert inner.calls == 1 and len(cache) == 1
        assert all(r is results[0] for r in results) and float(results[0][0, 0]) == 7.0
        assert callers[0].cancelled()
        assert await cache.encode(IDS, MASK, timeout=5) is results[0] and inner.calls == 1

    asyncio.run(scenario())


def test_a_shared_failure_reaches_every_waiter_and_is_not_cached() -> None:
    async def scenario() -> None:
        inner = GatedEncoder()
        inner.fail = True
        cache = CachedEncoder(inner, 10)
        callers = [asyncio.ensure_future(cache.encode(IDS, MASK, timeout=5)) for _ in range(3)]
        await asyncio.sleep(0.01)
        inner.gate.set()
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
        assert inner.calls == 1 and all(isinstance(o, BackendUnavailable) for o in outcomes) and len(cache) == 0
        inner.fail = False
        await cache.encode(IDS, MASK, timeout=5)
        assert inner.calls == 2 and len(cache) == 1

    asyncio.run(scenario())


def test_each_waiter_keeps_its_own_timeout() -> None:
    async def scenario() -> None:
        inner = GatedEncoder()
        cache = CachedEncoder(inner, 10)
        patient = asyncio.ensure_future(cache.encode(IDS, MASK, timeout=5))
        await asyncio.sleep(0.01)
        with pytest.raises(BackendTimeout):
            await cache.encode(IDS, MASK, timeout=0.05)
        inner.gate.set()
        assert float((await patient)[0, 0]) == 7.0 and inner.calls == 1

    asyncio.run(scenario())


def test_the_shared_call_has_the_caches_timeout_not_the_first_callers() -> None:
    async def scenario() -> None:
        inner = GatedEncoder()
        cache = CachedEncoder(inner, 10, fetch_timeout=2.0)
        hurried = asyncio.ensure_future(cache.encode(IDS, MASK, timeout=0.005))
        patient = asyncio.ensure_future(cache.encode(IDS, MASK, timeout=5))
        with pytest.raises(BackendTimeout):
            await hurried
        inner.gate.set()
        assert float((await patient)[0, 0]) == 7.0
        assert inner.timeouts == [2.0]

    asyncio.run(scenario())


def test_batches_of_several_texts_bypass_the_cache() -> None:
    async def scenario() -> None:
        inner = GatedEncoder()
        inner.gate.set()
        lookups: list[bool] = []
        cache = CachedEncoder(inner, 10, on_lookup=lookups.append)
        titles = np.array([[7, 1, 0], [8, 2, 3]], dtype=np.int64)
        for _ in range(2):
            await cache.encode(titles, (titles > 0).astype(np.int64), timeout=5)
        assert inner.calls == 2 and len(cache) == 0 and lookups == []

    asyncio.run(scenario())
