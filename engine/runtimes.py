"""Runtimes behind one interface: run a package's graph on named numpy inputs.

* ``onnxruntime`` (default): CPU here, the CUDA provider where one is present and asked for.
* ``tensorrt``: an engine built from the ONNX where a GPU and the ``tensorrt`` extra are present. TensorRT 10+
  builds strongly typed networks, so FP16 comes from an FP16 copy of the ONNX (onnxconverter-common) and INT8
  from the package's Q/DQ frame graph (:mod:`breathcast.engine.quantize`); engines are cached by (TensorRT
  version, GPU compute capability, precision, graph hash).
  Without a GPU or the package, opening it raises :class:`RuntimeUnavailable` with a one-line reason.
* ``torch``: the reference: the same split graphs as torch modules, from the package's ``model.pt`` (cvae and ldm).

Thread counts are settings (:class:`RuntimeConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from breathcast.errors import BreathcastError
from breathcast.engine.package import ModelPackage, PackageError

__all__ = ["RUNTIMES", "RuntimeConfig", "RuntimeUnavailable", "GraphSession", "open_graph", "runtime_available"]

RUNTIMES = ("onnxruntime", "tensorrt", "torch")


class RuntimeUnavailable(BreathcastError):
    """The runtime cannot run here (no GPU, package not installed); the message says which, in one line."""


@dataclass(frozen=True)
class RuntimeConfig:
    """How to run graphs.

    Args:
        kind: one of :data:`RUNTIMES`.
        intra_op_threads: threads inside one operator (onnxruntime, torch); 0 lets the runtime choose.
        inter_op_threads: threads across independent operators.
        device: "cpu" or "cuda" (onnxruntime's CUDA provider; TensorRT always uses the GPU).
        precision: "fp32", "fp16" (TensorRT) or "int8" (the package's Q/DQ frame graph: TensorRT, or
            onnxruntime on the CPU to measure it).
        engine_cache: folder for built TensorRT engines; default ``~/.cache/breathcast/tensorrt``.
    """

    kind: str = "onnxruntime"
    intra_op_threads: int = 2
    inter_op_threads: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    engine_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in RUNTIMES:
            raise BreathcastError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.kind!r}")
        if self.device not in ("cpu", "cuda"):
            raise BreathcastError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise BreathcastError(f"precision must be fp32, fp16 or int8, got {self.precision!r}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise BreathcastError("thread counts must be >= 0")


class GraphSession(Protocol):
    """One graph, ready to run."""

    runtime: str

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on named float32 inputs; outputs in the graph's order."""
        ...


class _OnnxRuntimeSession:
    runtime = "onnxruntime"

    def __init__(self, path: Path, config: RuntimeConfig) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = config.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Idle pool threads must not spin: the numba kernels run right after on the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if config.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeUnavailable("onnxruntime has no CUDA provider here (install onnxruntime-gpu on a machine with an NVIDIA GPU)")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise PackageError(f"{path}: onnxruntime cannot load the graph ({str(exc).splitlines()[0]})") from None
        self.input_names = [i.name for i in self._session.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(None, {name: feed[name] for name in self.input_names})


class _TorchSession:
    runtime = "torch"

    def __init__(self, package: ModelPackage, graph: str, config: RuntimeConfig) -> None:
        import torch

        if package.manifest.kind == "ldm":
            from breathcast.training.ldm import load_ldm
            from breathcast.engine.ldm_graphs import DecodeGraph, DenoiseGraph, EncodeGraph

            graphs = {"encode": EncodeGraph, "denoise": DenoiseGraph, "decode": DecodeGraph}
            self._module = graphs[graph](load_ldm(package.file("model.pt"))).eval()
        else:
            from breathcast.training.cvae import load_cvae
            from breathcast.engine.graphs import FrameGraph, PlanGraph

            self._module = (PlanGraph if graph == "plan" else FrameGraph)(load_cvae(package.file("model.pt"))).eval()
        self._torch = torch
        self._threads = config.intra_op_threads
        self.input_names = [spec.name for spec in package.manifest.graphs[graph].inputs]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        if self._threads:
            torch.set_num_threads(self._threads)
        with torch.no_grad():
            out = self._module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


class _TensorRTSession:
    runtime = "tensorrt"

    def __init__(self, path: Path, graph_hash: str, config: RuntimeConfig) -> None:
        trt = _import_tensorrt()
        import torch  # TensorRT buffers live in CUDA tensors

        if not torch.cuda.is_available():
            raise RuntimeUnavailable("TensorRT needs an NVIDIA GPU; torch sees none here")
        major, minor = torch.cuda.get_device_capability()
        cache = Path(config.engine_cache or Path.home() / ".cache" / "breathcast" / "tensorrt")
        engine_path = cache / f"{trt.__version__}-sm{major}{minor}-{config.precision}-{graph_hash[:16]}.engine"
        logger = trt.Logger(trt.Logger.WARNING)
        if not engine_path.is_file():
            onnx_bytes = _onnx_for_precision(path, config.precision)
            builder = trt.Builder(logger)
            network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            parser = trt.OnnxParser(network, logger)
            if not parser.parse(onnx_bytes):
                raise BreathcastError(f"{path}: TensorRT cannot parse the graph ({parser.get_error(0)})")
            build = builder.create_builder_config()
            profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                tensor = network.get_input(i)
                shape = tuple(tensor.shape)
                if -1 in shape:
                    fixed = tuple(1 if s == -1 else s for s in shape)
                    profile.set_shape(tensor.name, fixed, fixed, tuple(64 if s == -1 else s for s in shape))
            build.add_optimization_profile(profile)
            serialized = builder.build_serialized_network(network, build)
            if serialized is None:
                raise BreathcastError(f"{path}: TensorRT could not build an engine")
            cache.mkdir(parents=True, exist_ok=True)
            tmp = engine_path.with_suffix(".tmp")
            tmp.write_bytes(bytes(serialized))
            tmp.replace(engine_path)
        runtime = trt.Runtime(logger)
        self._engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        self._context = self._engine.create_execution_context()
        self._torch = torch
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        inputs = {n: torch.from_numpy(np.ascontiguousarray(feed[n])).cuda() for n in self.input_names}
        for name, tensor in inputs.items():
            self._context.set_input_shape(name, tuple(tensor.shape))
            self._context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            outputs[name] = torch.empty(tuple(self._context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            self._context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise BreathcastError("TensorRT execution failed")
        stream.synchronize()
        return [outputs[n].float().cpu().numpy() for n in self.output_names]


def _import_tensorrt():
    try:
        import tensorrt  # noqa: PLC0415 - optional extra
    except ImportError:
        raise RuntimeUnavailable("TensorRT is not installed (the `tensorrt` extra, on a machine with an NVIDIA GPU)") from None
    return tensorrt


def _onnx_for_precision(path: Path, precision: str) -> bytes:
    """The ONNX bytes TensorRT builds from: as exported, or converted to FP16 (inputs and outputs stay float32)."""
    if precision == "fp32":
        return path.read_bytes()
    if precision == "fp16":
        import onnx
        from onnxconverter_common import float16  # part of the tensorrt extra

        return float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True).SerializeToString()
    return path.read_bytes()  # int8: the Q/DQ graph (engine.quantize) carries its own scales


def runtime_available(kind: str) -> tuple[bool, str]:
    """Whether a runtime can run here, and if not, the one-line reason."""
    if kind == "onnxruntime":
        return True, ""
    if kind == "torch":
        return True, ""
    try:
        _import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            return False, "TensorRT needs an NVIDIA GPU; torch sees none here"
    except RuntimeUnavailable as exc:
        return False, str(exc)
    return True, ""


def open_graph(package: ModelPackage, graph: str, config: RuntimeConfig = RuntimeConfig()) -> GraphSession:
    """A session for ``graph`` of a verified package ("plan" or "frame" of a cvae; "encode", "denoise" or "decode" of an ldm)."""
    if graph not in package.manifest.graphs:
        raise PackageError(f"{package.path}: the package has no {graph!r} graph (kind {package.manifest.kind!r})")
    if config.precision == "int8" and graph == "frame":  # the plan graph runs once per plan: it stays float
        if "frame_int8" not in package.manifest.graphs:
            raise PackageError(f"{package.path}: no INT8 frame graph; make one with `breathcast quantize`")
        if config.kind == "torch":
            raise RuntimeUnavailable("the torch reference runtime has no INT8 path")
        graph = "frame_int8"
    spec = package.manifest.graphs[graph]
    path = package.file(spec.file)
    if config.kind == "onnxruntime":
        return _OnnxRuntimeSession(path, config)
    if config.kind == "torch":
        return _TorchSession(package, graph, config)
    return _TensorRTSession(path, package.manifest.files[spec.file], config)
