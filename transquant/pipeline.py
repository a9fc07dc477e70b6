"""The task function: fine-tune (cached) -> calibrate -> quantize -> evaluate -> log.

``run_job`` is what ``python -m transquant.run`` calls for every Hydra job; it returns the
quantized accuracy so Hydra's Optuna sweeper can optimise it.
"""
from __future__ import annotations

import copy
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import models
from .analysis.error_attribution import quantization_error
from .analysis.figures import log_figures
from .analysis.job import figure_k, job_statistics, stats_config
from .analysis.statistics import fp32_statistics, sample_items
from .analysis.to_mlflow import (
    log_profile,
    log_quantization_error,
    log_statistics,
    log_table,
    log_transformed_statistics,
)
from .core import cache, config, tracking
from .core.errors import TransquantError
from .core.provenance import FP32_EVAL_MODULES, fingerprint
from .core.tracking import JobRun
from .data.tasks import DataError, batches, encode, load_task
from .deploy.profiling import profile_stage
from .quant.sites import find_sites
from .quant.state import STATE_FILE, QuantState, quantize_
from .quant.transforms import fold_
from .studies.significance import PREDICTIONS, job_metrics, save_predictions
from .train import finetune
from .train.evaluate import percent_correct, predictions

log = logging.getLogger("transquant")


def device_of(cfg: DictConfig) -> torch.device:
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    return torch.device(cfg.hardware.device)


def history_metrics(history: dict[str, list[float]], share: float = 0.05) -> dict[str, float]:
    """The fine-tune's training curves as scalars: each series' mean over its first and last
    ``share`` of steps (``finetune_reg_first`` / ``_last``: did the regulariser act?)."""
    out = {}
    for name, values in history.items():
        n = max(1, int(len(values) * share))
        if values:
            out[f"finetune_{name}_first"] = sum(values[:n]) / n
            out[f"finetune_{name}_last"] = sum(values[-n:]) / n
    return out


def run_name(cfg: DictConfig) -> str:
    """Human-readable job name: the method plus the job's own overrides."""
    try:
        extra = HydraConfig.get().job.override_dirname
    except ValueError:  # not under Hydra (library use)
        extra = ""
    return f"{cfg.quant.method}" + (f" [{extra}]" if extra else "")


def calibration_items(items: list[dict], cfg: DictConfig) -> list[dict]:
    """A fixed random draw of training sequences for calibration."""
    n = min(len(items), cfg.calibration.num_batches * cfg.calibration.batch_size)
    return random.Random(cfg.calibration.seed).sample(items, n)


def calibration_batches(cfg: DictConfig, tokenizer, task) -> Iterator[dict]:
    """The calibration draw as padded batches, encoded only when read (float activations never are)."""
    items = calibration_items(encode(tokenizer, task.train, cfg.train.max_length), cfg)
    yield from batches(items, cfg.calibration.batch_size, tokenizer.pad_token_id)


def fp32_predictions(model, ckpt: Path, val_items, task, cfg, tokenizer, device):
    """FP32 (predictions, labels) in validation order and the seconds spent, cached beside the
    checkpoint per validation set, evaluation settings and the code and libraries that evaluate."""
    started = time.perf_counter()
    key = cache.key_of({"validation": task.fingerprint("validation"), "max_length": cfg.train.max_length,
                        "batch_size": cfg.eval.batch_size, "device": device.type,
                        "code": fingerprint(FP32_EVAL_MODULES)})

    def compute() -> dict:
        pred, label = predictions(model, val_items, cfg.eval.batch_size, tokenizer.pad_token_id, device,
                                  desc="evaluate fp32", original_order=True)
        return {"prediction": pred.tolist(), "label": label.tolist()}

    value, _ = cache.cached_json(ckpt.with_name(ckpt.name + ".eval") / f"{key}.json", compute)
    return torch.tensor(value["prediction"]), torch.tensor(value["label"]), time.perf_counter() - started


