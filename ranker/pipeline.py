"""Ranker.rank(): encode -> retrieve -> features -> score -> blend -> diversify, degrading per stage.

When the text encoder is unavailable the query is answered from BM25 alone; when a vector engine
(RANKER_DENSE_BACKEND=qdrant) is, from BM25's candidates; when the ranker is unavailable, from the
fusion of the retrieval lists. Each time the response says so.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ranker import blending, diversity, features, rules, tracing
from ranker.domain import DiversitySpec, Personalization, RankQuery, RankResult, Rule, ScoreComponent, ScoredItem
from ranker.errors import BackendError, BackendFailed, BackendTimeout, CircuitOpen, InvalidArgument
from ranker.models import Encoder, QueryTokenizer, Scorer
from ranker.personal import (
    Personalizer,
    personal_scores,
    popular_candidates,
    profile_candidates,
    profile_direction,
)
from ranker.profiles import ItemSpace, Profile
from ranker.release import Catalog, Manifest, Release
from ranker.retrieval import Candidates, LexicalHits, union_rows

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 400  # candidates per retriever the ranker trained on, for a manifest that does not record it
# Candidates per retriever when the settings name none (at most the trained depth; never fewer than the
# request's top_k). On the Home Depot dev split, 100 + 100 at efSearch 128 scores NDCG@10 0.4267 against
# 0.4268 for 200 + 200 at 256 and 0.4269 for the 400 + 400 the ranker trains on (Recall@100 0.805, 0.812,
# 0.814), and serves c=1 p50 14% faster (docs/performance.md, `offline.evaluate --dense-k`).
SERVING_DEPTH = 100


@dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    dense_k: int
    lexical_k: int

    def depth(self, top_k: int) -> tuple[int, int]:
        """(dense, lexical) candidates for a request: the settings', and at least top_k each, so that a long
        page is filled."""
        return max(self.dense_k, top_k), max(self.lexical_k, top_k)

    @classmethod
    def for_release(
        cls, manifest: Manifest, *, dense_k: int | None = None, lexical_k: int | None = None
    ) -> PipelineSettings:
        """SERVING_DEPTH candidates per retriever (less when the ranker trained on fewer), unless overridden."""
        return cls(
            dense_k=dense_k or min(SERVING_DEPTH, int(manifest.ranker.extra.get("dense_k", DEFAULT_DEPTH))),
            lexical_k=lexical_k or min(SERVING_DEPTH, int(manifest.ranker.extra.get("lexical_k", DEFAULT_DEPTH))),
        )


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with tracing.span(name):
                yield
        finally:
            self.timings.append((name, (time.perf_counter() - start) * 1000.0))


class Ranker:
    """One release's ranking pipeline over an encoder and a scorer (Triton, or in-process ONNX)."""

    def __init__(
        self,
        release: Release,
        *,
        encoder: Encoder,
        scorer: Scorer,
        tokenizer: QueryTokenizer,
        settings: PipelineSettings,
        personalizer: Personalizer | None = None,
    ) -> None:
        self.release = release
        self.encoder = encoder
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.settings = settings
        self.personalizer = personalizer  # user profiles (RecordEvents, the "personal" signal); None: off
        manifest = release.manifest
        self.model_versions = {
            manifest.encoder.name: manifest.encoder.version,
            manifest.ranker.name: manifest.ranker.version,
        }

    def with_release(self, release: Release) -> Ranker:
        """This pipeline over another version of the same release (online catalog updates swap these in);
        the ranker in use is never changed, so a Rank in flight keeps the catalog it started with."""
        clone = copy.copy(self)
        clone.release = release
        return clone

    async def rank(self, query: RankQuery, *, timeout: float | None = None) -> RankResult:
        """Rank for one validated query within `timeout` seconds (the caller's deadline): each model call
        gets what is left of it, less a reserve for the stages that follow, so a slow Triton makes the
        answer degraded rather than late."""
        deadline = None if timeout is None else time.monotonic() + timeout
        watch = _Stopwatch()
        degraded: list[str] = []
        release_policy = self.release.policy
        policy = blending.apply_overrides(release_policy.signals, query.weights, max_weight=release_policy.max_weight)
        business_rules = (*release_policy.rules, *query.rules)
        catalog = self.release.catalog
        query_tokens = self.release.analyzer.analyze(query.query)
        profile, personalization = None, Personalization.NONE
        # The query is encoded on Triton while this process does what needs no embedding (the profile
        # lookup, filters, pins, BM25): the encoder's round trip hides that work.
        encoding = asyncio.ensure_future(self._encode(query.query, _left(deadline, timeout), degraded))
        try:
            await asyncio.sleep(0)  # the encoder request leaves before the CPU work below
            if query.user_id is not None:
                with watch.stage("profile"):
                    profile, personalization = await self._profile(query.user_id, _left(deadline, timeout))
                if query.exclude_purchased and personalization is Personalization.UNAVAILABLE:
                    # A missing "personal" signal leaves the ranking whole; a purchase shown that the caller
                    # asked to hide does not.
                    degraded.append("profile unavailable: exclude_purchased not applied")
            with watch.stage("lexical"):
                allowed = catalog.mask(
                    categories=query.categories,
                    min_price=query.min_price,
                    max_price=query.max_price,
                    in_stock_only=query.in_stock_only,
                    excluded=self._excluded(query, business_rules, profile),
                )
                pinned = rules.pins(catalog, business_rules, _given(query, catalog, allowed))
                pins = [row for _, row in pinned]
                lexical = self._lexical(query, query_tokens, allowed)
            with watch.stage("encode"):
                embedding = await encoding
        finally:
            if not encoding.done():
                encoding.cancel()  # an error above: no encoder call is left running
            elif not encoding.cancelled():
                encoding.exception()  # marks a failed encode as seen, so asyncio does not log it as lost
        personal = profile if personalization is Personalization.APPLIED else None
        with watch.stage("retrieve"):
            dense = await self._dense(query, embedding, allowed, _left(deadline, timeout), degraded, personal)
            candidates = self._candidates(query, query_tokens, embedding, allowed, pins, personal, lexical, dense)
        with watch.stage("features"):
            if embedding is None:  # the ranker will not run (see _score): no features to compute
                rows = np.zeros((len(candidates.rows), len(features.FEATURE_NAMES)), dtype=np.float32)
            else:
                rows = features.assemble(
                    query.query, query_tokens, catalog.text, candidates.rows, candidates.dense, candidates.bm25
                )
        with watch.stage("score"):
            scores = await self._score(rows, embedding is not None, _left(deadline, timeout), degraded)
        signals = {"dense": candidates.dense, "lexical": candidates.bm25, "retrieval": candidates.fused()}
        if personal is not None and self.personalizer is not None:
            with watch.stage("personal"):
                items_space = ItemSpace.of(self.release)
                weights = self.personalizer.weights
                neighbours = self.release.neighbours
                signals["personal"] = personal_scores(personal, candidates.rows, items_space, neighbours, weights)
        else:
            policy = blending.without_personal(policy)
        with watch.stage("blend"):
            signals.update({name: values[candidates.rows] for name, values in catalog.signals.items()})
            if scores is None:
                # With no query (recommendations) the profile stands in for the ranker.
                to = "personal" if personal is not None and not query.query.strip() else "retrieval"
                policy = blending.without_ranker(policy, to=to)
            else:
                signals["ranker"] = scores
            blend = blending.blend(signals, policy)
            adjust = rules.adjustments(catalog, business_rules, candidates.rows)
        with watch.stage("diversify"):
            diversity_spec = query.diversity or release_policy.diversity
            items = self._select(query.top_k, diversity_spec, candidates, blend, adjust, pinned)

        return RankResult(
            request_id=query.request_id,
            items=items,
            release_id=self.release.manifest.release_id,
            model_versions=self.model_versions,
            timings_ms=tuple(watch.timings),
            candidates=len(candidates.rows),
            degraded=bool(degraded),
            degraded_reason="; ".join(degraded),
            personalization=personalization,
        )

    async def _profile(self, user_id: str, left: float | None) -> tuple[Profile | None, Personalization]:
        if self.personalizer is None:
            return None, Personalization.UNAVAILABLE
        profile, personalization = await self.personalizer.lookup(user_id, timeout=left)
        if profile is not None:
            profile = self.personalizer.align(profile, ItemSpace.of(self.release))
        return profile, personalization

    def _excluded(
        self, query: RankQuery, business_rules: tuple[Rule, ...], profile: Profile | None
    ) -> np.ndarray | None:
        """Rows excluded by rules, and with exclude_purchased the profile's purchases."""
        catalog = self.release.catalog
        excluded = rules.excluded(catalog, business_rules)
        if not (query.exclude_purchased and profile is not None and profile.purchased):
            return excluded
        bought = np.zeros(len(catalog), dtype=bool)
        bought[catalog.rows_of(profile.purchased)] = True
        return bought if excluded is None else excluded | bought

    def _recommendations(
        self,
        top_k: int,
        allowed: np.ndarray | None,
        include: np.ndarray,
        profile: Profile | None,
        near: np.ndarray | None,
    ) -> Candidates:
        """Candidates without a query: from the profile (`near`: a vector engine's rows, searched already), or
        (cold start) the most popular items."""
        depth = self.settings.depth(top_k)[0]
        if profile is not None and self.personalizer is not None:
            return profile_candidates(
                profile,
                ItemSpace.of(self.release),
                self.release.retriever.dense,
                self.release.neighbours,
                self.personalizer.weights,
                k=depth,
                allowed=allowed,
                include=include,
                near=near,
            )
        catalog = self.release.catalog
        column = catalog.signals.get("popularity")
        counts = None
        if self.release.neighbours is not None:
            counts = np.zeros(len(catalog))
            known = min(len(catalog), len(self.release.neighbours.counts))
            counts[:known] = self.release.neighbours.counts[:known]
        # The catalog's popularity when most items have one; else the interaction counts. An online upsert
        # that brings the column to a release without it leaves it NaN for every other item, and must not
        # turn the counts into a tie-break behind a handful of new items.
        if column is not None and (counts is None or np.mean(np.isfinite(column)) >= 0.5):
            return popular_candidates(column, depth, allowed, include, tiebreak=counts)
        return popular_candidates(
            np.zeros(len(catalog)) if counts is None else counts, depth, allowed, include, tiebreak=column
        )

    async def _encode(self, text: str, timeout: float | None, degraded: list[str]) -> np.ndarray | None:
        if not text.strip():
            return None
        ids, mask = self.tokenizer([text])
        try:
            embedding = await self.encoder.encode(ids, mask, timeout=timeout)
        except BackendError as e:
            log.warning("encoder unavailable, answering from BM25: %s", e)
            degraded.append(f"text_encoder {_failure(e)} ({type(e).__name__}): lexical retrieval only")
            return None
        return np.asarray(embedding[0], dtype=np.float32)

    def _candidates(
        self,
        query: RankQuery,
        tokens: list[str],
        embedding: np.ndarray | None,
        allowed: np.ndarray | None,
        include: list[int],
        profile: Profile | None = None,
        lexical: LexicalHits | None = None,
        dense: np.ndarray | None = None,
    ) -> Candidates:
        catalog = self.release.catalog
        retriever = self.release.retriever
        if not query.candidate_ids and not query.query.strip():
            return self._recommendations(query.top_k, allowed, np.array(include, dtype=np.int64), profile, dense)
        if query.candidate_ids:
            rows = catalog.rows_of(query.candidate_ids)  # a tombstone has no row; a dead row is masked
            if allowed is not None:
                rows = rows[allowed[rows]]
            rows = union_rows(rows, np.array(include, dtype=np.int64))
            return retriever.signals(rows, embedding, retriever.lexical.scores(tokens))
        dense_k, lexical_k = self.settings.depth(query.top_k)
        return retriever.retrieve(
            tokens,
            embedding,
            dense_k=dense_k,
            lexical_k=lexical_k,
            allowed=allowed,
            include=np.array(include, dtype=np.int64),
            lexical=lexical,
            dense_ranked=dense,
        )

    async def _dense(
        self,
        query: RankQuery,
        embedding: np.ndarray | None,
        allowed: np.ndarray | None,
        timeout: float | None,
        degraded: list[str],
        profile: Profile | None = None,
    ) -> np.ndarray | None:
        """A vector engine's rows, asked on a worker thread within `timeout`: near the query's embedding for a
        search, near the profile's centroid for recommendations. When the engine fails, none, so the candidates
        are BM25's (or the behavioural neighbours') alone, their dense features still from the release's
        embeddings, and the answer says so. None otherwise: the candidate stage searches an in-process index
        itself."""
        dense, k = self.release.retriever.dense, self.settings.depth(query.top_k)[0]
        if not dense.remote or query.candidate_ids:
            return None
        if query.query.strip():
            vector, fallback = embedding, "lexical candidates only"
        elif profile is not None:
            vector, fallback = profile_direction(profile, ItemSpace.of(self.release)), "behavioural candidates only"
        else:
            return None
        if vector is None:
            return None
        try:
            try:
                return await asyncio.wait_for(asyncio.to_thread(dense.search, vector, k, allowed), timeout)
            except TimeoutError as e:
                raise BackendTimeout("vector_engine", f"no answer within {timeout:.3f} s") from e
        except BackendError as e:
            log.warning("vector engine unavailable, answering without its candidates: %s", e)
            degraded.append(f"vector_engine {_failure(e)} ({type(e).__name__}): {fallback}")
            return np.zeros(0, dtype=np.int64)

    def _lexical(self, query: RankQuery, tokens: list[str], allowed: np.ndarray | None) -> LexicalHits | None:
        """BM25 hits for a search (text and no candidate_ids); None for the other kinds of request."""
        if query.candidate_ids or not query.query.strip():
            return None
        return self.release.retriever.lexical_hits(tokens, self.settings.depth(query.top_k)[1], allowed)

    async def _score(
        self, rows: np.ndarray, have_embedding: bool, timeout: float | None, degraded: list[str]
    ) -> np.ndarray | None:
        if len(rows) == 0:
            return np.zeros(0, dtype=np.float32)
        if not have_embedding:
            # The ranker was trained with dense features; zeros would be out of distribution.
            return None
        try:
            scores = await self.scorer.score(rows, timeout=timeout)
        except BackendError as e:
            log.warning("ranker unavailable, ordering by retrieval fusion: %s", e)
            degraded.append(f"ranker {_failure(e)} ({type(e).__name__}): retrieval order")
            return None
        return np.asarray(scores, dtype=np.float64).reshape(-1)

    def _select(
        self,
        top_k: int,
        spec: DiversitySpec,
        candidates: Candidates,
        blend: blending.Blend,
        adjust: np.ndarray | None,
        pinned: list[tuple[int, int]],
    ) -> tuple[ScoredItem, ...]:
        catalog = self.release.catalog
        base = blend.final if adjust is None else blend.final + adjust
        pinned_entries = []
        if pinned:
            position_of_row = {int(r): i for i, r in enumerate(candidates.rows)}
            # A pin past top_k is not shown, so it takes no place from the selected items either.
            pinned_entries = [(position, position_of_row[row]) for position, row in pinned if position <= top_k]
        # Unpinned candidates best first, ties by item id: the order every selector starts from.
        order = _best_first(base, candidates.rows, catalog.item_ids, [i for _, i in pinned_entries])
        rows = candidates.rows[order]
        needs = diversity.needs(spec)
        pinned_rows = [int(candidates.rows[i]) for _, i in pinned_entries]
        placed = diversity.Placed(
            positions=frozenset(position for position, _ in pinned_entries),
            categories=[catalog.categories[r] for r in pinned_rows] if needs.categories else (),
            brands=[catalog.brands[r] for r in pinned_rows] if needs.brands else (),
        )
        chosen = diversity.select(
            base[order],
            np.asarray(self.release.retriever.dense.embeddings[rows]) if needs.embeddings else None,
            spec,
            top_k - len(pinned_entries),
            [catalog.categories[r] for r in rows] if needs.categories else None,
            [catalog.brands[r] for r in rows] if needs.brands else None,
            placed,
        )
        ranked = [int(order[c]) for c in chosen]
        ids_of = [catalog.item_ids[r] for r in candidates.rows[ranked]]
        diversified = diversity.monotone_scores(base[ranked], ids_of) if ranked else np.zeros(0)
        shown_before_pins = dict(zip(ranked, diversified, strict=True))
        sequence, pinned_shown = rules.place(ranked, pinned_entries, top_k)
        is_pin = [i in pinned_shown for i in sequence]
        final = rules.pin_scores(np.array([shown_before_pins.get(i, base[i]) for i in sequence]), is_pin)
        if pinned_shown:  # a pin set to its neighbour's score: ties by id again
            final = diversity.monotone_scores(final, [catalog.item_ids[r] for r in candidates.rows[sequence]])
        return tuple(
            self._explain(
                catalog.item_ids[candidates.rows[i]],
                int(candidates.rows[i]),
                i,
                float(score),
                blend,
                adjust,
                shown_before_pins,
                pin,
            )
            for i, score, pin in zip(sequence, final, is_pin, strict=True)
        )

    @staticmethod
    def _explain(
        item_id: str,
        row: int,
        i: int,
        score: float,
        blend: blending.Blend,
        adjust: np.ndarray | None,
        shown_before_pins: dict[int, float],
        is_pin: bool,
    ) -> ScoredItem:
        """The item's breakdown: signals, rules, then the diversity or pin adjustment; sums to score."""
        normalized = blend.normalized[:, i]
        parts = [
            ScoreComponent(name=name, raw=raw, normalized=value, weight=weight, contribution=contribution)
            for name, raw, value, weight, contribution in zip(
                blend.names,
                blend.raw[:, i].tolist(),
                normalized.tolist(),
                blend.weights.tolist(),
                (normalized * blend.weights).tolist(),  # this item's column of blend.contributions
                strict=True,
            )
        ]
        so_far = float(blend.final[i])
        if adjust is not None:
            parts.append(_adjustment("rules", float(adjust[i])))
            so_far += float(adjust[i])
        if is_pin:
            parts.append(_adjustment("pin", score - so_far))
        else:
            parts.append(_adjustment("diversity", score - so_far))
        return ScoredItem(item_id=item_id, row=row, score=score, breakdown=tuple(parts))


