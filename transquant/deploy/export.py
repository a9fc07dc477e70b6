"""ONNX export of a model, and ``Gemm`` nodes rewritten as ``MatMul`` so every weight product can
take the integer path."""
from __future__ import annotations

import copy
import importlib
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .runtime import input_names, model_inputs

OPSET = 17


WRAPPED = "model"  # :class:`_Logits`' attribute holding the model: the prefix of its parameters' names


def param_name(module_name: str, param: str = "weight") -> str:
    """The name the exporter gives a parameter's initializer when it keeps it (tables a Gather
    reads, Gemm and Conv1D weights; weights it transposes for a MatMul are constant-folded under
    an ``onnx::MatMul_*`` name instead)."""
    return f"{WRAPPED}.{module_name}.{param}" if module_name else f"{WRAPPED}.{param}"


class _Logits(nn.Module):
    """Positional-input wrapper so the ONNX graph has exactly our inputs and one output."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model  # named WRAPPED
        self.names = names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors))).logits


def export_onnx(model: nn.Module, batch: dict, path: Path) -> Path:
    """Export ``model`` (a copy is switched to eager attention) with dynamic batch and length."""
    importlib.import_module("onnx")  # fail early with the import error if missing

    model = copy.deepcopy(model).cpu().eval()
    model.set_attn_implementation("eager")
    batch = model_inputs(model, batch)
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
    takes the same integer path as the encoder's MatMuls. A weight only this Gemm reads keeps
    its initializer's name (the parameter's, :func:`param_name`). Returns the number rewritten."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    readers: dict[str, int] = {}
    for node in g.node:
        for x in node.input:
            readers[x] = readers.get(x, 0) + 1
    n = 0
    for gemm in [x for x in g.node if x.op_type == "Gemm"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
                or gemm.input[1] not in inits):
            continue
        w = numpy_helper.to_array(inits[gemm.input[1]])
        w = np.ascontiguousarray(w.T if attrs.get("transB", 0) else w)
        if readers[gemm.input[1]] == 1:  # replaced in place, under its name
            w_name = gemm.input[1]
            g.initializer.remove(inits.pop(w_name))
        else:
            w_name = f"{gemm.input[1]}_matmul{n}"
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
