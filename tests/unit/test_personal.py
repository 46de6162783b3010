"""The "personal" signal through the Rank pipeline over fakes: applied, cold start, unavailable, recommendations."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from ranker import blending
from ranker.catalog_overlay import CatalogSnapshot
from ranker.domain import CatalogItem, Personalization, RankQuery, RankResult
from ranker.errors import BackendUnavailable
from ranker.events import Event, EventType
from ranker.neighbours import ItemNeighbours
from ranker.observability import degraded_reason_codes
from ranker.personal import Personalizer, PersonalWeights, components, personal_scores
from ranker.pipeline import PipelineSettings, Ranker
from ranker.profiles import (
    EmbeddedProfileStore,
    ItemSpace,
    Profile,
    ProfileConfig,
    ProfileUpdate,
    RecordCounts,
    apply_events,
)
from tests.unit.fakes import FakeEncoder, FakeScorer, FakeTokenizer, tiny_release

T0 = 1_700_000_000.0


class BrokenStore:
    """A ProfileStore that fails, or hangs, on every read."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang

    async def get(self, user_id: str) -> Profile | None:
        if self.hang:
            await asyncio.sleep(10)
        raise BackendUnavailable("redis", "connection refused")

    async def record(self, events_by_user: Mapping[str, Sequence[Event]], update: ProfileUpdate) -> RecordCounts:
        raise BackendUnavailable("redis", "connection refused")

    async def forget(self, user_id: str) -> bool:
        raise BackendUnavailable("redis", "connection refused")

    async def close(self) -> None:
        return None


def make_ranker(personalizer: Personalizer | None, *, neighbours: ItemNeighbours | None = None) -> Ranker:
    tokenizer = FakeTokenizer()
    release = tiny_release()
    if neighbours is not None:
        release = dataclasses.replace(release, neighbours=neighbours)
    return Ranker(
        release,
        encoder=FakeEncoder(tokenizer.texts),
        scorer=FakeScorer(),
        tokenizer=tokenizer,  # type: ignore[arg-type]
        settings=PipelineSettings(dense_k=8, lexical_k=8),
        personalizer=personalizer,
    )


def purchases(user: str, items: Sequence[str]) -> list[Event]:
    return [
        Event(event_id=f"{user}-{i}", user_id=user, item_id=item, type=EventType.PURCHASE, timestamp=T0 + i)
        for i, item in enumerate(items)
    ]


async def ranked(ranker: Ranker, **kwargs: object) -> RankResult:
    fields: dict[str, object] = {"request_id": "r", "query": "cordless drill", "top_k": 8, **kwargs}
    return await ranker.rank(RankQuery(**fields))  # type: ignore[arg-type]


def ids(result: RankResult) -> list[str]:
    return [item.item_id for item in result.items]


def names(result: RankResult) -> set[str]:
    return {c.name for item in result.items for c in item.breakdown}


@pytest.fixture
def personalizer(tmp_path: Path) -> Personalizer:
    store = EmbeddedProfileStore(tmp_path / "p.sqlite3", ttl_s=3600, dedup_ttl_s=3600)
    return Personalizer(store=store, timeout_s=1.0)


def test_without_a_user_nothing_changes(personalizer: Personalizer) -> None:
    plain = asyncio.run(ranked(make_ranker(None)))
    result = asyncio.run(ranked(make_ranker(personalizer)))
    assert ids(result) == ids(plain) and result.personalization is Personalization.NONE
    assert "personal" not in names(result)
    assert [stage for stage, _ in result.timings_ms] == [stage for stage, _ in plain.timings_ms]


def test_a_profile_reorders_the_results_and_explains_itself(personalizer: Personalizer) -> None:
    ranker = make_ranker(personalizer)
    boost = {"personal": 3.0}

    async def scenario() -> tuple[RankResult, RankResult, RankResult, str]:
        cold = await ranked(ranker, user_id="u1", weights=boost)
        bought = ids(cold)[-1]  # the item the non-personalised ranking puts last
        await personalizer.record(ItemSpace.of(ranker.release), purchases("u1", [bought, bought]))
        warm = await ranked(ranker, user_id="u1", weights=boost)
        other = await ranked(ranker, user_id="u2", weights=boost)
        return cold, warm, other, bought

    cold, warm, other, bought = asyncio.run(scenario())
    assert cold.personalization is Personalization.COLD_START and "personal" not in names(cold)
    assert other.personalization is Personalization.COLD_START and ids(other) == ids(cold)
    assert warm.personalization is Personalization.APPLIED
    assert ids(warm).index(bought) < ids(cold).index(bought)
    stages = [stage for stage, _ in warm.timings_ms]
    assert stages[0] == "profile" and "personal" in stages
    for item in warm.items:
        assert sum(c.contribution for c in item.breakdown) == pytest.approx(item.score, abs=1e-9)
        personal = next(c for c in item.breakdown if c.name == "personal")
        assert personal.weight == 3.0 and 0.0 <= personal.normalized <= 1.0
    assert next(c for c in warm.items[ids(warm).index(bought)].breakdown if c.name == "personal").normalized == 1.0


