"""Exact CPU rewrites of a QDQ graph that ONNX Runtime's optimizer does not do."""
from __future__ import annotations

import copy

import numpy as np

# Ops that only move or reshape data: a per-tensor dequantization commutes with them.
MOVES = frozenset({"Gather", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten"})


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
    - ``wide_matmul``: the same with a 16-bit input (``mixed``'s FFN input), which ORT would run
      as a float GEMM: the codes split into bytes, q = 256·h + l, and (q - z)·W =
      256·(h - z_h)·W + (l - z_l)·W is two integer GEMMs (exact int32 sums) added in float.

    Not done: fusing ``LayerNorm(a + b)`` into ``SkipLayerNormalization`` — ORT 1.32's CPU
    SkipLayerNormalization kernel measured ~8x slower than LayerNormalization plus an Add here.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    stats = {"scores": 0, "hoisted_dq": 0, "matmul_bias": 0, "wide_matmul": 0}
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
                or dtype(dq_a.input[2]) not in (TensorProto.UINT8, TensorProto.UINT16)):
            continue
        out, removed, bias = mm.output[0], [mm], []
        users = cons.get(mm.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add" and mm.output[0] not in outputs:
            add = users[0]
            other = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
            value = _const_value(g, other, consts)
            if value is not None and value.ndim == 1 and dtype(other) == TensorProto.FLOAT:
                out, removed, bias = add.output[0], [mm, add], [other]
        weight = list(dq_w.input[:3])
        if dtype(dq_a.input[2]) == TensorProto.UINT8:
            new = [_int_gemm(list(dq_a.input[:3]), weight, bias, out, mm.name + "_int")]
            stats["matmul_bias"] += 1
        else:
            new = _wide_matmul(g, mm, dq_a, weight, bias, out, consts)
            if new is None:
                continue
            stats["wide_matmul"] += 1
        for node in new:  # each before the MatMul, in order
            g.node.insert(list(g.node).index(mm), node)
        for n in removed:
            g.node.remove(n)

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


def _wide_matmul(g, mm, dq_a, weight: list[str], bias: list[str], out: str, consts: dict) -> list | None:
    """Nodes computing ``DQ(uint16 q) @ DQ(W) (+ bias)`` on two 8-bit integer GEMMs (see
    :func:`fuse_for_cpu`): h = q >> 8 and l = q mod 256 as uint8, the zero point split alike,
    the high half's scale times 256 (exact in float). None where the grid is not a constant scalar."""
    from onnx import TensorProto, helper, numpy_helper

    q, s_name, z_name = dq_a.input[0], dq_a.input[1], dq_a.input[2]
    scale, zero = _const_value(g, s_name, consts), _const_value(g, z_name, consts)
    if scale is None or zero is None or scale.size != 1 or zero.size != 1:
        return None
    base = mm.output[0] + "_wide"  # tensor names are unique; node names may be empty

    def const(suffix: str, value) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(value), base + suffix))
        return base + suffix

    z = int(zero)
    eight = const("_8", np.uint16(8))
    byte = const("_256", np.uint16(256))
    s_hi, s_lo = const("_scale_hi", (scale * np.float32(256)).astype(np.float32)), s_name
    z_hi, z_lo = const("_zp_hi", np.uint8(z >> 8)), const("_zp_lo", np.uint8(z & 255))
    nodes = [helper.make_node("BitShift", [q, eight], [base + "_h16"], direction="RIGHT", name=base + "_shift"),
             helper.make_node("Cast", [base + "_h16"], [base + "_h"], to=TensorProto.UINT8, name=base + "_cast_h"),
             helper.make_node("Mod", [q, byte], [base + "_l16"], name=base + "_mod"),
             helper.make_node("Cast", [base + "_l16"], [base + "_l"], to=TensorProto.UINT8, name=base + "_cast_l")]
    nodes += [_int_gemm([base + "_h", s_hi, z_hi], weight, bias, base + "_yh", base + "_int_h"),
              _int_gemm([base + "_l", s_lo, z_lo], weight, [], base + "_yl", base + "_int_l"),
              helper.make_node("Add", [base + "_yh", base + "_yl"], [out], name=base + "_add")]
    return nodes


def _int_gemm(act: list[str], weight: list[str], bias: list[str], out: str, name: str):
    """``MatMulIntegerToFloat`` of (codes, scale, zero point) of the activation and of the weight,
    plus an optional bias, in the operator's input order."""
    from onnx import helper

    (a, s_a, z_a), (w, s_w, z_w) = act, weight
    return helper.make_node("MatMulIntegerToFloat", [a, w, s_a, s_w, z_a, z_w, *bias], [out], name=name,
                            domain="com.microsoft")
