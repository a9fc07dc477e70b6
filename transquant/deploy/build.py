"""The ONNX Runtime INT8 build: export the quantized model, map its sites, write our grids as QDQ
nodes and int8 weights, apply the CPU fusions, then verify the result (:mod:`transquant.deploy`)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..quant.quantizers import Grid
from ..quant.sites import find_sites
from ..quant.state import QuantState, WeightState
from .export import export_onnx, gemm_to_matmul, param_name
from .fusions import fuse_for_cpu
from .qdq import (
    ActQuant,
    GraphEditor,
    quantize_activation,
    quantize_weight,
    split_peg_matmul,
)
from .runtime import EngineError, input_names, model_inputs
from .site_map import capture_sites, match_sites, module_readers, onnx_intermediates
from .verify import code_agreement, matmul_kernels

log = logging.getLogger("transquant")


def int8_weights(state: QuantState, per_channel: bool = False) -> dict[str, WeightState]:
    """Module name -> weight state for the weights on a <= 8-bit grid: the engines store their
    integer codes; wider grids stay float with their exact (dequantized) values. Per-channel
    grids (``quant.weight_granularity=channel``) only for an engine that stores them
    (``per_channel``), else :class:`EngineError`."""
    out = {}
    for name, w in state.weights.items():
        if w.grid.qmax > 127:
            continue
        if w.grid.scale.numel() != 1 and not per_channel:
            raise EngineError(f"engine: the weight grid of {name} is not per-tensor; "
                              "the engine stores one scale per weight")
        out[name] = w
    return out


def _weight_initializers(proto, name: str, weight: np.ndarray, by_value: dict[tuple, list[str]]
                         ) -> list[tuple[str, bool]]:
    """(initializer, transposed) for every initializer of the export holding module ``name``'s
    weight ``weight`` (the state's, dequantized): the one under the parameter's own name when the
    exporter kept it (Gather tables, Gemm and Conv1D weights), else those with its exact value,
    as stored or transposed (MatMul weights the exporter folded into [in, out], Gemm weights
    :func:`.export.gemm_to_matmul` rewrote, GPT-2's Conv1D [in, out]). Raises
    :class:`EngineError` naming the module when the initializer under its name holds other values,
    or none holds it: the engine would not compute the state's weights."""
    from onnx import numpy_helper

    layouts = ((weight, False), (np.ascontiguousarray(weight.T), True))
    found = []
    init = next((i for i in proto.graph.initializer if i.name == param_name(name)), None)
    if init is not None:
        arr = numpy_helper.to_array(init)
        match = [t for w, t in layouts if arr.shape == w.shape and np.array_equal(arr, w)]
        if not match:
            raise EngineError(f"engine export: the initializer {init.name} of {name}'s weight is not the quant "
                              "state's dequantized weight (as stored or transposed)")
        found.append((init.name, match[0]))
    for w, transposed in layouts:
        for init_name in by_value.pop((w.shape, w.tobytes()), []):
            if init_name != param_name(name):
                found.append((init_name, transposed))
    if not found:
        raise EngineError(f"engine export: the weight of {name} is not an initializer of the ONNX graph with the "
                          "quant state's values (as stored or transposed), so its int8 codes cannot be written")
    return found


def _transposed(grid: Grid) -> Grid:
    """The grid of the transposed weight (a per-channel scale [out, 1] becomes [1, out])."""
    return Grid(grid.scale.T if grid.scale.dim() == 2 else grid.scale,
                grid.zero_point.T if grid.zero_point.dim() == 2 else grid.zero_point, grid.qmin, grid.qmax)


@dataclass
class BuildReport:
    """What the ONNX build did, and what the checks of :mod:`transquant.deploy.verify` found."""

    site_bits: dict[str, int]
    int8_weights: list[str]
    float_weights: list[str]
    peg_split_sites: list[str]
    site_tensors: dict[str, str]
    site_codes: dict[str, tuple[str, int]]  # site -> (tensor with its integer codes, ONNX element type)
    precision: str
    fusions: dict[str, int] = field(default_factory=dict)
    int_matmuls: int = 0
    float_matmuls: int = 0
    code_agreement: float | None = None
    site_agreement: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        bits = sorted(set(self.site_bits.values()))
        per_bits = ", ".join(f"{sum(b == x for b in self.site_bits.values())} at {x} bits" for x in bits) or "none"
        agree = "-" if self.code_agreement is None else f"{self.code_agreement:.5f}"
        return (f"{self.precision}: activation sites QDQ {per_bits}; {len(self.int8_weights)} int8 weight tensors, "
                f"{len(self.float_weights)} float; {len(self.peg_split_sites)} PEG MatMuls split per group; "
                f"fusions {self.fusions}; after ORT's optimizer {self.int_matmuls} integer and "
                f"{self.float_matmuls} float MatMuls; code agreement {agree}")


def precision_label(weight_bits: list[int], act_bits: list[int]) -> str:
    """``W8A{8,16}``-style label of what the engine stores and computes (32 = float)."""
    def fmt(bits: list[int]) -> str:
        uniq = sorted(set(bits)) or [32]
        return str(uniq[0]) if len(uniq) == 1 else "{" + ",".join(map(str, uniq)) + "}"
    return f"W{fmt(weight_bits)}A{fmt(act_bits)}"


def build_onnx_int8(fp32_model: nn.Module, quant_model: nn.Module, state: QuantState, batch: dict,
                    workdir: Path, name: str = "engine", weight_storage: str = "s8", threads: int | None = None
                    ) -> tuple[Path, Path, BuildReport]:
    """Export ``quant_model`` (the model ``state`` quantized, or a fresh copy it was applied to),
    write the state into it and check the result. Returns (fp32 export, engine model, report).

    Weights on a <= 8-bit grid are stored as the state's integer codes (each export initializer
    checked to hold the state's dequantized weight), the others stay float. Activation sites get
    QDQ nodes with the state's grids (PEG: its groups). ``batch`` (padded, e.g.
    :func:`.runtime.sample_batch`) maps sites to tensors and is the sample on which the engine's
    codes must match the fake-quant model's.
    """
    import onnx
    from onnx import numpy_helper

    dynamic = [name for name, s in state.sites.items() if s.grid.per_token]
    if dynamic:
        raise EngineError(f"engine: {len(dynamic)} sites ({dynamic[0]}, ...) have per-token dynamic ranges; the "
                          "onnxruntime engine holds static QDQ grids only (profile.engine=torch or none)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    batch = model_inputs(quant_model, batch)
    state.activations_for(quant_model)  # raises if the model lacks a site of the state
    fp32_path = workdir / "fp32.onnx"
    if not fp32_path.is_file():  # the profiler exports it first for the peer
        export_onnx(fp32_model, batch, fp32_path)
    q_export = export_onnx(quant_model, batch, workdir / f"{name}.float.onnx")
    proto = onnx.load(str(q_export))
    gemms = gemm_to_matmul(proto)

    G = GraphEditor(proto)  # before any node id is taken (see GraphEditor)
    sites = state.sites
    feeds = {k: batch[k].cpu().numpy() for k in input_names(batch)}
    tensors: dict[str, str] = {}
    readers: dict[str, set[int]] = {}  # input sites: the nodes that read the quantized tensor
    if sites:
        values, module_outputs = capture_sites(quant_model, list(sites), batch)
        onnx_values, order = onnx_intermediates(proto, feeds)
        tensors = match_sites(values, onnx_values, order)
        for site, out in module_outputs.items():
            reading = [n for n in proto.graph.node if tensors[site] in n.input and n.op_type != "Shape"]
            if len(reading) > 1:
                readers[site] = module_readers(proto, site, tensors[site], out, onnx_values, order)
        ranks = {s: onnx_values[tensors[s]].ndim for s in sites}

    by_value: dict[tuple, list[str]] = {}
    for init in proto.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2:
            arr = numpy_helper.to_array(init)
            by_value.setdefault((arr.shape, arr.tobytes()), []).append(init.name)
    int8_names, float_weights, weight_bits = [], [], []
    stored = int8_weights(state, per_channel=True)
    for mod_name, w in stored.items():
        deq = w.dequantize(torch.empty(0)).numpy()
        codes = w.codes.numpy()
        for init_name, transposed in _weight_initializers(proto, mod_name, deq, by_value):
            grid = _transposed(w.grid) if transposed else w.grid
            quantize_weight(G, init_name, grid, np.ascontiguousarray(codes.T) if transposed else codes,
                            weight_storage)
        int8_names.append(mod_name)
        weight_bits.append(int(math.log2(w.grid.qmax + 1)) + 1)
    for mod_name, mod in quant_model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding, Conv1D)) and mod_name not in stored:
            float_weights.append(mod_name)
            weight_bits.append(32)

    peg_split = []
    seen: dict[str, str] = {}
    codes: dict[str, tuple[str, int]] = {}
    site_bits: dict[str, int] = {}
    for site, s in sites.items():
        t = tensors[site]
        if t in seen:
            raise EngineError(f"engine: sites {seen[t]} and {site} map to the same tensor {t}")
        seen[t] = site
        q = ActQuant.from_grid(s.grid, ranks[site])
        skip = set()
        if site in readers:  # only the module's readers take the quantized tensor
            skip = {id(n) for n in G.consumers(t)} - readers[site]
        if q.per_channel and q.container_bits == 8:
            if s.groups is None:
                raise EngineError(f"engine: site {site} has per-channel ranges without PEG groups")
            split = split_peg_matmul(G, t, q, s.groups.cpu().numpy())
            if split:
                peg_split.append(site)
            skip |= split
        elem = onnx.TensorProto.FLOAT if q.per_channel else onnx.helper.np_dtype_to_tensor_dtype(q.zero_point.dtype)
        codes[site] = (quantize_activation(G, t, q, skip), elem)  # other consumers (residual add): per-axis QDQ
        site_bits[site] = q.bits
    G.finish()
    if not any(op.domain == "com.microsoft" for op in proto.opset_import):  # uint16 QDQ, fused kernels
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(proto)
    fused = {"gemm_to_matmul": gemms, **fuse_for_cpu(proto)}
    out = workdir / f"{name}.onnx"
    onnx.save(proto, str(out))
    q_export.unlink()

    act_bits = list(site_bits.values())
    if sites and {s.name for s in find_sites(quant_model)} - set(sites):
        act_bits.append(32)  # sites the method leaves float
    report = BuildReport(site_bits, int8_names, float_weights, peg_split, tensors, codes,
                         precision_label(weight_bits, act_bits), fused)
    report.int_matmuls, report.float_matmuls = matmul_kernels(out, workdir / f"{name}.optimized.onnx", threads)
    if sites:
        report.code_agreement, report.site_agreement = code_agreement(quant_model, state.grids, out, codes, batch,
                                                                      threads)
    log.info("engine %s: %s", name, report.summary())
    return fp32_path, out, report
