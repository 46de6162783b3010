"""`python -m offline.export`: build a complete, checked release folder from a catalog (and judgments).

Stages: load data -> analyse titles -> BM25 index -> fine-tune the encoder on the train split (with
judgments; cached and resumable, see offline.train_encoder) -> export + check the ONNX encoder -> embed the
catalog with that ONNX file -> FAISS index -> train (or fall back) and export the ranker -> Triton
model repository -> items, manifest. Everything is written into a hidden sibling of --out and
renamed into place at the very end, so a reader never sees a half-written release.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from offline import cli, data, encoder, gate, interactions, train_encoder, train_ranker
from offline.attributes import fill_attributes
from offline.triton_repo import write_model_repository
from ranker import release as layout
from ranker.features import FEATURE_NAMES, TitleIndex
from ranker.models import ENCODER_CPU_ONNX_FILE, OnnxEncoder
from ranker.neighbours import NEIGHBOURS_FILE
from ranker.policy import POLICY_FILE, load_policy
from ranker.retrieval import Analyzer, DenseIndex, HybridRetriever, LexicalIndex

MODEL_VERSION = 1
THREADS = 2
PARITY_TITLES = 40
# DenseIndex.build's switch from exact search to HNSW, passed explicitly so the manifest can say which.
HNSW_THRESHOLD = 20_000
HNSW_M = 32
EF_CONSTRUCTION = 80
DEFAULT_CACHE = Path.home() / ".cache" / "ranker" / "encoders"
STAGING_PREFIX = ".staging-"
DEFAULT_POLICY_TOML = """\
# Ranking policy of this release (see docs/ranking-policy.md); RANKER_POLICY_FILE replaces it.
# Keys left out keep the service's defaults: every other signal has weight 0, but "personal" (0.3,
# present only with a user's profile; docs/personalization.md).
max_weight = 10.0
max_rule_amount = 100.0

[signals.ranker]
weight = 1.0
normalization = "identity"

[diversity]
method = "none"
"""
RETIRED_PREFIX = ".retired-"


class ExportError(RuntimeError):
    """The release cannot be written (bad arguments, or --out exists without --force)."""


class Stages:
    """Times each stage and prints progress, so a long export says where it is."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        print(f"[{name}] done in {self.seconds[name]:.1f} s", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m offline.export", description=__doc__)
    parser.add_argument("--catalog", type=cli.existing_file, required=True, help="items CSV/parquet (see offline.data)")
    parser.add_argument("--out", type=Path, required=True, help="release folder to create")
    parser.add_argument(
        "--judgments", type=cli.existing_file, help="query/item/relevance CSV; without it a fallback ranker"
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--seed", type=int, default=13, help="train/dev split and training seed")
    parser.add_argument("--limit", type=cli.count(1), help="use only the first N catalog rows (quick tests)")
    parser.add_argument(
        "--policy", type=cli.existing_file, help="ranking policy TOML to ship (default: the service defaults)"
    )
    parser.add_argument(
        "--interactions",
        type=cli.existing_file,
        help="shoppers' histories (user_id, item_id[, timestamp]) -> neighbours.npz for the personal signal",
    )
    parser.add_argument(
        "--catalog-log-through",
        type=cli.stream_id,
        help="the shared catalog log's position that --catalog already includes (`python -m ranker catalog-log "
        "position`, taken before the catalog was): replicas of this release apply only the entries after it",
    )
    parser.add_argument(
        "--allow-regression",
        action="store_true",
        help="publish even when dev NDCG@10 is worse than the release being replaced (see offline.gate)",
    )
    encoders = parser.add_argument_group("text encoder")
    encoders.add_argument(
        "--encoder", type=cli.existing_dir, help="a fine-tuned Hugging Face model folder to export as is"
    )
    encoders.add_argument(
        "--finetune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tune the encoder on the train split (default: yes when --judgments is given and no --encoder)",
    )
    encoders.add_argument(
        "--finetune-minutes",
        type=cli.positive,
        default=18.0,
        help="training time budget per export run (default 18, so a Home Depot-sized export stays under 30 min "
        "on 2 CPU cores); when reached, training stops at a checkpoint and the partly trained model is exported; "
        "re-running the same export resumes it, and a finished fine-tune is reused",
    )
    defaults = train_encoder.TrainConfig()
    encoders.add_argument("--finetune-epochs", type=cli.count(1), default=defaults.epochs)
    encoders.add_argument("--finetune-batch-size", type=cli.count(1), default=defaults.batch_size)
    encoders.add_argument("--finetune-device", choices=("cpu", "cuda"), default="cpu")
    encoders.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="fine-tuning checkpoints, one folder per data+config key"
    )
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    """What would otherwise fail only after the encoder and ranker have trained: a bad policy, no CUDA."""
    if args.policy is not None:
        load_policy(args.policy)
    if args.finetune_device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--finetune-device cuda but no CUDA device is available")


