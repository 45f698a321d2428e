"""TensorRT engines built from our ONNX exports, with the TensorRT 10 Python API.

Precision comes from the ONNX graph, not from builder flags: the network is created
*strongly typed* (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; always on and the flag
ignored from TensorRT 11), so an fp16 ONNX (:func:`~headrace.models.compress.quantize.convert_fp16`)
gives an fp16 engine and a QDQ ONNX with symmetric int8 activations
(:func:`~headrace.models.compress.quantize.quantize_static_int8` with
``symmetric_activations=True``) an INT8 one, exactly where the Q/DQ nodes say.

Dynamic batch and sequence axes become one optimization profile (min / opt / max shape per
input). The ONNX must be the *plain* export: onnxruntime's fused contrib ops (``Attention``,
``SkipLayerNormalization``, ``BiasGelu`` in the ``com.microsoft`` domain) exist only in
onnxruntime, and TensorRT does its own fusions.

Everything needs ``tensorrt`` and a CUDA GPU; :func:`tensorrt_available` says why not when
they are missing, and nothing here pretends to build an engine without them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ConfigError, ModelError
from headrace.client.optional import install_command

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profile = Mapping[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)
DEFAULT_WORKSPACE_BYTES = 2 << 30
ORT_ONLY_DOMAINS = ("com.microsoft",)


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) if ``tensorrt`` imports and a CUDA device is visible, else (False, reason)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return False, f"tensorrt is not installed ({e}); {install_command('tensorrt')} on a CUDA machine"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "tensorrt is installed but no CUDA device is visible"
    except ImportError:
        return False, "tensorrt is installed but torch (used for device buffers) is not"
    return True, str(trt.__version__)


def _trt() -> Any:
    ok, why = tensorrt_available()
    if not ok:
        raise ModelError(f"TensorRT is unavailable: {why}")
    import tensorrt as trt

    return trt


def text_profile(*, input_names: Sequence[str] = ("input_ids", "attention_mask"), min_batch: int = 1,
                 opt_batch: int = 8, max_batch: int = 32, min_seq: int = 1, opt_seq: int = 64,
                 max_seq: int = 256) -> dict[str, tuple[Shape, Shape, Shape]]:
    """One optimization profile for a text encoder with [batch, sequence] inputs.

    Raises:
        ConfigError: min <= opt <= max does not hold.
    """
    if not (1 <= min_batch <= opt_batch <= max_batch) or not (1 <= min_seq <= opt_seq <= max_seq):
        raise ConfigError(f"profile needs 1 <= min <= opt <= max: batch {min_batch}/{opt_batch}/{max_batch}, "
                          f"sequence {min_seq}/{opt_seq}/{max_seq}")
    return {n: ((min_batch, min_seq), (opt_batch, opt_seq), (max_batch, max_seq)) for n in input_names}


def tensor_profile(input_name: str, sample_shape: Shape, *, min_batch: int = 1, opt_batch: int = 8,
                   max_batch: int = 32) -> dict[str, tuple[Shape, Shape, Shape]]:
    """One optimization profile for a model with one fixed-shape input and a dynamic batch
    (e.g. digits: ``tensor_profile("image", (64,))``)."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ConfigError(f"profile needs 1 <= min <= opt <= max batch, got {min_batch}/{opt_batch}/{max_batch}")
    s = tuple(sample_shape)
    return {input_name: ((min_batch, *s), (opt_batch, *s), (max_batch, *s))}


