"""Real INT8 engines: the calibrated model as it would ship, executing integer arithmetic.

Fake quantization (``QuantizedActivations.active``) only *simulates* 8-bit arithmetic in float;
it is neither faster nor smaller. This module turns a calibrated model into a deployable
artifact whose matrix multiplications run on integer kernels, with **our** calibrated scales.

ONNX Runtime engine (``profile.engine=onnxruntime``, the default)
    1. The quantized-weight model is exported to ONNX (opset 17, eager attention: the sdpa export
       leaves Where/IsNaN nodes and runs slower in ORT).
    2. Every activation site is mapped to its ONNX tensor *by value*: the site tensors are
       captured from PyTorch (the same taps calibration uses) and compared with every
       intermediate tensor of the exported graph on a padded sample batch. No node-name
       heuristics, and the mapping is a check that the export computes the same function.
    3. QuantizeLinear→DequantizeLinear pairs carrying our grid (scale, zero point) are
       inserted at every quantized site: uint8 up to 8 bits, uint16 (``com.microsoft`` domain)
       for ``mixed``'s 16-bit sites, with Max/Min clipping in front for grids narrower than
       their container and per-channel scales for per-embedding-group sites. Every consumer
       reads the dequantized tensor — the residual path too, exactly as the fake-quant hooks
       replace a module output. So the engine is W8A{8,16} where the method is.
    4. Weights on a <= 8-bit grid (the grids ``quantize_weights_`` returned, not re-derived)
       are stored as 8-bit initializers feeding DequantizeLinear; embedding tables are
       gathered as int8 and dequantized after the Gather, so the word embeddings (about half
       of MiniLM's parameters) are 8-bit in the file too.
    5. :func:`fuse_for_cpu` writes ``MatMulIntegerToFloat`` (integer GEMM with the bias in its
       epilogue) for every weight MatMul with an 8-bit input (the pooler's and classifier's
       ``Gemm`` are rewritten as MatMuls first) and folds the attention scaling into the
       scores' grid, so ORT's optimizer turns ``q·kᵀ`` and ``probs·v`` into ``QLinearMatMul``
       (uint8 in and out). What stays float is the elementwise glue (LayerNorm, GELU, softmax,
       residual adds, the Quantize passes) and products with a float or 16-bit input.
    6. :mod:`transquant.engine_check` then counts integer and float MatMuls in the graph ORT's
       optimizer produces (a weight MatMul with two 8-bit inputs left float fails the build)
       and compares the engine's integer codes at every site with the fake-quant model's on
       the sample batch (below 99.9 % equal fails the build).

    The CPU this was measured on reports ``avx2 fma`` and no AVX-512/VNNI in /proc/cpuinfo.
    There MLAS runs U8S8 GEMMs with ``vpmaddubsw``, which adds *pairs* of u8·s8 products in
    saturating int16: an adversarial matrix (activations near 255, weights ±127) comes out 46 %
    wrong. ``weight_storage="u8"`` stores the same integers shifted by 128 (zero point 128) and
    runs U8U8 kernels that widen to 16 bits first — exact, but ~30 % slower per GEMM (1 thread:
    fp32 47, U8U8 70, U8S8 91 GMAC/s). On MiniLM's real activations the U8S8 engine produced the
    same integer codes at every site as the U8U8 one, so ``s8`` is the default (``profile.
    weight_storage``); ORT's own dynamic INT8 (the peer) uses U8S8 as well. On VNNI hardware
    (``vpdpbusd`` accumulates in int32) the question does not arise. S8S8 is exact but ORT
    has no fast kernel for it here (3x slower than fp32).
    The ``.onnx`` file is the deployable artifact and its bytes are the reported size.

    PEG (per-embedding-group ranges) is exact here: groups are per-channel scales, written as
    elementwise ``(clip(round(x/s_c) + z_c, 0, qmax) - z_c) * s_c`` (ORT's per-axis
    QuantizeLinear on the last axis was ~3x slower for the whole model); K=1 (one range for all
    channels) is an ordinary per-tensor QDQ. Where a PEG tensor feeds a MatMul (the FFN input),
    per-channel activation scales cannot be folded into one integer GEMM (the scale varies
    along the *reduction* axis), so the MatMul is split per group: the channels of a group are
    gathered, quantized with the group's scalar grid and multiplied by the matching weight rows
    on an integer kernel, and the K partial products are summed in float — the paper's
    proposal, executed.

PyTorch engine (``profile.engine=torch``)
    ``torch.ao`` dynamic INT8 Linear layers with our int8 weights (exact grid) and per-row 8-bit
    embedding tables. PyTorch has no maintained static-activation INT8 path for transformers
    (``torch.ao`` is deprecated), so activations are quantized per batch by the kernel itself,
    *not* with our calibrated grids: its accuracy is that of dynamic quantization, not of the
    calibrated method. It is kept for comparison. ONNX Runtime is the default because it
    executes our calibrated grids (fidelity to the fake-quant model is the point of the study)
    and its integer GEMMs were faster than PyTorch's on this CPU (numbers in the final report
    of issue 5 / ``profile.json`` of each run).

``profile.engine=none`` times the fake-quantized float model itself (a simulation, no gain).

Engines are registered in :data:`ENGINES` (end of this module): a new one is an
:class:`EngineKind` subclass with the packages it needs and a ``build`` method.
"""
from __future__ import annotations