def sha256_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by POSIX path relative to it, sorted."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): layout.sha256_file(p) for p in files}


def stamp(staging: Path) -> dict[str, Any]:
    """A finished release folder's identity for its manifest: release_id (time and a hash of the file
    hashes), created_at and files (sha256 of every file)."""
    files = file_hashes(staging)
    now = datetime.now(UTC)
    short = sha256_bytes(json.dumps(files, sort_keys=True).encode())[:8]
    return {
        "release_id": f"{now:%Y%m%dT%H%M%SZ}-{short}",
        "created_at": now.isoformat(timespec="seconds"),
        "files": files,
    }


def finetune_key(data_info: dict[str, Any], config: train_encoder.TrainConfig) -> str:
    """Checkpoint folder name: sha256 of the catalog and judgments files, the catalog limit and the config."""
    payload = {
        "catalog_sha256": data_info["catalog_sha256"],
        "catalog_limit": data_info["catalog_limit"],
        "judgments_sha256": data_info["judgments_sha256"],
        "config": config.as_dict(),
    }
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())[:16]


def parity_sample(titles: Sequence[str], n: int = PARITY_TITLES) -> list[str]:
    """Titles spread evenly over the catalog: real text of varied length, deterministically chosen."""
    if len(titles) <= n:
        return list(titles)
    return [titles[int(i)] for i in np.linspace(0, len(titles) - 1, n)]