def check_portable(onnx_path: str | Path) -> None:
    """Refuse graphs with onnxruntime-only contrib ops, which TensorRT cannot parse.

    Raises:
        ConfigError: the graph uses ``com.microsoft`` ops (an onnxruntime-optimized export).
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ort_ops = sorted({n.op_type for n in model.graph.node if n.domain in ORT_ONLY_DOMAINS})
    if ort_ops:
        raise ConfigError(f"{onnx_path} uses onnxruntime-only ops {ort_ops}; build TensorRT engines from the "
                          f"plain export (export_minilm(..., optimize=False)), TensorRT fuses on its own")


@dataclass(frozen=True)
class EngineReport:
    """What :func:`build_engine` produced."""

    path: str
    onnx: str
    tensorrt_version: str
    strongly_typed: bool
    profile: dict[str, list[list[int]]]
    size_bytes: int
    build_s: float
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    profile: Profile,
    *,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    optimization_level: int = 3,
) -> EngineReport:
    """Parse ``onnx_path`` into a strongly typed network, build it for ``profile`` and write
    the serialized engine (``.plan``) to ``plan_path``.

    Args:
        profile: per input, (min, opt, max) shapes including the batch axis.
        workspace_bytes: builder scratch memory limit.
        optimization_level: builder optimization level 0-5 (higher: longer builds, faster engines).

    Raises:
        ModelError: TensorRT or CUDA is unavailable, the ONNX does not parse, or the build fails.
        ConfigError: the graph holds onnxruntime-only ops, or the profile names unknown inputs.
    """
    trt = _trt()
    src, dst = Path(onnx_path), Path(plan_path)
    check_portable(src)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = (1 << int(flag)) if flag is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(src)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT could not parse {src}: {errors}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    unknown = set(profile) - inputs
    if unknown or inputs - set(profile):
        raise ConfigError(f"profile covers {sorted(profile)} but the network inputs are {sorted(inputs)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.builder_optimization_level = int(optimization_level)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT failed to build an engine from {src} (see the TensorRT log above)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(memoryview(serialized)))
    build_s = time.perf_counter() - t0
    import torch

    report = EngineReport(path=str(dst), onnx=str(src), tensorrt_version=str(trt.__version__),
                          strongly_typed=flag is not None,
                          profile={k: [list(s) for s in v] for k, v in profile.items()},
                          size_bytes=dst.stat().st_size, build_s=build_s,
                          device=torch.cuda.get_device_name(0))
    log.info("built TensorRT engine %s from %s in %.0fs (%d bytes)", dst, src.name, build_s, report.size_bytes)
    return report


class EngineRunner:
    """Runs a serialized engine on the GPU with torch-allocated device buffers.

    ``run(feeds)`` takes host numpy arrays and returns host numpy outputs; shapes must lie in
    the engine's optimization profile.

    Raises:
        ModelError: TensorRT/CUDA unavailable or the plan cannot be deserialized.
    """

    def __init__(self, plan_path: str | Path) -> None:
        import torch

        trt = _trt()
        self._trt = trt
        self._torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise ModelError(f"cannot deserialize TensorRT engine {plan_path} (built for another TensorRT/GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()

    def _torch_dtype(self, name: str) -> Any:
        t = self._torch
        dt = self.engine.get_tensor_dtype(name)
        table = {self._trt.DataType.FLOAT: t.float32, self._trt.DataType.HALF: t.float16,
                 self._trt.DataType.INT32: t.int32, self._trt.DataType.INT64: t.int64,
                 self._trt.DataType.BOOL: t.bool, self._trt.DataType.INT8: t.int8}
        return table[dt]

    def run(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        """One synchronous inference; returns every output as a host array."""
        t = self._torch
        keep: list[Any] = []
        with t.cuda.stream(self.stream):
            for name in self.inputs:
                if name not in feeds:
                    raise ConfigError(f"engine input {name!r} missing from feeds {sorted(feeds)}")
                x = t.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", dtype=self._torch_dtype(name))
                keep.append(x)
                self.context.set_input_shape(name, tuple(x.shape))
                self.context.set_tensor_address(name, x.data_ptr())
            outs: dict[str, Any] = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                y = t.empty(shape, dtype=self._torch_dtype(name), device="cuda")
                outs[name] = y
                self.context.set_tensor_address(name, y.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ModelError("TensorRT execution failed")
        self.stream.synchronize()
        return {k: v.float().cpu().numpy() for k, v in outs.items()}