import copy
import importlib
import logging
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .evaluate import percent_correct
from .errors import TransquantError
from .quant.quantizers import Grid, fake_quantize
from .quant.sites import find_sites, tap, use_tappable_attention
from .registry import Registry

log = logging.getLogger("transquant")

OPSET = 17
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
# Ops that only move or reshape data: a per-tensor dequantization commutes with them.
MOVES = frozenset({"Gather", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten"})


class EngineError(TransquantError):
    """An engine cannot be built or is not installed (one line, says what to do)."""


ENGINES = Registry("profile.engine", EngineError)  # EngineKind subclasses, at the end of this module


def require_engine(name: str) -> None:
    """Fail with one line if ``name`` is unknown or its runtime is not importable."""
    for module, pip_name in ENGINES[name].packages:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise EngineError(f"profile.engine={name}: the '{module}' package is not installed "
                              f"(pip install {pip_name}), or set profile.engine=none") from err


# --- common ------------------------------------------------------------------------------------

def input_names(batch: dict) -> list[str]:
    """Model inputs present in a batch, in export order."""
    return [k for k in INPUT_ORDER if k in batch]


def sample_batch(items: list[dict], pad_id: int, n: int = 3, extra_pad: int = 3) -> dict[str, torch.Tensor]:
    """A small batch where every row has padding, so masked and unmasked scores differ (the
    site matcher relies on it) and pad handling is exercised."""
    chunk = items[:n]
    width = max(len(c["input_ids"]) for c in chunk) + extra_pad
    out = {}
    for key in input_names(chunk[0]):
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([c[key] + [fill] * (width - len(c[key])) for c in chunk])
    return out


def fixed_batch(items: list[dict], pad_id: int, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A [batch_size, seq_len] batch for timing: real items truncated/padded to seq_len (the
    attention cost does not depend on padding; pads are still real work)."""
    rows = [items[i % len(items)] for i in range(batch_size)]
    out = {}
    for key in input_names(rows[0]):
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([(r[key] + [fill] * seq_len)[:seq_len] for r in rows])
    return out


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
class Engine:
    """A deployable model and a way to run it. ``run(feeds)`` takes numpy int64 inputs."""

    name: str
    path: Path | None
    run: Callable[[dict[str, np.ndarray]], np.ndarray]
    inputs: list[str]
    info: dict = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        """Bytes of the serialized artifact on disk (what would ship)."""
        if self.path is None:
            raise EngineError(f"engine {self.name}: no serialized artifact")
        return Path(self.path).stat().st_size

    def logits(self, batch: dict) -> np.ndarray:
        return self.run({k: np.ascontiguousarray(batch[k].cpu().numpy()) for k in self.inputs})

    def predictions(self, items: list[dict], batch_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted, true) labels over items, in the same length-sorted order as
        :func:`transquant.evaluate.predictions`."""
        from .tasks import batches

        preds, labels = [], []
        for batch in batches(items, batch_size, pad_id, by_length=True):
            labels.append(batch.pop("labels"))
            preds.append(torch.from_numpy(self.logits(batch)).argmax(-1))
        return torch.cat(preds), torch.cat(labels)

    def accuracy(self, items: list[dict], batch_size: int, pad_id: int) -> float:
        pred, true = self.predictions(items, batch_size, pad_id)
        return percent_correct(pred, true)


def torch_runner(model: nn.Module, names: list[str]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    def run(feeds):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(feeds[k]) for k in names}).logits.float().numpy()
    return run


# --- ONNX export -------------------------------------------------------------------------------

class _Logits(nn.Module):
    """Positional-input wrapper so the ONNX graph has exactly our inputs and one output."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors))).logits


def export_onnx(model: nn.Module, batch: dict, path: Path) -> Path:
    """Export ``model`` (a copy is switched to eager attention) with dynamic batch and length."""
    importlib.import_module("onnx")  # fail early with the import error if missing

    model = copy.deepcopy(model).cpu().eval()
    model.set_attn_implementation("eager")
    names = input_names(batch)
    axes = {k: {0: "batch", 1: "sequence"} for k in names}
    axes["logits"] = {0: "batch"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(model, names), tuple(batch[k].cpu() for k in names), str(path),
                          input_names=names, output_names=["logits"], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return path


def gemm_to_matmul(proto) -> int:
    """Rewrite ``Gemm(x, W, b)`` (how 2-D Linear inputs export: the pooler, the classifier) as
    ``MatMul(x, W') + b`` with the weight initializer stored as [in, out], so every weight product
    takes the same integer path as the encoder's MatMuls. Returns the number rewritten."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    n = 0
    for gemm in [x for x in g.node if x.op_type == "Gemm"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
                or gemm.input[1] not in inits):
            continue
        w = numpy_helper.to_array(inits[gemm.input[1]])
        w_name = f"{gemm.input[1]}_matmul{n}"
        w = np.ascontiguousarray(w.T if attrs.get("transB", 0) else w)
        g.initializer.append(numpy_helper.from_array(w, w_name))
        has_bias = len(gemm.input) > 2 and gemm.input[2]
        mm_out = gemm.output[0] + "_matmul" if has_bias else gemm.output[0]
        nodes = [helper.make_node("MatMul", [gemm.input[0], w_name], [mm_out], name=gemm.name + "_matmul")]
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, gemm.input[2]], [gemm.output[0]], name=gemm.name + "_bias"))
        at = list(g.node).index(gemm)
        g.node.remove(gemm)
        for i, node in enumerate(nodes):
            g.node.insert(at + i, node)
        n += 1
    used = {x for node in g.node for x in node.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return n


# ORT rewrites that would run another method than the one we built: a float weight between
# quantized activations gets quantized to int8 (WeightBiasQuantization, W32A8), and int8 weights
# under float activations become MatMulNBits that quantizes the activations per block at
# accuracy level 4 (W8A32). Level 1 keeps its arithmetic float.
ORT_CONFIG = {"optimization.disable_specified_optimizers": "WeightBiasQuantization",
              "session.qdq_matmulnbits_accuracy_level": "1"}


def ort_session(path_or_bytes, threads: int | None, optimize: bool = True, optimized_path: Path | None = None):
    """A CPU session; ``optimized_path`` saves the graph ORT's optimizer produced (what runs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    for key, value in ORT_CONFIG.items():
        so.add_session_config_entry(key, value)
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def ort_engine(name: str, path: Path, threads: int | None, names: list[str], info: dict | None = None) -> Engine:
    sess = ort_session(Path(path), threads)
    return Engine(name, Path(path), lambda feeds: sess.run(["logits"], feeds)[0], names, info or {})


# --- site -> ONNX tensor -----------------------------------------------------------------------

def capture_sites(model: nn.Module, names: list[str], batch: dict) -> dict[str, np.ndarray]:
    """Float values of the named sites on ``batch`` (taps on a copy with tappable attention)."""
    model = copy.deepcopy(model).cpu().eval()
    use_tappable_attention(model)
    wanted = set(names)
    sites = [s for s in find_sites(model) if s.name in wanted]
    values: dict[str, np.ndarray] = {}

    def grab(site, x):
        values[site.name] = x.detach().float().numpy().copy()
        return x

    with torch.no_grad(), tap(sites, grab):
        model(**{k: v.cpu() for k, v in batch.items()})
    return values


def onnx_intermediates(proto, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every float tensor the graph computes on ``feeds`` (optimizations off), and their order."""
    import onnx

    model = copy.deepcopy(proto)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    types.update({o.name: o.type.tensor_type.elem_type for o in model.graph.output})
    have = {o.name for o in model.graph.output}
    order = []
    for node in model.graph.node:
        for out in node.output:
            if types.get(out) == onnx.TensorProto.FLOAT and node.op_type != "Constant":
                order.append(out)
                if out not in have:
                    model.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
                    have.add(out)
    sess = ort_session(model.SerializeToString(), threads=None, optimize=False)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, feeds)))
    return values, order


