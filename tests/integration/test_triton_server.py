"""A real tritonserver (CPU config, python backend) serving tiny ONNX models through ranker.triton."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from offline.triton_repo import write_model_repository
from ranker.errors import BackendError, BackendFailed, BackendTimeout, BackendUnavailable
from ranker.features import NUM_FEATURES
from ranker.models import ENCODER_CPU_ONNX_FILE, ENCODER_INPUTS, ENCODER_OUTPUT, RANKER_INPUT, RANKER_OUTPUT
from ranker.triton import TritonEncoder, TritonModels, TritonScorer
from ranker.tritonserver import SHM_FOLDER, LocalTritonServer, TritonServerError
from tests.integration.conftest import children, still_running

pytestmark = [pytest.mark.triton, pytest.mark.slow]

DIM = 384
VERSION = "1"
MODELS = ("text_encoder", "ranker")


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime this project pins
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def tiny_encoder(path: Path) -> Path:
    """Embedding = L2-normalised sin(masked mean of the ids * w + b): padding-invariant like MiniLM."""
    rng = np.random.default_rng(0)
    consts = [
        numpy_helper.from_array(rng.normal(size=(1, DIM)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(DIM,)).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_f", "mask_f"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=1),
        helper.make_node("ReduceSum", ["mask_f", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["total", "count1"], ["mean"]),
        helper.make_node("MatMul", ["mean", "w"], ["proj"]),
        helper.make_node("Add", ["proj", "b"], ["shifted"]),
        helper.make_node("Sin", ["shifted"], ["raw"]),
        helper.make_node("ReduceL2", ["raw"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["raw", "norm"], [ENCODER_OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "tokens"]) for n in ENCODER_INPUTS],
        [helper.make_tensor_value_info(ENCODER_OUTPUT, TensorProto.FLOAT, ["batch", DIM])],
        consts,
    )
    return _save(graph, path)


def tiny_ranker(path: Path) -> Path:
    """Score = features @ w + b."""
    rng = np.random.default_rng(1)
    consts = [
        numpy_helper.from_array(rng.normal(size=(NUM_FEATURES, 1)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([0.5], dtype=np.float32), "b"),
    ]
    nodes = [
        helper.make_node("MatMul", [RANKER_INPUT, "w"], ["linear"]),
        helper.make_node("Add", ["linear", "b"], [RANKER_OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_ranker",
        [helper.make_tensor_value_info(RANKER_INPUT, TensorProto.FLOAT, ["rows", NUM_FEATURES])],
        [helper.make_tensor_value_info(RANKER_OUTPUT, TensorProto.FLOAT, ["rows", 1])],
        consts,
    )
    return _save(graph, path)


@pytest.fixture(scope="session")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    return {
        "text_encoder": tiny_encoder(folder / "encoder.onnx"),
        "ranker": tiny_ranker(folder / "ranker.onnx"),
    }


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory, onnx_files: dict[str, Path]) -> Iterator[LocalTritonServer]:
    repository = tmp_path_factory.mktemp("triton_models")
    # The CPU config runs the encoder's int8 file; the tiny test encoder serves as its own "int8" copy.
    extra = {"text_encoder": {ENCODER_CPU_ONNX_FILE: onnx_files["text_encoder"]}}
    write_model_repository(repository, onnx_files, version=int(VERSION), extra_files=extra)
    log_file = tmp_path_factory.mktemp("triton_log") / "tritonserver.log"
    server = LocalTritonServer(repository, models=MODELS, startup_timeout=120, log_file=log_file)
    server.start()
    print(f"tritonserver ready in {server.startup_seconds:.2f} s (log {server.log_file})")
    yield server
    server.stop()


def _local(path: Path, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([output], feeds)[0], dtype=np.float32)


def _token_batch(rng: np.random.Generator, rows: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(1, 30000, size=(rows, tokens), dtype=np.int64)
    mask = np.ones_like(ids)
    lengths = rng.integers(1, tokens + 1, size=rows)
    for row, length in enumerate(lengths):
        ids[row, length:] = 0
        mask[row, length:] = 0
    return ids, mask


def test_server_loaded_the_cpu_variant(triton_server: LocalTritonServer) -> None:
    for model in MODELS:
        config = triton_server.model_config(model)
        assert config["backend"] == "python"
        assert config["instance_group"][0]["kind"] == "KIND_CPU"  # type: ignore[index]


def test_encoder_matches_onnxruntime(triton_server: LocalTritonServer, onnx_files: dict[str, Path]) -> None:
    ids, mask = _token_batch(np.random.default_rng(2), rows=5, tokens=16)

    async def encode() -> tuple[np.ndarray, float]:
        models = TritonModels(triton_server.grpc_url)
        encoder = TritonEncoder(models, version=VERSION)
        try:
            await encoder.encode(ids[:1], mask[:1], timeout=10.0)  # warm-up
            started = time.perf_counter()
            embedding = await encoder.encode(ids, mask, timeout=10.0)
            return embedding, time.perf_counter() - started
        finally:
            await models.close()

    embedding, seconds = asyncio.run(encode())
    print(f"encoder infer (5 rows) {seconds * 1000:.2f} ms")
    expected = _local(onnx_files["text_encoder"], {"input_ids": ids, "attention_mask": mask}, ENCODER_OUTPUT)
    assert embedding.dtype == np.float32
    assert embedding.shape == (5, DIM)
    np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)


def test_scorer_matches_onnxruntime(triton_server: LocalTritonServer, onnx_files: dict[str, Path]) -> None:
    features = np.random.default_rng(3).normal(size=(300, NUM_FEATURES)).astype(np.float32)

    async def score() -> tuple[np.ndarray, np.ndarray, float]:
        models = TritonModels(triton_server.grpc_url)
        scorer = TritonScorer(models, version=VERSION)
        try:
            await scorer.score(features[:1], timeout=10.0)  # warm-up
            started = time.perf_counter()
            scores = await scorer.score(features, timeout=10.0)
            seconds = time.perf_counter() - started
            return scores, await scorer.score(features[:0], timeout=10.0), seconds
        finally:
            await models.close()

    scores, empty, seconds = asyncio.run(score())
    print(f"ranker infer (300 rows) {seconds * 1000:.2f} ms")
    expected = _local(onnx_files["ranker"], {"features": features}, RANKER_OUTPUT).reshape(-1)
    assert scores.shape == (300,)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert empty.shape == (0,)


def test_concurrent_scores_each_get_their_own_rows_and_are_batched(
    triton_server: LocalTritonServer, onnx_files: dict[str, Path]
) -> None:
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=(int(rng.integers(1, 1000)), NUM_FEATURES)).astype(np.float32) for _ in range(32)]

    async def run() -> tuple[list[np.ndarray], dict[str, int], dict[str, int]]:
        models = TritonModels(triton_server.grpc_url)
        scorer = TritonScorer(models, version=VERSION)
        try:
            before = await models.execution_counts("ranker")
            results = await asyncio.gather(*(scorer.score(b, timeout=30.0) for b in batches))
            return list(results), before, await models.execution_counts("ranker")
        finally:
            await models.close()

    results, before, after = asyncio.run(run())
    for batch, scores in zip(batches, results, strict=True):
        expected = _local(onnx_files["ranker"], {"features": batch}, RANKER_OUTPUT).reshape(-1)
        assert scores.shape == (len(batch),)
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    requests = after["requests"] - before["requests"]
    executions = after["executions"] - before["executions"]
    print(f"ranker: {requests} concurrent requests ran in {executions} executions")
    assert requests == 32
    assert executions < requests  # the python model ran several requests as one batch


def test_concurrent_encodes_of_different_lengths_are_batched(
    triton_server: LocalTritonServer, onnx_files: dict[str, Path]
) -> None:
    rng = np.random.default_rng(5)
    queries = [_token_batch(rng, rows=1, tokens=int(rng.integers(4, 33))) for _ in range(24)]

    async def run() -> tuple[list[np.ndarray], dict[int, int]]:
        models = TritonModels(triton_server.grpc_url)
        encoder = TritonEncoder(models, version=VERSION)
        try:
            results = await asyncio.gather(*(encoder.encode(ids, mask, timeout=30.0) for ids, mask in queries))
            return list(results), await models.batch_statistics("text_encoder")
        finally:
            await models.close()

    results, batch_stats = asyncio.run(run())
    for (ids, mask), embedding in zip(queries, results, strict=True):
        expected = _local(onnx_files["text_encoder"], {"input_ids": ids, "attention_mask": mask}, ENCODER_OUTPUT)
        np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-6)
    print(f"text_encoder execution batch sizes: {batch_stats}")
    assert any(size > 1 for size in batch_stats), batch_stats


def _call_error(url: str, model: str, *, timeout: float = 5.0) -> BackendError:
    async def call() -> None:
        models = TritonModels(url)
        try:
            await TritonScorer(models, version=VERSION, model=model).score(
                np.zeros((2, NUM_FEATURES), dtype=np.float32), timeout=timeout
            )
        finally:
            await models.close()

    with pytest.raises(BackendError) as info:
        asyncio.run(call())
    assert info.value.__cause__ is not None  # translated `from` the tritonclient error
    return info.value


def test_unknown_model_is_a_backend_error(triton_server: LocalTritonServer) -> None:
    error = _call_error(triton_server.grpc_url, "no_such_model")
    assert isinstance(error, BackendUnavailable | BackendFailed)
    assert error.backend == "triton:no_such_model"


def test_unreachable_server_is_unavailable() -> None:
    from ranker.tritonserver import free_port

    error = _call_error(f"127.0.0.1:{free_port()}", "ranker")
    assert isinstance(error, BackendUnavailable)


def test_deadline_is_a_timeout() -> None:
    # A socket that accepts TCP but never speaks HTTP/2: the call can only end by its deadline.
    # (Against the real server a tiny deadline races a sub-millisecond answer.)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        error = _call_error(f"127.0.0.1:{silent.getsockname()[1]}", "ranker", timeout=0.5)
    assert isinstance(error, BackendTimeout)
    assert time.monotonic() - started < 5.0


def test_stopped_server_is_unavailable(tmp_path: Path, onnx_files: dict[str, Path]) -> None:
    repository = tmp_path / "repo"
    write_model_repository(repository, {"ranker": onnx_files["ranker"]})
    with LocalTritonServer(repository) as server:
        url = server.grpc_url

        async def ready() -> bool:
            models = TritonModels(url)
            try:
                return await models.ready(["ranker"])
            finally:
                await models.close()

        assert asyncio.run(ready())
    assert server.pid is None
    assert isinstance(_call_error(url, "ranker"), BackendUnavailable)


def test_what_a_dead_server_leaves_is_stopped_and_removed(tmp_path: Path, onnx_files: dict[str, Path]) -> None:
    """A stub that does not exit after its server died (stopped here, as one blocked in its exit would be)
    and the /dev/shm regions of stubs killed with the server are gone after stop(), and after a start()."""
    repository = tmp_path / "repo"
    write_model_repository(
        repository, onnx_files, extra_files={"text_encoder": {ENCODER_CPU_ONNX_FILE: onnx_files["text_encoder"]}}
    )
    server = LocalTritonServer(repository)
    try:
        for again in (server.start, server.stop):
            assert server.start() is server and server.pid is not None and server.shm_prefix is not None
            stubs, prefix = children(server.pid), server.shm_prefix
            assert len(stubs) == 2 and len(list(SHM_FOLDER.glob(f"{prefix}*"))) == 2
            os.kill(stubs[0], signal.SIGSTOP)  # cannot notice that its server is gone
            os.kill(stubs[1], signal.SIGKILL)  # cannot remove its region
            os.kill(server.pid, signal.SIGKILL)
            while server.running:  # polls: the kill takes a moment to land
                time.sleep(0.01)
            again()
            assert still_running(stubs, timeout=5.0) == []
            assert list(SHM_FOLDER.glob(f"{prefix}*")) == []
    finally:
        server.stop()


def test_explicit_mode_loads_only_the_named_models(tmp_path: Path, onnx_files: dict[str, Path]) -> None:
    repository = tmp_path / "repo"
    write_model_repository(repository, onnx_files)
    with LocalTritonServer(repository, models=["ranker"], model_control_mode="explicit") as server:

        async def readiness() -> tuple[bool, bool]:
            models = TritonModels(server.grpc_url)
            try:
                return await models.ready(["ranker"]), await models.ready(["text_encoder"])
            finally:
                await models.close()

        assert asyncio.run(readiness()) == (True, False)


def test_failed_startup_reports_the_server_log(tmp_path: Path, onnx_files: dict[str, Path]) -> None:
    repository = tmp_path / "repo"
    write_model_repository(repository, {"ranker": onnx_files["ranker"]})
    (repository / "ranker" / "1" / "model.onnx").unlink()  # model.py cannot find its ONNX file
    server = LocalTritonServer(repository, startup_timeout=60)
    with pytest.raises(TritonServerError) as info:
        server.start()
    assert "model.onnx does not exist" in str(info.value)  # the runner's message, from the log
    assert not server.running
