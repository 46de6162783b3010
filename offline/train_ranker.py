"""Train the learned ranker on hybrid-retrieval candidate lists (listwise, small MLP) and export it to ONNX.

Training data is built exactly the way the service ranks: each judged query is encoded with the
exported ONNX encoder, HybridRetriever.retrieve() takes the top DENSE_K dense and LEXICAL_K BM25
hits, and ranker.features.assemble() computes the feature rows. A candidate's label is its gain
(relevance − 1); unjudged candidates get 0, as the evaluation counts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from offline import metrics
from offline.encoder import embed_queries
from ranker.features import FEATURE_NAMES, NUM_FEATURES, TitleIndex, assemble
from ranker.models import RANKER_INPUT, RANKER_OUTPUT, OnnxEncoder, OnnxScorer
from ranker.retrieval import Analyzer, HybridRetriever

# The service's candidate depths: train on the lists it will actually rank.
DENSE_K = 400
LEXICAL_K = 400

HIDDEN = (64, 32)
EPOCHS = 8
LISTS_PER_BATCH = 32
LEARNING_RATE = 3e-3
PARITY_TOLERANCE = 1e-4
# The fallback when there are no judgments: cosine and BM25-relative-to-best, equally weighted.
FALLBACK_WEIGHTS = {"dense_cosine": 0.5, "bm25_ratio_to_best": 0.5}


@dataclass(frozen=True, kw_only=True)
class CandidateList:
    """One query's candidates: feature rows, labels, and what the metrics need."""

    query: str
    item_ids: list[str]
    features: np.ndarray  # float32 [n, NUM_FEATURES]
    labels: np.ndarray  # float32 [n], relevance − 1, 0 for unjudged
    dense: np.ndarray  # cosine per candidate (for the baselines)
    bm25: np.ndarray
    fused: np.ndarray  # reciprocal-rank fusion, the service's no-ranker order


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """What retrieval needs about the catalog, row-aligned with the indexes."""

    item_ids: Sequence[str]
    retriever: HybridRetriever
    text: TitleIndex  # the titles' TitleIndex, for the match features


def build_lists(
    judged: Mapping[str, Mapping[str, float]],
    corpus: Corpus,
    encoder: OnnxEncoder,
    tokenizer_file: Path,
    *,
    desc: str,
) -> list[CandidateList]:
    """One CandidateList per query, in the order of `judged`."""
    queries = list(judged)
    if not queries:
        return []
    embeddings = embed_queries(encoder, tokenizer_file, queries)
    analyzer = Analyzer()
    lists = []
    for query, embedding in tqdm(
        zip(queries, embeddings, strict=True), total=len(queries), desc=desc, unit="query", mininterval=2.0
    ):
        tokens = analyzer.analyze(query)
        cand = corpus.retriever.retrieve(tokens, embedding, dense_k=DENSE_K, lexical_k=LEXICAL_K)
        ids = [corpus.item_ids[r] for r in cand.rows]
        features = assemble(query, tokens, corpus.text, cand.rows, cand.dense, cand.bm25)
        labels = np.array([max(judged[query].get(i, 1.0) - 1.0, 0.0) for i in ids], dtype=np.float32)
        lists.append(
            CandidateList(
                query=query,
                item_ids=ids,
                features=features,
                labels=labels,
                dense=cand.dense,
                bm25=cand.bm25,
                fused=cand.fused(),
            )
        )
    return lists


class MlpRanker(torch.nn.Module):
    """Standardise with the training statistics (baked in, so serving sends raw features), then an MLP."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: Sequence[int] = HIDDEN) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        # A constant feature must not divide by zero; it then carries no signal anyway.
        self.register_buffer("std", torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))
        layers: list[torch.nn.Module] = []
        width = NUM_FEATURES
        for size in hidden:
            layers += [torch.nn.Linear(width, size), torch.nn.ReLU()]
            width = size
        layers.append(torch.nn.Linear(width, 1))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)


class LinearRanker(torch.nn.Module):
    """A fixed weighted sum of features: the ranker written when there is nothing to train on."""

    weights: torch.Tensor

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__()
        w = torch.zeros(NUM_FEATURES, 1)
        for name, value in weights.items():
            w[FEATURE_NAMES.index(name), 0] = value
        self.register_buffer("weights", w)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weights


def _pad(lists: Sequence[CandidateList]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features [b, n, F], labels [b, n] and a validity mask [b, n], padded to the longest list."""
    n = max(len(c.labels) for c in lists)
    feats = np.zeros((len(lists), n, NUM_FEATURES), dtype=np.float32)
    labels = np.zeros((len(lists), n), dtype=np.float32)
    mask = np.zeros((len(lists), n), dtype=bool)
    for i, c in enumerate(lists):
        k = len(c.labels)
        feats[i, :k], labels[i, :k], mask[i, :k] = c.features, c.labels, True
    return torch.from_numpy(feats), torch.from_numpy(labels), torch.from_numpy(mask)