def ranges_table(state: QuantState) -> pd.DataFrame:
    rows = []
    for name, site in state.sites.items():
        plan, grid = site.plan, site.grid
        lo = (-grid.zero_point * grid.scale)
        hi = (grid.qmax - grid.zero_point) * grid.scale
        rows.append({"site": name, "kind": site.kind, "layer": site.layer, "bits": plan.bits,
                     "estimator": plan.estimator, "k": plan.k if plan.estimator == "peg" else None,
                     "lo": lo.min().item(), "hi": hi.max().item(), "scale_min": grid.scale.min().item(),
                     "scale_max": grid.scale.max().item()})
    return pd.DataFrame(rows)


def prepare(cfg: DictConfig):
    """Validate the config and load what every entry point needs: (device, task, tokenizer).
    Bad input raises :class:`TransquantError` here, before anything is written."""
    config.validate(cfg)
    device = device_of(cfg)
    try:
        task = load_task(cfg.task)
    except DataError as err:
        raise TransquantError(str(err)) from err
    return device, task, models.load_tokenizer(cfg.model)


def run_job(cfg: DictConfig) -> float:
    """One experiment job (fine-tune, calibrate, quantize, evaluate, stats, profile); returns accuracy."""
    device, task, tokenizer = prepare(cfg)
    key = tracking.job_key(cfg, task)
    (Path(cfg.paths.cache_dir) / "jobs").mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(cfg.paths.cache_dir) / "jobs" / f"{key}.lock")):
        finished, stale = tracking.previous_runs(cfg, key)
        if finished is not None and cfg.resume:
            log.info("job already finished in MLflow run %s (resume=true): reusing it", finished.info.run_id)
            tracking.link_reused(cfg, finished)
            return finished.data.metrics["accuracy"]
        return _run(cfg, task, tokenizer, device, key, stale)