RESERVE_FRACTION = 0.2  # of the request's budget, kept for the CPU stages after a model call
MIN_CALL_S = 0.001


def _failure(error: BackendError) -> str:
    """How a model call failed, in the words ranker.observability.degraded_reason_codes reads."""
    if isinstance(error, CircuitOpen):
        return "unavailable, circuit open"
    if isinstance(error, BackendTimeout):
        return "timeout"
    if isinstance(error, BackendFailed):
        return "failed"
    return "unavailable"


def _left(deadline: float | None, budget: float | None) -> float | None:
    """Seconds a model call may take now: the time to the deadline less the reserve, at least 1 ms."""
    if deadline is None or budget is None:
        return None
    return max(MIN_CALL_S, deadline - time.monotonic() - RESERVE_FRACTION * budget)


def _given(query: RankQuery, catalog: Catalog, allowed: np.ndarray | None) -> np.ndarray | None:
    """Where pins may come from: `allowed`, and for a rerank only the caller's items (rerank exactly these)."""
    if not query.candidate_ids:
        return allowed
    given = np.zeros(len(catalog), dtype=bool)
    given[catalog.rows_of(query.candidate_ids)] = True
    return given if allowed is None else given & allowed


def _best_first(scores: np.ndarray, rows: np.ndarray, item_ids: Sequence[str], skip: Sequence[int]) -> np.ndarray:
    """Positions of the candidates by score, best first, ties by item id, without the `skip` positions."""
    order = np.argsort(-scores, kind="stable")
    if skip:
        order = order[~np.isin(order, skip)]
    ordered = scores[order]
    if np.any(ordered[1:] == ordered[:-1]):  # tied scores (retrieval-only orders tie often): by item id
        return np.array(sorted(order.tolist(), key=lambda i: (-scores[i], item_ids[int(rows[i])])), dtype=np.int64)
    return order


def _adjustment(name: str, amount: float) -> ScoreComponent:
    return ScoreComponent(name=name, raw=amount, normalized=amount, weight=1.0, contribution=amount)


def check_candidate_ids(candidate_ids: tuple[str, ...], known: Container[str], limit: int) -> None:
    """Every caller-given id must be known (Catalog.known_ids: deleted ids are) and appear once."""
    if len(candidate_ids) > limit:
        raise InvalidArgument("candidate_ids", f"at most {limit} ids, got {len(candidate_ids)}")
    seen: set[str] = set()
    for i, item_id in enumerate(candidate_ids):
        if item_id not in known:
            raise InvalidArgument(f"candidate_ids[{i}]", f"unknown item id {item_id[:64]!r}")
        if item_id in seen:
            raise InvalidArgument(f"candidate_ids[{i}]", f"duplicate item id {item_id[:64]!r}")
        seen.add(item_id)
