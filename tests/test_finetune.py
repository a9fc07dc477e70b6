"""Fine-tuning recipes: the presets say what they are, the schedule and clipping do what the
recipe says, and the checkpoint cache key follows the code that trains."""
from __future__ import annotations

import shutil

import pytest
import torch

from transquant.core import provenance
from transquant.core.config import validate_static
from transquant.core.errors import TransquantError
from transquant.train import finetune


def test_presets_carry_the_published_settings(make_cfg):
    b = make_cfg("train=bondarenko", tiny=False).train
    assert (b.lr, b.batch_size, b.epochs, b.weight_decay, b.warmup_ratio, b.max_grad_norm, b.schedule) == \
        (3e-5, 8, 3, 0.0, 0.0, None, "linear")
    p = make_cfg("train=paper", tiny=False).train
    assert (p.lr, p.batch_size, p.epochs, p.weight_decay, p.warmup_ratio, p.max_grad_norm) == (5e-5, 8, 3, 0.0, 0.0, None)
    d = make_cfg(tiny=False).train  # the default stays the recipe the README's numbers were made with
    assert (d.lr, d.batch_size, d.epochs, d.weight_decay, d.warmup_ratio, d.max_grad_norm, d.schedule) == \
        (5e-5, 32, 2, 0.01, 0.1, 1.0, "linear")


def test_linear_schedule_unchanged_and_cosine_follows_hugging_face():
    total, warmup = 100, 10
    old = lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    assert all(finetune.lr_factor("linear", s, warmup, total) == old(s) for s in range(total + 1))
    assert finetune.lr_factor("cosine", warmup, warmup, total) == pytest.approx(1.0)
    assert finetune.lr_factor("cosine", 55, warmup, total) == pytest.approx(0.5)
    assert finetune.lr_factor("cosine", total, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert finetune.lr_factor("cosine", 0, 0, total) == 1.0  # no warm-up: full rate at step 0


@pytest.mark.parametrize("override, fragment", [
    ("train.schedule=step", "train.schedule=step"),
    ("train.max_grad_norm=0", "train.max_grad_norm=0"),
    ("train.weight_decay=-1", "train.weight_decay=-1"),
    ("train.autocast=fp16", "train.autocast=fp16: allowed none, bf16"),
])
def test_bad_recipe_values_are_refused(make_cfg, override, fragment):
    with pytest.raises(TransquantError, match=fragment):
        validate_static(make_cfg(override))


def test_no_clipping_when_max_grad_norm_is_null(make_cfg, monkeypatch):
    """train=bondarenko trains without clipping: clip_grad_norm_ is never called."""
    from transquant.pipeline import prepare
    cfg = make_cfg("train.max_grad_norm=null", "train.epochs=1", "task.synthetic_train_size=32")
    _, task, tokenizer = prepare(cfg)
    called = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: called.append(1))
    finetune.train(cfg.model, task, cfg.train, tokenizer, torch.device("cpu"))
    assert not called


def test_bf16_autocast_trains_a_different_float32_model(make_cfg, monkeypatch):
    """train.autocast=bf16: the matmuls run in bfloat16 (the trained weights differ from the FP32
    run's), the weights stay float32, and the regulariser still sees FP32 residual sums."""
    from transquant.pipeline import prepare
    common = ("train.epochs=1", "task.synthetic_train_size=32", "train.regularizer=quanttune",
              "train.reg_weight=0.1", "train.margin=0.5")
    fp32_cfg, bf16_cfg = make_cfg(*common), make_cfg(*common, "train.autocast=bf16")
    _, task, tokenizer = prepare(fp32_cfg)
    seen = []
    real = finetune.regularizers.range_penalty
    monkeypatch.setattr(finetune.regularizers, "range_penalty",
                        lambda values, margin: seen.append({v.dtype for v in values}) or real(values, margin))
    cpu = torch.device("cpu")
    a = finetune.train(fp32_cfg.model, task, fp32_cfg.train, tokenizer, cpu)
    b = finetune.train(bf16_cfg.model, task, bf16_cfg.train, tokenizer, cpu)
    assert all(p.dtype == torch.float32 for p in b.parameters())
    assert all(d == {torch.float32} for d in seen) and len(seen) == 2 * len(a.train_history["loss"])
    w_a, w_b = a.classifier.weight, b.classifier.weight
    assert not torch.equal(w_a, w_b) and torch.allclose(w_a, w_b, atol=0.05)  # same recipe, bf16 rounding


