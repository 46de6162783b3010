"""The service's one seam to Triton: encoder/scorer clients over gRPC, tritonclient errors translated."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format, text_format
from tritonclient.grpc import InferInput, InferRequestedOutput, model_config_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from ranker import tracing
from ranker.breaker import CircuitBreaker
from ranker.errors import BackendError, BackendFailed, BackendTimeout, BackendUnavailable, NotConfigured
from ranker.models import ENCODER_INPUTS, ENCODER_OUTPUT, RANKER_INPUT, RANKER_OUTPUT
from ranker.observability import triton_call
from ranker.tritonserver import KEEPALIVE_TIME_MS

# Same names as ranker.release.ENCODER_MODEL / RANKER_MODEL (not imported: release pulls in faiss).
ENCODER_MODEL = "text_encoder"
RANKER_MODEL = "ranker"

T = TypeVar("T")

_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND"}
_TIMEOUT = {"StatusCode.DEADLINE_EXCEEDED"}
# Triton answers an unloaded / unknown / not-ready model with these (status INVALID_ARGUMENT or
# UNAVAILABLE depending on the endpoint); for the service they all mean "not being served".
_UNAVAILABLE_MESSAGES = (
    "not ready",
    "unknown model",
    "is not found",
    "failed to connect",
    "connection refused",
)
# What Triton answers a load or unload when it is not in explicit model-control mode (none / poll).
_MODEL_CONTROL_OFF = "explicit model load / unload is not allowed"


def translate(error: BaseException, backend: str) -> BackendError:
    """The ranker.errors exception for anything tritonclient, grpc or asyncio raised."""
    if isinstance(error, BackendError):
        return error
    if isinstance(error, TimeoutError):  # asyncio.TimeoutError is TimeoutError since 3.11
        return BackendTimeout(backend, "no answer before the deadline")
    if isinstance(error, InferenceServerException):
        status, message = str(error.status() or ""), str(error.message() or error)
    elif isinstance(error, grpc.RpcError):
        status, message = str(error.code()), str(error.details() or error)
    else:
        return BackendFailed(backend, f"{type(error).__name__}: {error}")
    text = f"{message} ({status})" if status else message
    if status in _TIMEOUT:
        return BackendTimeout(backend, text)
    if status in _UNAVAILABLE or any(m in message.lower() for m in _UNAVAILABLE_MESSAGES):
        return BackendUnavailable(backend, text)
    return BackendFailed(backend, text)


def model_config_json(pbtxt: str, name: str) -> str:
    """A model configuration in protobuf text (config.pbtxt) as the JSON Triton's load API takes, named `name`.

    Raises ValueError when the text is not a valid ModelConfig."""
    try:
        config = text_format.Parse(pbtxt, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ValueError(f"not a Triton model configuration: {e}") from e
    config.name = name
    return json_format.MessageToJson(config, preserving_proto_field_name=True, indent=None)


async def _guarded(call: Awaitable[T], backend: str) -> T:
    try:
        return await call
    except (InferenceServerException, grpc.RpcError, TimeoutError) as e:
        raise translate(e, backend) from e


# gRPC's default reconnect backoff grows to 120 s: after a Triton restart the service would stay
# degraded for minutes. Capping it at 1 s, with the circuit breaker's cool-down capped at 2 s
# (ranker.breaker), brings full service back within a few seconds of Triton's return.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class TritonModels:
    """One gRPC connection to a Triton server, shared by the encoder and scorer clients.

    The aio channel is created on first use so it binds to the event loop that uses it.
    """

    def __init__(self, url: str, *, breaker: Callable[[str], CircuitBreaker] = CircuitBreaker) -> None:
        self.url = url
        self._client: InferenceServerClient | None = None
        self._new_breaker = breaker
        self.breakers: dict[str, CircuitBreaker] = {}

    @property
    def client(self) -> InferenceServerClient:
        if self._client is None:
            self._client = InferenceServerClient(url=self.url, channel_args=CHANNEL_ARGS)
        return self._client

    async def ready(self, models: Iterable[str] = ()) -> bool:
        """True when the server and each of `models` are ready; never raises."""
        try:
            if not await self.client.is_server_ready(client_timeout=2.0):
                return False
        except (InferenceServerException, grpc.RpcError, TimeoutError):
            return False
        return await self.models_ready(models)

    async def live(self) -> bool:
        """True when the server answers (it may be loading models, or have models that failed); never raises."""
        try:
            return bool(await self.client.is_server_live(client_timeout=2.0))
        except (InferenceServerException, grpc.RpcError, TimeoutError):
            return False

    async def models_ready(self, models: Iterable[str]) -> bool:
        """True when each of `models` is ready, whatever the state of the others; never raises.

        Unlike ready(): with --strict-readiness a model load that failed leaves the whole server "not ready"
        even after it is unloaded, and so does a load in progress."""
        try:
            for model in models:
                if not await self.client.is_model_ready(model, client_timeout=2.0):
                    return False
        except (InferenceServerException, grpc.RpcError, TimeoutError):
            return False
        return True

    async def wait_ready(self, models: Iterable[str], timeout: float) -> None:
        """Block until ready(models); raises BackendUnavailable after `timeout` seconds."""
        models = list(models)
        deadline = time.monotonic() + timeout
        while not await self.ready(models):
            if time.monotonic() >= deadline:
                raise BackendUnavailable(f"triton@{self.url}", f"models {models} not ready after {timeout:.0f} s")
            await asyncio.sleep(0.2)

    async def load_model(
        self, name: str, *, config: str, files: Mapping[str, bytes], timeout: float | None = None
    ) -> None:
        """Load (or reload) model `name` from `config` (JSON, see model_config_json) and `files`
        ({"file:<version>/<path>": content}), all sent in the request: Triton needs no access to the folder
        they came from. Returns once the model is ready. NotConfigured when Triton takes no load requests
        (not in explicit model-control mode); another BackendError when the load fails."""
        try:
            await self.client.load_model(name, config=config, files=dict(files), client_timeout=timeout)
        except (InferenceServerException, grpc.RpcError, TimeoutError) as e:
            error = translate(e, f"triton:{name}")
            if _MODEL_CONTROL_OFF in str(error):
                raise NotConfigured(
                    f"Triton at {self.url} does not load models on request: start it with --model-control-mode=explicit"
                ) from e
            raise error from e

    async def unload_model(self, name: str, *, timeout: float | None = None) -> None:
        """Unload model `name`; Triton still completes the inferences it has already accepted for it."""
        await _guarded(self.client.unload_model(name, client_timeout=timeout), f"triton:{name}")

    async def infer(
        self,
        model: str,
        version: str,
        inputs: list[InferInput],
        output: str,
        timeout: float | None,
        *,
        label: str | None = None,
    ) -> np.ndarray:
        """One output of one inference; every failure is a ranker.errors.BackendError. `label` names the model
        in the metrics (default: `model`), so that per-release model names do not grow the label set."""
        backend = f"triton:{model}"
        breaker = self.breakers.get(model) or self.breakers.setdefault(model, self._new_breaker(backend))
        probe = breaker.before_call()  # fails fast while Triton is known to be down
        try:
            with triton_call(label or model):  # latency and errors by model, for Prometheus (ranker.observability)
                result = await _guarded(
                    self.client.infer(
                        model,
                        inputs,
                        model_version=version,
                        outputs=[InferRequestedOutput(output)],
                        client_timeout=timeout,
                        # The same deadline for Triton's queue (model configs allow the override):
                        # a request still queued when the caller has given up is rejected, not run.
                        timeout=None if timeout is None else max(1, int(timeout * 1e6)),
                        headers=tracing.outgoing() or None,  # traceparent: Triton's spans join the trace
                    ),
                    backend,
                )
        except BaseException as e:
            breaker.failed(e, probe=probe, timeout=timeout)
            raise
        breaker.succeeded()
        array = result.as_numpy(output)
        if array is None:
            raise BackendFailed(backend, f"response has no output {output!r}")
        return np.asarray(array, dtype=np.float32)

    async def _statistics(self, model: str, version: str) -> Any:
        response = await _guarded(self.client.get_inference_statistics(model, version), f"triton:{model}")
        if not response.model_stats:
            raise BackendFailed(f"triton:{model}", "no statistics returned")
        return response.model_stats[0]

    async def batch_statistics(self, model: str, version: str = "") -> dict[int, int]:
        """{execution batch size: number of executions} as counted by Triton for the model."""
        stats = await self._statistics(model, version)
        return {int(b.batch_size): int(b.compute_infer.count) for b in stats.batch_stats}

    async def execution_counts(self, model: str, version: str = "") -> dict[str, int]:
        """Successful requests, rows inferred and model executions; executions < requests means
        the dynamic batcher merged requests."""
        stats = await self._statistics(model, version)
        return {
            "requests": int(stats.inference_stats.success.count),
            "inferences": int(stats.inference_count),
            "executions": int(stats.execution_count),
        }

    async def time_per_request_ms(self, model: str, version: str = "") -> dict[str, float]:
        """Triton's own cumulative timings divided by successful requests: queue, model compute, total."""
        stats = (await self._statistics(model, version)).inference_stats
        count = max(1, int(stats.success.count))
        return {
            "queue_ms": stats.queue.ns / count / 1e6,
            "compute_ms": (stats.compute_input.ns + stats.compute_infer.ns + stats.compute_output.ns) / count / 1e6,
            "total_ms": stats.success.ns / count / 1e6,
        }

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(InferenceServerException, grpc.RpcError):  # a dead channel is fine
                await client.close()


