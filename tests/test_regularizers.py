"""Activation regularisers for fine-tuning: each penalty is its formula on known tensors, its
gradient is right, it sees only the non-pad tokens' residual sums and lets gradients reach the
model, and fine-tuning with it runs and records it. The knobs are validated and enter the cache
key only where they are in effect."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import random_batches, tiny_bert
from transquant.core.errors import TransquantError
from transquant.quant.sites import RESIDUAL_KINDS, find_sites
from transquant.train import finetune, regularizers
from transquant.train.regularizers import (
    ResidualRegularizer,
    effective_recipe,
    kurtosis,
    kurtosis_penalty,
    range_penalty,
    validate_train,
)


def test_kurtosis_is_its_closed_form():
    # n values: one c, n - 1 zeros -> kurtosis (n^2 - 3n + 3) / (n - 1), whatever c
    for n, c in [(8, 2.0), (5, -7.0)]:
        x = torch.zeros(n, dtype=torch.float64)
        x[3] = c
        assert kurtosis(x).item() == pytest.approx((n * n - 3 * n + 3) / (n - 1), rel=1e-12)
    assert kurtosis(torch.tensor([1.0, -1.0, 1.0, -1.0])).item() == pytest.approx(1.0)  # two-point: 1
    g = torch.Generator().manual_seed(0)
    assert kurtosis(torch.randn(200_000, generator=g, dtype=torch.float64)).item() == pytest.approx(3.0, abs=0.05)
    assert kurtosis(torch.rand(200_000, generator=g, dtype=torch.float64)).item() == pytest.approx(1.8, abs=0.02)


def test_kurtosis_penalty_is_the_mean_squared_excess_over_sites():
    heavy = torch.zeros(8, 3, dtype=torch.float64)
    heavy[2, 1] = 2.0  # 24 values, one non-zero: kurtosis (24^2 - 72 + 3) / 23 = 507/23
    flat = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)  # kurtosis 1 < target: no penalty
    k = 507 / 23
    assert kurtosis_penalty([heavy, flat], 3.0).item() == pytest.approx((k - 3) ** 2 / 2, rel=1e-12)
    assert kurtosis_penalty([flat], 3.0).item() == 0.0
    assert kurtosis_penalty([heavy], 30.0).item() == 0.0  # below the target: one-sided


def test_range_penalty_is_the_mean_squared_excess_beyond_the_margin():
    a = torch.tensor([[0.5, -3.0], [2.0, 4.0]], dtype=torch.float64)  # relu(|x| - 2) = 0, 1, 0, 2
    b = torch.tensor([-5.0, 1.0], dtype=torch.float64)                # 3, 0
    assert range_penalty([a], 2.0).item() == pytest.approx(5 / 4)
    assert range_penalty([a, b], 2.0).item() == pytest.approx((5 / 4 + 9 / 2) / 2)
    assert range_penalty([a, b], 10.0).item() == 0.0


def test_gradients_are_right():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 4, generator=g, dtype=torch.float64) ** 3).requires_grad_()  # heavy-tailed
    y = (torch.randn(5, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    assert kurtosis(x.detach()) > 1.5  # the hinge is active below
    assert torch.autograd.gradcheck(lambda a, b: kurtosis_penalty([a, b], 1.5), (x, y))
    assert torch.autograd.gradcheck(kurtosis, (x,))
    margin = 0.7
    assert ((x.abs() - margin).abs() > 1e-3).all() and ((y.abs() - margin).abs() > 1e-3).all()  # off the kink
    assert torch.autograd.gradcheck(lambda a, b: range_penalty([a, b], margin), (x, y))


@pytest.mark.parametrize("kind", ["kurtosis", "quanttune"])
def test_regularizer_sees_the_non_pad_residual_sums_and_trains_the_model(kind):
    model = tiny_bert(layers=2).train()
    batch = random_batches(n=1)[0]
    reg = ResidualRegularizer(model, kind, target=1.0, margin=0.5)
    assert [s.kind for s in reg.sites] == [s.kind for s in find_sites(model) if s.kind in RESIDUAL_KINDS]
    assert len(reg.sites) == 1 + 2 * 2  # the embedding sum and each layer's two sums
    with reg.watch(batch["attention_mask"]):
        model(**batch)
        values = list(reg._values)
    tokens = int(batch["attention_mask"].sum())
    assert [tuple(v.shape) for v in values] == [(tokens, 32)] * len(reg.sites)
    penalty = reg.penalty()
    expected = kurtosis_penalty(values, 1.0) if kind == "kurtosis" else range_penalty(values, 0.5)
    assert penalty.item() == pytest.approx(expected.item()) and penalty.item() > 0
    penalty.backward()  # the tap returned the tensor itself: gradients reach the weights
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert reg._values == []  # penalty() clears the record; the taps are gone after watch()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("overrides", [
    ("train.regularizer=kurtosis", "train.reg_weight=0.01", "train.kurtosis_target=1.0"),
    ("train.regularizer=quanttune", "train.reg_weight=1.0", "train.margin=0.1"),
])
def test_finetuning_with_a_regularizer_records_it(make_cfg, tmp_path, overrides):
    from transquant.pipeline import prepare
    cfg = make_cfg(*overrides, "train.epochs=1", "task.synthetic_train_size=32", f"paths.cache_dir={tmp_path}")
    validate_train(cfg.train)
    _, task, tokenizer = prepare(cfg)
    ckpt, cached = finetune.finetuned(cfg.model, task, cfg.train, tokenizer, tmp_path, torch.device("cpu"))
    assert not cached
    hist = finetune.history(ckpt)
    steps = 2  # 32 examples / batch 16
    assert {k: len(v) for k, v in hist.items()} == {"loss": steps, "task_loss": steps, "reg": steps}
    assert all(r > 0 for r in hist["reg"])
    w = cfg.train.reg_weight
    assert all(loss == pytest.approx(t + w * r) for loss, t, r in zip(hist["loss"], hist["task_loss"], hist["reg"]))


def test_the_cache_key_hashes_the_knobs_in_effect_only(make_cfg):
    from transquant.pipeline import prepare
    cfg = make_cfg()
    old = {k: cfg.train[k] for k in sorted(cfg.train) if k not in regularizers.KNOB_DEFAULTS}
    assert effective_recipe(cfg.train) == old  # a default recipe hashes as before the knobs existed
    _, task, _ = prepare(cfg)
    key = lambda c: finetune.cache_key(c.model, task, c.train, c.train.max_length)
    base = key(cfg)
    assert key(make_cfg("train.margin=3", "train.clip_gamma=-0.1")) == base  # inert knobs
    k1 = key(make_cfg("train.regularizer=kurtosis", "train.reg_weight=0.1"))
    k2 = key(make_cfg("train.regularizer=kurtosis", "train.reg_weight=0.2"))
    k3 = key(make_cfg("train.regularizer=kurtosis", "train.reg_weight=0.1", "train.kurtosis_target=5"))
    k4 = key(make_cfg("train.regularizer=kurtosis", "train.reg_weight=0.1", "train.margin=2"))  # margin inert here
    assert len({base, k1, k2, k3}) == 4 and k4 == k1
    c1 = key(make_cfg("train.attention=clipped_softmax"))
    c2 = key(make_cfg("train.attention=clipped_softmax", "train.clip_gamma=-0.1"))
    g1 = key(make_cfg("train.attention=gated"))
    assert len({base, c1, c2, g1}) == 4
    assert key(make_cfg("train.autocast=none")) == base
    b1 = key(make_cfg("train.autocast=bf16"))
    assert b1 not in {base, k1, c1, g1}


def test_variant_recipes_also_hash_the_site_code(make_cfg, monkeypatch):
    from transquant.core import provenance
    seen = []
    monkeypatch.setattr(provenance, "fingerprint", lambda modules=None: seen.append(modules) or {})
    plain, variant = make_cfg(), make_cfg("train.attention=clipped_softmax")
    assert finetune._code_modules(plain.train) == provenance.FINETUNE_MODULES
    assert "transquant.train.regularizers" in provenance.FINETUNE_MODULES
    assert "transquant.train.attention" in provenance.FINETUNE_MODULES
    assert "transquant.quant.sites" in finetune._code_modules(variant.train)
    assert "transquant.quant.sites" in finetune._code_modules(
        make_cfg("train.regularizer=quanttune", "train.reg_weight=1", "train.margin=1").train)


@pytest.mark.parametrize("overrides, fragment", [
    (["train.regularizer=l2"], "train.regularizer=l2: allowed none, kurtosis, quanttune"),
    (["train.regularizer=kurtosis"], "train.reg_weight=None"),
    (["train.regularizer=kurtosis", "train.reg_weight=-1"], "train.reg_weight=-1"),
    (["train.regularizer=kurtosis", "train.reg_weight=1", "train.kurtosis_target=0.5"], "train.kurtosis_target=0.5"),
    (["train.regularizer=quanttune", "train.reg_weight=1"], "train.margin=None"),
    (["train.regularizer=quanttune", "train.reg_weight=1", "train.margin=-2"], "train.margin=-2"),
    (["train.attention=linear"], "train.attention=linear: allowed softmax, clipped_softmax, gated"),
    (["train.attention=clipped_softmax", "train.clip_gamma=0"], "train.clip_gamma=0"),
    (["train.attention=clipped_softmax", "train.clip_zeta=0.5"], "train.clip_zeta=0.5"),
    (["train.attention=gated", "train.gate_bias_init=abc"], "train.gate_bias_init=abc"),
])
def test_bad_knobs_are_refused(make_cfg, overrides, fragment):
    with pytest.raises(TransquantError, match=fragment):
        validate_train(make_cfg(*overrides).train)


def test_good_knobs_pass(make_cfg):
    for ov in [(), ("train.regularizer=kurtosis", "train.reg_weight=1e-4"),
               ("train.regularizer=quanttune", "train.reg_weight=0.5", "train.margin=6"),
               ("train.attention=clipped_softmax",), ("train.attention=gated",)]:
        validate_train(make_cfg(*ov).train)
    for preset in ("bondarenko", "paper", "quick"):
        t = make_cfg(f"train={preset}", tiny=False).train
        assert (t.regularizer, t.attention) == ("none", "softmax")  # every preset inherits the knobs
        validate_train(t)