def _jsonable(value: Any) -> Any:
    """Numpy scalars to Python numbers, recursively (json.dumps refuses them)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class Exporter:
    """Builds one release into a staging folder; `run` returns the manifest it wrote."""

    def __init__(self, args: argparse.Namespace, staging: Path) -> None:
        self.args = args
        self.staging = staging
        self.scratch = staging / ".build"  # intermediate ONNX files, removed before hashing
        self.stages = Stages()
        self.manifest: dict[str, Any] = {"format": layout.FORMAT_VERSION}

    def run(self) -> dict[str, Any]:
        self.scratch.mkdir(parents=True)
        items, judgments = self.load()
        titles = items["title"].to_list()
        with self.stages("analyse"):
            tokens = Analyzer().analyze_many(titles)
        with self.stages("lexical_index"):
            lexical = LexicalIndex.build(tokens)
            (self.staging / layout.LEXICAL_DIR).mkdir()
            lexical.save(self.staging / layout.LEXICAL_DIR)
        model_dir = self.encoder_model(items, judgments)
        enc = self.export_encoder(titles, model_dir)
        dense = self.dense_index(enc, titles)
        with self.stages("attributes"):
            # Brand and category for catalogs without them (filters, caps, diversity metrics).
            items, self.manifest["data"]["attributes"] = fill_attributes(items, np.asarray(dense.embeddings))
            items.write_parquet(self.staging / layout.ITEMS)
        if self.args.interactions is not None:
            with self.stages("neighbours"):
                self.write_neighbours(items["item_id"].to_list())
        if judgments is not None and self.finetuned is not None:
            with self.stages("dense_dev_metrics"):
                self.dense_dev_metrics(items, judgments, enc, dense)
        with self.stages("title_index"):
            text = TitleIndex.build(titles, tokens)
            text.save(self.staging / layout.TITLE_INDEX)
        corpus = train_ranker.Corpus(
            item_ids=items["item_id"].to_list(),
            retriever=HybridRetriever(dense, lexical),
            text=text,
        )
        ranker_onnx = self.ranker(corpus, enc, judgments)
        with self.stages("triton_repository"):
            onnx_files = {layout.ENCODER_MODEL: enc.onnx_file, layout.RANKER_MODEL: ranker_onnx}
            write_model_repository(
                self.staging / layout.MODEL_REPOSITORY,
                onnx_files,
                version=MODEL_VERSION,
                extra_files={layout.ENCODER_MODEL: {ENCODER_CPU_ONNX_FILE: self.encoder_int8}},
            )
            shutil.rmtree(self.scratch)
        with self.stages("policy"):
            self.write_policy()
        self.manifest["gate"] = gate.check(
            self.manifest, self.args.out.resolve(), allow_regression=self.args.allow_regression
        ).as_manifest()
        print(f"  release gate: {self.manifest['gate']['decision']} ({self.manifest['gate']['reason']})")
        with self.stages("manifest"):
            self.write_manifest(items)
        return self.manifest

    def load(self) -> tuple[pl.DataFrame, pl.DataFrame | None]:
        args = self.args
        with self.stages("load"):
            items = data.load_catalog(args.catalog, limit=args.limit)
            items.write_parquet(self.staging / layout.ITEMS)
            info: dict[str, Any] = {
                "catalog": str(args.catalog),
                "catalog_sha256": layout.sha256_file(args.catalog),
                "catalog_limit": args.limit,
                "judgments": str(args.judgments) if args.judgments else None,
                "judgments_sha256": layout.sha256_file(args.judgments) if args.judgments else None,
            }
            judgments = None
            if args.judgments:
                raw = data.load_judgments(args.judgments)
                # Pairs whose item is not in the catalog (e.g. with --limit) can never be retrieved.
                judgments = raw.filter(pl.col("item_id").is_in(items["item_id"].implode()))
                info["judged_pairs"] = raw.height
                info["judged_pairs_in_catalog"] = judgments.height
            self.manifest["data"] = info
            if args.catalog_log_through is not None:  # not in "data": that keys the fine-tuned encoder's cache
                self.manifest["catalog_log"] = {"through": args.catalog_log_through}
        print(f"  {items.height} items" + (f", {judgments.height} judged pairs" if judgments is not None else ""))
        return items, judgments

    def encoder_model(self, items: pl.DataFrame, judgments: pl.DataFrame | None) -> Path | None:
        """The HF folder to export: --encoder, a (cached) fine-tune, or None for the pretrained model."""
        args = self.args
        self.finetuned: train_encoder.FinetuneResult | None = None
        self.encoder_info: dict[str, Any] = {"finetuned": False}
        if args.encoder is not None:
            if not (args.encoder / "config.json").is_file():
                raise ExportError(f"--encoder {args.encoder} is not a Hugging Face model folder (no config.json)")
            self.encoder_info = {"finetuned": True, "source": str(args.encoder)}
            return Path(args.encoder)
        wanted = args.finetune if args.finetune is not None else judgments is not None
        if not wanted:
            return None
        if judgments is None or judgments.height == 0:
            raise ExportError("--finetune needs --judgments with items in the catalog")
        config = train_encoder.TrainConfig(
            seed=args.seed, epochs=args.finetune_epochs, batch_size=args.finetune_batch_size
        )
        key = finetune_key(self.manifest["data"], config)
        folder = args.cache_dir.expanduser() / key
        print(f"  fine-tuning checkpoint folder: {folder}", flush=True)
        split = data.split_queries(judgments, args.seed)
        with self.stages("finetune_encoder"):
            try:
                self.finetuned = train_encoder.finetune(
                    items,
                    split.train,
                    folder,
                    config,
                    device=args.finetune_device,
                    max_minutes=args.finetune_minutes,
                    pretrained_cache=self._pretrained_cache(items.height),
                )
            except ValueError as e:
                raise ExportError(f"fine-tuning failed: {e}") from e
        result = self.finetuned
        self.encoder_info = {
            "finetuned": True,
            "checkpoint_key": key,
            "checkpoint_dir": str(folder),
            "training": {
                **config.as_dict(),
                "objective": "InfoNCE (scale x cosine), in-batch + hard negatives (judged rel < 2, BM25, "
                "pretrained-dense), loss weighted by the positive's gain (relevance - 1)",
                "split": "train queries of data.split_queries(seed) only",
                "complete": result.complete,
                "steps": result.steps,
                "total_steps": result.total_steps,
                "train_queries": result.train_examples,
                "train_seconds": result.train_seconds,
                "seconds_per_step": result.seconds_per_step,
            },
        }
        if not result.complete:
            print(f"  warning: fine-tuning stopped at step {result.steps}/{result.total_steps}; re-run to resume")
        return result.model_dir

    def _pretrained_cache(self, num_items: int) -> np.ndarray | None:
        """Pretrained catalog embeddings of a sibling release built from the same catalog, if any."""
        parent = self.args.out.resolve().parent
        for release in sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")):
            cached = train_encoder.cached_pretrained_embeddings(release, self.args.catalog, self.args.limit, num_items)
            if cached is not None:
                print(f"  pretrained catalog embeddings for mining: reusing {release}")
                return cached
        return None

    def dense_dev_metrics(
        self, items: pl.DataFrame, judgments: pl.DataFrame, enc: encoder.EncoderExport, dense: DenseIndex
    ) -> None:
        """The dense retriever alone on the dev split (exact search): the exported encoder vs the pretrained one."""
        assert self.finetuned is not None
        split = data.split_queries(judgments, self.args.seed)
        judged = train_encoder.qualifying(data.judgments_by_query(split.dev))
        if not judged:
            return
        queries = list(judged)
        item_ids = items["item_id"].to_list()
        ours = encoder.embed_queries(self.encoder_session, enc.tokenizer_file, queries)
        model, tokenizer = encoder.load_reference()
        theirs = train_encoder.embed(
            model, tokenizer, queries, max_tokens=encoder.MAX_QUERY_TOKENS, device="cpu", desc="embed dev (pretrained)"
        )
        pretrained_items = np.load(self.finetuned.model_dir.parent / train_encoder.PRETRAINED_ITEMS)
        report = {
            "pretrained": train_encoder.dense_dev_metrics(theirs, pretrained_items, item_ids, judged),
            "finetuned": train_encoder.dense_dev_metrics(ours, np.asarray(dense.embeddings), item_ids, judged),
        }
        self.encoder_info["dense_dev_metrics"] = report
        self.manifest["models"][layout.ENCODER_MODEL]["dense_dev_metrics"] = report
        for name, values in report.items():
            print(f"  dense-only dev {name}: {json.dumps(values)}")

    def export_encoder(self, titles: Sequence[str], model_dir: Path | None) -> encoder.EncoderExport:
        with self.stages("encoder_export"):
            enc = encoder.export_encoder(
                self.scratch / "text_encoder.onnx", self.staging / layout.TOKENIZER, parity_sample(titles), model_dir
            )
        print(f"  ONNX vs torch max abs diff {enc.parity_max_abs_diff:.2e}")
        with self.stages("encoder_int8"):
            self.encoder_int8 = self.scratch / "text_encoder.int8.onnx"
            int8 = encoder.quantize_int8(
                enc.onnx_file, self.encoder_int8, enc.tokenizer_file, [*parity_sample(titles), *encoder.PARITY_QUERIES]
            )
        print(f"  int8 copy for CPU serving: cosine to fp32 min {int8['int8_cosine_min']:.4f}")
        self.manifest.setdefault("models", {})[layout.ENCODER_MODEL] = {
            "version": MODEL_VERSION,
            "dim": encoder.DIM,
            "max_query_tokens": encoder.MAX_QUERY_TOKENS,
            "max_title_tokens": encoder.MAX_TITLE_TOKENS,
            "base_model": encoder.BASE_MODEL,
            "pooling": "mean, L2-normalised",
            "opset": encoder.OPSET,
            "parity_max_abs_diff": enc.parity_max_abs_diff,
            "cpu_onnx_file": ENCODER_CPU_ONNX_FILE,
            **int8,
            **self.encoder_info,
        }
        return enc

    def dense_index(self, enc: encoder.EncoderExport, titles: Sequence[str]) -> DenseIndex:
        self.encoder_session = OnnxEncoder(enc.onnx_file, threads=THREADS)
        with self.stages("embed_catalog"):
            embeddings = encoder.embed_texts(
                self.encoder_session,
                enc.tokenizer_file,
                titles,
                max_tokens=encoder.MAX_TITLE_TOKENS,
                desc="embed catalog",
            )
        with self.stages("dense_index"):
            dense = DenseIndex.build(
                embeddings, hnsw_threshold=HNSW_THRESHOLD, hnsw_m=HNSW_M, ef_construction=EF_CONSTRUCTION
            )
            dense.save(self.staging / layout.DENSE_INDEX, self.staging / layout.EMBEDDINGS)
        hnsw = len(titles) >= HNSW_THRESHOLD
        self.manifest["index"] = {
            "items": len(titles),
            "kind": "hnsw" if hnsw else "flat",
            "metric": "inner_product",
            "dim": encoder.DIM,
            **({"hnsw_m": HNSW_M, "ef_construction": EF_CONSTRUCTION} if hnsw else {}),
            "lexical": "bm25s over ranker.retrieval.Analyzer tokens of the title",
        }
        return dense

    def ranker(self, corpus: train_ranker.Corpus, enc: encoder.EncoderExport, judgments: pl.DataFrame | None) -> Path:
        check_rows = None
        if judgments is None or judgments.height == 0:
            result = train_ranker.fallback()
            self.manifest["data"]["split"] = None
            print("  no judgments: writing the fallback ranker (fixed linear combination, not trained)")
        else:
            split = data.split_queries(judgments, self.args.seed)
            self.manifest["data"]["split"] = {
                "seed": self.args.seed,
                "method": f"sha256('<seed>:<normalised query>') < {data.DEV_FRACTION} of range -> dev",
                "train_queries": split.train_queries,
                "dev_queries": split.dev_queries,
            }
            judged = data.judgments_by_query(judgments)
            with self.stages("candidates"):
                train_lists = self._lists(split.train, judged, corpus, enc, "train candidates")
                dev_lists = self._lists(split.dev, judged, corpus, enc, "dev candidates")
            if any(c.labels.max(initial=0.0) > 0 for c in train_lists):
                with self.stages("train_ranker"):
                    result = train_ranker.train(train_lists, dev_lists, judged, seed=self.args.seed)
            else:
                # Tiny or --limit'ed data can leave nothing to learn from; say so rather than fail.
                print("  warning: no training query has a relevant candidate; writing the fallback ranker")
                result = train_ranker.fallback()
                result.diagnostics["reason"] = "no training query had a judged relevant item among its candidates"
            parity_lists = dev_lists or train_lists
            check_rows = np.concatenate([c.features for c in parity_lists[:20]]) if parity_lists else None
        with self.stages("ranker_export"):
            onnx_file = self.scratch / "ranker.onnx"
            parity = train_ranker.export_onnx(result.model, onnx_file, check_rows)
        self.manifest["models"][layout.RANKER_MODEL] = {
            "version": MODEL_VERSION,
            "features": list(FEATURE_NAMES),
            "kind": result.kind,
            "dense_k": train_ranker.DENSE_K,
            "lexical_k": train_ranker.LEXICAL_K,
            "parity_max_abs_diff": parity,
            **self._ranker_details(result),
        }
        self.manifest["metrics"] = result.diagnostics
        return onnx_file

    def _lists(
        self,
        pairs: pl.DataFrame,
        judged: dict[str, dict[str, float]],
        corpus: train_ranker.Corpus,
        enc: encoder.EncoderExport,
        desc: str,
    ) -> list[train_ranker.CandidateList]:
        queries = {q: judged[q] for q in pairs["query"].unique(maintain_order=True).to_list()}
        return train_ranker.build_lists(queries, corpus, self.encoder_session, enc.tokenizer_file, desc=desc)

    @staticmethod
    def _ranker_details(result: train_ranker.TrainResult) -> dict[str, Any]:
        if result.kind == "fallback-linear":
            return {
                "weights": train_ranker.FALLBACK_WEIGHTS,
                "note": "no judgments were given: a fixed linear combination, not trained",
            }
        return {
            "hidden": list(train_ranker.HIDDEN),
            "loss": "ListNet (softmax cross-entropy against gain-proportional targets)",
            "epochs": train_ranker.EPOCHS,
            "learning_rate": train_ranker.LEARNING_RATE,
            "label": "relevance - 1 for judged candidates, 0 for unjudged",
        }

    def write_neighbours(self, item_ids: list[str]) -> None:
        """Item-to-item neighbours from --interactions (docs/personalization.md)."""
        path = self.args.interactions
        try:
            neighbours, report = interactions.build_neighbours(
                interactions.read_sequences(path), {item_id: row for row, item_id in enumerate(item_ids)}, len(item_ids)
            )
        except interactions.InteractionsError as e:
            raise ExportError(str(e)) from e
        neighbours.save(self.staging / NEIGHBOURS_FILE, item_ids)
        self.manifest["personalization"] = {
            "interactions": str(path),
            "interactions_sha256": layout.sha256_file(path),
            "neighbours": report,
        }
        print(f"  neighbours: {json.dumps(report)}")

    def write_policy(self) -> None:
        """The release's ranking policy: --policy (validated), else the service defaults spelled out."""
        target = self.staging / POLICY_FILE
        if self.args.policy is not None:
            load_policy(self.args.policy)  # refuse a bad policy now, not when the service loads it
            shutil.copyfile(self.args.policy, target)
        else:
            target.write_text(DEFAULT_POLICY_TOML)
        self.manifest["policy"] = str(self.args.policy) if self.args.policy else "defaults"

    def write_manifest(self, items: pl.DataFrame) -> None:
        self.manifest.update(stamp(self.staging), timings_s=self.stages.seconds)
        text = json.dumps(_jsonable(self.manifest), indent=2, sort_keys=False)
        (self.staging / layout.MANIFEST).write_text(text + "\n")
        layout.Manifest.from_json(json.loads(text))  # what the service will check, checked now


