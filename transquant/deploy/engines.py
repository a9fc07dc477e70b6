"""The engines ``profile.engine`` selects (:data:`ENGINES`), and ONNX Runtime's own dynamic INT8,
the peer every engine is compared with (:mod:`transquant.deploy` describes each)."""
from __future__ import annotations

import copy
import importlib
import logging
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.registry import Registry
from ..quant.state import QuantState
from .build import build_onnx_int8, int8_weights
from .runtime import (
    Engine,
    EngineError,
    input_names,
    ort_engine,
    ort_timing_runner,
    torch_runner,
    torch_timing_runner,
)

ENGINES = Registry("profile.engine", EngineError)  # EngineKind subclasses, at the end of this module


def require_engine(name: str) -> None:
    """Fail with one line if ``name`` is unknown or its runtime is not importable."""
    for module, pip_name in ENGINES[name].packages:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise EngineError(f"profile.engine={name}: the '{module}' package is not installed "
                              f"(pip install {pip_name}), or set profile.engine=none") from err


def ort_dynamic_int8(fp32_onnx: Path, out: Path) -> Path:
    """ONNX Runtime's own dynamic INT8 (weights int8 for MatMul and Gather, activations
    quantized per batch at run time): the peer every engine is compared with."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # its chatter goes to the root logger
    try:
        quantize_dynamic(str(fp32_onnx), str(out), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gather"])
    finally:
        root.setLevel(level)  # the job's own INFO lines must keep coming
    return Path(out)


def build_torch_int8(quant_model: nn.Module, state: QuantState, path: Path) -> nn.Module:
    """Dynamic INT8 Linear layers holding the state's integer weight codes, and 8-bit per-row
    embeddings; the model's state dict (packed int8 tensors) is saved to ``path`` (the artifact).
    Each Linear's weight must be the state's (raises :class:`EngineError` naming it)."""
    from torch.ao.nn.quantized import dynamic as nnqd
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        float_qparams_weight_only_qconfig,
        quantize_dynamic,
    )

    model = copy.deepcopy(quant_model).cpu().eval()
    stored = int8_weights(state)
    float_mods = dict(model.named_modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantize_dynamic(model, {nn.Linear: default_dynamic_qconfig,
                                          nn.Embedding: float_qparams_weight_only_qconfig}, dtype=torch.qint8)
    mods = dict(qmodel.named_modules())
    for name, w in stored.items():
        target = mods.get(name)
        if not isinstance(target, nnqd.Linear):
            continue
        bias = target.bias()
        weight = float_mods[name].weight.detach().float().cpu()
        if not torch.equal(weight, w.dequantize(weight)):
            raise EngineError(f"engine: the weight of {name} is not the quant state's; apply the state to the model")
        codes = torch._make_per_tensor_quantized_tensor(w.codes.to(torch.int8).cpu(), float(w.grid.scale),
                                                        int(w.grid.zero_point))
        target.set_weight_bias(codes, bias)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(qmodel.state_dict(), str(path))
    return qmodel


@dataclass
class EngineJob:
    """What an engine is built from: the calibrated model, its quant state, the profile's batches
    and options."""

    profile: Any  # the ``profile`` config: engine options such as ``weight_storage``
    fp32_model: nn.Module
    quant_model: nn.Module
    state: QuantState  # what ``quantize_`` returned for ``quant_model`` (or applied to it)
    batch: dict[str, torch.Tensor]  # the fixed batch every candidate is timed on
    sample: dict[str, torch.Tensor]  # padded sample batch: site matching, code agreement
    workdir: Path
    device: torch.device
    threads: int | None
    fp32_onnx: Path | None  # ONNX Runtime FP32 export of ``fp32_model`` (None without onnxruntime)


@dataclass
class BuiltEngine:
    """A built engine and what the profile needs to time it against FP32."""

    engine: Engine
    load: Callable[[], Callable[[], Any]]  # returns a callable running the timing batch once
    fp32_size_bytes: int  # the FP32 model stored the way the engine is: the size baseline
    info: dict  # path, build summary, ... (logged as the profile's tags and artifacts)
    probe: tuple[str, Path] | None = None  # (kind, path) for the out-of-process memory probe


class EngineKind:
    """One value of ``profile.engine``, registered with ``@ENGINES.register(name)``."""

    packages: tuple[tuple[str, str], ...] = ()  # (module to import, pip name) it needs
    on_device = True  # runs on the job's device (PyTorch): timed with its clock, GPU memory measured there

    @classmethod
    def build(cls, job: EngineJob) -> BuiltEngine:
        raise NotImplementedError


def save_state_dict(model: nn.Module, path: Path) -> int:
    """Save ``model``'s state dict to ``path``; returns its bytes (the artifact size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), str(path))
    return path.stat().st_size


