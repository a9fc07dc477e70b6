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
