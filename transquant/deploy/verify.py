"""Checks that an ONNX Runtime engine runs what it claims to run.

- **Integer kernels**: the graph ORT executes is the one its optimizer writes out
  (``SessionOptions.optimized_model_filepath``), not the one we saved. MatMul-type nodes are
  counted there as integer or float; a float weight MatMul whose two inputs are both
  dequantized from 8-bit integers had an integer kernel and lost it, which fails the build
  instead of silently running float. Products of float activations (W8A32) or of two 16-bit
  tensors (16-bit attention) have no integer kernel in ORT and are counted, not refused.
- **Integer codes**: on a sample batch, the codes the engine computes at every quantized site
  are compared with the codes of the fake-quant model; below :data:`MIN_CODE_AGREEMENT` the
  engine is not the calibrated model and the build fails. The fake-quant model is fed the
  engine's dequantized values at every site (teacher forcing), so each site is judged on the
  same inputs. Free-running, one value on a rounding boundary (ORT and PyTorch sum in
  different orders, ~1e-5 of the codes) lands one code apart and the difference spreads
  through every later LayerNorm and attention: on the 2-layer test model a single such tie
  already cost 0.15 % of all codes, while a wrong scale, a saturating kernel or a weight ORT
  quantized on its own changes a site's codes wholesale.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..quant.quantizers import Grid, quantize
from ..quant.sites import find_sites, tap, use_tappable_attention
from .fusions import MOVES
from .runtime import EngineError, input_names, model_inputs, ort_session

INT_MATMULS = frozenset({"MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                         "QGemm", "QAttention"})
FLOAT_MATMULS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm"})
MIN_CODE_AGREEMENT = 0.999


def _is_int(node) -> bool:
    """Integer arithmetic; MatMulNBits is integer only at accuracy level 4 (int8 activations)."""
    if node.op_type == "MatMulNBits":
        return any(a.name == "accuracy_level" and a.i == 4 for a in node.attribute)
    return node.op_type in INT_MATMULS


def matmul_kernels(path: Path, optimized_path: Path, threads: int | None) -> tuple[int, int]:
    """(integer, float) MatMul-type nodes after ORT's optimizer; raises :class:`EngineError` for a
    float weight MatMul whose inputs are both 8-bit."""
    import onnx
    from onnx import TensorProto

    ort_session(Path(path), threads, optimized_path=optimized_path)
    g = onnx.load(str(optimized_path)).graph
    producer = {o: n for n in g.node for o in n.output}
    dtypes = {i.name: i.data_type for i in g.initializer}
    eight_bit = (TensorProto.UINT8, TensorProto.INT8)

    def source(tensor: str):
        """The DequantizeLinear a tensor comes from through data movement, or None."""
        node = producer.get(tensor)
        while node is not None and node.op_type in MOVES:
            node = producer.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def is_8bit(dq) -> bool:  # a missing zero point means uint8
        return len(dq.input) < 3 or not dq.input[2] or dtypes.get(dq.input[2]) in eight_bit

    n_int = sum(_is_int(n) for n in g.node)
    floats = [n for n in g.node if n.op_type in FLOAT_MATMULS or (n.op_type == "MatMulNBits" and not _is_int(n))]
    lost = []
    for node in floats:
        dqs = [source(x) for x in node.input[:2]]
        weight = any(dq is not None and dq.input[0] in dtypes for dq in dqs)
        if weight and all(dq is not None and is_8bit(dq) for dq in dqs):
            lost.append(node.name)
    if lost:
        raise EngineError(f"engine: {len(lost)} weight MatMul(s) with 8-bit inputs run in float after ONNX Runtime's "
                          f"optimizer (no integer kernel): {', '.join(lost[:5])}")
    return n_int, len(floats)


def fake_quant_codes(model: nn.Module, grids: dict[str, Grid], batch: dict,
                     forced: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Integer codes of every quantized site (``grids``: site -> activation grid, the quant
    state's) of the fake-quant model on ``batch`` (the arithmetic of ``state.active``), each
    site's output replaced by the dequantized ``forced`` codes (the engine's) so that later sites
    see the engine's values. Engine codes of a site the graph holds flattened to
    [batch * tokens, channels] (OPT's FFN) are viewed as the model's [batch, tokens, channels]."""
    model = copy.deepcopy(model).cpu().eval()
    use_tappable_attention(model)
    sites = [s for s in find_sites(model) if s.name in grids]
    codes: dict[str, np.ndarray] = {}

    def fq(site, x):
        grid = grids[site.name]
        codes[site.name] = quantize(x, grid).detach().numpy()
        engine = forced[site.name]
        if engine.shape != tuple(x.shape):
            if engine.size != x.numel() or engine.shape[-1:] != tuple(x.shape)[-1:]:
                raise EngineError(f"engine: site {site.name} has codes of shape {engine.shape} in the engine, "
                                  f"{tuple(x.shape)} in the model")
            engine = engine.reshape(x.shape)
        q = torch.from_numpy(engine.astype(np.float32))
        return (q - grid.zero_point.to(x.device, x.dtype)) * grid.scale.to(x.device, x.dtype)

    with torch.no_grad(), tap(sites, fq):
        model(**{k: v.cpu() for k, v in model_inputs(model, batch).items()})
    return codes


