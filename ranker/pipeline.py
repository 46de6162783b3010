"""Ranker.rank(): encode -> retrieve -> features -> score -> blend -> diversify, degrading per stage.

When the text encoder is unavailable the query is answered from BM25 alone; when the ranker is
unavailable, from the fusion of the retrieval lists. Either way the response says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ranker import blending, diversity, features
from ranker.domain import RankQuery, RankResult, ScoreComponent, ScoredItem
from ranker.errors import BackendError, InvalidArgument
from ranker.models import Encoder, QueryTokenizer, Scorer
from ranker.release import Release
from ranker.retrieval import Candidates

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    dense_k: int
    lexical_k: int
    max_weight: float = 10.0
    policy: Mapping[str, blending.SignalPolicy] = field(default_factory=lambda: blending.DEFAULT_POLICY)


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
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
    ) -> None:
        self.release = release
        self.encoder = encoder
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.settings = settings
        manifest = release.manifest
        self.model_versions = {
            manifest.encoder.name: manifest.encoder.version,
            manifest.ranker.name: manifest.ranker.version,
        }

    async def rank(self, query: RankQuery, *, timeout: float | None = None) -> RankResult:
        """Rank for one validated query; `timeout` bounds each model call (seconds)."""
        watch = _Stopwatch()
        degraded: list[str] = []
        policy = blending.apply_overrides(self.settings.policy, query.weights, max_weight=self.settings.max_weight)
        catalog = self.release.catalog
        query_tokens = self.release.analyzer.analyze(query.query)

        with watch.stage("encode"):
            embedding = await self._encode(query.query, timeout, degraded)
        with watch.stage("retrieve"):
            candidates = self._candidates(query, query_tokens, embedding)
        with watch.stage("features"):
            rows = features.assemble(
                query_tokens, [catalog.tokens[r] for r in candidates.rows], candidates.dense, candidates.bm25
            )
        with watch.stage("score"):
            scores = await self._score(rows, embedding is not None, timeout, degraded)
        with watch.stage("blend"):
            signals = {"dense": candidates.dense, "lexical": candidates.bm25, "retrieval": candidates.fused()}
            if scores is None:
                policy = blending.without_ranker(policy)
            else:
                signals["ranker"] = scores
            blend = blending.blend(signals, policy)
        with watch.stage("diversify"):
            items = self._select(query, candidates, blend)

        return RankResult(
            request_id=query.request_id,
            items=items,
            release_id=self.release.manifest.release_id,
            model_versions=self.model_versions,
            timings_ms=tuple(watch.timings),
            candidates=len(candidates.rows),
            degraded=bool(degraded),
            degraded_reason="; ".join(degraded),
        )

    async def _encode(self, text: str, timeout: float | None, degraded: list[str]) -> np.ndarray | None:
        if not text.strip():
            return None
        ids, mask = self.tokenizer([text])
        try:
            embedding = await self.encoder.encode(ids, mask, timeout=timeout)
        except BackendError as e:
            log.warning("encoder unavailable, answering from BM25: %s", e)
            degraded.append(f"text_encoder unavailable ({type(e).__name__}): lexical retrieval only")
            return None
        return np.asarray(embedding[0], dtype=np.float32)

    def _candidates(self, query: RankQuery, tokens: list[str], embedding: np.ndarray | None) -> Candidates:
        catalog = self.release.catalog
        allowed = catalog.mask(categories=query.categories, min_price=query.min_price, max_price=query.max_price)
        retriever = self.release.retriever
        if query.candidate_ids:
            rows = np.array([catalog.row_of[item_id] for item_id in query.candidate_ids], dtype=np.int64)
            if allowed is not None:
                rows = rows[allowed[rows]]
            return retriever.signals(rows, embedding, retriever.lexical.scores(tokens))
        return retriever.retrieve(
            tokens, embedding, dense_k=self.settings.dense_k, lexical_k=self.settings.lexical_k, allowed=allowed
        )

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
            degraded.append(f"ranker unavailable ({type(e).__name__}): retrieval order")
            return None
        return np.asarray(scores, dtype=np.float64).reshape(-1)

    def _select(self, query: RankQuery, candidates: Candidates, blend: blending.Blend) -> tuple[ScoredItem, ...]:
        catalog = self.release.catalog
        ids = [catalog.item_ids[r] for r in candidates.rows]
        # Best first, ties by item id: the order every selector starts from.
        order = np.array(sorted(range(len(ids)), key=lambda i: (-blend.final[i], ids[i])), dtype=np.int64)
        rows = candidates.rows[order]
        chosen = diversity.select(
            blend.final[order],
            np.asarray(self.release.retriever.dense.embeddings[rows]),
            query.diversity,
            query.top_k,
            [catalog.categories[r] for r in rows],
            [catalog.brands[r] for r in rows],
        )
        picked = order[chosen]
        final = diversity.monotone_scores(blend.final[picked])
        contributions = blend.contributions
        items = []
        for position, i in enumerate(picked):
            parts = [
                ScoreComponent(
                    name=name,
                    raw=float(blend.raw[s, i]),
                    normalized=float(blend.normalized[s, i]),
                    weight=float(blend.weights[s]),
                    contribution=float(contributions[s, i]),
                )
                for s, name in enumerate(blend.names)
            ]
            adjustment = float(final[position] - blend.final[i])
            parts.append(ScoreComponent(name="diversity", raw=0.0, normalized=0.0, weight=1.0, contribution=adjustment))
            items.append(
                ScoredItem(
                    item_id=ids[i],
                    row=int(candidates.rows[i]),
                    score=float(final[position]),
                    breakdown=tuple(parts),
                )
            )
        return tuple(items)


def check_candidate_ids(candidate_ids: tuple[str, ...], row_of: Mapping[str, int], limit: int) -> None:
    """Every caller-given id must be known and appear once."""
    if len(candidate_ids) > limit:
        raise InvalidArgument("candidate_ids", f"at most {limit} ids, got {len(candidate_ids)}")
    seen: set[str] = set()
    for i, item_id in enumerate(candidate_ids):
        if item_id not in row_of:
            raise InvalidArgument(f"candidate_ids[{i}]", f"unknown item id {item_id[:64]!r}")
        if item_id in seen:
            raise InvalidArgument(f"candidate_ids[{i}]", f"duplicate item id {item_id[:64]!r}")
        seen.add(item_id)
