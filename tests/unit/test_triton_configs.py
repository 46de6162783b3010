"""The Triton config templates parse against the real ModelConfig schema and match the code's tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ranker.features import NUM_FEATURES
from ranker.models import (
    ENCODER_CPU_ONNX_FILE,
    ENCODER_INPUTS,
    ENCODER_OUTPUT,
    ONNX_FILE,
    RANKER_INPUT,
    RANKER_OUTPUT,
)

TEMPLATES = Path(__file__).resolve().parents[2] / "triton_models"
MODELS = ("text_encoder", "ranker")
EMBEDDING_DIM = 384


def load(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def variants(model: str) -> dict[str, mc.ModelConfig]:
    return {"gpu": load(TEMPLATES / model / "config.pbtxt"), "cpu": load(TEMPLATES / model / "configs" / "cpu.pbtxt")}


def test_every_template_parses() -> None:
    files = sorted(TEMPLATES.glob("*/config.pbtxt")) + sorted(TEMPLATES.glob("*/configs/*.pbtxt"))
    assert {f.relative_to(TEMPLATES).parts[0] for f in files} == set(MODELS)
    for path in files:
        assert load(path).name == path.relative_to(TEMPLATES).parts[0], path


def test_model_folders_use_the_release_model_names() -> None:
    release = pytest.importorskip("ranker.release")
    assert {release.ENCODER_MODEL, release.RANKER_MODEL} == set(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_gpu_default_runs_onnxruntime_on_gpu(model: str) -> None:
    config = variants(model)["gpu"]
    assert config.platform == "onnxruntime_onnx" or config.backend == "onnxruntime"
    assert config.default_model_filename == "model.onnx"
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds > 0


@pytest.mark.parametrize("model", MODELS)
def test_cpu_variant_runs_the_python_backend_on_cpu(model: str) -> None:
    config = variants(model)["cpu"]
    assert config.backend == "python"
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    # The query encoder runs its int8 copy on CPU; the ranker's fp32 model is already ~0.03 ms.
    expected = ENCODER_CPU_ONNX_FILE if model == "text_encoder" else ONNX_FILE
    assert config.parameters["onnx_file"].string_value == expected
    assert int(config.parameters["intra_op_threads"].string_value) >= 1


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_encoder_tensors(variant: str) -> None:
    config = variants("text_encoder")[variant]
    assert config.max_batch_size == 64
    assert [i.name for i in config.input] == list(ENCODER_INPUTS)
    for tensor in config.input:
        assert tensor.data_type == mc.TYPE_INT64
        assert list(tensor.dims) == [-1]
    (output,) = config.output
    assert (output.name, output.data_type, list(output.dims)) == (ENCODER_OUTPUT, mc.TYPE_FP32, [EMBEDDING_DIM])


def test_cpu_encoder_pads_token_axis() -> None:
    config = variants("text_encoder")["cpu"]
    assert config.parameters["pad_axis1"].string_value == "true"
    # Without ragged batching the batcher would never merge queries of different lengths.
    assert all(i.allow_ragged_batch for i in config.input)


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_ranker_tensors(variant: str) -> None:
    config = variants("ranker")[variant]
    assert config.max_batch_size == 8192
    (features,) = config.input
    assert (features.name, features.data_type, list(features.dims)) == (RANKER_INPUT, mc.TYPE_FP32, [NUM_FEATURES])
    (score,) = config.output
    assert (score.name, score.data_type, list(score.dims)) == (RANKER_OUTPUT, mc.TYPE_FP32, [1])


def _signature(tensors: object) -> list[tuple[str, int, list[int]]]:
    return [(t.name, t.data_type, list(t.dims)) for t in tensors]  # type: ignore[attr-defined]


@pytest.mark.parametrize("model", MODELS)
def test_gpu_and_cpu_variants_expose_the_same_tensors(model: str) -> None:
    # Clients (ranker.triton) must not be able to tell which variant the server picked.
    gpu, cpu = variants(model)["gpu"], variants(model)["cpu"]
    assert _signature(gpu.input) == _signature(cpu.input)
    assert _signature(gpu.output) == _signature(cpu.output)
    assert gpu.max_batch_size == cpu.max_batch_size


@pytest.mark.parametrize("model", MODELS)
def test_nobatch_variant_is_the_cpu_config_without_the_batcher(model: str) -> None:
    """cpu_nobatch exists only to measure batching: it must not drift from cpu.pbtxt in anything else."""
    cpu = load(TEMPLATES / model / "configs" / "cpu.pbtxt")
    nobatch = load(TEMPLATES / model / "configs" / "cpu_nobatch.pbtxt")
    assert not nobatch.HasField("dynamic_batching")
    cpu.ClearField("dynamic_batching")
    assert cpu == nobatch