def test_exclude_purchased(personalizer: Personalizer) -> None:
    ranker = make_ranker(personalizer)

    async def scenario() -> tuple[RankResult, RankResult]:
        await personalizer.record(ItemSpace.of(ranker.release), purchases("u1", ["d1", "d3"]))
        return await ranked(ranker, user_id="u1"), await ranked(ranker, user_id="u1", exclude_purchased=True)

    kept, dropped = asyncio.run(scenario())
    assert {"d1", "d3"} <= set(ids(kept))
    assert not {"d1", "d3"} & set(ids(dropped)) and len(ids(dropped)) == len(ids(kept)) - 2


@pytest.mark.parametrize("hang", [False, True])
def test_a_failing_or_slow_store_answers_without_personalisation(hang: bool) -> None:
    plain = asyncio.run(ranked(make_ranker(None)))
    slow = Personalizer(store=BrokenStore(hang=hang), timeout_s=0.05)
    result = asyncio.run(ranked(make_ranker(slow), user_id="u1"))
    assert result.personalization is Personalization.UNAVAILABLE
    assert ids(result) == ids(plain) and not result.degraded
    # Purchases the caller asked to hide cannot be hidden: the answer says so.
    excluding = asyncio.run(ranked(make_ranker(slow), user_id="u1", exclude_purchased=True))
    assert ids(excluding) == ids(plain) and excluding.personalization is Personalization.UNAVAILABLE
    assert excluding.degraded and excluding.degraded_reason == "profile unavailable: exclude_purchased not applied"
    assert degraded_reason_codes(excluding.degraded_reason) == ["profile_unavailable"]
    assert asyncio.run(ranked(make_ranker(None), user_id="u1")).personalization is Personalization.UNAVAILABLE


def test_recommendations_come_from_the_profile(personalizer: Personalizer) -> None:
    neighbours = ItemNeighbours.build([[5, 6], [5, 6], [0, 7]], num_items=8)  # p1 -> p2 bought together
    ranker = make_ranker(personalizer, neighbours=neighbours)

    async def scenario() -> tuple[RankResult, RankResult]:
        await personalizer.record(ItemSpace.of(ranker.release), purchases("u1", ["p1"]))
        warm = await ranked(ranker, query="", user_id="u1", top_k=3, exclude_purchased=True)
        cold = await ranked(ranker, query="", user_id="new", top_k=3)
        return warm, cold

    warm, cold = asyncio.run(scenario())
    assert warm.personalization is Personalization.APPLIED
    assert ids(warm)[0] == "p2" and "p1" not in ids(warm)
    personal = next(c for c in warm.items[0].breakdown if c.name == "personal")
    assert personal.weight == pytest.approx(1.0 + blending.DEFAULT_POLICY["personal"].weight)  # the ranker's moved
    assert cold.personalization is Personalization.COLD_START
    assert ids(cold) == ["p1", "p2", "d1"]  # most interactions in the neighbours' data, ties by row


def test_cold_start_keeps_the_interaction_counts_when_an_upsert_brings_a_popularity_column() -> None:
    neighbours = ItemNeighbours.build([[5, 6], [5, 6], [0, 7]], num_items=8)
    ranker = make_ranker(None, neighbours=neighbours)
    assert "popularity" not in ranker.release.catalog.signals
    dim = ranker.release.manifest.embedding_dim
    new = CatalogItem(item_id="n1", title="Werner folding step ladder", popularity=0.0)
    snapshot, _ = CatalogSnapshot.of(ranker.release).apply([(new, np.ones(dim, np.float32) / np.sqrt(dim))])
    updated = ranker.with_release(snapshot.release)
    assert "popularity" in updated.release.catalog.signals  # NaN for every release item

    cold = asyncio.run(ranked(updated, query="", user_id="new", top_k=5))
    # Still the interaction counts; the new item's popularity only orders it among the items without any.
    assert ids(cold) == ["p1", "p2", "d1", "h1", "n1"]


