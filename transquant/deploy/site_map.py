"""Each activation site's tensor in the exported ONNX graph, found by value: the site tensors are
captured from PyTorch (the taps calibration uses) and compared with every intermediate tensor of
the graph on a padded sample batch. A site without a counterpart fails: the export would not
compute the calibrated model.

A site on a module's *input* quantizes what that module reads, not what other readers of the
same tensor read: GPT-2's and OPT's post-attention sum is the input of the FFN's LayerNorm and
also the stream carried to the block's second add, which stays float in the fake-quant model.
So for an input site the module's output is found by value too, and only the readers of the
site tensor it depends on (:func:`module_readers`) get the quantized tensor.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..quant.sites import _first, find_sites, tap, use_tappable_attention
from .runtime import EngineError, model_inputs, ort_session


def capture_sites(model: nn.Module, names: list[str], batch: dict
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(float values of the named sites on ``batch``, and for each input site the output of the
    module reading it), from taps on a copy with tappable attention."""
    model = copy.deepcopy(model).cpu().eval()
    use_tappable_attention(model)
    wanted = set(names)
    sites = [s for s in find_sites(model) if s.name in wanted]
    values: dict[str, np.ndarray] = {}
    outputs: dict[str, np.ndarray] = {}

    def grab(site, x):
        values[site.name] = x.detach().float().numpy().copy()
        return x

    def grab_output(name):
        def hook(module, args, out):
            outputs[name] = _first(out).detach().float().numpy().copy()
        return hook

    handles = [s.module.register_forward_hook(grab_output(s.name)) for s in sites if s.side == "input"]
    try:
        with torch.no_grad(), tap(sites, grab):
            model(**{k: v.cpu() for k, v in model_inputs(model, batch).items()})
    finally:
        for h in handles:
            h.remove()
    return values, outputs


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


def _same(t: np.ndarray, v: np.ndarray) -> bool:
    """``t`` carries ``v``'s values: same shape, or the same tokens flattened to
    [batch * tokens, channels] (OPT's FFN), allclose."""
    if t.shape != v.shape:
        if t.size != v.size or t.ndim == 0 or v.ndim == 0 or t.shape[-1] != v.shape[-1]:
            return False
        t = t.reshape(v.shape)
    return np.allclose(t, v, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(v).max())))


def tensors_like(v: np.ndarray, onnx_values: dict[str, np.ndarray], order: list[str]) -> list[str]:
    """The graph's tensors carrying ``v``'s values, in graph order."""
    return [t for t in order if _same(onnx_values[t], v)]


def match_sites(site_values: dict[str, np.ndarray], onnx_values: dict[str, np.ndarray],
                order: list[str]) -> dict[str, str]:
    """Site name -> ONNX tensor carrying the same values (same shape, or flattened tokens;
    allclose). When several tensors agree (e.g. a MatMul and its zero-bias Add, or a sum and its
    flattened copy), the last in graph order is the module's output. Raises if a site has no
    counterpart: the export would not compute our model."""
    out = {}
    for site, v in site_values.items():
        cands = tensors_like(v, onnx_values, order)
        if not cands:
            raise EngineError(f"engine export: site {site} has no tensor with its values in the ONNX graph "
                              "(the exported graph does not compute the calibrated model)")
        out[site] = cands[-1]
    return out


def module_readers(proto, site: str, tensor: str, module_output: np.ndarray, onnx_values: dict[str, np.ndarray],
                   order: list[str]) -> set[int]:
    """Ids of the nodes reading ``tensor`` (an input site's) that the reading module's output
    depends on: the readers of the quantized tensor. Raises when that output is not in the graph
    (which readers belong to the module cannot then be told)."""
    outs = tensors_like(module_output, onnx_values, order)
    if not outs:
        raise EngineError(f"engine export: site {site} is the input of a module whose output has no tensor in the "
                          "ONNX graph, so the readers to quantize cannot be told from the others")
    producer = {o: n for n in proto.graph.node for o in n.output}
    upstream: set[int] = set()
    todo = [producer[t] for t in outs if t in producer]
    while todo:
        node = todo.pop()
        if id(node) in upstream:
            continue
        upstream.add(id(node))
        todo.extend(producer[x] for x in node.input if x in producer and x != tensor)
    return {id(n) for n in proto.graph.node if tensor in n.input and id(n) in upstream}
