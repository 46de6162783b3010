"""Triton python-backend model that runs its version folder's ONNX file, one ORT call per batch.

Installed as `<model>/<version>/model.py` for every model of the CPU model repository
(offline/triton_repo.py copies it). The dynamic batcher hands execute() several requests; they are
concatenated along the batch axis, run through ONNX Runtime once and split back per request,
which is what makes batching pay off on CPU. Config parameters (configs/cpu.pbtxt):

    onnx_file         ONNX file relative to the version folder (default model.onnx)
    intra_op_threads  ONNX Runtime intra-op threads (default 2)
    pad_axis1         "true": right-pad axis 1 with zeros so requests of different lengths stack

The concat/pad/split logic is plain numpy at module level so it is testable without Triton.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:  # only importable inside the Triton python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised when imported by unit tests
    pb_utils = None

DEFAULT_ONNX_FILE = "model.onnx"
DEFAULT_THREADS = 2

Inputs = dict[str, np.ndarray]


class RequestError(ValueError):
    """One request's inputs cannot be run; only that request gets an error response."""


@dataclass(frozen=True, kw_only=True)
class RunnerSettings:
    onnx_file: str
    intra_op_threads: int
    pad_axis1: bool
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def _parameter(parameters: Mapping[str, Any], key: str, default: str) -> str:
    value = parameters.get(key, {})
    text = value.get("string_value", "") if isinstance(value, Mapping) else str(value)
    return text.strip() or default


def parse_settings(model_config: Mapping[str, Any]) -> RunnerSettings:
    """Settings from the parsed model config (the JSON Triton passes as args["model_config"])."""
    parameters = model_config.get("parameters", {}) or {}
    threads_text = _parameter(parameters, "intra_op_threads", str(DEFAULT_THREADS))
    try:
        threads = int(threads_text)
    except ValueError as e:
        raise ValueError(f"parameter intra_op_threads must be an integer, got {threads_text!r}") from e
    if threads < 0:
        raise ValueError(f"parameter intra_op_threads must be >= 0, got {threads}")
    return RunnerSettings(
        onnx_file=_parameter(parameters, "onnx_file", DEFAULT_ONNX_FILE),
        intra_op_threads=threads,
        pad_axis1=_parameter(parameters, "pad_axis1", "false").lower() in ("true", "1", "yes"),
        input_names=tuple(i["name"] for i in model_config.get("input", [])),
        output_names=tuple(o["name"] for o in model_config.get("output", [])),
    )


def batch_size(inputs: Mapping[str, np.ndarray], names: Sequence[str]) -> int:
    """The request's batch size; raises RequestError when an input is missing or sizes disagree."""
    missing = [n for n in names if n not in inputs]
    if missing:
        raise RequestError(f"missing input(s) {missing}")
    sizes = {n: int(inputs[n].shape[0]) if inputs[n].ndim else -1 for n in names}
    if len(set(sizes.values())) != 1 or -1 in sizes.values():
        raise RequestError(f"inputs must share the batch dimension, got shapes { {n: inputs[n].shape for n in names} }")
    return next(iter(sizes.values()))


