"""PTQ mitigations beyond the paper: per-channel weights, MSE activation ranges, bias correction,
dynamic per-token activation ranges."""
import copy
import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification

from transquant.data.tasks import batches
from transquant.deploy.build import build_onnx_int8, int8_weights
from transquant.deploy.runtime import EngineError, ort_engine, sample_batch
from transquant.quant.ptq import calibrate, input_means, plan_sites, quantize_weights_
from transquant.quant.quantizers import (
    asymmetric_grid,
    fake_quantize,
    per_token_grid,
    symmetric_grid,
)
from transquant.quant.ranges import ESTIMATORS, WEIGHT_ESTIMATORS, HistogramMSE
from transquant.quant.sites import find_sites
from transquant.quant.state import STATE_FILE, QuantState, quantize_
from transquant.train.evaluate import predictions

from .conftest import random_batches, tiny_bert
from .test_engine import one_thread, quant_cfg  # noqa: F401 (one_thread: an autouse fixture)
from .test_ptq import LENGTHS, _items

# --- per-channel weights --------------------------------------------------------------------------

def test_channel_minmax_is_max_abs_per_output_row_of_a_linear():
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 6) * torch.tensor([[0.01], [0.1], [1.0], [10.0]]))
    w = lin.weight.detach().clone()
    grid = quantize_weights_(lin, 8, granularity="channel")[""]
    assert grid.scale.shape == (4, 1) and torch.all(grid.zero_point == 0)
    torch.testing.assert_close(grid.scale, w.abs().amax(1, keepdim=True) / 127)
    # each row's largest weight is exactly on its grid; the rows' errors scale with their own range
    err = (lin.weight - w).abs().amax(1)
    assert torch.all(err <= grid.scale.reshape(-1) / 2 + 1e-7)
    tensor_err = (fake_quantize(w, quantize_weights_(copy.deepcopy(nn.Linear(6, 4)), 8)[""]) - w).abs()
    assert err[0] < 1e-4 < tensor_err.amax()  # the small row keeps its precision


def test_channel_axis_follows_the_layout_conv1d_per_column_embeddings_per_tensor():
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_inner=64,
                                                     n_positions=64, pad_token_id=0))
    ref = copy.deepcopy(model)
    grids = quantize_weights_(model, 8, granularity="channel")
    mods = dict(ref.named_modules())
    c_fc = grids["transformer.h.0.mlp.c_fc"]  # Conv1D weight [in, out]: one scale per column
    assert c_fc.scale.shape == (1, 64)
    torch.testing.assert_close(c_fc.scale, mods["transformer.h.0.mlp.c_fc"].weight.abs().amax(0, keepdim=True) / 127)
    assert grids["score"].scale.shape == (2, 1)  # the head is a Linear [out, in]
    assert grids["transformer.wte"].scale.numel() == 1  # embedding tables stay per tensor


@pytest.mark.parametrize("bits", [4, 8])
def test_channel_mse_is_never_worse_than_minmax_per_channel(bits):
    """Laplace rows of 16 scales: each row's MSE range is at most as bad as its max |w| (the
    fraction 1 is a candidate), and at 4 bits clipping the tails wins in every row."""
    g = torch.Generator().manual_seed(0)
    sign = torch.sign(torch.rand(16, 256, generator=g) - 0.5)
    w = sign * -torch.log(torch.rand(16, 256, generator=g)) * torch.linspace(0.01, 1, 16)[:, None]
    err = {}
    for name in ("minmax", "mse"):
        r = WEIGHT_ESTIMATORS[name](w, bits, 0)
        assert r.shape == (16, 1)
        err[name] = (fake_quantize(w, symmetric_grid(r, bits)) - w).square().sum(1)
    assert torch.all(err["mse"] <= err["minmax"])
    if bits == 4:
        assert torch.all(err["mse"] < 0.95 * err["minmax"])


