"""The INT8 engine executes the calibrated model: same predictions, int8 bytes on disk."""
from __future__ import annotations

import copy
import sys

import numpy as np
import onnx
import pytest
import torch
from omegaconf import OmegaConf
from onnx import TensorProto, numpy_helper

from tests.conftest import random_batches, tiny_bert
from transquant.deploy.build import build_onnx_int8, int8_weights
from transquant.deploy.engines import build_torch_int8, ort_dynamic_int8, require_engine
from transquant.deploy.export import export_onnx
from transquant.deploy.qdq import ActQuant, GraphEditor, quantize_activation
from transquant.deploy.runtime import (
    Engine,
    EngineError,
    fixed_batch,
    ort_engine,
    ort_session,
    sample_batch,
    torch_runner,
)
from transquant.quant.quantizers import symmetric_grid
from transquant.quant.state import QuantState, WeightState, quantize_
from transquant.run import CONF_DIR
from transquant.train.evaluate import predictions


def quant_cfg(method: str, **over):
    base = OmegaConf.load(f"{CONF_DIR}/quant/fp32.yaml")
    spec = OmegaConf.load(f"{CONF_DIR}/quant/{method}.yaml")
    spec.pop("defaults", None)
    return OmegaConf.merge(base, spec, over)


def items_from(batches: list[dict]) -> list[dict]:
    """Unpadded token lists (as tasks.encode makes them) from padded random batches."""
    out = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum())
            out.append({k: b[k][i, :n].tolist() for k in ("input_ids", "token_type_ids", "attention_mask")}
                       | {"labels": i % 2})
    return out


def quantized(method: str, **over) -> tuple[torch.nn.Module, torch.nn.Module, QuantState]:
    """(fp32 model, fake-quant model, its quant state) for a tiny BERT calibrated on random
    batches. The head is scaled up so logit margins exceed quantization noise (a random head's
    logits nearly tie)."""
    fp32 = tiny_bert()
    with torch.no_grad():
        fp32.classifier.weight.mul_(30)
    model = copy.deepcopy(fp32)
    state = quantize_(model, quant_cfg(method, **over), random_batches(4), torch.device("cpu"))
    return fp32, model, state


VAL = items_from(random_batches(16, 4, 12, seed=1))  # 64 sequences, a quarter of them padded


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one PyTorch thread is ~5x faster than two on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(tmp_path, method: str, storage: str = "u8", **over):
    """(fp32, fake-quant model, quant state, engine path, report) of the tiny model."""
    fp32, model, state = quantized(method, **over)
    _, path, report = build_onnx_int8(fp32, model, state, sample_batch(VAL, pad_id=0), tmp_path,
                                      weight_storage=storage, threads=1)
    return fp32, model, state, path, report


def engine_of(path) -> Engine:
    return ort_engine("onnxruntime", path, 1, ["input_ids", "attention_mask", "token_type_ids"])


@pytest.mark.parametrize("method,over", [("w8a8", {}), ("mixed", {}), ("mixed_paper", {}), ("peg", {"k": 4}),
                                         ("w8a32", {})])
def test_engine_predictions_match_fake_quant(tmp_path, method, over):
    """The engine computes the same integer grid as fake quantization, so predictions agree.

    Threshold: with exact U8U8 kernels the only differences are float-rounding ties at a
    quantization boundary (ORT and PyTorch sum in different orders), i.e. one code at ~1e-5 of
    the elements per site on a 2-layer model; over 64 sequences with widened logit margins that
    flips at most ~1 prediction, so >= 62/64 (97 %) agree. Observed: 64/64.
    """
    _, model, state, path, report = build(tmp_path, method, **over)
    pred_engine, true = engine_of(path).predictions(VAL, 16, pad_id=0)
    with torch.no_grad(), state.active(model):
        pred_fq, true_fq = predictions(model, VAL, 16, 0, torch.device("cpu"))
    assert torch.equal(true, true_fq)
    assert (pred_engine == pred_fq).float().mean().item() >= 62 / 64
    if state.sites:
        assert sorted(report.site_bits) == sorted(state.sites)  # every quantized site has its QDQ
        assert len(set(report.site_tensors.values())) == len(report.site_tensors)  # one tensor per site
        assert report.code_agreement >= 0.999
    if method == "peg":
        assert report.peg_split_sites == ["layer.0.attn.norm", "layer.1.attn.norm"]
    if method == "mixed_paper":  # the 16-bit FFN input runs on two integer GEMMs, not a float one
        assert report.fusions["wide_matmul"] == 2 and report.float_matmuls == 0


