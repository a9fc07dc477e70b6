"""Every method the configs allow builds an ONNX Runtime engine that runs what it says: integer
kernels where both inputs are 8-bit, the fake-quant model's integer codes at every site."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.test_engine import VAL, build, engine_of, one_thread, quant_cfg  # noqa: F401 (fixture)
from transquant.deploy import build as B
from transquant.deploy.runtime import EngineError, fixed_batch, sample_batch
from transquant.deploy.verify import MIN_CODE_AGREEMENT, code_agreement
from transquant.run import CONF_DIR
from transquant.train.evaluate import predictions

HIDDEN = 32  # tiny_bert's width: K = hidden is per-channel
GROUPINGS = {"contiguous": {"permute": False}, "sorted": {"grouping": "sorted"}, "gap": {"grouping": "gap"}}


def configured_methods() -> list:
    """One case per conf/quant preset, and per K x grouping for every preset with PEG sites."""
    cases = []
    for path in sorted(Path(CONF_DIR, "quant").glob("*.yaml")):
        if not quant_cfg(path.stem).peg_sites:
            cases.append(pytest.param(path.stem, {}, id=path.stem))
            continue
        for k in (1, 2, 3, 4, 6, HIDDEN):
            for grouping, over in GROUPINGS.items():
                cases.append(pytest.param(path.stem, {"k": k, **over}, id=f"{path.stem}-k{k}-{grouping}"))
    return cases


@pytest.mark.parametrize("method,over", configured_methods())
def test_every_configured_method_builds_a_valid_engine(tmp_path, method, over):
    """Build (which checks kernels and codes), validate, and run two batches. PEG with K=1 used
    to fail ONNX's checker ("Nodes in a graph must be topologically sorted"). Per-token dynamic
    ranges have no static QDQ grids: their build must refuse."""
    if quant_cfg(method, **over).estimator == "dynamic":
        with pytest.raises(EngineError, match="per-token dynamic ranges"):
            build(tmp_path, method, **over)
        return
    _, model, state, path, report = build(tmp_path, method, **over)
    onnx.checker.check_model(onnx.load(str(path)))
    q = quant_cfg(method, **over)
    if state.sites:
        assert report.code_agreement >= MIN_CODE_AGREEMENT
    if q.weight_bits is not None and q.act_bits is not None:
        assert report.int_matmuls >= 4  # at least the attention products and the head
    if q.peg_sites:
        assert bool(report.peg_split_sites) == (over["k"] > 1)  # K=1 is per-tensor: nothing to split
    items = VAL[:16]
    pred_engine, _ = engine_of(path).predictions(items, 8, pad_id=0)
    with torch.no_grad(), state.active(model):
        pred_fq, _ = predictions(model, items, 8, 0, torch.device("cpu"))
    assert (pred_engine == pred_fq).sum().item() >= 15


def test_every_weight_product_is_integer(tmp_path):
    """W8A8: all 18 products run on integer kernels after ORT's optimizer — 12 encoder weight
    MatMuls, 4 attention products, and the pooler and classifier, which export as Gemm (the
    pooler reading the [CLS] row through a Gather) and used to stay float."""
    *_, report = build(tmp_path, "w8a8")
    assert (report.int_matmuls, report.float_matmuls) == (18, 0)


def test_a_weight_matmul_left_float_fails_the_build(tmp_path, monkeypatch):
    """Without our integer rewrite ORT leaves DQ -> MatMul -> Add float: the build refuses."""
    monkeypatch.setattr(B, "fuse_for_cpu", lambda proto: {})
    with pytest.raises(EngineError, match=r"weight MatMul\(s\) with 8-bit inputs run in float"):
        build(tmp_path, "w8a8")


def test_ort_does_not_quantize_float_weights(tmp_path):
    """W32A8: ORT's WeightBiasQuantization would quantize the classifier's float weight into a
    QGemm (another method); it is disabled, so only the attention products are integer."""
    *_, report = build(tmp_path, "w32a8")
    assert (report.int_matmuls, report.float_matmuls) == (4, 14)
    assert report.site_agreement["logits"] == 1.0


def test_weight_only_engine_keeps_float_activations(tmp_path):
    """W8A32: ORT turns DQ(int8 W) -> MatMul into MatMulNBits, at accuracy level 4 by default,
    which quantizes the activations per block; the engine asks for level 1 (float arithmetic),
    so its logits are the fake-quant model's to float rounding."""
    _, model, _, path, report = build(tmp_path, "w8a32")
    assert report.precision == "W8A32" and report.int_matmuls == 0
    batch = fixed_batch(VAL, 0, 8, 12)
    with torch.no_grad():
        ref = model(**batch).logits.numpy()
    np.testing.assert_allclose(engine_of(path).logits(batch), ref, rtol=0, atol=1e-4)


def test_code_agreement_refuses_a_wrong_grid(tmp_path):
    """The engine's codes are compared with the model's: a site whose grid differs by 2 % is
    caught, although it is one site out of 30."""
    _, model, state, path, report = build(tmp_path, "w8a8")
    site = "layer.0.ffn.output"
    grids = state.grids
    g = grids[site]
    grids[site] = type(g)(g.scale * 1.02, g.zero_point, g.qmin, g.qmax)
    with pytest.raises(EngineError, match=f"site {site}"):
        code_agreement(model, grids, path, report.site_codes, sample_batch(VAL, pad_id=0), 1)