@pytest.mark.parametrize("flags, ok", [("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True),
                                       ("avx2 avx512f avx512_vnni", False)])
def test_bf16_autocast_needs_bf16_instructions(make_cfg, monkeypatch, flags, ok):
    from transquant.core import config
    from transquant.deploy.cpu import cpu_info
    info = f"model name\t: Test CPU\nflags\t\t: fpu {flags}\n"
    monkeypatch.setattr(config, "cpu_info", lambda: cpu_info(info))
    cfg = make_cfg("train.autocast=bf16")
    if ok:
        validate_static(cfg)
    else:
        with pytest.raises(TransquantError, match=r"train.autocast=bf16: this CPU \(Test CPU; avx2 avx512f avx512_vnni\)"):
            validate_static(cfg)
    config.check_autocast("bf16", "cuda")  # not a CPU: torch decides on the GPU


def test_source_hash_follows_the_code(tmp_path, monkeypatch):
    copy = tmp_path / "transquant"
    shutil.copytree(provenance.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.gz"))
    monkeypatch.setattr(provenance, "PACKAGE_DIR", copy)
    before = provenance.source_hash()
    assert provenance.source_hash() == before  # deterministic
    (copy / "train" / "evaluate.py").write_text((copy / "train" / "evaluate.py").read_text() + "\n# edited\n")
    assert provenance.source_hash() != before


def test_finetune_key_follows_training_code(make_cfg, monkeypatch):
    from transquant.pipeline import prepare
    cfg = make_cfg()
    _, task, _ = prepare(cfg)
    key = finetune.cache_key(cfg.model, task, cfg.train, cfg.train.max_length)
    assert finetune.cache_key(cfg.model, task, cfg.train, cfg.train.max_length) == key
    monkeypatch.setattr(provenance, "source_hash", lambda modules=None: "edited")
    assert finetune.cache_key(cfg.model, task, cfg.train, cfg.train.max_length) != key


def test_finetune_key_follows_the_cpu_thread_count(make_cfg):
    """Another thread count sums in another order: other weights, so another checkpoint."""
    from transquant.pipeline import prepare
    cfg = make_cfg()
    _, task, _ = prepare(cfg)
    before = torch.get_num_threads()
    try:
        keys = set()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            keys.add(finetune.cache_key(cfg.model, task, cfg.train, cfg.train.max_length, torch.device("cpu")))
        assert len(keys) == 2
        on_gpu = {finetune.cache_key(cfg.model, task, cfg.train, cfg.train.max_length, torch.device("cuda"))}
        torch.set_num_threads(1)
        assert on_gpu == {finetune.cache_key(cfg.model, task, cfg.train, cfg.train.max_length, torch.device("cuda"))}
        assert not on_gpu & keys
    finally:
        torch.set_num_threads(before)


# --- attention variants (Bondarenko et al., NeurIPS 2023) ---------------------------------------

def test_clipped_softmax_is_its_formula():
    from transquant.train.attention import clipped_softmax
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 7, generator=g, dtype=torch.float64) * 4
    p = torch.softmax(x, dim=-1)
    gamma, zeta = -0.03, 1.0
    assert torch.equal(clipped_softmax(x, gamma, zeta), torch.clamp((zeta - gamma) * p + gamma, 0, 1))
    assert torch.equal(clipped_softmax(x, 0.0, 1.0), p)  # gamma = 0, zeta = 1: the plain softmax
    y = clipped_softmax(x, gamma, zeta)
    assert (y == 0).any() and (y >= 0).all() and (y <= 1).all()  # exact zeros at finite scores
    one = clipped_softmax(torch.tensor([[20.0, 0.0, 0.0]]), gamma, 1.1)
    assert one[0, 0] == 1.0 and (one[0, 1:] == 0).all()  # and exact ones with zeta > 1


@pytest.mark.parametrize("model, attention", [("tiny", "clipped_softmax"), ("tiny-gpt2", "clipped_softmax"),
                                              ("tiny", "gated"), ("tiny-distilbert", "gated")])
def test_attention_variant_survives_the_checkpoint(make_cfg, tmp_path, model, attention):
    """The variant is recorded in the checkpoint's config; load_finetuned gives back the same
    function (same logits), through the tapped kernel, with the gates' trained weights."""
    from transquant import models
    from transquant.pipeline import prepare
    from transquant.quant.sites import (
        ATTN_IMPLEMENTATION,
        find_sites,
        tap,
        use_tappable_attention,
    )
    from transquant.train import attention as variants
    cfg = make_cfg(f"model={model}", f"train.attention={attention}", "profile.enabled=false", "train.epochs=1",
                   "task.synthetic_train_size=32", "train.gate_bias_init=1.0")
    finetune.validate_train(cfg.train)
    _, task, tokenizer = prepare(cfg)
    ckpt, _ = finetune.finetuned(cfg.model, task, cfg.train, tokenizer, tmp_path, torch.device("cpu"))
    loaded = models.load_finetuned(ckpt).eval()
    assert variants.spec_of(loaded.config)["kind"] == attention
    assert loaded.config._attn_implementation == ATTN_IMPLEMENTATION
    variants.check_kernel(loaded)
    batch = tokenizer(["a short one", "a much longer second sentence here"], padding=True, return_tensors="pt")
    trained = finetune.train(cfg.model, task, cfg.train, tokenizer, torch.device("cpu"))  # same seed: same weights
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, trained(**batch).logits, atol=1e-5)
        if attention == "gated":
            gates = [m.transquant_gate for m in variants.attention_modules(loaded)]
            assert len(gates) == 2 and all(g.bias.abs().sum() > 0 for g in gates)
            assert any((g.bias - 1.0).abs().max() > 0 for g in gates)  # trained, not re-initialised
        else:  # the probabilities the quantizer sees are the clipped ones (exact zeros at pads)
            use_tappable_attention(loaded)
            seen = []
            probs = [s for s in find_sites(loaded) if s.kind == "attn_probs"]
            with tap(probs, lambda s, x: seen.append(x) or x):
                loaded(**batch)
            assert len(seen) == 2 and all((p == 0).any() for p in seen)
    loaded.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="only the transquant_eager kernel"):
        variants.check_kernel(loaded)