def test_per_channel_and_bias_correction_survive_save_load(tmp_path):
    q = quant_cfg("w8a8", weight_granularity="channel", weight_estimator="mse", bias_correction=True)
    model = tiny_bert()
    state = quantize_(model, q, random_batches(4, seed=1))
    lin = state.weights["bert.encoder.layer.0.intermediate.dense"]
    assert lin.grid.scale.shape == (64, 1) and lin.bias is not None
    assert state.weights["bert.embeddings.word_embeddings"].bias is None  # no bias to correct
    loaded = QuantState.load(state.save(tmp_path / STATE_FILE))
    fresh = loaded.apply(tiny_bert())
    for name, w in state.weights.items():
        assert torch.equal(loaded.weights[name].grid.scale, w.grid.scale)
        assert (w.bias is None) == (loaded.weights[name].bias is None)
    with torch.no_grad(), state.active(model):
        ref = torch.cat([model(**b).logits for b in random_batches(3, seed=2)])
    with torch.no_grad(), loaded.active(fresh):
        got = torch.cat([fresh(**b).logits for b in random_batches(3, seed=2)])
    assert torch.equal(ref, got)


def _engine_build(tmp_path, fp32, q, items, calib):
    model = copy.deepcopy(fp32)
    state = quantize_(model, q, calib, torch.device("cpu"))
    _, path, report = build_onnx_int8(fp32, model, state, sample_batch(items, pad_id=0), tmp_path, threads=1)
    return model, state, path, report


def _val(token_types=True):
    from .test_engine import VAL
    return VAL if token_types else [{k: v for k, v in it.items() if k != "token_type_ids"} for it in VAL]


def test_engine_stores_per_channel_int8_weights_and_keeps_integer_matmuls(tmp_path):
    """Per-output-channel weights become per-axis DequantizeLinear on int8 codes; ORT's fused
    MatMulIntegerToFloat takes them as per-column B scales, so as many MatMuls run in integer as
    with per-tensor weights, none in float, and the engine predicts what the fake-quant model does."""
    fp32 = tiny_bert()
    with torch.no_grad():
        fp32.classifier.weight.mul_(30)
    reports = {}
    for g in ("tensor", "channel"):
        model, state, path, reports[g] = _engine_build(tmp_path / g, fp32, quant_cfg("w8a8", weight_granularity=g),
                                                      _val(), random_batches(4))
    assert reports["channel"].int_matmuls == reports["tensor"].int_matmuls > 0
    assert reports["channel"].float_matmuls == 0 and reports["channel"].code_agreement >= 0.999
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    fused = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert fused and all(len(inits[n.input[3]].dims) == 1 and inits[n.input[3]].dims[0] > 1 for n in fused)  # B scales
    engine = ort_engine("onnxruntime", path, 1, ["input_ids", "attention_mask", "token_type_ids"])
    pred_engine, _ = engine.predictions(_val(), 16, pad_id=0)
    with torch.no_grad(), state.active(model):
        pred_fq, _ = predictions(model, _val(), 16, 0, torch.device("cpu"))
    assert (pred_engine == pred_fq).float().mean().item() >= 62 / 64
    with pytest.raises(EngineError, match="not per-tensor"):
        int8_weights(state)  # the torch engine stores one scale per weight: it refuses


def test_engine_per_channel_conv1d_weights_gpt2(tmp_path):
    torch.manual_seed(0)
    fp32 = GPT2ForSequenceClassification(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                                    n_positions=64, pad_token_id=0)).eval()
    calib = [{k: v for k, v in b.items() if k != "token_type_ids"} for b in random_batches(4)]
    counts = {}
    for g in ("tensor", "channel"):
        _, _, _, r = _engine_build(tmp_path / g, fp32, quant_cfg("w8a8", weight_granularity=g), _val(False), calib)
        counts[g] = (r.int_matmuls, r.float_matmuls)
        assert r.code_agreement >= 0.999
    assert counts["channel"] == counts["tensor"]


# --- MSE activation ranges -------------------------------------------------------------------------

def _mse_range(x, bits, chunks=1):
    est = HistogramMSE(bits)
    for _ in range(est.passes):
        for part in x.chunk(chunks):
            est.observe(part)
        if est.counts is None:
            est.next_pass()
    return est.range()


def _fq_mse(x, lo, hi, bits):
    return float((fake_quantize(x, asymmetric_grid(lo, hi, bits)) - x).square().mean())


