"""Dense retrieval on a Qdrant vector engine: the only module that imports qdrant_client.

For catalogs that outgrow one replica's memory the ANN lives in a Qdrant cluster instead of each
replica's FAISS index. A release's embeddings are uploaded once, offline, with item row ids as
point ids, into the collection `ranker-<release_id>`:

    python -m ranker.vector_engine load --release releases/R --url http://qdrant:6333
    python -m ranker.vector_engine load --release releases/R --url local:/var/lib/ranker/qdrant

and the service reads it with RANKER_DENSE_BACKEND=qdrant RANKER_VECTOR_ENGINE_URL=<the same url>.
`local:/path` (and `:memory:`, for tests) is qdrant-client's in-process engine: the same client API
as a server, exact search in numpy, one process per folder (and one client: releases open at once
during a swap share it, see SHARED). Filters (the request's `allowed` mask)
are sent with the query as a point-id condition, so the engine searches only allowed points.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from ranker.errors import BackendFailed, BackendTimeout, BackendUnavailable, NotFound, RankerError
from ranker.retrieval import EF_SEARCH

ENGINE = "qdrant"
LOCAL_PREFIX = "local:"
MEMORY = ":memory:"
COLLECTION_PREFIX = "ranker-"
UPLOAD_BATCH = 1024
# The server's HNSW graph; the same shape as DenseIndex.build's FAISS HNSW (M=32).
HNSW_M = 32
HNSW_EF_CONSTRUCT = 128
DEFAULT_TIMEOUT_S = 5

T = TypeVar("T")


def collection_name(release_id: str) -> str:
    """The collection holding one release's vectors; releases are immutable, so each gets its own."""
    return COLLECTION_PREFIX + release_id


