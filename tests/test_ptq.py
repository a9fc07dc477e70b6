"""Quantizing a whole (tiny) model: site plans, calibration, and the laws that must hold."""
import random

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from transquant.core.errors import TransquantError
from transquant.core.paths import CONF_PATH
from transquant.data.tasks import batches
from transquant.quant.ptq import WEIGHT_ESTIMATORS, _causal_mask, calibrate, plan_sites, quantize_weights_, token_values
from transquant.quant.quantizers import fake_quantize
from transquant.quant.ranges import make_groups
from transquant.quant.sites import find_sites

from .conftest import random_batches, tiny_bert

CONF = OmegaConf.load(CONF_PATH / "quant" / "fp32.yaml")


def qcfg(**kw):
    return OmegaConf.merge(CONF, kw)


def quantized_logits(q, seed=0, batches=None):
    model = tiny_bert(seed)
    calib = random_batches(4, seed=1)
    sites = find_sites(model)
    plans = plan_sites(sites, q)
    quantize_weights_(model, q.weight_bits)
    qa = calibrate(model, sites, plans, calib, torch.device("cpu"))
    with torch.no_grad(), qa.active():
        return torch.cat([model(**b).logits for b in (batches or random_batches(3, seed=2))]), qa


def fp32_logits(seed=0):
    model = tiny_bert(seed)
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in random_batches(3, seed=2)])


def test_plan_mixed_and_peg_precedence():
    sites = find_sites(tiny_bert())
    q = qcfg(act_bits=8, high_bits_sites=["*.ffn.residual"], peg_sites=["*.residual", "*.ffn.output"], k=4,
             act_exclude=["logits"])
    plans = plan_sites(sites, q)
    assert "logits" not in plans
    assert plans["layer.0.ffn.residual"].bits == 16 and plans["layer.0.ffn.residual"].estimator == "minmax"
    assert plans["layer.0.attn.residual"].estimator == "peg" and plans["layer.0.attn.residual"].k == 4
    assert plans["layer.1.ffn.output"].estimator == "peg"
    assert plans["layer.0.attn.scores"].bits == 8 and plans["layer.0.attn.scores"].estimator == "minmax"
    assert plan_sites(sites, qcfg()) == {}


def test_permute_false_means_contiguous():
    sites = find_sites(tiny_bert())
    plans = plan_sites(sites, qcfg(act_bits=8, peg_sites=["*.ffn.residual"], k=3, permute=False))
    assert plans["layer.0.ffn.residual"].grouping == "contiguous"


def test_sixteen_bits_everywhere_is_fp32():
    ref = fp32_logits()
    out, _ = quantized_logits(qcfg(weight_bits=16, act_bits=16))
    assert torch.allclose(out, ref, atol=2e-3)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_eight_bits_changes_the_output():
    ref = fp32_logits()
    out, _ = quantized_logits(qcfg(weight_bits=8, act_bits=4))
    assert not torch.allclose(out, ref, atol=1e-3)


def test_permutation_changes_nothing_at_high_bits():
    peg = dict(weight_bits=16, act_bits=16, k=4, peg_sites=["*.residual", "*.ffn.output", "*.attn.norm"])
    a, _ = quantized_logits(qcfg(**peg, permute=True))
    b, _ = quantized_logits(qcfg(**peg, permute=False))
    assert torch.allclose(a, b, atol=2e-3)


def test_peg_k1_equals_per_tensor_model():
    base = dict(weight_bits=8, act_bits=8)
    a, qa_peg = quantized_logits(qcfg(**base, k=1, peg_sites=["*.ffn.residual"]))
    b, qa_tensor = quantized_logits(qcfg(**base))
    g1, g2 = qa_peg.grids["layer.1.ffn.residual"], qa_tensor.grids["layer.1.ffn.residual"]
    assert torch.allclose(g1.scale, g2.scale.expand_as(g1.scale))
    assert torch.allclose(a, b)


def test_percentile_100_model_equals_minmax_model():
    a, _ = quantized_logits(qcfg(weight_bits=8, act_bits=8, estimator="percentile", percentile=100.0))
    b, _ = quantized_logits(qcfg(weight_bits=8, act_bits=8))
    assert torch.equal(a, b)


