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