@ENGINES.register("onnxruntime")
class OnnxRuntimeEngine(EngineKind):
    """Our calibrated grids as QDQ nodes on integer kernels (the module docstring)."""

    packages = (("onnxruntime", "onnxruntime"), ("onnx", "onnx"))
    on_device = False

    @classmethod
    def build(cls, job: EngineJob) -> BuiltEngine:
        _, path, report = build_onnx_int8(job.fp32_model, job.quant_model, job.state, job.sample,
                                          job.workdir, name="engine",
                                          weight_storage=str(job.profile.get("weight_storage", "s8")),
                                          threads=job.threads)
        eng = ort_engine("onnxruntime", path, job.threads, input_names(job.sample), {"report": report})
        info = {"path": str(path), "build": report.summary(), "site_tensors": report.site_tensors, "report": report,
                "precision": report.precision}
        return BuiltEngine(eng, lambda: ort_timing_runner(path, job.threads, job.batch), job.fp32_onnx.stat().st_size,
                           info, probe=("onnx", path))


@ENGINES.register("torch")
class TorchEngine(EngineKind):
    """``torch.ao`` dynamic INT8 with our int8 weights; activations quantized per batch, on CPU."""

    on_device = False  # torch.ao's dynamic INT8 kernels are CPU-only, whatever the job's device

    @classmethod
    def build(cls, job: EngineJob) -> BuiltEngine:
        n_int8 = len(int8_weights(job.state))
        path = job.workdir / "engine_torch_int8.pt"
        if n_int8:
            qmodel = build_torch_int8(job.quant_model, job.state, path)
            build = f"torch dynamic INT8: {n_int8} int8 weight tensors (activations quantized per batch)"
        else:
            qmodel = copy.deepcopy(job.quant_model).cpu().eval()
            save_state_dict(qmodel, path)
            build = "torch: no <= 8-bit weights, the model runs in float"
        names = input_names(job.sample)
        eng = Engine("torch", path, torch_runner(qmodel, names), names)
        return BuiltEngine(eng, lambda: torch_timing_runner(qmodel, job.batch, torch.device("cpu")),
                           save_state_dict(job.fp32_model, job.workdir / "fp32_state_dict.pt"),
                           {"build": build, "path": str(path)})


@ENGINES.register("none")
class FakeQuantEngine(EngineKind):
    """The research model as it runs here: fake quantization in float, no gain."""

    @classmethod
    def build(cls, job: EngineJob) -> BuiltEngine:
        path = job.workdir / "fake_quant_state_dict.pt"
        save_state_dict(job.quant_model, path)
        acts = job.state.activations_for(job.quant_model)
        ctx = acts.active if acts is not None else None
        names = input_names(job.sample)

        def run_fake(feeds):
            with torch.inference_mode(), (ctx or nullcontext)():
                feeds = {k: torch.from_numpy(feeds[k]).to(job.device) for k in names}
                return job.quant_model(**feeds).logits.float().cpu().numpy()

        eng = Engine("none", path, run_fake, names)
        return BuiltEngine(eng, lambda: torch_timing_runner(job.quant_model, job.batch, job.device, ctx),
                           save_state_dict(job.fp32_model, job.workdir / "fp32_state_dict.pt"),
                           {"path": str(path),
                            "build": "none: fake-quantized float model (simulation, not a deployable INT8 engine)"})