def match_sites(site_values: dict[str, np.ndarray], onnx_values: dict[str, np.ndarray],
                order: list[str]) -> dict[str, str]:
    """Site name -> ONNX tensor carrying the same values (same shape, allclose). When several
    tensors agree (e.g. a MatMul and its zero-bias Add), the last in graph order is the module's
    output. Raises if a site has no counterpart: the export would not compute our model."""
    out = {}
    for site, v in site_values.items():
        tol = 1e-4 * max(1.0, float(np.abs(v).max()))
        cands = [t for t in order if onnx_values[t].shape == v.shape
                 and np.allclose(onnx_values[t], v, rtol=1e-3, atol=tol)]
        if not cands:
            raise EngineError(f"engine export: site {site} has no tensor with its values in the ONNX graph "
                              "(the exported graph does not compute the calibrated model)")
        out[site] = cands[-1]
    return out


# --- QDQ rewrite -------------------------------------------------------------------------------

@dataclass
class ActQuant:
    """One activation tensor's grid in ONNX terms (per-tensor, or per-channel on ``axis``).

    Grids of <= 8 bits are stored as uint8, wider ones (``mixed``'s 16-bit sites) as uint16:
    ORT 1.32 runs uint16 QuantizeLinear in the ``com.microsoft`` domain at any opset (the ONNX
    domain needs opset 21, and the export is opset 17)."""

    scale: np.ndarray  # float32, scalar or [C]
    zero_point: np.ndarray  # uint8 or uint16 (the container), same shape
    bits: int
    axis: int | None = None

    @classmethod
    def from_grid(cls, grid: Grid, rank: int) -> "ActQuant":
        """A per-channel grid whose channels all share one range (PEG with K=1) is per-tensor."""
        scale = grid.scale.detach().float().cpu().numpy().astype(np.float32).reshape(-1)
        zero = grid.zero_point.detach().cpu().numpy().reshape(-1)
        if grid.qmin != 0 or grid.qmax > 65535:
            raise EngineError(f"engine: activation grid [{grid.qmin}, {grid.qmax}] is not unsigned <= 16 bits")
        bits = int(math.log2(grid.qmax + 1))
        container = np.uint8 if bits <= 8 else np.uint16
        if (scale == scale[0]).all() and (zero == zero[0]).all():
            return cls(scale[0].reshape(()), zero[0].astype(container).reshape(()), bits)
        return cls(scale, zero.astype(container), bits, axis=rank - 1)

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def container_bits(self) -> int:
        return 8 * self.zero_point.dtype.itemsize

    @property
    def domain(self) -> str:
        """Operator domain of this grid's QuantizeLinear/DequantizeLinear."""
        return "" if self.container_bits == 8 else "com.microsoft"

    def real_range(self) -> tuple[np.ndarray, np.ndarray]:
        qmax = 2 ** self.bits - 1
        zp = self.zero_point.astype(np.float32)
        return (-zp * self.scale).astype(np.float32), ((qmax - zp) * self.scale).astype(np.float32)


