"""Inference backends: one protocol, three implementations (ONNX Runtime, torch, TensorRT).

A backend is a small object: ``load(folder)``, ``warm_up(batch)``, ``run(inputs) -> outputs``.
The stage that uses one does not know which it has. Each backend imports its runtime only in
``load``, so nothing here imports onnxruntime, torch or tensorrt until a model is loaded.

- :class:`OnnxRuntimeBackend` (default; CPU): runs the folder's ONNX file; ``threads`` intra-op
  threads (1 by default: the daemon parallelizes over windows, not inside one).
- :class:`TorchBackend`: rebuilds the network from the registry (``card.architecture``) and loads
  the folder's state dict; CPU or CUDA.
- :class:`TensorRTBackend`: builds a TensorRT engine from the ONNX file (dynamic batch, FP32 or
  FP16) with TensorRT's documented Python API and runs it through torch CUDA tensors. Needs an
  NVIDIA GPU, ``tensorrt`` and torch with CUDA; it cannot run on the build machine (no GPU).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from scopestream.models._card import ModelFolder, ModelLoadError

__all__ = [
    "BACKENDS", "InferenceBackend", "ModelRef", "OnnxRuntimeBackend", "TensorRTBackend", "TorchBackend", "load_once",
    "make_backend",
]


@runtime_checkable
class InferenceBackend(Protocol):
    """Runs a model folder's network on batches of inputs."""

    name: str

    def load(self, folder: ModelFolder) -> None:
        """Load the weights (raises :class:`ModelLoadError` naming what is missing)."""
        ...

    def warm_up(self, batch: int = 1) -> None:
        """Run once on zeros of the declared shapes (first-call costs happen here, not live)."""
        ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs by name (float32, batch first) -> outputs by name (numpy)."""
        ...


def _zeros(folder: ModelFolder, batch: int) -> dict[str, np.ndarray]:
    return {t.name: np.zeros([batch if s == -1 else s for s in t.shape], dtype=t.dtype) for t in folder.card.inputs}


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU (or another execution provider)."""

    name = "onnxruntime"

    def __init__(self, threads: int = 1, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        self._threads = int(threads)
        self._providers = list(providers)
        self._session: Any = None
        self._folder: ModelFolder | None = None
        self._input_names: list[str] = []
        self._output_names: list[str] = []

    def load(self, folder: ModelFolder) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # a core dependency; this only happens in a broken install
            raise ModelLoadError(f"onnxruntime is not importable ({exc}); install scopestream's dependencies") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        path = folder.file("onnx")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=self._providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelLoadError(f"ONNX Runtime cannot load {path}: {exc}") from None
        self._folder = folder
        self._input_names = [i.name for i in self._session.get_inputs()]
        self._output_names = [o.name for o in self._session.get_outputs()]

    def warm_up(self, batch: int = 1) -> None:
        assert self._folder is not None, "load() first"
        self.run(_zeros(self._folder, batch))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise RuntimeError("OnnxRuntimeBackend.run before load()")
        feed = {n: np.ascontiguousarray(inputs[n], dtype=np.float32) for n in self._input_names}
        outs = self._session.run(self._output_names, feed)
        return dict(zip(self._output_names, outs, strict=True))


class TorchBackend:
    """The network rebuilt in torch from the registry, on ``device`` ('cpu', 'cuda', 'cuda:1')."""

    name = "torch"

    def __init__(self, device: str = "cpu", threads: int | None = 1) -> None:
        self._device = device
        self._threads = threads
        self._model: Any = None
        self._folder: ModelFolder | None = None

    def load(self, folder: ModelFolder) -> None:
        try:
            import torch
        except ImportError:
            raise ModelLoadError("the torch backend needs torch: pip install 'scopestream[torch]'") from None
        from scopestream.models._registry import create_model

        if self._threads is not None and self._device == "cpu":
            torch.set_num_threads(self._threads)
        model = create_model(folder.card.architecture, **folder.card.architecture_config)
        path = folder.file("torch")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - name the file whatever torch raised
            raise ModelLoadError(f"torch cannot load {path} into {folder.card.architecture}: {exc}") from None
        self._model = model.eval().to(self._device)
        self._folder = folder

    def warm_up(self, batch: int = 1) -> None:
        assert self._folder is not None, "load() first"
        self.run(_zeros(self._folder, batch))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self._model is None or self._folder is None:
            raise RuntimeError("TorchBackend.run before load()")
        names = [t.name for t in self._folder.card.inputs]
        tensors = [torch.as_tensor(np.ascontiguousarray(inputs[n], dtype=np.float32), device=self._device) for n in names]
        card = self._folder.card
        with torch.inference_mode():
            out = self._model(*tensors)
            if isinstance(out, tuple | list):  # several outputs (regression heads): in the card's order
                return {spec.name: o.float().cpu().numpy() for spec, o in zip(card.outputs, out, strict=True)}
            if card.classes:  # a classifier's logits -> the exported probabilities
                out = torch.softmax(out, dim=1)
        return {card.outputs[0].name: out.float().cpu().numpy()}


class TensorRTBackend:
    """A TensorRT engine built from the folder's ONNX file (needs a GPU and ``tensorrt``).

    The engine is built at :meth:`load` for batches of 1 to ``max_batch`` (optimum ``opt_batch``)
    with the documented builder API: ``Builder`` -> ``create_network`` -> ``OnnxParser.parse`` ->
    ``BuilderConfig`` (+ an optimization profile, FP16 when asked) -> ``build_serialized_network``
    -> ``Runtime.deserialize_cuda_engine``; it runs with ``set_tensor_address`` and
    ``execute_async_v3`` on torch CUDA buffers.
    """

    name = "tensorrt"

    def __init__(self, max_batch: int = 64, opt_batch: int = 16, fp16: bool = False, device: str = "cuda") -> None:
        self._max_batch = int(max_batch)
        self._opt_batch = int(opt_batch)
        self._fp16 = bool(fp16)
        self._device = device
        self._engine: Any = None
        self._context: Any = None
        self._folder: ModelFolder | None = None

    def load(self, folder: ModelFolder) -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError:
            raise ModelLoadError("the TensorRT backend needs `tensorrt` and torch with CUDA on an NVIDIA GPU") from None
        if not torch.cuda.is_available():
            raise ModelLoadError("the TensorRT backend needs a CUDA GPU; torch sees none")
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit in TensorRT >= 10
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        onnx_path = folder.file("onnx")
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelLoadError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        if self._fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for t in folder.card.inputs:
            if not any(t.name == network.get_input(i).name for i in range(network.num_inputs)):
                continue
            dims = [s for s in t.shape[1:]]
            profile.set_shape(t.name, [1, *dims], [self._opt_batch, *dims], [self._max_batch, *dims])
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelLoadError(f"TensorRT could not build an engine from {onnx_path}")
        self._engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        self._context = self._engine.create_execution_context()
        self._folder = folder

    def warm_up(self, batch: int = 1) -> None:
        assert self._folder is not None, "load() first"
        self.run(_zeros(self._folder, batch))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorrt as trt
        import torch

        if self._engine is None or self._folder is None:
            raise RuntimeError("TensorRTBackend.run before load()")
        engine, context = self._engine, self._context
        stream = torch.cuda.current_stream(self._device)
        keep: list[Any] = []
        outputs: dict[str, Any] = {}
        batch = next(iter(inputs.values())).shape[0]
        if batch > self._max_batch:
            raise ValueError(f"batch of {batch} exceeds the engine's max_batch {self._max_batch}")
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                t = torch.as_tensor(np.ascontiguousarray(inputs[name], dtype=np.float32), device=self._device)
                context.set_input_shape(name, tuple(t.shape))
                keep.append(t)
                context.set_tensor_address(name, t.data_ptr())
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device=self._device)
                outputs[name] = out
                context.set_tensor_address(name, out.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outputs.items()}