def publish(staging: Path, out: Path, *, force: bool) -> None:
    """Rename the finished release into place; with force the old one is moved aside, then deleted."""
    if not out.exists():
        os.rename(staging, out)
        return
    if not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    retired = Path(tempfile.mkdtemp(prefix=f"{RETIRED_PREFIX}{out.name}-", dir=out.parent))
    os.rename(out, retired / out.name)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(retired / out.name, out)  # the old release goes back: --out is never left missing
        retired.rmdir()
        raise
    shutil.rmtree(retired)


def export(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    out = args.out.resolve()
    if out.exists() and not args.force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling of --out: same filesystem, so the final rename is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{out.name}-", dir=out.parent))
    try:
        manifest = Exporter(args, staging).run()
        publish(staging, out, force=args.force)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out, manifest


def summary(out: Path, manifest: dict[str, Any], total_s: float) -> str:
    ranker = manifest["models"][layout.RANKER_MODEL]
    lines = [
        f"release {manifest['release_id']} written to {out}",
        f"  items {manifest['index']['items']} ({manifest['index']['kind']} index), ranker {ranker['kind']}",
        f"  encoder parity {manifest['models'][layout.ENCODER_MODEL]['parity_max_abs_diff']:.2e}, "
        f"ranker parity {ranker['parity_max_abs_diff']:.2e}",
    ]
    text_encoder = manifest["models"][layout.ENCODER_MODEL]
    if text_encoder.get("finetuned"):
        lines.append(f"  encoder fine-tuned ({text_encoder.get('checkpoint_dir') or text_encoder.get('source')})")
        for name, values in text_encoder.get("dense_dev_metrics", {}).items():
            lines.append(f"  dense-only dev {name}: {json.dumps(values)}")
    dev = manifest["metrics"].get("dev")
    if dev:
        lines.append(f"  dev: {json.dumps({k: v for k, v in dev.items() if k.startswith('dev_')})}")
        for name, values in manifest["metrics"]["dev_baselines"].items():
            lines.append(f"  dev {name}: {json.dumps(values)}")
    lines.append("  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in manifest["timings_s"].items()))
    lines.append(f"  total {total_s:.1f} s")
    return "\n".join(lines)


REPORTED: tuple[type[BaseException], ...] = (ExportError, encoder.ParityError, gate.GateRefused, *cli.USER_ERRORS)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    try:
        check_arguments(args)
        out, manifest = export(args)
    except REPORTED as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(out, manifest, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub
    sys.exit(main())
