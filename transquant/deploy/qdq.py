"""QuantizeLinear -> DequantizeLinear insertion into an ONNX graph with our calibrated grids:
activations (per tensor, per channel for PEG), 8-bit weight initializers (per tensor or per
output column; gathered embeddings dequantized after the Gather), and PEG MatMul inputs split
per group onto integer kernels."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..quant.quantizers import Grid
from .runtime import EngineError


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


class GraphEditor:
    """Small helper around a GraphProto: consumers, rewiring, node insertion in order.

    Nodes are told apart by ``id()`` (skip sets). protobuf's Python objects for the graph's nodes
    are made on access and cached only while referenced, so a freed one's id can come back for
    another node: the editor holds every node's object for its lifetime, which keeps each node's
    id fixed (create it before collecting ids)."""

    def __init__(self, proto):
        self.model = proto
        self.g = proto.graph
        self._held = list(self.g.node)
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


def _qdq_nodes(G: GraphEditor, tensor: str, q: ActQuant, out: str | None = None) -> tuple[list, str, str]:
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


def quantize_activation(G: GraphEditor, tensor: str, q: ActQuant, skip: set[int] = frozenset()) -> str:
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


def quantize_weight(G: GraphEditor, init_name: str, grid: Grid, codes: np.ndarray, storage: str = "u8") -> None:
    """Replace a float initializer by the weight's 8-bit integer ``codes`` (the quant state's, in
    the initializer's layout) + DequantizeLinear with ``grid``'s scale and zero point; a Gather
    reads the int8 table directly and dequantizes only the rows it gathered.

    A per-channel grid (its scale shaped to broadcast against ``codes``, in the same layout)
    becomes a per-axis DequantizeLinear: one scale and zero point per output column of the MatMul
    weight, which ORT's integer MatMul kernels take as per-column B scales. A gathered table must
    be per tensor (its rows would need their own scales gathered along).

    ``storage="u8"`` writes matmul weights as uint8 shifted by 128 (the same integers; exact
    U8U8 kernels), ``"s8"`` as int8 (U8S8 kernels: faster on AVX2, but they sum pairs of u8*s8
    products in saturating int16 — see the module docstring)."""
    from onnx import helper

    shape = tuple(grid.scale.shape)
    axes = [d for d, n in enumerate(shape) if n != 1]
    axis = axes[0] if axes else None
    scale = grid.scale.detach().float().cpu().numpy().astype(np.float32).reshape(-1 if axes else ())
    zeros = grid.zero_point.detach().cpu().numpy().astype(np.int64).reshape(scale.shape)
    signed8 = -128 <= grid.qmin <= grid.qmax <= 127 and (grid.qmin <= zeros).all() and (zeros <= grid.qmax).all()
    if len(axes) > 1 or (axes and len(shape) != np.ndim(codes)) or not signed8:
        raise EngineError(f"engine: weight grid [{grid.qmin}, {grid.qmax}] (scale shape {shape}) of {init_name} "
                          "is not signed 8-bit, per tensor or per channel")
    ints = np.asarray(codes).astype(np.int8)
    consumers = G.consumers(init_name)
    gathers = [n for n in consumers if n.op_type == "Gather" and n.input[0] == init_name]
    if gathers and axis is not None:
        raise EngineError(f"engine: {init_name} is gathered (an embedding table) but has per-channel scales")
    per_axis = {} if axis is None else {"axis": axis}
    s_name = G.const(init_name + "_scale", scale)
    if gathers:
        q_name, z_name = G.const(init_name + "_int8", ints), G.const(init_name + "_zp", zeros.astype(np.int8))
    if len(gathers) < len(consumers):
        if storage == "u8":
            wq = G.const(init_name + "_uint8", (ints.astype(np.int16) + 128).astype(np.uint8))
            wz = G.const(init_name + "_zp", (zeros + 128).astype(np.uint8))
        else:
            wq = G.const(init_name + "_int8", ints) if not gathers else q_name
            wz = G.const(init_name + "_zp", zeros.astype(np.int8)) if not gathers else z_name
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
                                                name=G.fresh("tq_dqw"), **per_axis))
            for i, x in enumerate(node.input):
                if x == init_name:
                    node.input[i] = dq_out
    G.g.initializer.remove(G.inits.pop(init_name))


def split_peg_matmul(G: GraphEditor, tensor: str, q: ActQuant, groups: np.ndarray) -> set[int]:
    """PEG on a MatMul input: y = sum_g DQ_g(Q_g(x[..., idx_g])) @ W[idx_g, :].

    ``groups`` is the quant state's group id per channel (sorting channels by it is the PEG
    permutation). Each group has one scalar grid (checked), so each partial product is an
    ordinary U8S8 integer GEMM.
    Only the MatMul consumers are rewritten (other consumers, e.g. the residual add, get the
    per-axis QDQ). Returns the ids of the inserted nodes that read the float tensor."""
    from onnx import helper

    consumers = [n for n in G.consumers(tensor) if n.op_type == "MatMul"]
    if not consumers:
        return set()
    if any(n.input[0] != tensor for n in consumers):
        raise EngineError(f"engine: per-group (PEG) ranges on {tensor}, the second input of a MatMul, "
                          "have no integer kernel (per-channel scales along the reduction axis)")
    group_of = np.asarray(groups).reshape(-1)
    if group_of.size != q.scale.size:
        raise EngineError(f"engine: PEG groups of {tensor} cover {group_of.size} channels, its grid {q.scale.size}")
    grids = []
    for g in np.unique(group_of):
        idx = np.nonzero(group_of == g)[0]
        scale, zero = q.scale[idx], q.zero_point[idx]
        if not ((scale == scale[0]).all() and (zero == zero[0]).all()):
            raise EngineError(f"engine: PEG group {g} of {tensor} has channels on different grids")
        grids.append((idx.astype(np.int64), scale[0], zero[0]))
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
    for g, (idx, scale, zero) in enumerate(grids):
        xg = G.fresh(f"{tensor}_peg{g}")
        nodes = [helper.make_node("Gather", [tensor, G.const("idx", idx)], [xg], axis=-1, name=G.fresh("tq_peg_gather"))]
        qg = ActQuant(np.float32(scale).reshape(()), np.asarray(zero, q.zero_point.dtype).reshape(()), q.bits)
        qdq, dq, _ = _qdq_nodes(G, xg, qg)
        G.place(tensor, nodes + qdq)
        skip.update(id(n) for n in nodes)
        parts.append((idx, dq))
    for node, (ints, s_name, z_name, rows_float, attrs) in plans:
        outs = []
        for g, (idx, dq) in enumerate(parts):
            if ints is not None:  # rows of the weight: per-column scales (axis 1) hold for every group
                w_g = G.const(node.input[1] + f"_g{g}", ints[idx])
                w_in = G.fresh(node.input[1] + f"_g{g}_dq")
                G.front.append(helper.make_node("DequantizeLinear", [w_g, s_name, z_name], [w_in],
                                                name=G.fresh("tq_dqw"), **attrs))
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


def _weight_source(G: GraphEditor, name: str):
    """(int8 array, scale name, zp name, None, its DequantizeLinear's attributes) for a
    dequantized int8 weight, (None, .., float array, {}) for a float initializer, or None."""
    from onnx import helper, numpy_helper

    if name in G.inits:
        return None, None, None, numpy_helper.to_array(G.inits[name]), {}
    node = next((n for n in G.front if name in n.output and n.op_type == "DequantizeLinear"), None)
    if node is None:
        return None
    arrays = {i.name: i for i in G.g.initializer}
    ints = numpy_helper.to_array(arrays[node.input[0]])
    return ints, node.input[1], node.input[2], None, {a.name: helper.get_attribute_value(a) for a in node.attribute}
