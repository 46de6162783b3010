"""Fine-tune the text encoder on a shop's judgments: graded InfoNCE with in-batch and mined hard negatives.

`python -m offline.train_encoder --catalog P --judgments J --out DIR` trains on the TRAIN split of
offline.data.split_queries only (dev queries are never read for training), then reports the dense
retriever alone on the dev split (exact search over the whole catalog, offline.metrics) before and
after. offline.export calls `finetune()` with a cache folder keyed by the data and configuration.

Objective, per training example (query q, one positive p with relevance ≥ 2, K hard negatives):
softmax cross-entropy over cosine × SCALE against every title in the batch (all positives and all
hard negatives, in-batch negatives included), with the columns that are judged relevant for q masked
out (they are not negatives), weighted by the positive's gain (relevance − 1): an "exact" pair counts
twice a "relevant" one. Hard negatives per query: judged items with relevance < 2 first (up to
`judged_negatives`), then items ranked high for q by BM25 and by the PRETRAINED encoder that are not
judged for q at all, skipping the first `mine_skip` ranks of each (likely unjudged relevant items).

Data order depends only on (seed, epoch), so a resumed run sees exactly the batches an uninterrupted
run would. The output folder holds `checkpoint.pt` (model, optimiser, scheduler, step, RNG),
`mined.json` (the hard-negative pools), `pretrained_items.npy` and, when done, `model/` (a Hugging
Face model + tokenizer that offline.encoder.load_reference(path) loads) and `result.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from offline import cli, data, metrics
from offline.encoder import MAX_QUERY_TOKENS, MAX_TITLE_TOKENS, MeanPooledEncoder, load_reference
from ranker.retrieval import Analyzer, LexicalIndex, top_rows

THREADS = 2
CHECKPOINT = "checkpoint.pt"
MINED = "mined.json"
PRETRAINED_ITEMS = "pretrained_items.npy"
MODEL_DIR = "model"
RESULT = "result.json"
EMBED_BATCH = 128
EVAL_K = 100


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that changes the trained weights (it is part of the export's cache key)."""

    seed: int = 13
    epochs: int = 3
    batch_size: int = 32
    hard_negatives: int = 3  # per example, besides the in-batch ones
    judged_negatives: int = 1  # at most this many of them are judged items with relevance < 2
    mine_depth: int = 30  # ranks taken from each miner (after the skipped ones)
    mine_skip: int = 3
    learning_rate: float = 5e-5
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    scale: float = 20.0
    max_query_tokens: int = MAX_QUERY_TOKENS
    max_title_tokens: int = 48
    freeze_word_embeddings: bool = True  # most of the parameters, and the slowest to update on a CPU
    checkpoint_every: int = 50

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class QueryPlan:
    """What training needs about one train query, all as item rows of the catalog."""

    query: str
    positives: tuple[tuple[int, float], ...]  # (row, gain), gain = relevance − 1 > 0 ... ≥ 1
    judged_negatives: tuple[int, ...]  # relevance < 2, lowest relevance first
    mined: tuple[int, ...]  # unjudged, high-ranked by BM25 / the pretrained encoder
    relevant: frozenset[int]  # every row judged relevant (≥ 2): never a negative for this query


@dataclass(frozen=True, kw_only=True)
class Example:
    query: str
    positive: int
    gain: float
    negatives: tuple[int, ...]
    relevant: frozenset[int]


@dataclass(frozen=True, kw_only=True)
class FinetuneResult:
    model_dir: Path
    complete: bool
    steps: int
    total_steps: int
    train_seconds: float
    seconds_per_step: float
    train_examples: int


# ---------------------------------------------------------------- pure parts: plans, batches, loss