class _Graph:
    """Small helper around a GraphProto: consumers, rewiring, node insertion in order."""

    def __init__(self, proto):
        self.model = proto
        self.g = proto.graph
        self.after: dict[str, list] = {}   # tensor -> nodes to place right after its producer
        self.front: list = []              # nodes placed before everything (constants, weights)
        self.inits = {i.name: i for i in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self._n = 0

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}__tq{self._n}"

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(name)
        self.g.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def place(self, tensor: str, nodes: list) -> None:
        if tensor in self.producer:
            self.after.setdefault(tensor, []).extend(nodes)
        else:
            self.front.extend(nodes)

    def consumers(self, tensor: str) -> list:
        return [n for n in self.g.node if tensor in n.input]

    def rewire(self, old: str, new: str, skip: set[int]) -> None:
        """Consumers of ``old`` (except nodes in ``skip``, by id) read ``new``."""
        for n in list(self.g.node) + [n for ns in self.after.values() for n in ns] + self.front:
            if id(n) in skip:
                continue
            for i, x in enumerate(n.input):
                if x == old:
                    n.input[i] = new
        if any(o.name == old for o in self.g.output):
            raise EngineError(f"engine: cannot rewire graph output {old}")

    def finish(self) -> None:
        nodes = list(self.front)
        for n in self.g.node:
            nodes.append(n)
            for o in n.output:
                nodes.extend(self.after.get(o, []))
        del self.g.node[:]
        self.g.node.extend(nodes)