def test_mse_range_of_uniform_data_is_its_min_max():
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 6 - 2  # U(-2, 4)
    lo, hi = _mse_range(x, 8)
    assert abs(lo - x.min()) < 0.01 * 6 and abs(hi - x.max()) < 0.01 * 6


def test_mse_range_of_a_gaussian_at_4_bits_is_the_aciq_optimum():
    """Banner et al. (ACIQ): the MSE-optimal clipping of N(0, 1) for 16 uniform levels is ~2.55 σ.
    Checked against brute force over symmetric clips with the real fake quantizer."""
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    lo, hi = _mse_range(x, 4)
    assert 2.4 < -lo < 2.7 and 2.4 < hi < 2.7
    brute = min(_fq_mse(x, -a, a, 4) for a in np.linspace(1.5, 3.5, 201))
    assert _fq_mse(x, lo, hi, 4) <= 1.01 * brute
    assert abs(min(np.linspace(1.5, 3.5, 201), key=lambda a: _fq_mse(x, -a, a, 4)) - hi) < 0.1


def test_mse_range_clips_a_few_huge_outliers():
    x = torch.cat([torch.randn(100_000, generator=torch.Generator().manual_seed(0)), torch.tensor([60.0, -45.0, 80.0])])
    lo, hi = _mse_range(x, 4)
    assert -5 < lo < -1 and 1 < hi < 5
    assert _fq_mse(x, lo, hi, 4) < 0.2 * _fq_mse(x, x.min(), x.max(), 4)


def test_mse_range_is_streamed_in_bounded_memory_and_keeps_zero():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(1)).abs()  # one-sided, like GELU
    one, streamed = _mse_range(x, 8), _mse_range(x, 8, chunks=7)
    assert torch.equal(one[0], streamed[0]) and torch.equal(one[1], streamed[1])
    assert one[0] == 0 and 0 < one[1] <= x.max()
    est = HistogramMSE(8)
    est.observe(x)
    est.next_pass()
    est.observe(x)
    assert est.counts.numel() == HistogramMSE.BINS
    assert _mse_range(torch.full((10,), 3.0), 8) == (torch.tensor(3.0), torch.tensor(3.0))


def test_mse_preset_calibrates_every_site_with_two_passes():
    q = quant_cfg("mse")
    assert q.estimator == "mse" and q.weight_estimator == "mse" and "mse" in ESTIMATORS
    model = tiny_bert()
    sites = find_sites(model)
    plans = plan_sites(sites, q)
    assert {p.estimator for p in plans.values()} == {"mse"} and {p.bits for p in plans.values()} == {8}
    items = _items(LENGTHS)
    alone = calibrate(model, sites, plans, list(batches(items, 1, 0)), torch.device("cpu"))
    padded = calibrate(model, sites, plans, list(batches(items, 16, 0)), torch.device("cpu"))
    for name in plans:  # pads never reach a histogram
        lo_a = -alone.grids[name].zero_point * alone.grids[name].scale
        lo_p = -padded.grids[name].zero_point * padded.grids[name].scale
        torch.testing.assert_close(alone.grids[name].scale, padded.grids[name].scale, rtol=1e-4, atol=0)
        torch.testing.assert_close(lo_a, lo_p, rtol=1e-3, atol=1e-6)


# --- bias correction ------------------------------------------------------------------------------

def test_bias_correction_cancels_the_expected_output_error_of_a_linear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g) * 0.5 + torch.linspace(-3, 3, 32)  # non-zero mean inputs
    fp = nn.Linear(32, 16)
    with torch.no_grad():
        y = fp(x)
    errs = {}
    for correct in (False, True):
        lin = copy.deepcopy(fp)
        quantize_weights_(lin, 4, input_means={"": x.mean(0)} if correct else None)
        with torch.no_grad():
            errs[correct] = (lin(x) - y).mean(0).abs().max().item()
    assert errs[False] > 1e-2 and errs[True] < 1e-5