def judged_train_queries(train_judgments: pl.DataFrame, item_rows: Mapping[str, int]) -> dict[str, dict[int, float]]:
    """{query: {row: relevance}} for judged items present in the catalog, queries in first-seen order."""
    judged: dict[str, dict[int, float]] = {}
    for query, item_id, relevance in train_judgments.select(["query", "item_id", "relevance"]).iter_rows():
        row = item_rows.get(item_id)
        if row is not None:
            judged.setdefault(query, {})[row] = float(relevance)
    return judged


def mine_pool(judged: Mapping[int, float], ranked: Sequence[Sequence[int]], *, depth: int, skip: int) -> list[int]:
    """Unjudged rows from each ranked list (first `skip` ranks dropped), interleaved, de-duplicated."""
    lists = [[r for r in rows[skip:] if r not in judged][:depth] for rows in ranked]
    pool: list[int] = []
    seen: set[int] = set()
    for rank in range(max((len(x) for x in lists), default=0)):
        for rows in lists:
            if rank < len(rows) and rows[rank] not in seen:
                seen.add(rows[rank])
                pool.append(rows[rank])
    return pool


def build_plans(judged: Mapping[str, Mapping[int, float]], mined: Mapping[str, Sequence[int]]) -> list[QueryPlan]:
    """One plan per query with at least one relevant item, in the order of `judged`."""
    plans = []
    for query, items in judged.items():
        positives = sorted(
            ((row, rel - 1.0) for row, rel in items.items() if rel >= metrics.RELEVANT), key=lambda x: (-x[1], x[0])
        )
        if not positives:
            continue
        negatives = sorted((row for row, rel in items.items() if rel < metrics.RELEVANT), key=lambda r: (items[r], r))
        plans.append(
            QueryPlan(
                query=query,
                positives=tuple(positives),
                judged_negatives=tuple(negatives),
                mined=tuple(r for r in mined.get(query, ()) if r not in items),
                relevant=frozenset(row for row, _ in positives),
            )
        )
    return plans


def steps_per_epoch(plans: Sequence[QueryPlan], batch_size: int) -> int:
    return math.ceil(len(plans) / batch_size)


def epoch_batches(plans: Sequence[QueryPlan], epoch: int, config: TrainConfig, num_items: int) -> list[list[Example]]:
    """The epoch's batches: every plan once, a seeded order, one positive and K hard negatives each.

    A function of (plans, seed, epoch) only, which is what makes --resume exact.
    """
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(plans))
    examples = []
    for i in order:
        plan = plans[int(i)]
        row, gain = plan.positives[int(rng.integers(len(plan.positives)))]
        examples.append(
            Example(
                query=plan.query,
                positive=row,
                gain=gain,
                negatives=_negatives(plan, rng, config, num_items),
                relevant=plan.relevant,
            )
        )
    return [examples[s : s + config.batch_size] for s in range(0, len(examples), config.batch_size)]


def _negatives(plan: QueryPlan, rng: np.random.Generator, config: TrainConfig, num_items: int) -> tuple[int, ...]:
    k = config.hard_negatives
    judged = [plan.judged_negatives[int(i)] for i in rng.permutation(len(plan.judged_negatives))]
    n_judged = min(config.judged_negatives, k, len(judged))
    chosen = judged[:n_judged]
    mined = [plan.mined[int(i)] for i in rng.permutation(len(plan.mined))]
    chosen += mined[: k - len(chosen)]
    chosen += judged[n_judged:][: k - len(chosen)]  # too few mined: more judged ones
    # Still short (tiny catalogs): random items that are not relevant for the query.
    while len(chosen) < k and num_items > len(plan.relevant) + len(chosen):
        row = int(rng.integers(num_items))
        if row not in plan.relevant and row not in chosen:
            chosen.append(row)
    return tuple(chosen)


def batch_documents(batch: Sequence[Example]) -> tuple[list[int], torch.Tensor]:
    """Document rows (the B positives first, then every example's negatives) and the [B, D] mask of
    columns that must not count as negatives for a row: items judged relevant for that query, except
    the row's own positive."""
    docs = [e.positive for e in batch] + [r for e in batch for r in e.negatives]
    mask = torch.zeros(len(batch), len(docs), dtype=torch.bool)
    for i, example in enumerate(batch):
        for j, row in enumerate(docs):
            if j != i and row in example.relevant:
                mask[i, j] = True
    return docs, mask