def _wide_graph(q: np.ndarray, scale: float, zero: int, w: np.ndarray, w_scale: np.ndarray, bias: np.ndarray):
    """DQ(uint16 codes) @ DQ(int8 W, per column) + bias, the pattern of a 16-bit GEMM input."""
    from onnx import helper

    g = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"], domain="com.microsoft"),
         helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=1),
         helper.make_node("MatMul", ["x", "wf"], ["y0"]),
         helper.make_node("Add", ["y0", "b"], ["y"])],
        "wide", [helper.make_tensor_value_info("q", TensorProto.UINT16, list(q.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [q.shape[0], w.shape[1]])],
        initializer=[numpy_helper.from_array(a, n) for a, n in (
            (np.float32(scale), "s"), (np.uint16(zero), "z"), (w, "w"), (w_scale, "sw"),
            (np.zeros(w.shape[1], np.int8), "zw"), (bias, "b"))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_two_unnamed_16bit_gemms_get_distinct_tensors():
    """Node names may be empty (the ONNX helpers' default): the byte split names its tensors after
    the MatMul's output, so two unnamed 16-bit GEMMs still make a valid (SSA) graph."""
    from onnx import helper

    from transquant.deploy.fusions import fuse_for_cpu

    w = np.ones((8, 4), np.int8)
    model = _wide_graph(np.zeros((2, 8), np.uint16), 0.1, 3, w, np.ones(4, np.float32), np.zeros(4, np.float32))
    g = model.graph
    g.node.extend([helper.make_node("MatMul", ["x", "wf"], ["y1"])])
    g.output.extend([helper.make_tensor_value_info("y1", TensorProto.FLOAT, [2, 4])])
    assert all(not n.name for n in g.node) and fuse_for_cpu(model)["wide_matmul"] == 2
    onnx.checker.check_model(model)


def test_16bit_gemm_input_runs_as_two_exact_integer_gemms():
    """``wide_matmul``: a uint16 input splits into bytes on two integer GEMMs whose int32 sums are
    exact, so the result is the float64 product to float32 rounding — at the extreme codes
    (0 and 65535), an odd zero point, and sums that no 16-bit accumulator would hold."""
    import onnxruntime as ort

    from transquant.deploy.fusions import fuse_for_cpu

    rng = np.random.default_rng(0)
    q = rng.integers(0, 65536, size=(64, 384)).astype(np.uint16)
    q[0], q[1] = 65535, 0
    w = rng.integers(-127, 128, size=(384, 96)).astype(np.int8)
    w[:, 0] = 127
    scale, zero = 3.1e-4, 32769
    w_scale = rng.uniform(1e-3, 2e-3, 96).astype(np.float32)
    bias = rng.normal(size=96).astype(np.float32)
    model = _wide_graph(q, scale, zero, w, w_scale, bias)
    assert fuse_for_cpu(model)["wide_matmul"] == 1
    onnx.checker.check_model(model)  # nodes still in topological order
    assert {n.op_type for n in model.graph.node} >= {"MatMulIntegerToFloat"}
    assert "MatMul" not in {n.op_type for n in model.graph.node}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"q": q})[0]
    exact = ((q.astype(np.int64) - zero) @ w.astype(np.int64)) * (np.float64(np.float32(scale)) * w_scale) + bias
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


def test_engine_logits_close_to_fake_quant(tmp_path):
    _, model, state, path, _ = build(tmp_path, "mixed")
    batch = fixed_batch(VAL, 0, 8, 12)
    with torch.no_grad(), state.active(model):
        ref = model(**batch).logits.numpy()
    got = engine_of(path).logits(batch)
    # Both sides end on the same 8-bit logits grid: differences are whole codes, and a row
    # differs only where a float tie at some site rounded the other way and propagated.
    codes = (got - ref) / float(state.grids["logits"].scale)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert (codes == 0).all(axis=1).mean() >= 0.75


def test_mixed_engine_has_real_16bit_qdq(tmp_path):
    """``mixed``'s 16-bit sites are uint16 QuantizeLinear/DequantizeLinear in the engine (it used
    to leave them float, a W8A{8,32} engine), with the model's 16-bit grid; the 8-bit sites stay
    uint8 and the label says W8A{8,16}."""
    _, _, state, path, report = build(tmp_path, "mixed")
    high = {s for s, g in state.grids.items() if g.qmax == 65535}
    assert high and {s for s, b in report.site_bits.items() if b == 16} == high
    assert report.precision == "W8A{8,16}"
    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    quant = {n.output[0]: n for n in g.node if n.op_type == "QuantizeLinear"}
    for site, (codes, elem) in report.site_codes.items():
        q = quant[codes]
        zero, scale = inits[q.input[2]], inits[q.input[1]]
        grid = state.grids[site]
        if site in high:
            assert (q.domain, elem, zero.dtype) == ("com.microsoft", TensorProto.UINT16, np.uint16)
        else:
            assert (q.domain, elem, zero.dtype) == ("", TensorProto.UINT8, np.uint8)
        assert int(zero) == int(grid.zero_point.reshape(-1)[0])
        if not site.endswith("attn.scores"):  # the scores' Quantize carries s/α (the scaling folded in)
            assert float(scale) == pytest.approx(float(grid.scale.reshape(-1)[0]), rel=1e-6)


