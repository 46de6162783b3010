"""`python -m ranker.bench_dense`: the vector engine's dense retrieval against FAISS, overlap and latency (JSON).

    python -m ranker.bench_dense --release releases/homedepot-ft \\
        --queries ../shared/data/homedepot/judgments.csv --num-queries 200 --k 100
    python -m ranker.bench_dense --release R --queries Q --url http://qdrant:6333   # a loaded cluster

Encodes real queries with the release's own ONNX encoder (in-process), then times one k-NN search
per query on exact FAISS (IndexFlatIP: the reference), FAISS HNSW (the release's settings) and the
Qdrant collection at --url (default `:memory:`, loaded here; otherwise loaded by `python -m
ranker.vector_engine load`, or pass --load). overlap@k is |top-k ∩ exact top-k| / k, averaged over
queries. A second, smaller run repeats it with --exclude random rows filtered out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ranker.bench import load_queries
from ranker.bench_stages import percentiles
from ranker.models import OnnxEncoder, QueryTokenizer
from ranker.release import EMBEDDINGS, ENCODER_MODEL, MODEL_REPOSITORY, TOKENIZER, Manifest, read_manifest
from ranker.retrieval import EF_SEARCH, DenseIndex, DenseRetriever


def overlap_at_k(got: Sequence[np.ndarray], reference: Sequence[np.ndarray], k: int) -> float:
    """Mean over queries of |got ∩ reference| / min(k, |reference|) (1.0 when the reference is empty)."""
    values = []
    for a, b in zip(got, reference, strict=True):
        expected = set(b[:k].tolist())
        values.append(len(set(a[:k].tolist()) & expected) / len(expected) if expected else 1.0)
    return float(np.mean(values)) if values else 1.0


def encode_queries(release: Path, manifest: Manifest, queries: Sequence[str]) -> np.ndarray:
    """Query embeddings [queries, dim] from the release's text encoder, one query per call as served."""
    onnx_file = release / MODEL_REPOSITORY / ENCODER_MODEL / manifest.encoder.version / "model.onnx"
    encoder = OnnxEncoder(onnx_file)
    tokenizer = QueryTokenizer(release / TOKENIZER, manifest.max_query_tokens)
    return np.concatenate([encoder.encode_sync(*tokenizer([q])) for q in queries]).astype(np.float32)


def run_searches(
    index: DenseRetriever, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, *, warm_up: int = 3
) -> tuple[list[np.ndarray], list[float]]:
    """Each query's top-k rows and its search time in milliseconds."""
    for q in queries[:warm_up]:
        index.search(q, k, allowed)
    results, times = [], []
    for q in queries:
        start = time.perf_counter()
        results.append(index.search(q, k, allowed))
        times.append((time.perf_counter() - start) * 1000.0)
    return results, times


def compare(
    backends: dict[str, DenseRetriever], queries: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> dict[str, dict[str, float]]:
    """Latency percentiles and overlap@k against the first backend (the exact reference) for each backend."""
    report: dict[str, dict[str, float]] = {}
    reference: list[np.ndarray] = []
    for name, index in backends.items():
        results, times = run_searches(index, queries, k, allowed)
        reference = reference or results
        entry = {f"overlap@{k}": overlap_at_k(results, reference, k), **percentiles(times)}
        if allowed is not None:
            entry["hits_outside_filter"] = float(sum(int((~allowed[r]).sum()) for r in results))
        report[name] = entry
    return report


def main(argv: Sequence[str] | None = None) -> None:
    from ranker import vector_engine

    parser = argparse.ArgumentParser(prog="python -m ranker.bench_dense", description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True, help="text file (one query per line) or judgments CSV")
    parser.add_argument("--num-queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--url", default=vector_engine.MEMORY, help="Qdrant url (default: in-process, loaded here)")
    parser.add_argument("--load", action="store_true", help="upload the release's embeddings to --url first")
    parser.add_argument("--ef-search", type=int, default=EF_SEARCH)
    parser.add_argument("--exclude", type=int, default=100, help="rows filtered out in the filtered run (0: none)")
    parser.add_argument("--filtered-queries", type=int, default=20)
    args = parser.parse_args(argv)

    manifest = read_manifest(args.release)
    embeddings = np.load(args.release / EMBEDDINGS)
    queries = load_queries(args.queries, args.num_queries)
    query_vectors = encode_queries(args.release, manifest, queries)

    start = time.perf_counter()
    hnsw = DenseIndex.build(embeddings, hnsw_threshold=0, ef_search=args.ef_search)
    hnsw_build_s = time.perf_counter() - start
    client = vector_engine.connect(args.url, timeout_s=60)
    collection = vector_engine.collection_name(manifest.release_id)
    start = time.perf_counter()
    if args.load or args.url == vector_engine.MEMORY:
        vector_engine.upload(client, collection, embeddings, progress=False)
    engine_load_s = time.perf_counter() - start
    engine = vector_engine.QdrantDenseIndex.open(client, collection, embeddings, ef_search=args.ef_search)
    backends: dict[str, DenseRetriever] = {
        "faiss_flat": DenseIndex.build(embeddings, hnsw_threshold=len(embeddings) + 1),
        "faiss_hnsw": hnsw,
        "qdrant": engine,
    }
    report: dict[str, object] = {
        "release": manifest.release_id,
        "items": len(embeddings),
        "dim": int(embeddings.shape[1]),
        "queries": len(queries),
        "k": args.k,
        "ef_search": args.ef_search,
        "qdrant_url": args.url,
        "hnsw_build_s": round(hnsw_build_s, 2),
        "qdrant_load_s": round(engine_load_s, 2),
        "unfiltered": compare(backends, query_vectors, args.k),
    }
    if args.exclude > 0:
        allowed = np.ones(len(embeddings), dtype=bool)
        allowed[np.random.default_rng(0).choice(len(embeddings), size=args.exclude, replace=False)] = False
        report["filtered"] = {
            "excluded_rows": args.exclude,
            "queries": min(args.filtered_queries, len(queries)),
            **compare(backends, query_vectors[: args.filtered_queries], args.k, allowed),
        }
    engine.close()
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