def pad_axis1(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Right-pad every array with zeros along axis 1 to the longest length among them."""
    if not arrays or any(a.ndim < 2 for a in arrays):
        return list(arrays)
    longest = max(a.shape[1] for a in arrays)
    padded = []
    for a in arrays:
        extra = longest - a.shape[1]
        if extra:
            widths = [(0, 0)] * a.ndim
            widths[1] = (0, extra)
            a = np.pad(a, widths, mode="constant", constant_values=0)
        padded.append(a)
    return padded


def concat_requests(
    requests: Sequence[Mapping[str, np.ndarray]], names: Sequence[str], *, pad: bool
) -> tuple[Inputs, list[int]]:
    """Stack each named input of every request along axis 0; returns the feeds and batch sizes.

    Requests must already be valid (see batch_size). Without `pad`, differing trailing shapes
    raise ValueError from numpy, which the caller turns into per-request runs.
    """
    sizes = [batch_size(r, names) for r in requests]
    feeds: Inputs = {}
    for name in names:
        arrays = [np.asarray(r[name]) for r in requests]
        if pad:
            arrays = pad_axis1(arrays)
        feeds[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    return feeds, sizes


def split_outputs(outputs: Mapping[str, np.ndarray], sizes: Sequence[int]) -> list[Inputs]:
    """Cut each batched output back into one dict per request, in request order."""
    total = sum(sizes)
    for name, value in outputs.items():
        if value.shape[0] != total:
            raise ValueError(f"output {name} has {value.shape[0]} rows, the batch had {total}")
    bounds = np.cumsum(sizes)[:-1]
    parts = {name: np.split(value, bounds, axis=0) for name, value in outputs.items()}
    return [{name: parts[name][i] for name in outputs} for i in range(len(sizes))]


def run_batched(
    run: Any, requests: Sequence[Mapping[str, np.ndarray]], settings: RunnerSettings
) -> list[Inputs | Exception]:
    """Outputs (or the exception) per request, running all valid requests in one `run(feeds)` call.

    `run` maps feeds to {output name: array}. When the merged call fails, each request is retried
    alone so that one bad request cannot fail the others it was batched with.
    """
    results: list[Inputs | Exception] = [RequestError("not run") for _ in requests]
    valid: list[int] = []
    for i, request in enumerate(requests):
        try:
            batch_size(request, settings.input_names)
            if settings.pad_axis1:
                _same_axis1(request, settings.input_names)
            valid.append(i)
        except RequestError as e:
            results[i] = e
    for group in _same_length(requests, valid, settings):
        try:
            feeds, sizes = concat_requests([requests[i] for i in group], settings.input_names, pad=settings.pad_axis1)
            for i, out in zip(group, split_outputs(run(feeds), sizes), strict=True):
                results[i] = out
        except Exception:
            for i in group:
                results[i] = _run_one(run, requests[i], settings)
    return results


def _same_axis1(inputs: Mapping[str, np.ndarray], names: Sequence[str]) -> None:
    """With pad_axis1, a request's inputs must agree on axis 1 (ids and their mask): padding one of them
    to a batch neighbour's length would otherwise hide the mismatch that running it alone reports."""
    lengths = {n: int(inputs[n].shape[1]) for n in names if inputs[n].ndim > 1}
    if len(set(lengths.values())) > 1:
        raise RequestError(f"inputs must share axis 1, got lengths {lengths}")


def _same_length(
    requests: Sequence[Mapping[str, np.ndarray]], valid: Sequence[int], settings: RunnerSettings
) -> list[list[int]]:
    """The valid requests in groups run as one batch each: all of them, or with pad_axis1 one group per
    axis-1 length (token count), shortest first. Padding 8-token queries to a 16-token neighbour
    would nearly double their compute: 14% of Home Depot queries are 16 tokens, so most batches of
    8 would hold one."""
    if not settings.pad_axis1 or not valid:
        return [list(valid)] if valid else []
    first = settings.input_names[0]
    groups: dict[int, list[int]] = {}
    for i in valid:
        array = requests[i][first]
        groups.setdefault(int(array.shape[1]) if array.ndim > 1 else 0, []).append(i)
    return [groups[length] for length in sorted(groups)]


def _run_one(run: Any, request: Mapping[str, np.ndarray], settings: RunnerSettings) -> Inputs | Exception:
    try:
        feeds, sizes = concat_requests([request], settings.input_names, pad=False)
        return split_outputs(run(feeds), sizes)[0]
    except Exception as e:
        return e


class TritonPythonModel:
    """Triton entry point: one ONNX Runtime session per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort  # imported here so unit tests of the pure functions stay light

        self._settings = parse_settings(json.loads(args["model_config"]))
        path = Path(args["model_repository"]) / args["model_version"] / self._settings.onnx_file
        if not path.is_file():
            raise FileNotFoundError(f"{args['model_name']}: ONNX file {path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._settings.intra_op_threads
        options.inter_op_num_threads = 1  # one graph run at a time: execute() is already serial
        # Idle intra-op threads sleep instead of spinning: on a small CPU machine a spinning pool takes
        # the cores the ranker process and the other model need (measured: ~2x the CPU per query).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._output_names = list(self._settings.output_names) or [o.name for o in self._session.get_outputs()]

    def _run(self, feeds: Inputs) -> Inputs:
        values = self._session.run(self._output_names, feeds)
        return dict(zip(self._output_names, values, strict=True))

    def execute(self, requests: list[Any]) -> list[Any]:
        inputs = [self._read(request) for request in requests]
        results = run_batched(self._run, inputs, self._settings)
        return [self._response(result) for result in results]

    def _read(self, request: Any) -> Inputs:
        read: Inputs = {}
        for name in self._settings.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                read[name] = tensor.as_numpy()
        return read

    def _response(self, result: Inputs | Exception) -> Any:
        if isinstance(result, Exception):
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(result)))
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in result.items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self._session = None
