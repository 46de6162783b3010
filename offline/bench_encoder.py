"""`python -m offline.bench_encoder`: the query encoder's latency and throughput by batch size on one device.

    python -m offline.bench_encoder --device cuda --batch-sizes 1,8,16,32,64,128 --tokens 8,16 --json
    python -m offline.bench_encoder --model ~/.cache/ranker/encoders/<key>/model --device cpu --json
    python -m offline.bench_encoder --input docs/bench/encoder-h200.json --plot docs/encoder-gpu.png

Runs the release's encoder architecture (transformer + masked mean pooling + L2 norm,
offline.encoder.MeanPooledEncoder) without Triton, so that a GPU machine without the Triton image
still tells what the production config's batching buys: for each backend, dtype, token length and
batch size, the time of one batch (p50/p99 over --repeats, synchronised) and the queries per second
that one model instance sustains at that batch size. Backends:

- `torch`: eager PyTorch in each --dtypes (fp16 only on CUDA).
- `torch-graph`: the same fp16/fp32 model replayed as a CUDA graph per shape (CUDA only), which
  removes the per-kernel launch cost that dominates small batches.
- `onnxruntime`: the model exported with offline.encoder.export_onnx (the file a release ships)
  and run by ONNX Runtime on its best provider for --device, what Triton's onnxruntime backend runs.

Each backend's embeddings are compared with fp32 torch on the same inputs (minimum cosine), so a
faster variant that changes the answer shows it. Inputs are random token ids of the given length
(content does not change the time of a transformer of fixed shape).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offline.encoder import MeanPooledEncoder, export_onnx, load_reference
from ranker.bench_stages import percentiles

BACKENDS = ("torch", "torch-graph", "onnxruntime")


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(run: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Milliseconds per call, each synchronised with the device, after a warm-up."""
    for _ in range(min(10, repeats)):
        run()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def inputs(batch: int, tokens: int, vocab: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] + random WordPiece ids + [SEP], as the service pads them: every row `tokens` long."""
    ids = rng.integers(1000, vocab, size=(batch, tokens), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return ids, np.ones_like(ids)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


class TorchRunner:
    """One model copy on the device in one dtype; `graph` replays a captured CUDA graph per input shape."""

    def __init__(self, model: MeanPooledEncoder, device: torch.device, dtype: torch.dtype, graph: bool) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.graph = graph
        self._graphs: dict[tuple[int, ...], tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def prepare(self, ids: np.ndarray, mask: np.ndarray) -> Callable[[], torch.Tensor]:
        ids_t = torch.from_numpy(ids).to(self.device)
        mask_t = torch.from_numpy(mask).to(self.device)
        if not self.graph:

            def eager() -> torch.Tensor:
                with torch.inference_mode():
                    return self.model(ids_t, mask_t)

            return eager
        static_ids, static_mask = ids_t.clone(), mask_t.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
                self.model(static_ids, static_mask)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            out = self.model(static_ids, static_mask)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        self._graphs[tuple(ids.shape)] = (graph, static_ids, static_mask, out)  # keep the graph's memory alive
        return replay


class OrtRunner:
    """The exported ONNX file on ONNX Runtime's best provider for the device; inputs and outputs cross as numpy."""

    def __init__(self, onnx_file: Path, device: torch.device) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
        self.providers = [p for p in wanted if p in available] + ["CPUExecutionProvider"]
        if device.type == "cuda" and self.providers[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"ONNX Runtime has no CUDA provider here (available: {available})")
        self.session = ort.InferenceSession(str(onnx_file), providers=self.providers)

    def prepare(self, ids: np.ndarray, mask: np.ndarray) -> Callable[[], object]:
        feed = {"input_ids": ids, "attention_mask": mask}
        return lambda: self.session.run(None, feed)[0]


