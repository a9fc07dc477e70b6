"""Config validation, run before any minute is spent and before MLflow or the cache is touched."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import AutoModelForSequenceClassification

from .. import models
from ..deploy.cpu import cpu_info
from ..deploy.engines import ENGINES
from ..quant.precision import check_precision
from ..quant.ptq import SHARE_GROUPS, WEIGHT_GRANULARITIES, plan_sites
from ..quant.ranges import ESTIMATORS, GROUPINGS, WEIGHT_ESTIMATORS
from ..quant.sites import ArchitectureError, Site, available, find_sites, select, unmatched
from ..quant.transforms import validate_transform
from ..train.regularizers import validate_train
from .errors import TransquantError
from .tracking import check_artifacts, check_uri

TASKS = ("qnli-squad", "qnli", "synthetic")
DEVICES = ("cpu", "cuda")
SCHEDULES = ("linear", "cosine")
# Attention kernels of the PyTorch FP32 baseline (profiling.torch_fp32) that run on CPU and GPU
# without optional packages; any other name fails only after calibration and evaluation.
FP32_ATTENTIONS = ("sdpa", "eager")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise TransquantError(msg)


def _bits(name: str, value) -> None:
    _check(value is None or (isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 16),
           f"{name}={value}: bits must be an integer in [2, 16] (or null for float)")


def positive_int(name: str, value, allow_none: bool = False) -> None:
    """``value`` is an integer >= 1 (or None where allowed); the error names ``name``."""
    if allow_none and value is None:
        return
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
           f"{name}={value}: must be an integer >= 1{' or null' if allow_none else ''}")


def check_device(key: str, device) -> None:
    """``device`` is one of :data:`DEVICES`, and a GPU torch can see for cuda (else torch fails mid-job)."""
    _check(device in DEVICES, f"{key}={device}: allowed {', '.join(DEVICES)}")
    _check(device != "cuda" or torch.cuda.is_available(), f"{key}=cuda: no CUDA device visible to torch "
           f"(torch {torch.__version__}); use {key}=cpu or install a CUDA build (README)")


def check_autocast(autocast: str, device) -> None:
    """bf16 autocast on a CPU without bf16 instructions runs emulated, slower than FP32: refuse it."""
    if autocast != "bf16" or not str(device).startswith("cpu"):
        return
    flags, model = cpu_info()
    _check(bool({"avx512_bf16", "amx_bf16"} & set(flags)),
           f"train.autocast=bf16: this CPU ({model}; {' '.join(flags) or 'no relevant flags'}) has neither "
           "avx512_bf16 nor amx_bf16, so bf16 would run emulated and slower than FP32; use train.autocast=none")


def writable_dir(name: str, value) -> None:
    """A directory we may create and write (checked, not created: bad input writes nothing)."""
    path = Path(str(value)).absolute()
    _check(not path.exists() or path.is_dir(), f"{name}={value}: exists and is not a directory")
    base = next(p for p in (path, *path.parents) if p.exists())
    _check(base.is_dir(), f"{name}={value}: {base} is a file, not a directory")
    _check(os.access(base, os.W_OK | os.X_OK), f"{name}={value}: {base} is not writable")


def validate_static(cfg: DictConfig) -> None:
    """Checks that need no model: ranges, enums, types."""
    q = cfg.quant
    for key in ("weight_bits", "act_bits", "high_bits"):
        _bits(f"quant.{key}", q[key])
    check_precision(cfg.get("precision"), q)  # before the site lists it resolves into are read
    validate_transform(q)
    ESTIMATORS.check(q.estimator)
    WEIGHT_ESTIMATORS.check(q.weight_estimator)
    _check(q.weight_granularity in WEIGHT_GRANULARITIES,
           f"quant.weight_granularity={q.weight_granularity}: allowed {', '.join(WEIGHT_GRANULARITIES)}")
    _check(isinstance(q.bias_correction, bool), f"quant.bias_correction={q.bias_correction}: must be true or false")
    _check(q.share_groups in SHARE_GROUPS, f"quant.share_groups={q.share_groups}: allowed {', '.join(SHARE_GROUPS)}")
    if q.estimator == "percentile":
        p = q.percentile
        _check(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 100,
               f"quant.percentile={p}: must be a number in (0, 100]")
    positive_int("quant.k", q.k)
    _check(isinstance(q.permute, bool), f"quant.permute={q.permute}: must be true or false")
    GROUPINGS.check(q.grouping)
    for key in ("act_sites", "act_exclude", "high_bits_sites", "peg_sites"):
        _check(all(isinstance(p, str) for p in q[key]), f"quant.{key}={list(q[key])}: must be a list of glob strings")
    _check(cfg.task.name in TASKS, f"task.name={cfg.task.name}: allowed {', '.join(TASKS)}")
    positive_int("task.max_train_samples", cfg.task.max_train_samples, allow_none=True)
    positive_int("task.max_eval_samples", cfg.task.max_eval_samples, allow_none=True)
    t = cfg.train
    _check(isinstance(t.lr, (int, float)) and t.lr > 0, f"train.lr={t.lr}: must be > 0")
    for key in ("epochs", "batch_size"):
        positive_int(f"train.{key}", t[key])
    _check(isinstance(t.max_length, int) and 8 <= t.max_length <= 512,
           f"train.max_length={t.max_length}: must be an integer in [8, 512]")
    _check(0 <= t.warmup_ratio < 1, f"train.warmup_ratio={t.warmup_ratio}: must be in [0, 1)")
    _check(t.schedule in SCHEDULES, f"train.schedule={t.schedule}: allowed {', '.join(SCHEDULES)}")
    _check(t.max_grad_norm is None or (isinstance(t.max_grad_norm, (int, float)) and t.max_grad_norm > 0),
           f"train.max_grad_norm={t.max_grad_norm}: must be > 0, or null for no clipping")
    _check(isinstance(t.weight_decay, (int, float)) and t.weight_decay >= 0,
           f"train.weight_decay={t.weight_decay}: must be >= 0")
    validate_train(t)
    _check(t.attention == "softmax" or not cfg.profile.enabled,
           f"train.attention={t.attention}: the profiled engines export the stock attention, not this variant; "
           "use profile.enabled=false")
    positive_int("calibration.num_batches", cfg.calibration.num_batches)
    positive_int("calibration.batch_size", cfg.calibration.batch_size)
    positive_int("eval.batch_size", cfg.eval.batch_size)
    ENGINES.check(cfg.profile.get("engine", "onnxruntime"))
    _check(not (q.estimator == "dynamic" and q.act_bits is not None and cfg.profile.enabled
                and cfg.profile.get("engine", "onnxruntime") == "onnxruntime"),
           "quant.estimator=dynamic: per-token ranges have no onnxruntime engine (static QDQ grids only); "
           "use profile.engine=torch or none, or profile.enabled=false")
    runs = cfg.profile.get("op_profile_runs", 0)
    _check(isinstance(runs, int) and not isinstance(runs, bool) and runs >= 0,
           f"profile.op_profile_runs={runs}: must be an integer >= 0 (0 = no op profile)")
    attention = cfg.profile.get("fp32_attention", "sdpa")
    _check(attention in FP32_ATTENTIONS,
           f"profile.fp32_attention={attention}: allowed {', '.join(FP32_ATTENTIONS)}")
    hw = cfg.hardware
    check_device("hardware.device", hw.device)
    check_autocast(t.get("autocast", "none"), hw.device)
    positive_int("hardware.threads", hw.threads, allow_none=True)
    _check(cfg.on_error in ("stop", "continue"), f"on_error={cfg.on_error}: allowed stop, continue")
    _check(isinstance(cfg.resume, bool), f"resume={cfg.resume}: must be true or false")
    check_artifacts(cfg.tracking)
    check_uri(cfg.tracking.uri)
    if cfg.tracking.artifacts is not None:
        writable_dir("tracking.artifacts", cfg.tracking.artifacts)
    writable_dir("paths.cache_dir", cfg.paths.cache_dir)


def skeleton(model_cfg) -> torch.nn.Module:
    """The model's module tree without weights (meta device): sites without loading anything."""
    _, loc = models.resolve_source(model_cfg)
    conf = models.model_config(model_cfg)
    try:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(conf)
    except ValueError as err:
        raise TransquantError(f"model {loc}: {conf.model_type} has no sequence-classification head "
                              f"({str(err).splitlines()[0]})") from err


def validate_against_model(cfg: DictConfig) -> list[Site]:
    """Checks that need the architecture: site patterns, PEG group count. Returns the sites."""
    try:
        sites = find_sites(skeleton(cfg.model))
    except (ArchitectureError, models.ModelError, OSError) as err:
        raise TransquantError(str(err).splitlines()[0]) from err
    q = cfg.quant
    for key in ("act_sites", "act_exclude", "high_bits_sites", "peg_sites"):
        bad = unmatched(sites, list(q[key]))
        _check(not bad, f"quant.{key}: pattern(s) {bad} match no site of {cfg.model.name}; its {available(sites)}")
    if q.peg_sites and q.act_bits is not None:
        widths = [s.channels for s in select(sites, list(q.peg_sites)) if s.channels]
        hidden = min(widths) if widths else None
        _check(hidden is None or q.k <= hidden, f"quant.k={q.k}: must be in [1, {hidden}] (the hidden size of the PEG sites)")
    plan_sites(sites, q)  # raises on PEG groups shared with a site that cannot give them
    return sites


def validate(cfg: DictConfig) -> list[Site]:
    validate_static(cfg)
    return validate_against_model(cfg)