def connect(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> QdrantClient:
    """A client for `http(s)://host:port` (a server or cluster), `local:/path` or `:memory:` (in-process)."""
    if url == MEMORY:
        return QdrantClient(location=MEMORY)
    if url.startswith(LOCAL_PREFIX):
        path = url.removeprefix(LOCAL_PREFIX)
        if not path:
            raise ValueError(f"vector engine url {url!r} names no folder: use local:/path")
        return QdrantClient(path=path)
    if url.startswith(("http://", "https://")):
        # qdrant-client takes whole seconds.
        return QdrantClient(url=url, timeout=max(1, math.ceil(timeout_s)))
    raise ValueError(f"vector engine url must be http(s)://host:port, local:/path or {MEMORY}, got {url!r}")


class _SharedClients:
    """One client per engine url in this process, counted: a local folder admits one client at a time, so the
    serving release and the next one loading beside it during a swap must share it, and an http client is
    closed when the last release using it is closed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[QdrantClient, int]] = {}

    def acquire(self, url: str) -> QdrantClient:
        key = _url_key(url)
        with self._lock:
            client, users = self._clients.get(key) or (connect(url), 0)
            self._clients[key] = (client, users + 1)
            return client

    def release(self, url: str) -> None:
        key = _url_key(url)
        with self._lock:
            client, users = self._clients[key]
            if users > 1:
                self._clients[key] = (client, users - 1)
                return
            del self._clients[key]
        client.close()

    def users(self, url: str) -> int:
        with self._lock:
            return self._clients.get(_url_key(url), (None, 0))[1]


def _url_key(url: str) -> str:
    """`local:` urls naming the same folder share a client however the path is written."""
    if url.startswith(LOCAL_PREFIX) and url != LOCAL_PREFIX:
        return LOCAL_PREFIX + str(Path(url.removeprefix(LOCAL_PREFIX)).resolve())
    return url


SHARED = _SharedClients()


def _call(what: str, fn: Callable[[], T]) -> T:
    """Run one client call, re-raising the client's transport and HTTP errors as ranker.errors."""
    try:
        return fn()
    except ResponseHandlingException as e:
        if isinstance(e.source, httpx.TimeoutException):
            raise BackendTimeout(ENGINE, f"{what}: timed out") from e
        raise BackendUnavailable(ENGINE, f"{what}: {type(e.source).__name__}: {e.source}") from e
    except ResourceExhaustedResponse as e:
        raise BackendUnavailable(ENGINE, f"{what}: rate limited ({e})") from e
    except UnexpectedResponse as e:
        raise BackendFailed(ENGINE, f"{what}: HTTP {e.status_code} {e.reason_phrase}") from e


def row_filter(allowed: np.ndarray) -> models.Filter:
    """The allowed-row mask as a point-id condition, on its smaller side (ids to keep, or ids to drop)."""
    keep = np.flatnonzero(allowed)
    if 2 * len(keep) <= len(allowed):
        return models.Filter(must=[models.HasIdCondition(has_id=keep.tolist())])
    drop = np.flatnonzero(~allowed)
    return models.Filter(must_not=[models.HasIdCondition(has_id=drop.tolist())])


class QdrantDenseIndex:
    """ranker.retrieval.DenseRetriever over a Qdrant collection whose point ids are the release's rows.

    The ANN runs in the engine; `embeddings` (the release's memory-mapped embeddings.npy) serves the
    exact cosines of candidates and MMR/DPP, which need only the candidates' rows.
    """

    def __init__(
        self,
        client: QdrantClient,
        collection: str,
        embeddings: np.ndarray,
        *,
        num_items: int,
        ef_search: int = EF_SEARCH,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self.collection = collection
        self.embeddings = embeddings
        self._num_items = num_items
        self.ef_search = ef_search
        self._on_close = on_close or client.close
        self._closed = False

    @property
    def num_items(self) -> int:
        return self._num_items

    @property
    def remote(self) -> bool:
        return True  # a server round trip (local: an exact search over every vector)

    @classmethod
    def open(
        cls,
        client: QdrantClient,
        collection: str,
        embeddings: np.ndarray,
        *,
        ef_search: int = EF_SEARCH,
        on_close: Callable[[], None] | None = None,
    ) -> QdrantDenseIndex:
        """Attach to a loaded collection; NotFound unless it holds exactly these embeddings' rows and width.
        close() calls `on_close` (default: closes the client) once."""
        exists = _call("collection_exists", lambda: client.collection_exists(collection))
        if not exists:
            raise NotFound(
                f"vector engine has no collection {collection!r}: run `python -m ranker.vector_engine load` first"
            )
        size = _vector_size(client, collection)
        count = _call("count", lambda: client.count(collection, exact=True).count)
        rows, dim = embeddings.shape
        if size != dim or count != rows:
            raise NotFound(
                f"collection {collection!r} holds {count} vectors of {size} dims, the release {rows} of {dim}: "
                "load it again with --recreate"
            )
        return cls(client, collection, embeddings, num_items=count, ef_search=ef_search, on_close=on_close)

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Row ids of the k nearest items, best first; `allowed` (boolean row mask) is applied by the engine."""
        k = min(k, self.num_items)
        query_filter = None
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=bool)
            if not allowed.any():
                k = 0
            elif not allowed.all():
                query_filter = row_filter(allowed)
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        vector = np.asarray(query, dtype=np.float32).reshape(-1).tolist()
        params = models.SearchParams(hnsw_ef=max(self.ef_search, k))
        response = _call(
            "query_points",
            lambda: self._client.query_points(
                self.collection,
                query=vector,
                limit=k,
                query_filter=query_filter,
                search_params=params,
                with_payload=False,
                with_vectors=False,
            ),
        )
        return np.array([int(point.id) for point in response.points], dtype=np.int64)

    def similarities(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact cosine between the query and the given items."""
        return np.asarray(self.embeddings[rows] @ query.astype(np.float32), dtype=np.float32)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._on_close()


def open_shared(url: str, collection: str, embeddings: np.ndarray, *, ef_search: int = EF_SEARCH) -> QdrantDenseIndex:
    """QdrantDenseIndex.open on this process's shared client for `url`; its close() lets go of the client."""
    client = SHARED.acquire(url)
    try:
        return QdrantDenseIndex.open(
            client, collection, embeddings, ef_search=ef_search, on_close=partial(SHARED.release, url)
        )
    except BaseException:
        SHARED.release(url)  # a local folder stays locked while its client is open
        raise


def _vector_size(client: QdrantClient, collection: str) -> int:
    info = _call("get_collection", lambda: client.get_collection(collection))
    params = info.config.params.vectors
    if not isinstance(params, models.VectorParams):
        raise NotFound(f"collection {collection!r} has named vectors; expected one unnamed vector per point")
    return int(params.size)


def upload(
    client: QdrantClient,
    collection: str,
    embeddings: np.ndarray,
    *,
    batch_size: int = UPLOAD_BATCH,
    recreate: bool = False,
    progress: bool = True,
) -> int:
    """Upsert every embedding row as point id = row, in batches; returns the collection's point count.

    Idempotent: running it again over the same collection rewrites the same points (so an interrupted
    load can simply be repeated). `recreate` drops the collection first.
    """
    from tqdm import tqdm

    rows, dim = embeddings.shape
    if recreate and _call("collection_exists", lambda: client.collection_exists(collection)):
        _call("delete_collection", lambda: client.delete_collection(collection))
    if not _call("collection_exists", lambda: client.collection_exists(collection)):
        _call(
            "create_collection",
            lambda: client.create_collection(
                collection,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.DOT),
                hnsw_config=models.HnswConfigDiff(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT),
            ),
        )
    elif (size := _vector_size(client, collection)) != dim:
        raise NotFound(f"collection {collection!r} holds {size}-dim vectors, these are {dim}: pass --recreate")
    starts = range(0, rows, batch_size)
    for start in tqdm(starts, desc=f"upload {collection}", unit="batch", disable=not progress, mininterval=2.0):
        stop = min(start + batch_size, rows)
        batch = models.Batch(
            ids=list(range(start, stop)),
            vectors=np.asarray(embeddings[start:stop], dtype=np.float32).tolist(),
        )
        _call("upsert", partial(client.upsert, collection, points=batch, wait=True))
    count = _call("count", lambda: client.count(collection, exact=True).count)
    if count != rows:
        raise NotFound(f"collection {collection!r} holds {count} points after loading {rows}: pass --recreate")
    return count


def load_release(url: str, release: Path, *, recreate: bool = False, progress: bool = True) -> dict[str, object]:
    """Upload a release's embeddings.npy into `ranker-<release_id>` at `url`; a summary for the log."""
    from ranker.release import EMBEDDINGS, read_manifest

    manifest = read_manifest(release)
    embeddings = np.load(release / EMBEDDINGS, mmap_mode="r")
    if embeddings.shape != (manifest.items, manifest.embedding_dim):
        raise NotFound(
            f"{release / EMBEDDINGS} has shape {embeddings.shape}, the manifest says "
            f"({manifest.items}, {manifest.embedding_dim})"
        )
    collection = collection_name(manifest.release_id)
    start = time.perf_counter()
    client = connect(url, timeout_s=60)
    try:
        count = upload(client, collection, embeddings, recreate=recreate, progress=progress)
    finally:
        client.close()  # a local folder stays locked until its client closes
    return {"url": url, "collection": collection, "points": count, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ranker.vector_engine", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="upload a release's embeddings into the vector engine")
    load.add_argument("--release", type=Path, required=True, help="release folder written by offline.export")
    load.add_argument("--url", required=True, help="http(s)://host:6333, or local:/path for the in-process engine")
    load.add_argument("--recreate", action="store_true", help="drop the release's collection first")
    load.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = load_release(args.url, args.release, recreate=args.recreate, progress=not args.quiet)
    except (ValueError, RankerError) as e:
        raise SystemExit(f"error: {e}") from e
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