def test_calibration_ignores_pad_tokens():
    """Changing the embeddings seen only at pad positions must not change any range."""
    model = tiny_bert()
    sites = find_sites(model)
    plans = plan_sites(sites, qcfg(act_bits=8, act_sites=["embeddings.sum"]))
    calib = random_batches(2, seed=1)
    qa1 = calibrate(model, sites, plans, calib, torch.device("cpu"))
    with torch.no_grad():  # make pad-token embeddings huge
        model.bert.embeddings.word_embeddings.weight[0] *= 1000
    qa2 = calibrate(model, sites, plans, calib, torch.device("cpu"))
    assert torch.equal(qa1.grids["embeddings.sum"].scale, qa2.grids["embeddings.sum"].scale)


def test_weight_quantization_is_symmetric_8bit():
    model = tiny_bert()
    grids = quantize_weights_(model, 8)
    w = model.bert.encoder.layer[0].intermediate.dense.weight
    scale = w.abs().max() / 127
    assert len(grids) == 2 * 6 + 2 + 3  # 6 Linear per layer, pooler + classifier, 3 embedding tables
    assert torch.allclose(grids["bert.encoder.layer.0.intermediate.dense"].scale, scale)
    assert torch.allclose(w / scale, torch.round(w / scale), atol=1e-3)
    assert torch.unique(torch.round(w / scale)).numel() <= 255
    assert quantize_weights_(tiny_bert(), None) == {}


@pytest.mark.parametrize("estimator", ["minmax", "mse"])
def test_returned_weight_grids_are_the_ones_applied(estimator):
    """Module name -> grid: fake-quantizing the float weight on that grid gives the stored weight."""
    fp32, model = tiny_bert(), tiny_bert()
    grids = quantize_weights_(model, 8, estimator)
    mods = dict(model.named_modules())
    for name, ref in fp32.named_modules():
        if isinstance(ref, (nn.Linear, nn.Embedding)):
            grid = grids[name]
            assert (grid.qmin, grid.qmax) == (-128, 127) and torch.all(grid.zero_point == 0)
            assert torch.equal(mods[name].weight, fake_quantize(ref.weight.detach(), grid))


def test_mse_weights_are_closer_to_fp32_than_minmax():
    fp32 = tiny_bert()
    models = {e: tiny_bert() for e in WEIGHT_ESTIMATORS}
    grids = {e: quantize_weights_(m, 4, e) for e, m in models.items()}
    err = {e: sum(((dict(m.named_modules())[n].weight - w.weight) ** 2).sum().item()
                  for n, w in fp32.named_modules() if n in grids[e]) for e, m in models.items()}
    assert err["mse"] < err["minmax"]


def _items(lengths, seed=0):
    """Encoded sequences of the given lengths (no padding: each is its own length)."""
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(1, 100) for _ in range(n)], "token_type_ids": [0] * n,
             "attention_mask": [1] * n} for n in lengths]


LENGTHS = [3, 60, 5, 40, 7, 33, 4, 50, 9, 25, 3, 61, 12, 8, 45, 6]  # 16 per batch: heavy padding


@pytest.mark.parametrize("method", [dict(), dict(estimator="percentile", percentile=99.0),
                                    dict(k=4, peg_sites=["*"], share_groups="none")], ids=["minmax", "percentile", "peg"])
def test_ranges_do_not_depend_on_padding(method):
    """The same sequences one per batch (no padding) or sixteen per batch (most positions pads)
    give the same range at every site, attention scores and probabilities included."""
    model = tiny_bert()
    sites = find_sites(model)
    plans = plan_sites(sites, qcfg(act_bits=8, **method))
    assert {"layer.0.attn.scores", "layer.1.attn.probs"} <= set(plans)
    items = _items(LENGTHS)
    alone = calibrate(model, sites, plans, list(batches(items, 1, 0)), torch.device("cpu"))
    padded = calibrate(model, sites, plans, list(batches(items, 16, 0)), torch.device("cpu"))
    for name in plans:
        a, b = alone.grids[name], padded.grids[name]
        assert torch.allclose(a.scale, b.scale, rtol=1e-5, atol=0), name
        assert torch.equal(a.zero_point, b.zero_point), name


def test_attention_values_of_pad_queries_and_keys_are_dropped():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    scores = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3)  # 4 heads, 3 tokens
    kept = token_values(scores, mask)
    assert kept.numel() == 4 * (2 * 2 + 3 * 3)
    assert torch.equal(kept[:4], scores[0, 0, :2, :2].reshape(-1))
    hidden = torch.randn(2, 3, 8)
    assert torch.equal(token_values(hidden, mask), hidden[mask])
    heads_like_tokens = torch.randn(2, 3, 3, 3)  # heads == tokens: still masked as scores
    assert token_values(heads_like_tokens, mask).numel() == 3 * (4 + 9)


