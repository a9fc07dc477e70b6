"""Stats only: ``python -m transquant.stats [overrides]`` — does my model have outliers?

Runs just the FP32 statistics stage (:mod:`transquant.analysis.statistics`) on the fine-tuned model
(trained first if the cache has none) or, with ``stats.finetune=false``, on the pretrained
encoder, prints the per-layer table and the method suggested at the bit budget
(``stats.weight_bits``, ``stats.act_bits``: :mod:`transquant.analysis.suggest`), and logs an MLflow
run tagged ``transquant.role=stats`` with ``activation_stats.csv``, ``outlier_channels.json``, the
figures and the page ``stats.html`` (outlier map, figures, per-layer table, the suggestion and its
rule), also written to ``<stats.page_dir>/stats-<model>/``. Statistics are cached per checkpoint
and validation sample, so asking twice costs nothing.

    python -m transquant.stats model=minilm-l6 task=qnli-squad stats.finetune=false

(``+stats=default stats.finetune=false`` while ``conf/config.yaml`` does not list the ``stats``
group in its defaults; without any ``stats`` override the defaults of
``conf/stats/default.yaml`` apply.)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="(?s).*_execution_whitelist_")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from .analysis.job import figure_k, printable, stats_config, validate_stats  # noqa: E402
from .core.errors import TransquantError  # noqa: E402
from .core.paths import CONF_DIR  # noqa: E402


def run_stats(cfg: DictConfig):
    """The stats-only job; returns the :class:`~transquant.analysis.results.ActivationStats`."""
    import pandas as pd

    from . import models
    from .analysis.job import job_statistics
    from .analysis.stats_page import log_stats_page
    from .analysis.suggest import suggest
    from .analysis.to_mlflow import log_statistics
    from .core.cache import key_of
    from .core.tracking import JobRun, job_key
    from .data.tasks import encode
    from .pipeline import prepare
    from .train import finetune

    s = stats_config(cfg)
    validate_stats(s)
    device, task, tokenizer = prepare(cfg)
    which = "fine-tuned" if s.finetune else "pretrained"
    tags = {"transquant.role": "stats", "model": cfg.model.name, "task": cfg.task.name, "stats_model": which}
    # Its own job key: a stats run must never be taken for a finished pipeline job (resume).
    key = key_of({"role": "stats", "job": job_key(cfg, task), "stats": OmegaConf.to_container(s)})
    with JobRun(cfg, f"stats: {cfg.model.name} ({which}) on {cfg.task.name}", tags, key=key) as run:
        if s.finetune:
            ckpt, was_cached = finetune.finetuned(cfg.model, task, cfg.train, tokenizer, Path(cfg.paths.cache_dir),
                                                  device)
            run.tag("finetune_cache", "hit" if was_cached else "miss")
            run.tag("checkpoint", str(ckpt))
            model = models.load_finetuned(ckpt)
            checkpoint = str(ckpt)
        else:
            model = models.load_pretrained(cfg.model, num_labels=2, seed=cfg.train.seed,
                                           pad_token_id=tokenizer.pad_token_id)
            checkpoint = {"pretrained": models.identity(cfg.model)}
        model = model.to(device).eval()
        val_items = encode(tokenizer, task.validation, cfg.train.max_length)
        stats, hit, path = job_statistics(cfg, model, checkpoint, task, val_items, tokenizer, device)
        stats.meta["label"] = f"{cfg.model.name} ({which})"
        run.tag("stats_cache", "hit" if hit else "miss")
        log_statistics(run, stats)
        per_layer = printable(stats, tokenizer)
        suggestion = suggest(stats, s.weight_bits, s.act_bits)
        page_dir = Path(s.page_dir) / f"stats-{cfg.model.name}" if s.page_dir else None
        page = log_stats_page(run, stats, suggestion, per_layer, figure_k(cfg), page_dir)
        with pd.option_context("display.width", 250, "display.max_rows", 500, "display.max_columns", 20,
                               "display.float_format", "{:.4g}".format):
            print(f"FP32 activation statistics: {cfg.model.name} ({which}), {cfg.task.name} validation, "
                  f"{stats.meta['examples']} examples / {stats.meta['tokens']} non-pad tokens"
                  + ("" if not hit else " (cached)"))
            print(per_layer.to_string(index=False))
        res = stats.outliers().get("residual_stream", {})
        top = ", ".join(f"{c} ({100 * p:.0f} %)" for c, p in list(res.get("persistence", {}).items())[:6])
        print(f"outlier channels of the residual stream (share of residual sums where top-{stats.top_k}): {top}")
        meta = stats.meta
        if meta.get("stats_cost_vs_fp32_pass"):
            print(f"stats pass {meta['stats_seconds']:.1f} s = {meta['stats_cost_vs_fp32_pass']:.2f} x one FP32 "
                  f"forward pass ({meta['fp32_pass_seconds']:.1f} s)")
        print(f"suggested at W{s.weight_bits}A{s.act_bits}: {suggestion.command}\n  why: {suggestion.reason}")
        print(f"MLflow run {run.run_id} ({cfg.tracking.uri}); cache {path}")
    print(f"stats page: {page if page else 'stats.html in the MLflow run (stats.page_dir=null)'}")
    return stats


@hydra.main(config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_stats(cfg)
    except TransquantError as err:
        print(f"transquant: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