BACKENDS = ("onnxruntime", "torch", "tensorrt")


def make_backend(kind: Literal["onnxruntime", "torch", "tensorrt"], device: str = "cpu", threads: int = 1) -> InferenceBackend:
    """A backend by name (nothing imported until ``load``)."""
    if kind == "onnxruntime":
        providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if device.startswith("cuda") else ("CPUExecutionProvider",)
        return OnnxRuntimeBackend(threads=threads, providers=providers)
    if kind == "torch":
        return TorchBackend(device=device, threads=threads)
    if kind == "tensorrt":
        return TensorRTBackend(device=device if device.startswith("cuda") else "cuda")
    raise ValueError(f"unknown inference backend {kind!r}; choose one of {BACKENDS}")


@dataclass(frozen=True)
class ModelRef:
    """A model folder and how to serve it: all a process needs to load the model (picklable, so an
    off-thread job can carry it to a worker process, which then loads the model once)."""

    model_dir: str
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int = 1


# Keyed by the checks too: a folder loaded for one family is not handed, unchecked, to another.
_LOADED: dict[tuple[ModelRef, Callable[[str], ModelFolder]], tuple[ModelFolder, InferenceBackend]] = {}
_LOADED_LOCK = threading.Lock()


def load_once(ref: ModelRef, check_folder: Callable[[str], ModelFolder]) -> tuple[ModelFolder, InferenceBackend]:
    """(model folder, loaded and warmed-up backend) for ``ref``, loaded once per process.

    ``check_folder(model_dir)`` loads the folder with the family's checks (name, major version,
    input shapes; :func:`scopestream.models._card.load_model_folder`).

    Raises
    ------
    ModelLoadError
        From ``check_folder`` or the backend, naming the folder and the problem.
    """
    with _LOADED_LOCK:
        hit = _LOADED.get((ref, check_folder))
        if hit is None:
            folder = check_folder(ref.model_dir)
            backend = make_backend(ref.backend, device=ref.device, threads=ref.threads)  # type: ignore[arg-type]
            backend.load(folder)
            backend.warm_up(1)
            hit = _LOADED[ref, check_folder] = (folder, backend)
        return hit
