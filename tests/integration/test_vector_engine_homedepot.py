"""The Qdrant engine (local mode) returns exact FAISS's top 100 on the Home Depot catalog.

Embeddings come from a prebuilt release when RANKER_HD_RELEASE names one (all 54,667 items, its own
encoder for the queries); otherwise the pretrained MiniLM encoder is exported and run in-process on
the first HD_SUBSET titles, because embedding all of them takes ~2.5 minutes on 2 cores (see
docs/scale-out.md for the full-catalog numbers and the command that measures them).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ranker import vector_engine
from ranker.bench import load_queries
from ranker.bench_dense import encode_queries, overlap_at_k, run_searches
from ranker.release import EMBEDDINGS, read_manifest
from ranker.retrieval import DenseIndex
from tests.conftest import require_homedepot

pytestmark = [
    pytest.mark.data,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Local mode:UserWarning"),
]

HD_SUBSET = 10_000
NUM_QUERIES = 200
K = 100
MIN_OVERLAP = 0.95


def prebuilt_vectors(release: Path, queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
    manifest = read_manifest(release)
    return np.load(release / EMBEDDINGS), encode_queries(release, manifest, queries)


def computed_vectors(products: Path, queries: list[str], workdir: Path) -> tuple[np.ndarray, np.ndarray]:
    from offline import encoder
    from offline.data import load_catalog
    from ranker.models import OnnxEncoder

    titles = load_catalog(products, limit=HD_SUBSET)["title"].to_list()
    onnx_file, tokenizer_file = workdir / "encoder.onnx", workdir / "tokenizer.json"
    encoder.export_encoder(onnx_file, tokenizer_file, titles[:8])
    session = OnnxEncoder(onnx_file)
    items = encoder.embed_texts(session, tokenizer_file, titles, max_tokens=encoder.MAX_TITLE_TOKENS, desc="titles")
    return items, encoder.embed_queries(session, tokenizer_file, queries)


def test_local_engine_returns_exact_faiss_top_100(tmp_path: Path) -> None:
    data = require_homedepot()
    queries = load_queries(data / "judgments.csv", NUM_QUERIES)
    prebuilt = os.environ.get("RANKER_HD_RELEASE")
    if prebuilt:
        items, query_vectors = prebuilt_vectors(Path(prebuilt), queries)
    else:
        items, query_vectors = computed_vectors(data / "products.csv", queries, tmp_path)
    flat = DenseIndex.build(items, hnsw_threshold=len(items) + 1)

    # In memory: a local folder commits each point to SQLite on its own (minutes for 55k points here);
    # loading into a folder and reopening it is tested in tests/unit/test_vector_engine.py.
    client = vector_engine.connect(vector_engine.MEMORY)
    vector_engine.upload(client, "hd", items, progress=False)
    engine = vector_engine.QdrantDenseIndex.open(client, "hd", items)

    got, _ = run_searches(engine, query_vectors, K)
    want, _ = run_searches(flat, query_vectors, K)
    overlap = overlap_at_k(got, want, K)
    print(f"items={len(items)} queries={len(queries)} overlap@{K}={overlap:.4f}")
    assert overlap >= MIN_OVERLAP

    # A filter travels with the query: 100 excluded rows never come back, the rest is still exact.
    allowed = np.ones(len(items), dtype=bool)
    allowed[np.random.default_rng(0).choice(len(items), size=100, replace=False)] = False
    got, _ = run_searches(engine, query_vectors[:5], K, allowed, warm_up=0)
    want, _ = run_searches(flat, query_vectors[:5], K, allowed, warm_up=0)
    assert all(allowed[rows].all() for rows in got)
    assert overlap_at_k(got, want, K) >= MIN_OVERLAP
    engine.close()