def _input(name: str, array: np.ndarray, datatype: str, backend: str) -> InferInput:
    tensor = InferInput(name, list(array.shape), datatype)
    try:
        tensor.set_data_from_numpy(array)
    except InferenceServerException as e:  # raised client-side for a dtype/shape mismatch
        raise BackendFailed(backend, f"input {name}: {e.message()}") from e
    return tensor


class TritonEncoder:
    """ranker.models.Encoder on Triton's text_encoder, pinned to one model name and version."""

    def __init__(
        self, models: TritonModels, *, version: str, model: str = ENCODER_MODEL, label: str | None = None
    ) -> None:
        self._models = models
        self.model = model  # the name Triton serves it under (a release's own name when the ranker loads it)
        self.version = str(version)
        self.label = label or model  # the name in metrics

    async def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, timeout: float | None) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        backend = f"triton:{self.model}"
        inputs = [
            _input(ENCODER_INPUTS[0], ids, "INT64", backend),
            _input(ENCODER_INPUTS[1], mask, "INT64", backend),
        ]
        return await self._models.infer(self.model, self.version, inputs, ENCODER_OUTPUT, timeout, label=self.label)


class TritonScorer:
    """ranker.models.Scorer on Triton's ranker, pinned to one model name and version."""

    def __init__(
        self, models: TritonModels, *, version: str, model: str = RANKER_MODEL, label: str | None = None
    ) -> None:
        self._models = models
        self.model = model
        self.version = str(version)
        self.label = label or model

    async def score(self, features: np.ndarray, *, timeout: float | None) -> np.ndarray:
        rows = np.ascontiguousarray(features, dtype=np.float32)
        if rows.shape[0] == 0:  # Triton rejects an empty batch; nothing to score is not an error
            return np.zeros(0, dtype=np.float32)
        inputs = [_input(RANKER_INPUT, rows, "FP32", f"triton:{self.model}")]
        scores = await self._models.infer(self.model, self.version, inputs, RANKER_OUTPUT, timeout, label=self.label)
        return scores.reshape(-1)