def _qdq_nodes(G: _Graph, tensor: str, q: ActQuant, out: str | None = None) -> tuple[list, str, str]:
    """(Clip) -> QuantizeLinear -> DequantizeLinear on ``tensor``; returns (nodes, dq output,
    the tensor holding the integer codes)."""
    from onnx import helper

    nodes = []
    if q.per_channel:
        # ORT's per-axis QuantizeLinear on the innermost axis runs one tiny block per element
        # (measured ~3x slower for the whole PEG model); the same arithmetic as elementwise
        # broadcasts is fast: clip(round(x / s_c) + z_c, 0, qmax) then (q - z_c) * s_c. Rounding
        # before adding z_c, as QuantizeLinear and the fake quantizer do: round-half-to-even of
        # x/s_c + z_c would break an exact .5 tie the other way for odd z_c.
        qmax = np.float32(2 ** q.bits - 1)
        s_c, z_c = G.const(tensor + "_scale", q.scale), G.const(tensor + "_zp", q.zero_point.astype(np.float32))
        lo, hi = G.const("qmin", np.float32(0)), G.const("qmax", qmax)
        t = [G.fresh(tensor + f"_pc{i}") for i in range(5)]
        dq = out or G.fresh(tensor + "_dq")
        nodes += [helper.make_node("Div", [tensor, s_c], [t[0]], name=G.fresh("tq_pc_div")),
                  helper.make_node("Round", [t[0]], [t[1]], name=G.fresh("tq_pc_round")),
                  helper.make_node("Add", [t[1], z_c], [t[2]], name=G.fresh("tq_pc_zp")),
                  helper.make_node("Clip", [t[2], lo, hi], [t[3]], name=G.fresh("tq_pc_clip")),
                  helper.make_node("Sub", [t[3], z_c], [t[4]], name=G.fresh("tq_pc_unzp")),
                  helper.make_node("Mul", [t[4], s_c], [dq], name=G.fresh("tq_pc_scale"))]
        return nodes, dq, t[3]
    src = tensor
    if q.bits < q.container_bits:
        lo, hi = q.real_range()
        clipped = G.fresh(tensor + "_clip")
        mx = G.fresh(tensor + "_clipmax")
        nodes += [helper.make_node("Max", [src, G.const("lo", lo)], [mx], name=G.fresh("tq_clip_lo")),
                  helper.make_node("Min", [mx, G.const("hi", hi)], [clipped], name=G.fresh("tq_clip_hi"))]
        src = clipped
    scale, zero = G.const(tensor + "_scale", q.scale), G.const(tensor + "_zp", q.zero_point)
    qt, dq = G.fresh(tensor + "_q"), out or G.fresh(tensor + "_dq")
    nodes += [helper.make_node("QuantizeLinear", [src, scale, zero], [qt], name=G.fresh("tq_q"), domain=q.domain),
              helper.make_node("DequantizeLinear", [qt, scale, zero], [dq], name=G.fresh("tq_dq"), domain=q.domain)]
    return nodes, dq, qt


def quantize_activation(G: _Graph, tensor: str, q: ActQuant, skip: set[int] = frozenset()) -> str:
    """Insert QDQ on ``tensor`` and make every consumer read the dequantized tensor. A graph
    output keeps its name (the producer's output is renamed). Returns the codes tensor."""
    outputs = {o.name for o in G.g.output}
    if tensor in outputs:
        producer = G.producer[tensor]
        raw = G.fresh(tensor + "_float")
        producer.output[list(producer.output).index(tensor)] = raw
        G.producer[raw] = producer
        nodes, _, codes = _qdq_nodes(G, raw, q, out=tensor)
        G.place(raw, nodes)
        return codes
    nodes, dq, codes = _qdq_nodes(G, tensor, q)
    # Shape nodes only read the dimensions: leave them on the float tensor, or ORT keeps a full
    # DequantizeLinear pass alive just to feed a Shape.
    shapes = {id(n) for n in G.consumers(tensor) if n.op_type == "Shape"}
    G.rewire(tensor, dq, skip={id(n) for n in nodes} | shapes | set(skip))
    G.place(tensor, nodes)
    return codes


def quantize_weight(G: _Graph, init_name: str, grid: Grid, array: np.ndarray, storage: str = "u8") -> None:
    """Replace a float initializer by 8-bit integers + DequantizeLinear; a Gather reads the int8
    table directly and dequantizes only the rows it gathered.

    ``storage="u8"`` writes matmul weights as uint8 with zero point 128 (the same integers
    shifted; exact U8U8 kernels), ``"s8"`` as int8 (U8S8 kernels: faster on AVX2, but they sum
    pairs of u8*s8 products in saturating int16 — see the module docstring)."""
    from onnx import helper

    scale = grid.scale.detach().float().cpu().numpy().astype(np.float32).reshape(())
    ints = np.clip(np.round(array / scale), grid.qmin, grid.qmax).astype(np.int8)
    consumers = G.consumers(init_name)
    gathers = [n for n in consumers if n.op_type == "Gather" and n.input[0] == init_name]
    s_name = G.const(init_name + "_scale", scale)
    if gathers:
        q_name, z_name = G.const(init_name + "_int8", ints), G.const(init_name + "_zp", np.zeros((), np.int8))
    if len(gathers) < len(consumers):
        if storage == "u8":
            wq = G.const(init_name + "_uint8", (ints.astype(np.int16) + 128).astype(np.uint8))
            wz = G.const(init_name + "_zp", np.full((), 128, np.uint8))
        else:
            wq = G.const(init_name + "_int8", ints) if not gathers else q_name
            wz = G.const(init_name + "_zp", np.zeros((), np.int8)) if not gathers else z_name
    dq_out = None
    for node in consumers:
        if node in gathers:
            node.input[0] = q_name
            out = node.output[0]
            raw = G.fresh(out + "_int8")
            node.output[0] = raw
            G.producer[raw] = node
            G.place(raw, [helper.make_node("DequantizeLinear", [raw, s_name, z_name], [out], name=G.fresh("tq_dqg"))])
        else:
            if dq_out is None:
                dq_out = G.fresh(init_name + "_dq")
                G.front.append(helper.make_node("DequantizeLinear", [wq, s_name, wz], [dq_out],
                                                name=G.fresh("tq_dqw")))
            for i, x in enumerate(node.input):
                if x == init_name:
                    node.input[i] = dq_out
    G.g.initializer.remove(G.inits.pop(init_name))