def listnet_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the gain-proportional target distribution and softmax(scores), per list."""
    target = labels / labels.sum(dim=1, keepdim=True).clamp(min=1e-9)
    log_p = torch.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
    return -(target * log_p.masked_fill(~mask, 0.0)).sum(dim=1).mean()


def order_by(scores: np.ndarray, item_ids: Sequence[str]) -> list[str]:
    """Item ids by descending score, ties by item id (the service's deterministic order)."""
    order = np.lexsort((np.asarray(item_ids, dtype=object), -np.asarray(scores, dtype=np.float64)))
    return [item_ids[i] for i in order]


def _score_lists(model: torch.nn.Module, lists: Sequence[CandidateList]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.from_numpy(c.features)).reshape(-1).numpy() for c in lists]


def evaluate_lists(
    lists: Sequence[CandidateList], scores: Sequence[np.ndarray], judged: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    runs = {c.query: order_by(s, c.item_ids) for c, s in zip(lists, scores, strict=True)}
    return metrics.evaluate(runs, {c.query: judged[c.query] for c in lists})


def baselines(lists: Sequence[CandidateList], judged: Mapping[str, Mapping[str, float]]) -> dict[str, dict]:
    """The same metrics for single-signal orders, so the ranker's number has a reference."""
    return {
        "bm25": evaluate_lists(lists, [c.bm25 for c in lists], judged),
        "dense": evaluate_lists(lists, [c.dense for c in lists], judged),
        "rrf": evaluate_lists(lists, [c.fused for c in lists], judged),
    }


@dataclass(kw_only=True)
class TrainResult:
    model: torch.nn.Module
    kind: str
    diagnostics: dict = field(default_factory=dict)


def train(
    train_lists: Sequence[CandidateList],
    dev_lists: Sequence[CandidateList],
    judged: Mapping[str, Mapping[str, float]],
    *,
    seed: int,
    epochs: int = EPOCHS,
) -> TrainResult:
    """ListNet over the training lists that have a positive label; dev metrics after each epoch."""
    torch.manual_seed(seed)
    usable = [c for c in train_lists if c.labels.max(initial=0.0) > 0]
    if not usable:
        raise ValueError("no training query has a judged relevant item among its candidates")
    stacked = np.concatenate([c.features for c in usable])
    model = MlpRanker(stacked.mean(axis=0), stacked.std(axis=0))
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    rng = np.random.default_rng(seed)
    curve = []
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(usable))
        losses = []
        batches = range(0, len(order), LISTS_PER_BATCH)
        for start in tqdm(batches, desc=f"train epoch {epoch + 1}/{epochs}", unit="batch", mininterval=2.0):
            feats, labels, mask = _pad([usable[i] for i in order[start : start + LISTS_PER_BATCH]])
            loss = listnet_loss(model(feats).squeeze(-1), labels, mask)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        model.eval()
        dev = evaluate_lists(dev_lists, _score_lists(model, dev_lists), judged) if dev_lists else {}
        dev_metrics = {f"dev_{k}": v for k, v in dev.items()}
        curve.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **dev_metrics})
        print(f"  epoch {epoch + 1}: loss {curve[-1]['train_loss']:.4f} dev {dev}", flush=True)
    diagnostics = {
        "train_lists": len(usable),
        "train_lists_without_positive": len(train_lists) - len(usable),
        "train_rows": len(stacked),
        "dev_lists": len(dev_lists),
        "epochs": curve,
        "dev": curve[-1] if dev_lists else {},
        "dev_baselines": baselines(dev_lists, judged) if dev_lists else {},
        "dev_candidate_recall": _candidate_recall(dev_lists, judged),
    }
    return TrainResult(model=model, kind="mlp-listnet", diagnostics=diagnostics)


def _candidate_recall(lists: Sequence[CandidateList], judged: Mapping[str, Mapping[str, float]]) -> float:
    """Share of relevant judged items that retrieval puts among the candidates at all."""
    found = total = 0
    for c in lists:
        relevant = {i for i, r in judged[c.query].items() if r >= metrics.RELEVANT}
        found += len(relevant.intersection(c.item_ids))
        total += len(relevant)
    return found / total if total else 0.0


def fallback() -> TrainResult:
    return TrainResult(
        model=LinearRanker(FALLBACK_WEIGHTS),
        kind="fallback-linear",
        diagnostics={"fallback_weights": FALLBACK_WEIGHTS},
    )


def export_onnx(model: torch.nn.Module, dst: Path, check_rows: np.ndarray | None = None) -> float:
    """Write `features [rows, F] -> score [rows, 1]` and return the max |ONNX − torch| on check rows."""
    model.eval()
    dst.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.zeros(4, NUM_FEATURES)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (sample,),
            str(dst),
            dynamo=False,
            opset_version=17,
            input_names=[RANKER_INPUT],
            output_names=[RANKER_OUTPUT],
            dynamic_axes={RANKER_INPUT: {0: "rows"}, RANKER_OUTPUT: {0: "rows"}},
        )
    rows = check_rows if check_rows is not None and len(check_rows) else _random_rows(64)
    with torch.no_grad():
        expected = model(torch.from_numpy(rows)).reshape(-1).numpy()
    diff = float(np.abs(OnnxScorer(dst).score_sync(rows) - expected).max())
    if diff >= PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX ranker differs from torch by {diff:.2e} (limit {PARITY_TOLERANCE:.0e})")
    return diff


def _random_rows(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, NUM_FEATURES), dtype=np.float32)