def test_input_means_count_real_tokens_only():
    """Each Linear's mean input over real tokens: the same sequences alone or heavily padded."""
    model = tiny_bert()
    items = _items(LENGTHS)
    alone = input_means(model, list(batches(items, 1, 0)), torch.device("cpu"))
    padded = input_means(model, list(batches(items, 16, 0)), torch.device("cpu"))
    assert set(alone) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name in alone:
        torch.testing.assert_close(alone[name], padded[name], rtol=1e-4, atol=1e-5)


def test_bias_correction_moves_the_model_toward_fp32():
    calib = random_batches(8, seed=1)
    fp32 = tiny_bert()
    with torch.no_grad():
        ref = torch.cat([fp32(**b).logits for b in calib])
    err = {}
    for correct in (False, True):
        model = tiny_bert()
        quantize_(model, quant_cfg("w8a32", weight_bits=3, bias_correction=correct), calib)
        with torch.no_grad():
            err[correct] = (torch.cat([model(**b).logits for b in calib]) - ref).mean(0).abs().sum().item()
    assert err[True] < err[False]
    assert math.isfinite(err[True])


# --- dynamic per-token ranges ---------------------------------------------------------------------

def test_per_token_grid_quantizes_each_token_on_its_own_range():
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 10.0, 100.0])[:, None]
    grid = per_token_grid(8)
    assert grid.per_token and not asymmetric_grid(-1.0, 1.0, 8).per_token
    y = fake_quantize(x, grid)
    for b in range(2):
        for t in range(3):
            tok = x[b, t]
            torch.testing.assert_close(y[b, t], fake_quantize(tok, asymmetric_grid(tok.min(), tok.max(), 8)))
    x2 = x.clone()
    x2[0, 2] *= 1000  # one token's outlier leaves every other token's codes as they were
    y2 = fake_quantize(x2, grid)
    assert torch.equal(y2[1], y[1]) and torch.equal(y2[0, :2], y[0, :2])
    assert (y - x).abs().max() <= (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)).div(255).mul(0.51).max()


def test_dynamic_preset_needs_no_calibration_and_survives_save_load(tmp_path):
    model = tiny_bert()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    state = quantize_(model, quant_cfg("dynamic"), random_batches(4, seed=1))
    assert calls == [] and state.sites and all(s.grid.per_token for s in state.sites.values())
    loaded = QuantState.load(state.save(tmp_path / STATE_FILE))
    fresh = loaded.apply(tiny_bert())
    assert all(s.grid.per_token and s.grid.qmax == 255 for s in loaded.sites.values())
    with torch.no_grad(), state.active(model):
        ref = torch.cat([model(**b).logits for b in random_batches(3, seed=2)])
    with torch.no_grad(), loaded.active(fresh):
        got = torch.cat([fresh(**b).logits for b in random_batches(3, seed=2)])
    with torch.no_grad():
        weights_only = torch.cat([fresh(**b).logits for b in random_batches(3, seed=2)])
    assert torch.equal(ref, got) and not torch.equal(ref, weights_only)
    with pytest.raises(EngineError, match="per-token dynamic ranges"):
        build_onnx_int8(tiny_bert(), model, state, random_batches(1)[0], tmp_path / "engine")


def test_dynamic_validates_with_the_torch_engine(make_cfg):
    from transquant.core.config import validate

    validate(make_cfg("quant=dynamic", "profile.engine=torch"))
    validate(make_cfg("quant=mse", "quant.weight_granularity=channel", "quant.bias_correction=true"))


def test_labels_name_the_new_knobs_and_methods():
    from transquant.studies.labels import method_label, quant_params

    assert method_label({"method": "w8a8", "weight_granularity": "channel", "bias_correction": True}) \
        == "W8A8 w/channel +bias-corr"
    assert method_label({"method": "w8a8", "weight_granularity": "tensor", "bias_correction": False}) == "W8A8"
    assert method_label({"method": "mse"}) == "MSE" and method_label({"method": "dynamic"}) == "dynamic"
    assert method_label({"method": "w8a8", "estimator": "mse"}) == "W8A8 est=mse"
    params = {"quant.method": "peg_paper", "quant.weight_granularity": "channel", "quant.bias_correction": "True"}
    assert method_label(quant_params(params)) == "PEG K=6 sorted (paper) w/channel +bias-corr"
