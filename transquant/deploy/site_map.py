"""Each activation site's tensor in the exported ONNX graph, found by value: the site tensors are
captured from PyTorch (the taps calibration uses) and compared with every intermediate tensor of
the graph on a padded sample batch. A site without a counterpart fails: the export would not
compute the calibrated model."""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..quant.sites import find_sites, tap, use_tappable_attention
from .runtime import EngineError, ort_session


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