def split_peg_matmul(G: _Graph, tensor: str, q: ActQuant) -> set[int]:
    """PEG on a MatMul input: y = sum_g DQ_g(Q_g(x[..., idx_g])) @ W[idx_g, :].

    Each group has one scalar grid, so each partial product is an ordinary U8S8 integer GEMM.
    Only the MatMul consumers are rewritten (other consumers, e.g. the residual add, get the
    per-axis QDQ). Returns the ids of the inserted nodes that read the float tensor."""
    from onnx import helper

    consumers = [n for n in G.consumers(tensor) if n.op_type == "MatMul"]
    if not consumers:
        return set()
    if any(n.input[0] != tensor for n in consumers):
        raise EngineError(f"engine: per-group (PEG) ranges on {tensor}, the second input of a MatMul, "
                          "have no integer kernel (per-channel scales along the reduction axis)")
    keys = np.stack([q.scale.astype(np.float64), q.zero_point.astype(np.float64)], 1)
    uniq, group_of = np.unique(keys, axis=0, return_inverse=True)
    group_of = group_of.reshape(-1)
    plans = []
    for node in consumers:
        wq = _weight_source(G, node.input[1])
        if wq is None:
            raise EngineError(f"engine: per-group (PEG) ranges on {tensor} feed a MatMul whose other input "
                              "is not a constant weight; the ONNX Runtime engine cannot split it per group")
        plans.append((node, wq))
    skip: set[int] = set()
    # x_g = Gather(x, idx_g, axis=-1), quantized with the group's scalar grid, shared by consumers.
    parts = []
    for g, (scale, zero) in enumerate(uniq):
        idx = np.nonzero(group_of == g)[0].astype(np.int64)
        xg = G.fresh(f"{tensor}_peg{g}")
        nodes = [helper.make_node("Gather", [tensor, G.const("idx", idx)], [xg], axis=-1, name=G.fresh("tq_peg_gather"))]
        qg = ActQuant(np.float32(scale).reshape(()), np.asarray(zero, q.zero_point.dtype).reshape(()), q.bits)
        qdq, dq, _ = _qdq_nodes(G, xg, qg)
        G.place(tensor, nodes + qdq)
        skip.update(id(n) for n in nodes)
        parts.append((idx, dq))
    for node, (ints, s_name, z_name, rows_float) in plans:
        outs = []
        for g, (idx, dq) in enumerate(parts):
            if ints is not None:
                w_g = G.const(node.input[1] + f"_g{g}", ints[idx])
                w_in = G.fresh(node.input[1] + f"_g{g}_dq")
                G.front.append(helper.make_node("DequantizeLinear", [w_g, s_name, z_name], [w_in], name=G.fresh("tq_dqw")))
            else:
                w_in = G.const(node.input[1] + f"_g{g}", rows_float[idx])
            y = G.fresh(node.output[0] + f"_g{g}")
            G.place(tensor, [helper.make_node("MatMul", [dq, w_in], [y], name=G.fresh("tq_peg_mm"))])
            outs.append(y)
        total = outs[0]
        adds = []
        for i, y in enumerate(outs[1:]):
            nxt = node.output[0] if i == len(outs) - 2 else G.fresh(node.output[0] + "_sum")
            adds.append(helper.make_node("Add", [total, y], [nxt], name=G.fresh("tq_peg_add")))
            total = nxt
        G.place(tensor, adds)
        G.g.node.remove(node)
    return skip


def _weight_source(G: _Graph, name: str):
    """(int8 array, scale name, zp name, None) for a dequantized int8 weight, (None, .., float
    array) for a float initializer, or None."""
    from onnx import numpy_helper

    if name in G.inits:
        return None, None, None, numpy_helper.to_array(G.inits[name])
    node = next((n for n in G.front if name in n.output and n.op_type == "DequantizeLinear"), None)
    if node is None:
        return None
    arrays = {i.name: i for i in G.g.initializer}
    ints = numpy_helper.to_array(arrays[node.input[0]])
    return ints, node.input[1], node.input[2], None


# --- CPU fusions ORT's QDQ optimizer does not do ------------------------------------------------