def test_weights_are_int8_in_the_file(tmp_path):
    """Size accounting: every Linear/Embedding weight is stored as 8-bit integers; the reported
    size is the file's byte count."""
    fp32, model, state = quantized("w8a8")
    sample = sample_batch(VAL, pad_id=0)
    fp_path, path, report = build_onnx_int8(fp32, model, state, sample, tmp_path, weight_storage="s8")
    n_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
    proto = onnx.load(str(path))
    int8_elems = sum(int(np.prod(i.dims)) for i in proto.graph.initializer
                     if i.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(i.dims) == 2)
    float_2d = [i.name for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) >= 2]
    assert int8_elems == n_weights
    assert float_2d == []
    assert report.float_weights == [] and len(report.int8_weights) == 2 * 6 + 3 + 2  # layer Linears, tables, pooler, head
    assert engine_of(path).size_bytes == path.stat().st_size
    # Weights go from 4 bytes to 1; the QDQ nodes, scales and zero points add a little graph
    # (on this tiny model about a third of the saving; on MiniLM about 0.1 %).
    saved = fp_path.stat().st_size - path.stat().st_size
    assert saved > 0.5 * 3 * n_weights


def test_int8_weights_are_our_grid(tmp_path):
    """The integers in the file dequantize to exactly the fake-quantized weights."""
    _, model, _, path, _ = build(tmp_path, "w8a32", storage="s8")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    word = model.bert.embeddings.word_embeddings.weight.detach().numpy()
    ints = next(v for k, v in inits.items() if k.startswith("model.bert.embeddings.word_embeddings.weight_int8"))
    scale = next(v for k, v in inits.items() if k.startswith("model.bert.embeddings.word_embeddings.weight_scale"))
    np.testing.assert_allclose(ints.astype(np.float32) * scale, word, rtol=0, atol=1e-7)


def _int8_initializers(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
            if i.data_type == TensorProto.INT8}


def test_engine_takes_the_weight_grids_it_is_given(tmp_path):
    """The engine stores the state's grids (an MSE range is not max|w|/127), and refuses a model
    whose weight is not the state's instead of storing other integers."""
    fp32, model, state = quantized("w8a8", weight_estimator="mse")
    name = "bert.encoder.layer.0.intermediate.dense"
    w = model.get_submodule(name).weight
    assert float(state.weights[name].grid.scale) < float(w.detach().abs().max()) / 127  # MSE clips
    sample = sample_batch(VAL, pad_id=0)
    *_, report = build_onnx_int8(fp32, model, state, sample, tmp_path, threads=1)
    assert name in report.int8_weights
    with torch.no_grad():
        w.add_(float(state.weights[name].grid.scale) / 3)  # off the grid
    with pytest.raises(EngineError, match=f"weight of {name} is not an initializer .* quant state's values"):
        build_onnx_int8(fp32, model, state, sample, tmp_path / "off", threads=1)


@pytest.mark.parametrize("name,layout", [("bert.encoder.layer.0.intermediate.dense", "folded MatMul, [in, out]"),
                                         ("classifier", "Gemm rewritten as MatMul, under its name"),
                                         ("bert.embeddings.word_embeddings", "Gather table, under its name")])
def test_engine_writes_the_state_codes_not_requantized_weights(tmp_path, name, layout):
    """The int8 initializers are the state's codes. One code moved by one step (so it is no
    longer round(w / scale) of the FP32 weight): applied to a fresh FP32 copy, the moved code is in
    the engine; left off the model (whose weight is then not the state's), the build refuses,
    naming the module."""
    fp32, model, state = quantized("w8a8")
    ws = state.weights[name]
    codes = ws.codes.clone()
    i = int(torch.argmin(codes.abs()))  # a code with room on both sides
    codes.view(-1)[i] += 1
    moved = QuantState(state.config, state.sites, {**state.weights, name: WeightState(ws.grid, codes)})
    sample = sample_batch(VAL, pad_id=0)
    with pytest.raises(EngineError, match=name):
        build_onnx_int8(fp32, model, moved, sample, tmp_path / "stale", weight_storage="s8", threads=1)

    applied = moved.apply(copy.deepcopy(fp32))
    _, path, report = build_onnx_int8(fp32, applied, moved, sample, tmp_path, weight_storage="s8", threads=1)
    assert name in report.int8_weights
    want = codes.numpy().astype(np.int8)
    stored = [v for v in _int8_initializers(path).values() if v.shape in (want.shape, want.T.shape)]
    assert any(np.array_equal(v, want) or np.array_equal(v, want.T) for v in stored), layout