def test_components_and_scores() -> None:
    release = tiny_release()
    items = ItemSpace.of(release)
    neighbours = ItemNeighbours.build([[0, 1], [0, 1], [0, 2]], num_items=8)
    profile = apply_events(None, purchases("u", ["d1"]), items, ProfileConfig())
    rows = np.arange(8)
    parts = components(profile, rows, items, neighbours, PersonalWeights())
    assert parts["centroid"][0] == pytest.approx(1.0, abs=1e-5)
    assert parts["neighbours"][1] == pytest.approx(2 / 3) and parts["neighbours"][2] == pytest.approx(1 / 3)
    assert parts["brand"][0] == parts["brand"][3] == pytest.approx(1.0) and parts["brand"][5] == 0.0  # DEWALT
    assert parts["category"][:4].tolist() == [1.0, 1.0, 1.0, 1.0] and parts["category"][4] == 0.0
    assert parts["popularity"][0] == pytest.approx(1.0) and parts["popularity"][7] == 0.0
    weights = PersonalWeights(centroid=0.0, recent=0.0, neighbours=1.0, brand=0.0, popularity=0.0)
    assert personal_scores(profile, rows, items, neighbours, weights) == pytest.approx(parts["neighbours"])


def test_neighbours_build_save_and_load(tmp_path: Path) -> None:
    built = ItemNeighbours.build([[0, 1, 2], [0, 1], [3]], num_items=4, window=1, top_k=1)
    # Pairs within one step, both ways: 0-1 twice, 1-2 once. Row 1: P(0|1) = 2/3 kept, P(2|1) cut by top_k.
    assert built.indices[built.indptr[1] : built.indptr[2]].tolist() == [0]
    assert built.weights[built.indptr[1]] == pytest.approx(2 / 3)
    assert built.counts.tolist() == [2, 2, 1, 1]
    path = tmp_path / "n.npz"
    built.save(path, ["a", "b", "c", "d"])
    loaded = ItemNeighbours.load(path, {"b": 0, "a": 1, "x": 2}, num_rows=3)  # other rows; c, d gone
    assert loaded.indices[loaded.indptr[0] : loaded.indptr[1]].tolist() == [1]  # b -> a
    assert loaded.counts.tolist() == [2, 2, 0]
    spread = loaded.spread(np.array([0, 5]), np.array([1.0, 1.0]), 3)
    assert spread.tolist() == pytest.approx([0.0, 2 / 3, 0.0])


def test_record_goes_through_the_store_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = EmbeddedProfileStore(Path(tempfile.mkdtemp(dir=tmp_path)) / "p.sqlite3", ttl_s=60, dedup_ttl_s=60)
        personalizer = Personalizer(store=store)
        items = ItemSpace.of(tiny_release())
        events = purchases("a", ["d1", "d2"]) + purchases("b", ["p1"])
        assert await personalizer.record(items, events) == RecordCounts(3, 0)
        assert await personalizer.record(items, events) == RecordCounts(0, 3)
        assert await personalizer.forget("a") is True
        profile, state = await personalizer.lookup("a")
        assert profile is None and state is Personalization.COLD_START
        await store.close()

    asyncio.run(scenario())


def test_interactions_file_to_neighbours(tmp_path: Path) -> None:
    from offline.interactions import InteractionsError, build_neighbours, read_sequences

    path = tmp_path / "interactions.csv"
    path.write_text("user_id,item_id,timestamp\nu1,b,2\nu1,a,1\nu2,a,5\nu2,b,6\nu2,zz,7\nu3,c,1\n")
    sequences = read_sequences(path)
    assert sequences == [["a", "b"], ["a", "b", "zz"], ["c"]]  # by timestamp within a user
    neighbours, report = build_neighbours(sequences, {"a": 0, "b": 1, "c": 2}, 3)
    assert report["interactions"] == 6 and report["interactions_in_catalog"] == 5
    assert neighbours.indices[neighbours.indptr[0] : neighbours.indptr[1]].tolist() == [1]
    with pytest.raises(InteractionsError, match="no interaction"):
        build_neighbours([["zz"]], {"a": 0}, 1)