def _const_value(g, name: str, consts: dict) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in g.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = consts.get(name)
    if node is not None:
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def fuse_for_cpu(proto) -> dict[str, int]:
    """Exact rewrites of the QDQ graph that ORT's optimizer leaves undone (counts returned):

    - ``scores``: ``MatMul(q, kᵀ) * α -> Q(s)`` becomes ``MatMul(q, kᵀ) -> Q(s/α)`` (same codes
      up to float ties), so ORT runs QLinearMatMul with a uint8 output instead of a float
      MatMul, a Mul pass and a Quantize pass; the DequantizeLinear keeps scale ``s``.
    - ``hoisted_dq``: ``DQ(x) -> Gather/Slice/… -> MatMul(·, DQ(W))`` (the pooler reads the
      [CLS] row) becomes ``Gather/Slice/…(x) -> DQ``: moving data before or after a per-tensor
      dequantization is exact, and the MatMul then reads a DQ, as the next rewrite needs.
    - ``matmul_bias``: ``DQ(uint8 x), DQ(int8 W) -> MatMul -> Add(bias)`` becomes one
      ``MatMulIntegerToFloat(x, W, …, bias)`` (the bias add happens in the GEMM epilogue).

    Not done: fusing ``LayerNorm(a + b)`` into ``SkipLayerNormalization`` — ORT 1.32's CPU
    SkipLayerNormalization kernel measured ~8x slower than LayerNormalization plus an Add here.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    stats = {"scores": 0, "hoisted_dq": 0, "matmul_bias": 0}
    outputs = {o.name for o in g.output}

    def maps():
        prod = {o: n for n in g.node for o in n.output}
        cons: dict[str, list] = {}
        for n in g.node:
            for x in n.input:
                cons.setdefault(x, []).append(n)
        return prod, cons

    def dtype(name: str) -> int | None:
        for init in g.initializer:
            if init.name == name:
                return init.data_type
        return None

    def replace(old_nodes: list, new_node, at) -> None:
        idx = list(g.node).index(at)
        g.node.insert(idx, new_node)
        for n in old_nodes:
            g.node.remove(n)

    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    prod, cons = maps()
    for mul in [n for n in g.node if n.op_type == "Mul"]:
        a, c = mul.input
        alpha = _const_value(g, c, consts)
        mm = prod.get(a)
        users = cons.get(mul.output[0], [])
        if (alpha is None or alpha.size != 1 or float(alpha) <= 0 or mm is None or mm.op_type != "MatMul"
                or len(cons.get(a, [])) != 1 or len(users) != 1 or users[0].op_type != "QuantizeLinear"
                or mul.output[0] in outputs):
            continue
        q = users[0]
        scale = _const_value(g, q.input[1], consts)
        if scale is None or scale.size != 1:
            continue
        name = q.input[1] + "_over_alpha"
        g.initializer.append(numpy_helper.from_array((scale / np.float32(alpha)).astype(np.float32), name))
        q.input[0], q.input[1] = a, name
        g.node.remove(mul)
        stats["scores"] += 1

    hoisted = True
    while hoisted:
        hoisted = False
        prod, cons = maps()
        for mm in [n for n in g.node if n.op_type == "MatMul"]:
            mv, dq_w = prod.get(mm.input[0]), prod.get(mm.input[1])
            dq = prod.get(mv.input[0]) if mv is not None and mv.op_type in MOVES else None
            if (dq is None or dq.op_type != "DequantizeLinear" or dq_w is None or dq_w.op_type != "DequantizeLinear"
                    or any(at.name == "axis" for at in dq.attribute) or len(dq.input) < 3
                    or dtype(dq.input[2]) != TensorProto.UINT8
                    or dtype(dq_w.input[0]) not in (TensorProto.INT8, TensorProto.UINT8)):
                continue
            codes = mv.output[0] + "_codes"
            moved = copy.deepcopy(mv)
            moved.input[0], moved.output[0] = dq.input[0], codes
            after = helper.make_node("DequantizeLinear", [codes, dq.input[1], dq.input[2]], [mv.output[0]],
                                     name=mv.name + "_dq")
            replace([mv], moved, mv)
            g.node.insert(list(g.node).index(moved) + 1, after)
            stats["hoisted_dq"] += 1
            hoisted = True
            break

    prod, cons = maps()
    for mm in [n for n in g.node if n.op_type == "MatMul"]:
        dq_a, dq_w = prod.get(mm.input[0]), prod.get(mm.input[1])
        if (dq_a is None or dq_w is None or dq_a.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear"
                or any(at.name == "axis" for at in dq_a.attribute) or len(dq_a.input) < 3 or len(dq_w.input) < 3
                or dtype(dq_w.input[0]) not in (TensorProto.INT8, TensorProto.UINT8)
                or dtype(dq_a.input[2]) != TensorProto.UINT8):
            continue
        inputs = [dq_a.input[0], dq_w.input[0], dq_a.input[1], dq_w.input[1], dq_a.input[2], dq_w.input[2]]
        out, removed = mm.output[0], [mm]
        users = cons.get(mm.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add" and mm.output[0] not in outputs:
            add = users[0]
            other = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
            bias = _const_value(g, other, consts)
            if bias is not None and bias.ndim == 1 and dtype(other) == TensorProto.FLOAT:
                inputs.append(other)
                out, removed = add.output[0], [mm, add]
        node = helper.make_node("MatMulIntegerToFloat", inputs, [out], name=mm.name + "_int", domain="com.microsoft")
        replace(removed, node, mm)
        stats["matmul_bias"] += 1

    # Dequantize nodes left without consumers (their MatMul is now integer).
    while True:
        prod, cons = maps()
        dead = [n for n in g.node if n.op_type == "DequantizeLinear"
                and not any(cons.get(o) for o in n.output) and not any(o in outputs for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {x for n in g.node for x in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return stats


@dataclass
class BuildReport:
    """What the ONNX build did, and what the checks of :mod:`transquant.engine_check` found."""

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
    ``batch`` (padded, e.g. :func:`sample_batch`) maps sites to tensors and is the sample on
    which the engine's codes must match the fake-quant model's.
    """
    import onnx
    from onnx import numpy_helper

    from .engine_check import code_agreement, matmul_kernels

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

    G = _Graph(proto)
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