def as_numpy(value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def bench(args: argparse.Namespace) -> dict[str, object]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    model, tokenizer = load_reference(args.model)
    vocab = int(tokenizer.vocab_size)
    reference = TorchRunner(model, device, torch.float32, graph=False)

    runners: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for backend in args.backends:
        if backend == "onnxruntime":
            onnx_file = Path(tempfile.mkdtemp(prefix="bench-encoder-")) / "model.onnx"
            try:
                export_onnx(load_reference(args.model)[0].float().eval(), tokenizer, onnx_file)
                runners["onnxruntime/fp32"] = OrtRunner(onnx_file, device)
            except Exception as error:  # a benchmark row missing is reported, not fatal to the others
                notes["onnxruntime"] = f"{type(error).__name__}: {error}"
            continue
        if backend == "torch-graph" and device.type != "cuda":
            notes[backend] = "CUDA graphs need --device cuda"
            continue
        for dtype_name in args.dtypes:
            if dtype_name == "fp16" and device.type != "cuda":
                notes[f"{backend}/fp16"] = "fp16 only on CUDA"
                continue
            dtype = torch.float16 if dtype_name == "fp16" else torch.float32
            runners[f"{backend}/{dtype_name}"] = TorchRunner(
                load_reference(args.model)[0], device, dtype, graph=backend == "torch-graph"
            )

    rng = np.random.default_rng(0)
    rows: list[dict[str, object]] = []
    for tokens in args.tokens:
        for batch in args.batch_sizes:
            ids, mask = inputs(batch, tokens, vocab, rng)
            expected = as_numpy(reference.prepare(ids, mask)())
            for name, runner in runners.items():
                run = runner.prepare(ids, mask)
                cosine = min_cosine(as_numpy(run()), expected)
                stats = percentiles(time_batches(run, device, args.repeats))
                rows.append(
                    {
                        "backend": name,
                        "tokens": tokens,
                        "batch": batch,
                        **{key: round(value, 4) for key, value in stats.items()},
                        "queries_per_s": round(batch / stats["p50_ms"] * 1000.0, 1),
                        "min_cosine_to_fp32": round(cosine, 5),
                    }
                )
                print(f"  {name:>20} tokens {tokens:>3} batch {batch:>4}: {stats['p50_ms']:.3f} ms", file=sys.stderr)
    return {"device": describe(device), "model": str(args.model or "pretrained"), "rows": rows, "notes": notes}


def describe(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["threads"] = torch.get_num_threads()
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    return info


def table(result: dict[str, object]) -> str:
    rows = result["rows"]
    assert isinstance(rows, list)
    lines = [
        "| backend | tokens | batch | p50 ms | p99 ms | queries/s | min cosine to fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['backend']} | {row['tokens']} | {row['batch']} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} "
            f"| {row['queries_per_s']:,.0f} | {row['min_cosine_to_fp32']:.4f} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, object], path: Path) -> None:
    """Queries per second of one model instance against batch size, one panel per token length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    assert isinstance(rows, list)
    token_lengths = sorted({row["tokens"] for row in rows})
    fig, axes = plt.subplots(1, len(token_lengths), figsize=(5.2 * len(token_lengths), 4.2), sharey=True, squeeze=False)
    for ax, tokens in zip(axes[0], token_lengths, strict=True):
        for backend in dict.fromkeys(row["backend"] for row in rows):
            points = sorted(
                (row["batch"], row["queries_per_s"])
                for row in rows
                if row["backend"] == backend and row["tokens"] == tokens
            )
            ax.plot(*zip(*points, strict=True), marker="o", label=backend)
        ax.set(xscale="log", yscale="log", xlabel="batch size", title=f"{tokens} tokens per query")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("queries/s, one model instance")
    axes[0][-1].legend()
    device = result["device"]
    name = device.get("name", device.get("type")) if isinstance(device, dict) else device
    fig.suptitle(f"Query encoder throughput by batch size: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m offline.bench_encoder", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="Hugging Face folder (default: the pretrained package)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", type=lambda s: s.split(","), default=list(BACKENDS))
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "fp16"])
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 8, 16, 32, 64, 128])
    parser.add_argument("--tokens", type=_ints, default=[8, 16])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--plot", type=Path, default=None, help="also write queries/s by batch size to this PNG")
    parser.add_argument("--input", type=Path, default=None, help="re-render an earlier --json result; measures nothing")
    args = parser.parse_args(argv)
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        parser.error(f"--backends: unknown {unknown}; choose from {', '.join(BACKENDS)}")
    bad = [d for d in args.dtypes if d not in ("fp32", "fp16")]
    if bad:
        parser.error(f"--dtypes: unknown {bad}; choose from fp32, fp16")
    if args.repeats < 1 or min(args.batch_sizes, default=0) < 1 or min(args.tokens, default=0) < 3:
        parser.error("--repeats and --batch-sizes must be ≥ 1 and --tokens ≥ 3 ([CLS] + a token + [SEP])")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = json.loads(args.input.read_text()) if args.input else bench(args)
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()