def _run(cfg, task, tokenizer, device, key, stale) -> float:
    q = cfg.quant
    pad_id = tokenizer.pad_token_id
    tags = {"model": cfg.model.name, "task": cfg.task.name, "quant_method": q.method}
    with JobRun(cfg, run_name(cfg), tags, key, stale) as run:
        started = time.perf_counter()
        ckpt, was_cached = finetune.finetuned(cfg.model, task, cfg.train, tokenizer, Path(cfg.paths.cache_dir), device)
        run.tag("finetune_cache", "hit" if was_cached else "miss")
        run.tag("checkpoint", str(ckpt))
        metrics = {} if was_cached else {"finetune_seconds": time.perf_counter() - started}
        metrics.update(history_metrics(finetune.history(ckpt)))
        model = models.load_finetuned(ckpt).to(device)
        val_items = encode(tokenizer, task.validation, cfg.train.max_length)
        fp32_pred, labels, metrics["fp32_eval_seconds"] = fp32_predictions(model, ckpt, val_items, task, cfg,
                                                                           tokenizer, device)
        fp32 = percent_correct(fp32_pred, labels)
        log.info("FP32 accuracy %.2f %%", fp32)

        stats = stats_path = None
        if cfg.stats.enabled:  # on the FP32 weights, before they are quantized in place
            t0 = time.perf_counter()
            stats, hit, stats_path = job_statistics(cfg, model, ckpt, task, val_items, tokenizer, device)
            run.tag("stats_cache", "hit" if hit else "miss")
            log_statistics(run, stats)
            metrics["stats_seconds_job"] = time.perf_counter() - t0

        state = quantize_(model, q, calibration_batches(cfg, tokenizer, task), device)
        qa = state.activations
        metrics.update({"quantized_weight_tensors": len(state.weights), "quantized_activation_sites": len(state.sites),
                        "train_examples": len(task.train), "eval_examples": len(task.validation)})
        if state.sites:
            metrics["calibration_seconds"] = state.seconds["calibration"]
            run.table(ranges_table(state), "activation_ranges.csv")
        if "transform" in state.seconds:  # SmoothQuant / OS / OS+: its statistics pass and search
            metrics["transform_seconds"] = state.seconds["transform"]
        if state.sites or state.weights:
            t0 = time.perf_counter()
            with state.active(model):
                pred, _ = predictions(model, val_items, cfg.eval.batch_size, pad_id, device,
                                      desc=f"evaluate {q.method}", original_order=True)
            metrics["eval_seconds"] = time.perf_counter() - t0
        else:
            pred = fp32_pred
        acc = percent_correct(pred, labels)
        metrics.update({"accuracy": acc, "fp32_accuracy": fp32, "accuracy_drop": fp32 - acc,
                        **job_metrics((pred == labels).numpy(), (fp32_pred == labels).numpy())})
        run.metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:  # per example, so any two runs can be compared later
            run.artifact_file(save_predictions(Path(tmp) / PREDICTIONS, pred.numpy(), labels.numpy()))
            if state.sites or state.weights:
                run.artifact_file(state.save(Path(tmp) / STATE_FILE), "quant_state")
        log.info("%s accuracy %.2f %% (FP32 %.2f %%, drop %.2f points)", q.method, acc, fp32, fp32 - acc)

        transformed = state.transform is not None
        fp32_model = (models.load_finetuned(ckpt).to(device) if (stats and (qa or transformed)) or cfg.profile.enabled
                      else None)
        # The reference of the error attribution: the FP32 function with the transformed tensors at
        # the sites (a transform rescales norm outputs on purpose; that is not quantization error).
        reference = fold_(copy.deepcopy(fp32_model), state.transform) if transformed and fp32_model else fp32_model
        if stats is not None:
            if transformed:
                s = stats_config(cfg)
                log_transformed_statistics(run, fp32_statistics(
                    reference, find_sites(reference), sample_items(val_items, s.num_examples), pad_id, device,
                    s.batch_size, s.top_k, s.reservoir, measure_cost=False, special_ids=tokenizer.all_special_ids))
            error_df = None
            if qa is not None:
                t0 = time.perf_counter()
                error_df = quantization_error(reference, model, qa, qa.sites,
                                              sample_items(val_items, cfg.stats.num_examples), pad_id, device,
                                              cfg.stats.batch_size)
                log_quantization_error(run, error_df)
                run.metrics({"error_attribution_seconds": time.perf_counter() - t0})
            log_figures(run, stats, figure_k(cfg), error_df, cache_at=stats_path.with_suffix(".figures"))
        if cfg.profile.enabled:
            _profile(cfg, run, fp32_model, model, state, tokenizer, val_items)
        _log_hydra_files(run)
        return acc


def _profile(cfg, run: JobRun, fp32_model, model, state: QuantState, tokenizer, val_items) -> None:
    """Latency, memory and size of what would ship, timed interleaved with its baselines (PyTorch
    FP32, ONNX Runtime FP32, the peer) in one run; the engine is built from ``state``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transquant-profile-") as workdir:
        values, tags, tables, artifacts = profile_stage(cfg.profile, cfg.hardware, fp32_model, model, state,
                                                        tokenizer, val_items, tokenizer.pad_token_id, Path(workdir))
        log_profile(run, {**values, "profile_seconds": time.perf_counter() - t0})
        for name, table in tables.items():  # engine_op_profile: CSV + MLflow table, as profile_candidates
            log_table(run, table, name)
        for k, v in tags.items():
            run.tag(k, v)
        for path in artifacts:
            run.artifact_file(path, "profile")


def _log_hydra_files(run: JobRun) -> None:
    """The job's resolved config and overrides, as Hydra wrote them."""
    try:
        out = Path(HydraConfig.get().runtime.output_dir) / HydraConfig.get().output_subdir
    except (ValueError, TypeError):
        return
    if out.is_dir():
        run.artifact_dir(out, "hydra")
