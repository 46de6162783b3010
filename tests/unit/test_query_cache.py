"""ranker.models.CachedEncoder: the query embedding cache in front of the encoder (RANKER_QUERY_CACHE_SIZE)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ranker import observability
from ranker.domain import RankQuery
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
