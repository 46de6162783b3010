"""The Triton runner's batching logic: concatenate requests, pad token axes, split outputs back."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

RUNNER_FILE = Path(__file__).resolve().parents[2] / "triton_models" / "onnx_runner.py"


def _load_runner() -> ModuleType:
    # triton_models/ is a model repository template, not a package: load the file directly.
    spec = importlib.util.spec_from_file_location("onnx_runner", RUNNER_FILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


runner = _load_runner()

ENCODER_CONFIG = {
    "input": [{"name": "input_ids"}, {"name": "attention_mask"}],
    "output": [{"name": "embedding"}],
    "parameters": {
        "onnx_file": {"string_value": "encoder.onnx"},
        "intra_op_threads": {"string_value": "3"},
        "pad_axis1": {"string_value": "true"},
    },
}


def tokens(rows: int, length: int, start: int) -> dict[str, np.ndarray]:
    ids = np.arange(start, start + rows * length, dtype=np.int64).reshape(rows, length)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_settings_from_model_config() -> None:
    settings = runner.parse_settings(ENCODER_CONFIG)
    assert settings.onnx_file == "encoder.onnx"
    assert settings.intra_op_threads == 3
    assert settings.pad_axis1 is True
    assert settings.input_names == ("input_ids", "attention_mask")
    assert settings.output_names == ("embedding",)


def test_settings_defaults() -> None:
    settings = runner.parse_settings({"input": [{"name": "features"}], "output": [{"name": "score"}]})
    assert (settings.onnx_file, settings.intra_op_threads, settings.pad_axis1) == ("model.onnx", 2, False)


def test_bad_thread_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="intra_op_threads"):
        runner.parse_settings({"parameters": {"intra_op_threads": {"string_value": "many"}}})


def test_pad_axis1_right_pads_with_zeros() -> None:
    short, long = np.ones((2, 3), dtype=np.int64), np.ones((1, 5), dtype=np.int64)
    padded = runner.pad_axis1([short, long])
    assert [p.shape for p in padded] == [(2, 5), (1, 5)]
    np.testing.assert_array_equal(padded[0], [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    assert padded[1] is long  # already the longest: not copied


def test_concat_keeps_request_order_and_sizes() -> None:
    requests = [
        {"features": np.full((3, 11), 1, np.float32)},
        {"features": np.full((1, 11), 2, np.float32)},
        {"features": np.full((5, 11), 3, np.float32)},
    ]
    feeds, sizes = runner.concat_requests(requests, ["features"], pad=False)
    assert sizes == [3, 1, 5]
    assert feeds["features"].shape == (9, 11)
    np.testing.assert_array_equal(feeds["features"][:, 0], [1, 1, 1, 2, 3, 3, 3, 3, 3])


def test_concat_pads_different_token_lengths() -> None:
    feeds, sizes = runner.concat_requests(
        [tokens(2, 3, 1), tokens(1, 6, 100)], ["input_ids", "attention_mask"], pad=True
    )
    assert sizes == [2, 1]
    assert feeds["input_ids"].shape == feeds["attention_mask"].shape == (3, 6)
    np.testing.assert_array_equal(feeds["attention_mask"].sum(axis=1), [3, 3, 6])
    np.testing.assert_array_equal(feeds["input_ids"][0], [1, 2, 3, 0, 0, 0])


def test_concat_without_padding_rejects_different_lengths() -> None:
    with pytest.raises(ValueError):
        runner.concat_requests([tokens(1, 3, 1), tokens(1, 4, 1)], ["input_ids", "attention_mask"], pad=False)


def test_split_returns_each_request_its_rows() -> None:
    scores = np.arange(9, dtype=np.float32).reshape(9, 1)
    parts = runner.split_outputs({"score": scores}, [3, 1, 5])
    assert [p["score"].ravel().tolist() for p in parts] == [[0, 1, 2], [3], [4, 5, 6, 7, 8]]


def test_split_rejects_wrong_row_count() -> None:
    with pytest.raises(ValueError, match="rows"):
        runner.split_outputs({"score": np.zeros((4, 1), np.float32)}, [3, 2])


def _sum_model(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stand-in for the ONNX session: one number per row that depends on the whole row."""
    return {"embedding": (feeds["input_ids"] * feeds["attention_mask"]).sum(axis=1, keepdims=True).astype(np.float32)}


def test_run_batched_runs_once_and_answers_in_order() -> None:
    calls: list[int] = []

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(feeds["input_ids"]))
        return _sum_model(feeds)

    settings = runner.parse_settings(ENCODER_CONFIG)
    requests = [tokens(2, 3, 1), tokens(1, 3, 10), tokens(3, 3, 50)]
    results = runner.run_batched(run, requests, settings)
    assert calls == [6]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["embedding"], _sum_model(request)["embedding"])


def test_run_batched_runs_each_token_length_as_its_own_batch() -> None:
    """No query is padded to a longer neighbour's length: one run per length, shortest first."""
    calls: list[tuple[int, int]] = []

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(feeds["input_ids"].shape)
        return _sum_model(feeds)

    settings = runner.parse_settings(ENCODER_CONFIG)
    requests = [tokens(2, 16, 1), tokens(1, 8, 10), tokens(3, 16, 50), tokens(1, 8, 7)]
    results = runner.run_batched(run, requests, settings)
    assert calls == [(2, 8), (5, 16)]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["embedding"], _sum_model(request)["embedding"])


def test_one_bad_request_does_not_fail_the_others() -> None:
    settings = runner.parse_settings(ENCODER_CONFIG)
    bad = {"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    missing = {"input_ids": np.ones((1, 3), np.int64)}
    # a mask shorter than its ids, which padding to a neighbour's length would otherwise hide
    narrow = {"input_ids": np.ones((1, 3), np.int64), "attention_mask": np.ones((1, 2), np.int64)}
    requests = [tokens(1, 3, 1), bad, missing, tokens(2, 4, 7), narrow]
    results = runner.run_batched(_sum_model, requests, settings)
    assert isinstance(results[1], runner.RequestError)
    assert isinstance(results[2], runner.RequestError)
    assert isinstance(results[4], runner.RequestError) and "axis 1" in str(results[4])
    np.testing.assert_array_equal(results[0]["embedding"], _sum_model(requests[0])["embedding"])
    np.testing.assert_array_equal(results[3]["embedding"], _sum_model(requests[3])["embedding"])


def test_failed_merged_run_is_retried_per_request() -> None:
    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (feeds["input_ids"] < 0).any():
            raise RuntimeError("negative id")
        return _sum_model(feeds)

    settings = runner.parse_settings(ENCODER_CONFIG)
    poisoned = tokens(1, 3, 1)
    poisoned["input_ids"][0, 0] = -1
    results = runner.run_batched(run, [tokens(1, 3, 1), poisoned, tokens(1, 3, 5)], settings)
    assert isinstance(results[1], RuntimeError)
    assert results[0]["embedding"].shape == results[2]["embedding"].shape == (1, 1)


def test_module_imports_without_triton() -> None:
    assert runner.pb_utils is None
    assert "onnxruntime" not in vars(runner)  # the session is created only inside Triton