def test_plain_softmax_leaves_the_model_untouched(make_cfg):
    """The default recipe trains the model it always did: no config attribute, no kernel switch."""
    from transquant.pipeline import prepare
    from transquant.train import attention as variants
    cfg = make_cfg("train.epochs=1", "task.synthetic_train_size=16")
    _, task, tokenizer = prepare(cfg)
    model = finetune.train(cfg.model, task, cfg.train, tokenizer, torch.device("cpu"))
    assert not hasattr(model.config, variants.CONFIG_ATTR)
    assert model.config._attn_implementation != "transquant_eager"
    assert set(model.train_history) == {"loss"}


def test_a_gated_model_without_gates_refuses_to_run(make_cfg, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from transquant.pipeline import prepare
    from transquant.quant.sites import use_tappable_attention
    cfg = make_cfg("train.attention=gated", "profile.enabled=false", "train.epochs=1", "task.synthetic_train_size=16")
    _, task, tokenizer = prepare(cfg)
    ckpt, _ = finetune.finetuned(cfg.model, task, cfg.train, tokenizer, tmp_path, torch.device("cpu"))
    bare = AutoModelForSequenceClassification.from_pretrained(str(ckpt))  # no gates
    use_tappable_attention(bare)
    with pytest.raises(ValueError, match="no gates"):
        bare(**tokenizer(["x y"], return_tensors="pt"))