def engine_codes(path: Path, codes: dict[str, tuple[str, int]], batch: dict,
                 threads: int | None) -> dict[str, np.ndarray]:
    """The codes tensors (site -> (name, ONNX element type)) of the engine on ``batch``, read as
    extra graph outputs of the optimized session."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(path))
    have = {o.name for o in proto.graph.output}
    for name, elem in codes.values():
        if name not in have:
            proto.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    sess = ort_session(proto.SerializeToString(), threads)
    feeds = {k: np.ascontiguousarray(batch[k].cpu().numpy()) for k in input_names(batch)}
    names = [name for name, _ in codes.values()]
    values = dict(zip(names, sess.run(names, feeds)))
    return {site: values[name] for site, (name, _) in codes.items()}


def code_agreement(model: nn.Module, grids: dict[str, Grid], path: Path, codes: dict[str, tuple[str, int]], batch: dict,
                   threads: int | None) -> tuple[float, dict[str, float]]:
    """(fraction of equal codes over all quantized sites, the fraction per site).

    Raises :class:`EngineError` when the overall fraction is below :data:`MIN_CODE_AGREEMENT`,
    or when at one site more than that share of the codes (and more than one code: a 6-element
    logits site with one boundary tie is 83 % equal) are more than one step apart, so that a
    small site computed wrongly cannot hide among the attention scores. One step is what float
    rounding explains: a value within float error of a rounding boundary (a dot product summed in
    another order, a 16-bit step 256x finer) lands on either side; a wrong grid or kernel moves
    codes by more."""
    got = engine_codes(path, codes, batch, threads)
    ref = fake_quant_codes(model, grids, batch, got)
    equal = total = 0
    per_site, bad = {}, []
    for site, want in ref.items():
        diff = np.abs(got[site].astype(np.float64).reshape(want.shape) - want)
        same = int((diff == 0).sum())
        per_site[site] = same / want.size
        equal, total = equal + same, total + want.size
        if int((diff > 1).sum()) > max(1.0, (1 - MIN_CODE_AGREEMENT) * want.size):
            bad.append(site)
    overall = equal / total if total else 1.0
    if overall < MIN_CODE_AGREEMENT or bad:
        worst = bad[0] if bad else min(per_site, key=per_site.get)
        raise EngineError(f"engine: {overall:.4%} of the integer codes equal the fake-quant model's (need "
                          f"{MIN_CODE_AGREEMENT:.1%} overall, and at every site no more than that share "
                          f"off by more than one step; site {worst}: {per_site[worst]:.2%} equal)")
    return overall, per_site
