"""FP32 fine-tuning (recipes in ``conf/train/``), cached by everything that changes the weights.

Beyond the plain recipe: a regulariser on the residual-sum activations (``train.regularizer``,
:mod:`.regularizers`) and an attention variant that changes the model (``train.attention``,
:mod:`.attention`; recorded in the checkpoint's config and restored by ``load_finetuned``). Their
defaults (``none``, ``softmax``) train exactly as before. ``train.autocast=bf16`` runs forward and
loss under bfloat16 autocast (weights, gradients and optimizer state stay FP32): measured 2.7x
faster per step on an AVX512-BF16 CPU, a different checkpoint (its own cache key), opt-in."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from .. import models
from ..core import cache, provenance
from ..core.progress import Progress, transformers_bars_off
from ..data.tasks import Task, batches, encode, n_batches
from . import attention, regularizers
from .regularizers import validate_train  # noqa: F401  (config validation of the knobs below)

HISTORY_FILE = "train_history.json"  # per-step losses, beside the checkpoint


class TrainingError(RuntimeError):
    """Fine-tuning produced an unusable model (e.g. a NaN loss)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cache_key(model_cfg, task: Task, train_cfg, max_length: int, device: torch.device = torch.device("cpu")) -> str:
    """Hash of model identity, training data, recipe, seed, the code that trains, the libraries and
    the arithmetic — everything that decides the weights, nothing else. The CPU thread count is
    part of the arithmetic: MiniLM-L6 fine-tuned at 1 and at 2 threads gave the same FP32 accuracy
    but different weights, and PTQ accuracies 0.3-0.5 point apart."""
    return cache.key_of({
        "model": models.identity(model_cfg),
        "task": task.name,
        "train_data": task.fingerprint("train"),
        "recipe": regularizers.effective_recipe(train_cfg),  # every knob that is in effect
        "max_length": max_length,
        "code": provenance.fingerprint(_code_modules(train_cfg)),
        "arithmetic": arithmetic(device),
    })


def arithmetic(device: torch.device) -> dict:
    """Where the fine-tune's sums run: the device type and, on a CPU, torch's thread count (it
    changes the reduction order, hence the weights)."""
    return {"device": device.type, "threads": torch.get_num_threads() if device.type == "cpu" else None}


def _code_modules(train_cfg) -> tuple[str, ...]:
    """The modules whose code trains with this recipe: a regulariser or an attention variant also
    runs the site taps / the tapped attention kernel."""
    plain = train_cfg.get("regularizer", "none") == "none" and train_cfg.get("attention", "softmax") == "softmax"
    return provenance.FINETUNE_MODULES + (() if plain else provenance.FINETUNE_VARIANT_MODULES)


def finetuned(model_cfg, task: Task, train_cfg, tokenizer, cache_dir: Path, device: torch.device
              ) -> tuple[Path, bool]:
    """Path of the fine-tuned checkpoint, training it first if the cache has none."""
    key = cache_key(model_cfg, task, train_cfg, train_cfg.max_length, device)

    def build(tmp: Path) -> None:
        model = train(model_cfg, task, train_cfg, tokenizer, device)
        with transformers_bars_off():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cache.write_json_atomic(tmp / HISTORY_FILE, model.train_history)
        cache.write_json_atomic(tmp / "transquant_meta.json", {
            "key": key, "task": task.name, "train_examples": len(task.train),
            "model": models.identity(model_cfg), **arithmetic(device)})

    return cache.cached_dir(Path(cache_dir) / "finetune" / key, build)


def history(ckpt: Path) -> dict[str, list[float]]:
    """The per-step training history saved with a checkpoint: ``loss`` (what was minimised),
    and with a regulariser ``task_loss`` and ``reg`` (its unweighted penalty); {} for a
    checkpoint cached before histories were kept."""
    import json

    f = Path(ckpt) / HISTORY_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm weights (BERT convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then linear or cosine decay to 0
    (the formulas of Hugging Face's ``get_linear/cosine_schedule_with_warmup``)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return max(0.0, (total - step) / max(1, total - warmup))


def train(model_cfg, task: Task, cfg, tokenizer, device: torch.device) -> torch.nn.Module:
    seed_everything(cfg.seed)
    model = models.load_pretrained(model_cfg, num_labels=2, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id)
    attention.install(model, attention.spec_from_train(cfg))  # a no-op for plain softmax
    model = model.to(device)
    reg = regularizers.build(model, cfg)
    hist: dict[str, list[float]] = {"loss": []} if reg is None else {"loss": [], "task_loss": [], "reg": []}
    items = encode(tokenizer, task.train, cfg.max_length)
    steps_per_epoch = n_batches(len(items), cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.schedule, s, warmup, total))
    model.train()
    bar = Progress("fine-tune", total)
    bf16 = cfg.get("autocast", "none") == "bf16"
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        for batch in batches(items, cfg.batch_size, tokenizer.pad_token_id, shuffle_seed=cfg.seed + epoch):
            batch = {k: v.to(device) for k, v in batch.items()}
            if reg is None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = model(**batch).loss.float()
            else:
                with reg.watch(batch["attention_mask"]), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                         enabled=bf16):
                    task_loss = model(**batch).loss.float()
                penalty = reg.penalty()
                loss = task_loss + cfg.reg_weight * penalty
                hist["task_loss"].append(task_loss.item())
                hist["reg"].append(penalty.item())
            hist["loss"].append(loss.item())
            if not math.isfinite(loss.item()):
                raise TrainingError(f"fine-tune: loss became {loss.item()} at step {bar.n} "
                                    f"(lr={cfg.lr}); lower train.lr or check the data")
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    model.train_seconds = time.perf_counter() - started
    model.train_history = hist
    return model.eval()