def test_gemm_weight_keeps_its_parameter_name(tmp_path):
    """torch.onnx keeps the names of the parameters it does not fold (Gemm, Gather): after the
    Gemm -> MatMul rewrite the classifier's [in, out] weight still carries it."""
    from transquant.deploy.export import gemm_to_matmul, param_name

    fp32, *_ = quantized("fp32")
    proto = onnx.load(str(export_onnx(fp32, sample_batch(VAL, pad_id=0), tmp_path / "m.onnx")))
    assert gemm_to_matmul(proto) == 2
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    np.testing.assert_array_equal(inits[param_name("classifier")], fp32.classifier.weight.detach().numpy().T)
    assert param_name("bert.embeddings.word_embeddings") in inits


def test_int8_weights_keeps_only_8_bit_grids():
    *_, state = quantized("w8a8")
    ws = state.weights["classifier"]
    wide = QuantState(state.config, state.sites,
                      {**state.weights, "classifier": WeightState(symmetric_grid(torch.tensor(1.0), 16), ws.codes)})
    kept = int8_weights(wide)  # a 16-bit grid stays float
    assert "classifier" not in kept and len(kept) == len(state.weights) - 1


def test_missing_engine_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(EngineError) as err:
        require_engine("onnxruntime")
    msg = str(err.value)
    assert "\n" not in msg and "pip install onnxruntime" in msg and "profile.engine=none" in msg
    with pytest.raises(EngineError, match="allowed onnxruntime, torch, none"):
        require_engine("tensorrt")
    require_engine("none")


def test_torch_engine_uses_our_int8_weights(tmp_path):
    _, model, state = quantized("w8a8")
    q = build_torch_int8(model, state, tmp_path / "m.pt")
    dense = q.bert.encoder.layer[0].intermediate.dense
    w = dense.weight()
    ref = model.bert.encoder.layer[0].intermediate.dense.weight.detach()
    torch.testing.assert_close(w.dequantize(), ref, rtol=0, atol=1e-7)
    assert (tmp_path / "m.pt").stat().st_size > 0
    eng = Engine("torch", tmp_path / "m.pt", torch_runner(q, ["input_ids", "attention_mask", "token_type_ids"]),
                   ["input_ids", "attention_mask", "token_type_ids"])
    assert 0.0 <= eng.accuracy(VAL, 16, 0) <= 100.0


def test_per_channel_quantizer_breaks_ties_like_the_fake_quantizer():
    """PEG's elementwise quantizer rounds x/s before adding the zero point, as QuantizeLinear and
    the fake quantizer do; rounding x/s + z half-to-even broke exact .5 ties the other way for
    an odd zero point."""
    from onnx import helper

    from transquant.quant.quantizers import Grid, quantize

    grid = Grid(torch.tensor([1.0, 1.0, 0.5]), torch.tensor([1.0, 2.0, 3.0]), 0, 255)
    x = np.array([[0.5, 0.5, 1.25]], np.float32)  # x / s = 0.5, 0.5, 2.5: all ties
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["h"]), helper.make_node("Identity", ["h"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    G = GraphEditor(proto)
    codes = quantize_activation(G, "h", ActQuant.from_grid(grid, rank=2))
    G.finish()
    proto.graph.output.append(helper.make_tensor_value_info(codes, TensorProto.FLOAT, None))
    got = ort_session(proto.SerializeToString(), 1, optimize=False).run([codes], {"x": x})[0]
    np.testing.assert_array_equal(got, quantize(torch.from_numpy(x), grid).numpy())


def test_peer_build_leaves_logging_as_it_was(tmp_path):
    """ORT's quantizer is silenced while it runs only: the root logger used to stay at ERROR,
    which hid every later INFO line of the job (the engine build, the profile)."""
    import logging

    fp32, *_ = quantized("fp32")
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    try:
        path = export_onnx(fp32, sample_batch(VAL, pad_id=0), tmp_path / "fp32.onnx")
        ort_dynamic_int8(path, tmp_path / "peer.onnx")
        assert root.level == logging.INFO
    finally:
        root.setLevel(before)