def test_causal_masks_are_built_once_per_shape_and_left_intact():
    _causal_mask.cache_clear()
    for tokens in (3, 5, 3, 5, 3):
        mask = torch.ones(2, tokens, dtype=torch.bool)
        mask[0, -1] = False
        scores = torch.randn(2, 4, tokens, tokens)
        keep = (mask[:, None, :, None] & mask[:, None, None, :]
                & torch.ones(tokens, tokens, dtype=torch.bool).tril())  # what every call used to build anew
        assert torch.equal(token_values(scores, mask, causal=True), scores[keep.expand_as(scores)])
    info = _causal_mask.cache_info()
    assert (info.misses, info.hits) == (2, 3)
    assert torch.equal(_causal_mask(5, torch.device("cpu")), torch.ones(5, 5, dtype=torch.bool).tril())


PAPER_SITES = {f"layer.{i}.{s}" for i in range(2) for s in ("attn.norm", "ffn.output", "ffn.residual")}


def _preset(name):
    return OmegaConf.merge(CONF, OmegaConf.load(f"conf/quant/{name}.yaml"))


def test_mixed_paper_is_16_bit_exactly_at_the_ffn_input_output_and_residual():
    q = _preset("mixed_paper")
    plans = plan_sites(find_sites(tiny_bert()), q)
    assert {n for n, p in plans.items() if p.bits == 16} == PAPER_SITES
    assert all(p.bits == 8 and p.estimator == "minmax" for n, p in plans.items() if n not in PAPER_SITES)
    assert q.weight_bits == 8 and q.weight_estimator == "mse"


def test_peg_paper_shares_one_grouping_per_layer_from_the_ffn_output():
    """The authors' --per-groups-permute-shared-h: a layer's three PEG tensors use the groups
    chosen by sorting the FFN output's ranges."""
    q = _preset("peg_paper")
    model = tiny_bert()
    sites = find_sites(model)
    plans = plan_sites(sites, q)
    peg = {n: p for n, p in plans.items() if p.estimator == "peg"}
    assert set(peg) == PAPER_SITES and all(p.k == 6 and p.grouping == "sorted" for p in peg.values())
    assert {p.group_source for p in peg.values()} == {"layer.0.ffn.output", "layer.1.ffn.output"}
    qa = calibrate(model, sites, plans, random_batches(4, seed=1), torch.device("cpu"))
    for i in range(2):
        src = qa.estimators[f"layer.{i}.ffn.output"]
        expected = make_groups(*src.channel_ranges(), 6, "sorted")
        for kind in ("attn.norm", "ffn.output", "ffn.residual"):
            est = qa.estimators[f"layer.{i}.{kind}"]
            assert torch.equal(est.groups, expected)
            scale = qa.grids[f"layer.{i}.{kind}"].scale
            for g in range(6):  # one step size per shared group
                assert scale[expected == g].unique().numel() == 1
    own = calibrate(model, sites, plan_sites(sites, OmegaConf.merge(q, {"share_groups": "none"})),
                    random_batches(4, seed=1), torch.device("cpu"))
    assert not torch.equal(own.estimators["layer.0.ffn.residual"].groups, qa.estimators["layer.0.ffn.residual"].groups)


def test_shared_groups_need_the_ffn_output_as_a_peg_site():
    sites = find_sites(tiny_bert())
    q = qcfg(act_bits=8, k=2, peg_sites=["*.ffn.residual"], share_groups="layer")
    with pytest.raises(TransquantError, match="layer.0.ffn.residual takes its PEG groups from layer.0.ffn.output"):
        plan_sites(sites, q)
    with pytest.raises(TransquantError, match=r"layer.0.ffn.intermediate \(width 64\) cannot share"):
        plan_sites(sites, qcfg(act_bits=8, k=2, peg_sites=["*.ffn.*"], share_groups="layer"))
    ok = plan_sites(sites, qcfg(act_bits=8, k=2, peg_sites=["embeddings.sum", "*.ffn.output"], share_groups="layer"))
    assert ok["embeddings.sum"].group_source is None  # outside the layers: its own groups