def graded_infonce(
    queries: torch.Tensor, documents: torch.Tensor, gains: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Gain-weighted mean over rows of cross-entropy(scale · cos(q_i, d_j) over j, target j = i)."""
    logits = scale * queries @ documents.T
    logits = logits.masked_fill(mask, float("-inf"))
    losses = torch.nn.functional.cross_entropy(logits, torch.arange(len(queries)), reduction="none")
    return (gains * losses).sum() / gains.sum().clamp(min=1e-9)


# ---------------------------------------------------------------- embedding and mining


def embed(
    model: MeanPooledEncoder, tokenizer: Any, texts: Sequence[str], *, max_tokens: int, device: str, desc: str
) -> np.ndarray:
    """L2-normalised embeddings in input order (torch, eval mode, batches of similar length)."""
    model.eval()
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(texts), 384), dtype=np.float32)
    with torch.no_grad():
        for start in tqdm(range(0, len(order), EMBED_BATCH), desc=desc, unit="batch", mininterval=5.0):
            rows = order[start : start + EMBED_BATCH]
            batch = tokenizer(
                [texts[r] for r in rows], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
            )
            out[rows] = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu().numpy()
    return out


def dense_top(query_embeddings: np.ndarray, item_embeddings: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k most similar items per query (exact inner product), best first, ties by row."""
    k = min(k, len(item_embeddings))
    out = np.zeros((len(query_embeddings), k), dtype=np.int64)
    for start in range(0, len(query_embeddings), 256):
        sims = query_embeddings[start : start + 256] @ item_embeddings.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        for i, rows in enumerate(part):
            scores = sims[i, rows]
            out[start + i] = rows[np.lexsort((rows, -scores))]
    return out


def bm25_top(queries: Sequence[str], titles: Sequence[str], k: int) -> list[np.ndarray]:
    analyzer = Analyzer()
    index = LexicalIndex.build(analyzer.analyze_many(titles))
    return [
        top_rows(index.scores(analyzer.analyze(q)), k)
        for q in tqdm(queries, desc="mine bm25", unit="query", mininterval=5.0)
    ]


def cached_pretrained_embeddings(release: Path, catalog: Path, limit: int | None, num_items: int) -> np.ndarray | None:
    """A release's embeddings.npy, when it was built from this very catalog by the pretrained encoder."""
    manifest_file = release / "manifest.json"
    if not (manifest_file.is_file() and (release / "embeddings.npy").is_file()):
        return None
    from ranker.release import sha256_file

    manifest = json.loads(manifest_file.read_text())
    info = manifest.get("data", {})
    encoder_info = manifest.get("models", {}).get("text_encoder", {})
    if info.get("catalog_sha256") != sha256_file(catalog) or info.get("catalog_limit") != limit:
        return None
    if encoder_info.get("finetuned") or encoder_info.get("base_model") != "sentence-transformers/all-MiniLM-L6-v2":
        return None
    embeddings = np.load(release / "embeddings.npy")
    return embeddings if embeddings.shape == (num_items, 384) else None


def pretrained_item_embeddings(
    out_dir: Path, titles: Sequence[str], device: str, cache: np.ndarray | None = None
) -> np.ndarray:
    """The catalog under the pretrained encoder, stored in out_dir (from `cache` when given)."""
    path = out_dir / PRETRAINED_ITEMS
    if path.is_file():
        stored = np.load(path)
        if stored.shape[0] == len(titles):
            return stored
    if cache is not None:
        embeddings = np.asarray(cache, dtype=np.float32)
        print("  pretrained catalog embeddings: reused from a release built from the same catalog")
    else:
        model, tokenizer = load_reference()
        model.to(device)
        embeddings = embed(
            model, tokenizer, titles, max_tokens=MAX_TITLE_TOKENS, device=device, desc="embed catalog (pretrained)"
        )
    np.save(path, embeddings)
    return embeddings


def mine(
    judged: Mapping[str, Mapping[int, float]],
    titles: Sequence[str],
    item_embeddings: np.ndarray,
    config: TrainConfig,
    device: str,
) -> dict[str, list[int]]:
    """Hard-negative pools per query: BM25 and pretrained-dense top ranks, unjudged for the query."""
    queries = list(judged)
    depth = config.mine_skip + config.mine_depth + 20  # room for the judged items dropped from the lists
    lexical = bm25_top(queries, titles, depth)
    model, tokenizer = load_reference()
    model.to(device)
    query_embeddings = embed(
        model, tokenizer, queries, max_tokens=config.max_query_tokens, device=device, desc="embed train queries"
    )
    dense = dense_top(query_embeddings, item_embeddings, depth)
    return {
        q: mine_pool(
            judged[q], [lexical[i].tolist(), dense[i].tolist()], depth=config.mine_depth, skip=config.mine_skip
        )
        for i, q in enumerate(queries)
    }


# ---------------------------------------------------------------- evaluation


def dense_dev_metrics(
    query_embeddings: np.ndarray,
    item_embeddings: np.ndarray,
    item_ids: Sequence[str],
    judged: Mapping[str, Mapping[str, float]],
) -> dict[str, float]:
    """The dense retriever alone: exact search over the whole catalog, offline.metrics over `judged`."""
    top = dense_top(query_embeddings, item_embeddings, EVAL_K)
    runs = {q: [item_ids[r] for r in top[i]] for i, q in enumerate(judged)}
    return metrics.evaluate(runs, judged)


def qualifying(judged: Mapping[str, Mapping[str, float]]) -> dict[str, Mapping[str, float]]:
    return {q: j for q, j in judged.items() if metrics.qualifies(j)}


# ---------------------------------------------------------------- training


def _lr_lambda(total: int, warmup: int) -> Any:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _save_model(model: MeanPooledEncoder, tokenizer: Any, out_dir: Path) -> Path:
    target = out_dir / MODEL_DIR
    transformer: Any = model.transformer
    transformer.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def finetune(
    items: pl.DataFrame,
    train_judgments: pl.DataFrame,
    out_dir: Path,
    config: TrainConfig,
    *,
    device: str = "cpu",
    max_minutes: float | None = None,
    resume: bool = True,
    pretrained_cache: np.ndarray | None = None,
) -> FinetuneResult:
    """Fine-tune on train judgments; returns the HF model folder (also when stopped by the time budget).

    A finished run in out_dir with the same config is returned as is; a checkpoint is continued
    when `resume`, else refused.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result_file = out_dir / RESULT
    if result_file.is_file():
        done = json.loads(result_file.read_text())
        if done.get("config") != config.as_dict():
            raise ValueError(f"{out_dir} holds a run with another configuration; use another folder")
        if done.get("complete"):
            print(f"  fine-tuned encoder already complete in {out_dir}: reusing it")
            return _result_from(out_dir, done)
    if (out_dir / CHECKPOINT).is_file() and not resume:
        raise ValueError(f"{out_dir} has a checkpoint; pass --resume to continue it or choose another folder")

    torch.manual_seed(config.seed)
    titles = items["title"].to_list()
    item_rows = {item_id: row for row, item_id in enumerate(items["item_id"].to_list())}
    judged = judged_train_queries(train_judgments, item_rows)
    mined_file = out_dir / MINED
    if mined_file.is_file():
        mined = {q: list(v) for q, v in json.loads(mined_file.read_text()).items()}
    else:
        item_embeddings = pretrained_item_embeddings(out_dir, titles, device, pretrained_cache)
        mined = mine(judged, titles, item_embeddings, config, device)
        mined_file.write_text(json.dumps(mined))
    plans = build_plans(judged, mined)
    if not plans:
        raise ValueError("no training query has a judged relevant item in the catalog")
    per_epoch = steps_per_epoch(plans, config.batch_size)
    total = per_epoch * config.epochs

    model, tokenizer = load_reference()
    model.to(device).train()
    if config.freeze_word_embeddings:
        transformer: Any = model.transformer
        transformer.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = max(1, int(total * config.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(total, warmup))
    step, trained_s = 0, 0.0
    if (out_dir / CHECKPOINT).is_file():
        state = torch.load(out_dir / CHECKPOINT, map_location=device, weights_only=False)
        if state["config"] != config.as_dict():
            raise ValueError(f"{out_dir / CHECKPOINT} was written with another configuration")
        model.transformer.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step, trained_s = int(state["step"]), float(state["train_seconds"])
        print(f"  resuming at step {step}/{total} (epoch {step // per_epoch + 1})")

    def checkpoint() -> None:
        _atomic_save(
            {
                "config": config.as_dict(),
                "step": step,
                "epoch": step // per_epoch,
                "batch_in_epoch": step % per_epoch,
                "train_seconds": trained_s,
                "model": model.transformer.state_dict(),
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            },
            out_dir / CHECKPOINT,
        )

    print(
        f"  {len(plans)} train queries with a relevant item, {per_epoch} steps/epoch × {config.epochs} epochs,"
        f" checkpoints in {out_dir}"
    )
    started = time.perf_counter()
    session_start_step = step
    budget_s = max_minutes * 60.0 if max_minutes is not None else math.inf
    batches: list[list[Example]] = []
    batches_epoch = -1
    bar = tqdm(total=total, initial=step, desc="fine-tune encoder", unit="step", mininterval=5.0)
    stopped = False
    while step < total:
        epoch = step // per_epoch
        if epoch != batches_epoch:
            batches, batches_epoch = epoch_batches(plans, epoch, config, len(titles)), epoch
        batch = batches[step % per_epoch]
        t0 = time.perf_counter()
        loss = _train_step(model, tokenizer, batch, titles, config, device)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        scheduler.step()
        step += 1
        trained_s += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}", refresh=False)
        if step % config.checkpoint_every == 0 or step == total:
            checkpoint()
        if step < total and time.perf_counter() - started >= budget_s:
            checkpoint()
            stopped = True
            print(f"\n  time budget of {max_minutes} min reached at step {step}/{total}: checkpoint saved")
            break
    bar.close()
    model.eval()
    model_dir = _save_model(model, tokenizer, out_dir)
    session_steps = step - session_start_step
    done = {
        "config": config.as_dict(),
        "complete": not stopped,
        "steps": step,
        "total_steps": total,
        "train_seconds": round(trained_s, 1),
        "seconds_per_step": round((time.perf_counter() - started) / max(1, session_steps), 3),
        "train_examples": len(plans),
    }
    result_file.write_text(json.dumps(done, indent=2) + "\n")
    print(f"  fine-tuned model written to {model_dir}")
    return _result_from(out_dir, done)


def _train_step(
    model: MeanPooledEncoder,
    tokenizer: Any,
    batch: Sequence[Example],
    titles: Sequence[str],
    config: TrainConfig,
    device: str,
) -> torch.Tensor:
    docs, mask = batch_documents(batch)
    q = tokenizer(
        [e.query for e in batch], padding=True, truncation=True, max_length=config.max_query_tokens, return_tensors="pt"
    )
    d = tokenizer(
        [titles[r] for r in docs],
        padding=True,
        truncation=True,
        max_length=config.max_title_tokens,
        return_tensors="pt",
    )
    q_emb = model(q["input_ids"].to(device), q["attention_mask"].to(device))
    d_emb = model(d["input_ids"].to(device), d["attention_mask"].to(device))
    gains = torch.tensor([e.gain for e in batch], dtype=torch.float32, device=device)
    return graded_infonce(q_emb, d_emb, gains, mask.to(device), config.scale)


def _result_from(out_dir: Path, done: Mapping[str, Any]) -> FinetuneResult:
    return FinetuneResult(
        model_dir=out_dir / MODEL_DIR,
        complete=bool(done["complete"]),
        steps=int(done["steps"]),
        total_steps=int(done["total_steps"]),
        train_seconds=float(done["train_seconds"]),
        seconds_per_step=float(done["seconds_per_step"]),
        train_examples=int(done["train_examples"]),
    )


# ---------------------------------------------------------------- CLI


def evaluate_models(
    items: pl.DataFrame,
    dev_judgments: pl.DataFrame,
    model_dir: Path,
    pretrained_items: np.ndarray,
    device: str,
) -> dict[str, dict[str, float]]:
    """Dense-only dev metrics of the pretrained and the fine-tuned encoder (torch, exact search)."""
    judged = qualifying(data.judgments_by_query(dev_judgments))
    queries = list(judged)
    item_ids = items["item_id"].to_list()
    out = {}
    for name, path in (("pretrained", None), ("finetuned", model_dir)):
        model, tokenizer = load_reference(path)
        model.to(device)
        q = embed(model, tokenizer, queries, max_tokens=MAX_QUERY_TOKENS, device=device, desc=f"embed dev ({name})")
        if path is None:
            catalog = pretrained_items
        else:
            catalog = embed(
                model,
                tokenizer,
                items["title"].to_list(),
                max_tokens=MAX_TITLE_TOKENS,
                device=device,
                desc="embed catalog",
            )
        out[name] = dense_dev_metrics(q, catalog, item_ids, judged)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m offline.train_encoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", type=cli.existing_file, required=True)
    parser.add_argument("--judgments", type=cli.existing_file, required=True)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder (the model lands in OUT/model)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--epochs", type=cli.count(1), default=defaults.epochs)
    parser.add_argument("--batch-size", type=cli.count(1), default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=cli.positive, default=defaults.learning_rate)
    parser.add_argument("--hard-negatives", type=cli.count(0), default=defaults.hard_negatives)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--max-minutes", type=cli.positive, help="stop cleanly at a checkpoint after this long")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    parser.add_argument("--limit", type=cli.count(1), help="use only the first N catalog rows")
    parser.add_argument(
        "--pretrained-release",
        type=Path,
        help="reuse this release's embeddings.npy for mining when its manifest names the same catalog",
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the dense-only dev evaluation")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    config = TrainConfig(
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        hard_negatives=args.hard_negatives,
    )
    try:
        items = data.load_catalog(args.catalog, limit=args.limit)
        judgments = data.load_judgments(args.judgments)
    except cli.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    judgments = judgments.filter(pl.col("item_id").is_in(items["item_id"].implode()))
    split = data.split_queries(judgments, args.seed)
    cache = None
    if args.pretrained_release:
        cache = cached_pretrained_embeddings(args.pretrained_release, args.catalog, args.limit, items.height)
        if cache is None:
            print(f"  {args.pretrained_release} was not built from this catalog by the pretrained encoder: embedding")
    start = time.perf_counter()
    try:
        result = finetune(
            items,
            split.train,
            args.out,
            config,
            device=args.device,
            max_minutes=args.max_minutes,
            resume=args.resume,
            pretrained_cache=cache,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"model in {result.model_dir} ({'complete' if result.complete else 'stopped early'}: step"
        f" {result.steps}/{result.total_steps}, {result.seconds_per_step:.2f} s/step,"
        f" {time.perf_counter() - start:.0f} s this run)"
    )
    if not args.no_eval and split.dev.height:
        pretrained = np.load(args.out / PRETRAINED_ITEMS)
        report = evaluate_models(items, split.dev, result.model_dir, pretrained, args.device)
        (args.out / "dev_metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        for name, values in report.items():
            print(f"  dense-only dev {name}: {json.dumps(values)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
