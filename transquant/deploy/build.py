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

from ..quant.quantizers import Grid, fake_quantize
from ..quant.sites import find_sites
from .export import export_onnx, gemm_to_matmul
from .fusions import fuse_for_cpu
from .qdq import ActQuant, GraphEditor, quantize_activation, quantize_weight, split_peg_matmul
from .runtime import EngineError, input_names
from .site_map import capture_sites, match_sites, onnx_intermediates
from .verify import code_agreement, matmul_kernels

log = logging.getLogger("transquant")


def int8_weight_grids(model: nn.Module, grids: dict[str, Grid]) -> dict[str, tuple[nn.Module, Grid]]:
    """Module name -> (module, grid) for the weights ``quantize_weights_`` put on a <= 8-bit grid
    (``grids`` is what it returned); wider grids stay float with their exact values. Each weight
    is checked to lie on its grid, because the engine stores exactly those integers."""
    mods = dict(model.named_modules())
    out = {}
    for name, grid in grids.items():
        if grid.qmax > 127:
            continue
        mod = mods.get(name)
        if mod is None or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            raise EngineError(f"engine: weight grid given for {name!r}, which is not a module with a weight")
        if grid.scale.numel() != 1:
            raise EngineError(f"engine: the weight grid of {name} is not per-tensor; "
                              "the engine stores one scale per weight")
        w = mod.weight.detach().float().cpu()
        if not torch.equal(fake_quantize(w, grid), w):
            raise EngineError(f"engine: the weight of {name} is not on the grid quantize_weights_ returned for it")
        out[name] = (mod, grid)
    return out


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


def build_onnx_int8(fp32_model: nn.Module, quant_model: nn.Module, qa, weight_grids: dict[str, Grid], batch: dict,
                    workdir: Path, name: str = "engine", weight_storage: str = "s8", threads: int | None = None
                    ) -> tuple[Path, Path, BuildReport]:
    """Export ``quant_model``, write our grids into it and check the result. Returns (fp32
    export, engine model, report).

    ``qa`` may be None (no activation quantization). ``weight_grids`` is what
    ``quantize_weights_`` returned: those of <= 8 bits are stored as int8, the others stay float.
    ``batch`` (padded, e.g. :func:`.runtime.sample_batch`) maps sites to tensors and is the sample on
    which the engine's codes must match the fake-quant model's.
    """
    import onnx
    from onnx import numpy_helper

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fp32_path = workdir / "fp32.onnx"
    if not fp32_path.is_file():  # the profiler exports it first for the peer
        export_onnx(fp32_model, batch, fp32_path)
    q_export = export_onnx(quant_model, batch, workdir / f"{name}.float.onnx")
    proto = onnx.load(str(q_export))
    gemms = gemm_to_matmul(proto)

    grids = dict(qa.grids) if qa is not None else {}
    feeds = {k: batch[k].cpu().numpy() for k in input_names(batch)}
    tensors: dict[str, str] = {}
    if grids:
        values = capture_sites(quant_model, list(grids), batch)
        onnx_values, order = onnx_intermediates(proto, feeds)
        tensors = match_sites(values, onnx_values, order)
        ranks = {s: values[s].ndim for s in values}

    G = GraphEditor(proto)
    # Weights: find each quantized module's weight among the initializers by exact value.
    by_bytes: dict[tuple, str] = {}
    for init in proto.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2:
            by_bytes[(tuple(init.dims), numpy_helper.to_array(init).tobytes())] = init.name
    int8_weights, float_weights, weight_bits = [], [], []
    wg = int8_weight_grids(quant_model, weight_grids)
    for mod_name, (mod, grid) in wg.items():
        w = mod.weight.detach().float().cpu().numpy()
        found = False
        for arr in (w, np.ascontiguousarray(w.T)):
            key = (arr.shape, arr.tobytes())
            if key in by_bytes:
                quantize_weight(G, by_bytes.pop(key), grid, arr, weight_storage)
                found = True
        if not found:
            raise EngineError(f"engine export: the weight of {mod_name} is not an initializer of the ONNX graph, "
                              "so it cannot be stored as int8")
        int8_weights.append(mod_name)
        weight_bits.append(int(math.log2(grid.qmax + 1)) + 1)
    for mod_name, mod in quant_model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and mod_name not in wg:
            float_weights.append(mod_name)
            weight_bits.append(32)

    peg_split = []
    seen: dict[str, str] = {}
    codes: dict[str, tuple[str, int]] = {}
    site_bits: dict[str, int] = {}
    for site in grids:
        t = tensors[site]
        if t in seen:
            raise EngineError(f"engine: sites {seen[t]} and {site} map to the same tensor {t}")
        seen[t] = site
        q = ActQuant.from_grid(grids[site], ranks[site])
        skip = split_peg_matmul(G, t, q) if q.per_channel and q.container_bits == 8 else set()
        if skip:
            peg_split.append(site)
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
    if qa is not None and {s.name for s in find_sites(quant_model)} - set(grids):
        act_bits.append(32)  # sites the method leaves float
    report = BuildReport(site_bits, int8_weights, float_weights, peg_split, tensors, codes,
                         precision_label(weight_bits, act_bits), fused)
    report.int_matmuls, report.float_matmuls = matmul_kernels(out, workdir / f"{name}.optimized.onnx", threads)
    if qa is not None:
        report.code_agreement, report.site_agreement = code_agreement(quant_model, qa, out, codes, batch, threads)
    log.info("engine %s: %s", name, report.summary())
    return fp32_path, out, report