# --- PyTorch engine ----------------------------------------------------------------------------

def build_torch_int8(quant_model: nn.Module, weight_grids: dict[str, Grid], path: Path) -> nn.Module:
    """Dynamic INT8 Linear layers (our exact int8 weights, from ``quantize_weights_``'s grids)
    and 8-bit per-row embeddings; the model's state dict (packed int8 tensors) is saved to
    ``path`` (the artifact)."""
    from torch.ao.nn.quantized import dynamic as nnqd
    from torch.ao.quantization import default_dynamic_qconfig, float_qparams_weight_only_qconfig, quantize_dynamic

    model = copy.deepcopy(quant_model).cpu().eval()
    grids = int8_weight_grids(model, weight_grids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantize_dynamic(model, {nn.Linear: default_dynamic_qconfig,
                                          nn.Embedding: float_qparams_weight_only_qconfig}, dtype=torch.qint8)
    mods = dict(qmodel.named_modules())
    for name, (mod, grid) in grids.items():
        target = mods.get(name)
        if isinstance(target, nnqd.Linear):
            w = torch.quantize_per_tensor(mod.weight.detach().float().cpu(), float(grid.scale), 0, torch.qint8)
            target.set_weight_bias(w, mod.bias.detach().cpu() if mod.bias is not None else None)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(qmodel.state_dict(), str(path))
    return qmodel


# --- engines (profile.engine) ------------------------------------------------------------------

@dataclass
class EngineJob:
    """What an engine is built from: the calibrated model, the profile's batches and options."""

    profile: Any  # the ``profile`` config: engine options such as ``weight_storage``
    fp32_model: nn.Module
    quant_model: nn.Module
    qa: Any  # QuantizedActivations, or None without quantized activations
    weight_grids: dict[str, Grid]  # what ``quantize_weights_`` returned
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
    in_torch = True  # runs in PyTorch: timed with the job device's clock, GPU memory measured there

    @classmethod
    def build(cls, job: EngineJob) -> BuiltEngine:
        raise NotImplementedError


def torch_timing_runner(model: nn.Module, batch: dict, device: torch.device, context=None) -> Callable[[], Any]:
    """A callable running ``model`` once on ``batch`` (moved to ``device`` once), inside ``context()``."""
    feeds = {k: v.to(device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode(), (context or nullcontext)():
            out = model(**feeds).logits
        sync()  # so a host clock is valid when GPU and CPU (ORT) candidates are compared
        return out
    return run


def ort_timing_runner(path: Path, threads: int | None, batch: dict) -> Callable[[], Any]:
    """A callable running the ONNX model at ``path`` once on ``batch``."""
    sess = ort_session(Path(path), threads)
    feeds = {i.name: np.ascontiguousarray(batch[i.name].cpu().numpy()) for i in sess.get_inputs()}
    return lambda: sess.run(None, feeds)


def save_state_dict(model: nn.Module, path: Path) -> int:
    """Save ``model``'s state dict to ``path``; returns its bytes (the artifact size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), str(path))
    return path.stat().st_size


@ENGINES.register("onnxruntime")
class OnnxRuntimeEngine(EngineKind):
    """Our calibrated grids as QDQ nodes on integer kernels (the module docstring)."""

    packages = (("onnxruntime", "onnxruntime"), ("onnx", "onnx"))
    in_torch = False

    @classmethod
    def build(cls, job: EngineJob) -> BuiltEngine:
        _, path, report = build_onnx_int8(job.fp32_model, job.quant_model, job.qa, job.weight_grids, job.sample,
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

    @classmethod
    def build(cls, job: EngineJob) -> BuiltEngine:
        n_int8 = len(int8_weight_grids(job.quant_model, job.weight_grids))
        path = job.workdir / "engine_torch_int8.pt"
        if n_int8:
            qmodel = build_torch_int8(job.quant_model, job.weight_grids, path)
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
        ctx = job.qa.active if job.qa is not None else None
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
