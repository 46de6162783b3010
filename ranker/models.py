"""The two model seams (Encoder, Scorer), the query tokenizer, and in-process ONNX Runtime models.

The service runs the models on Triton (ranker.triton); offline evaluation and unit tests run the
very same ONNX files in-process through OnnxEncoder / OnnxScorer. Tensor names and shapes:

    text_encoder: input_ids INT64 [batch, tokens], attention_mask INT64 [batch, tokens]
                  -> embedding FP32 [batch, dim] (mean-pooled, L2-normalised)
    ranker:       features FP32 [rows, NUM_FEATURES] -> score FP32 [rows, 1]
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

from ranker.errors import BackendTimeout

ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_OUTPUT = "embedding"
RANKER_INPUT = "features"
RANKER_OUTPUT = "score"
# ONNX files in a model version folder: fp32 for GPUs (config.pbtxt); the query encoder's CPU config
# (configs/cpu.pbtxt) runs its int8 copy, ~3x faster on CPU at cosine ~0.99 to fp32 (docs/performance.md).
ONNX_FILE = "model.onnx"
ENCODER_CPU_ONNX_FILE = "model.int8.onnx"


def encoder_cpu_onnx(version_dir: Path) -> Path:
    """The query encoder file the CPU config runs: the int8 copy, or model.onnx in releases without one."""
    int8 = version_dir / ENCODER_CPU_ONNX_FILE
    return int8 if int8.is_file() else version_dir / ONNX_FILE


class Encoder(Protocol):
    async def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, timeout: float | None) -> np.ndarray:
        """Embeddings [batch, dim] for padded token ids; raises ranker.errors.BackendError."""
        ...


_CacheKey = tuple[tuple[int, ...], bytes, bytes]  # the token ids' shape and bytes, the mask's bytes


class CachedEncoder:
    """An Encoder with a least-recently-used cache of query embeddings in front of it.

    Shop traffic repeats its head queries, and an embedding depends only on the query's token ids and
    the encoder (one per release: each release's Ranker gets its own cache). A repeat skips the encoder
    round trip, and is still answered with its dense retrieval while the encoder is down. Concurrent
    misses of one query share a single encoder call (a burst of a popular query after a release swap
    costs one inference); each caller still waits no longer than its own timeout. Failures are not
    cached. `on_lookup(hit)` is told of every lookup (the hit-rate metric).

    The shared call runs with the cache's own `fetch_timeout`, not the first caller's: a caller with
    almost no time left must not fail every other caller of the same query. The cache is for queries: the
    catalog's titles go to `uncached`, and so do batches of several texts.
    """

    def __init__(
        self,
        inner: Encoder,
        max_entries: int,
        on_lookup: Callable[[bool], object] | None = None,
        *,
        fetch_timeout: float | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._inner = inner
        self._max_entries = max_entries
        self._on_lookup = on_lookup
        self._fetch_timeout = fetch_timeout
        self._cache: OrderedDict[_CacheKey, np.ndarray] = OrderedDict()
        self._pending: dict[_CacheKey, asyncio.Future[np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def uncached(self) -> Encoder:
        """The encoder behind the cache, for what is not a query (catalog titles)."""
        return self._inner

    async def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, timeout: float | None) -> np.ndarray:
        if input_ids.shape[0] != 1:
            return await self._inner.encode(input_ids, attention_mask, timeout=timeout)
        key = (input_ids.shape, input_ids.tobytes(), attention_mask.tobytes())
        cached = self._cache.get(key)
        if self._on_lookup is not None:
            self._on_lookup(cached is not None)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        call = self._pending.get(key)
        if call is None:
            # The call belongs to the cache, not to this caller: a caller that gives up leaves it running for
            # the others, and its answer still fills the cache.
            call = asyncio.ensure_future(self._fetch(key, input_ids, attention_mask))
            self._pending[key] = call
            call.add_done_callback(lambda done: self._settle(key, done))
        try:
            return await asyncio.wait_for(asyncio.shield(call), timeout)
        except TimeoutError as e:
            raise BackendTimeout("text_encoder", f"no embedding within {timeout:.3f}s") from e

    async def _fetch(self, key: _CacheKey, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        embedding = await self._inner.encode(input_ids, attention_mask, timeout=self._fetch_timeout)
        embedding = np.array(embedding, dtype=np.float32)
        embedding.setflags(write=False)  # shared by every request for this query
        self._cache[key] = embedding
        if len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return embedding

    def _settle(self, key: _CacheKey, call: asyncio.Future[np.ndarray]) -> None:
        if self._pending.get(key) is call:
            del self._pending[key]
        if not call.cancelled():
            call.exception()  # seen: a failure nobody waited for any more is not logged as lost


class Scorer(Protocol):
    async def score(self, features: np.ndarray, *, timeout: float | None) -> np.ndarray:
        """One relevance score per feature row; raises ranker.errors.BackendError."""
        ...


class QueryTokenizer:
    """WordPiece ids truncated to max_tokens and padded to the next multiple of `bucket`.

    Bucketed lengths (8, 16, 24, 32 tokens) keep short queries cheap to encode while giving
    concurrent requests few distinct shapes, which is what Triton's dynamic batcher merges (the CPU
    model also accepts ragged lengths and pads them itself).
    """

    def __init__(self, tokenizer_file: Path, max_tokens: int, *, bucket: int = 8) -> None:
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        self._tok.enable_truncation(max_length=max_tokens)
        self._tok.enable_padding(pad_id=0, pad_to_multiple_of=bucket)
        self.max_tokens = max_tokens

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self._tok.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask


def _session(path: Path, threads: int) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle intra-op threads sleep instead of spinning: a spinning pool burns the core that the rest
    # of the request (or another process on a small machine) needs, for a few percent of latency.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """The text_encoder ONNX file run in-process."""

    def __init__(self, onnx_file: Path, *, threads: int = 0) -> None:
        self._session = _session(onnx_file, threads)

    def encode_sync(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {ENCODER_INPUTS[0]: input_ids, ENCODER_INPUTS[1]: attention_mask}
        (embedding,) = self._session.run([ENCODER_OUTPUT], feeds)  # type: ignore[attr-defined]
        return np.asarray(embedding, dtype=np.float32)

    async def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, timeout: float | None) -> np.ndarray:
        return await asyncio.to_thread(self.encode_sync, input_ids, attention_mask)


class OnnxScorer:
    """The ranker ONNX file run in-process."""

    def __init__(self, onnx_file: Path, *, threads: int = 1) -> None:
        self._session = _session(onnx_file, threads)

    def score_sync(self, features: np.ndarray) -> np.ndarray:
        (scores,) = self._session.run([RANKER_OUTPUT], {RANKER_INPUT: features.astype(np.float32)})  # type: ignore[attr-defined]
        return np.asarray(scores, dtype=np.float32).reshape(-1)

    async def score(self, features: np.ndarray, *, timeout: float | None) -> np.ndarray:
        return self.score_sync(features)
