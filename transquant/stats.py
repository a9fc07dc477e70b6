"""Stats only: ``python -m transquant.stats [overrides]`` — does my model have outliers?

Runs just the FP32 statistics stage (:mod:`transquant.statistics`) on the fine-tuned model
(trained first if the cache has none) or, with ``stats.finetune=false``, on the pretrained
encoder, prints the per-layer table and logs an MLflow run tagged ``transquant.role=stats``
with ``activation_stats.csv``, ``outlier_channels.json`` and the figures. Statistics are cached
per checkpoint and validation sample, so asking twice costs nothing.

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

from .errors import TransquantError  # noqa: E402
from .paths import CONF_DIR, CONF_PATH  # noqa: E402

STATS_DEFAULTS = CONF_PATH / "stats" / "default.yaml"
PRINT_KINDS = ("embedding_sum", "attn_residual", "attn_norm", "ffn_intermediate", "ffn_residual", "ffn_norm")


def stats_config(cfg: DictConfig) -> DictConfig:
    """``cfg.stats`` over the defaults of ``conf/stats/default.yaml`` (the group may be absent)."""
    base = OmegaConf.load(STATS_DEFAULTS)
    return OmegaConf.merge(base, cfg.get("stats") or {})


def validate_stats(s: DictConfig) -> None:
    def positive(name, allow_none=False):
        v = s[name]
        if allow_none and v is None:
            return
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise TransquantError(f"stats.{name}={v}: must be an integer >= 1{' or null' if allow_none else ''}")

    positive("num_examples", allow_none=True)
    positive("batch_size")
    positive("top_k")
    if not (isinstance(s.reservoir, int) and not isinstance(s.reservoir, bool) and s.reservoir >= 0):
        raise TransquantError(f"stats.reservoir={s.reservoir}: must be an integer >= 0")
    for key in ("finetune", "enabled"):
        if not isinstance(s[key], bool):
            raise TransquantError(f"stats.{key}={s[key]}: must be true or false")


def figure_k(cfg: DictConfig) -> int | None:
    """PEG group count for the figures: the config's when it is a PEG method, else the default."""
    q = cfg.quant
    return int(q.k) if q.get("peg_sites") and q.k > 1 else None


def printable(stats, tokenizer) -> "pd.DataFrame":  # noqa: F821
    """The per-layer table printed to stdout: residual sums, LayerNorm outputs, FFN intermediate."""
    df = stats.table()
    df = df[df["kind"].isin(PRINT_KINDS)].copy()
    df["max_token"] = [tokenizer.convert_ids_to_tokens(int(t)) if t is not None and not _isna(t) else ""
                       for t in df["max_token_id"]]
    cols = ["site", "kurtosis", "kurtosis_non_special", "top1pct_channel_energy", "max_abs", "median_abs",
            "max_over_median", "top_channels", "max_token", "max_token_position"]
    return df[cols].rename(columns={"kurtosis_non_special": "kurt_no_special", "top1pct_channel_energy": "top1%_energy",
                                    "max_over_median": "max/median", "max_token_position": "pos"})


def _isna(v) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def job_statistics(cfg: DictConfig, model, checkpoint, task, val_items: list[dict], tokenizer, device):
    """Cached FP32 statistics of ``model`` for a job: (stats, was_cached, cache path).

    ``checkpoint`` identifies the weights (the fine-tuned checkpoint path, or any JSON-able
    identity); ``val_items`` is the encoded validation split, sampled here with ``stats.*``.
    Call it before the weights are quantized in place."""
    from .quant.sites import find_sites
    from .statistics import cached_fp32_statistics, sample_items, stats_cache_path

    s = stats_config(cfg)
    special = sorted(tokenizer.all_special_ids)
    path = stats_cache_path(cfg.paths.cache_dir, checkpoint, task.fingerprint("validation"), s.num_examples,
                            top_k=s.top_k, reservoir=s.reservoir, max_length=cfg.train.max_length,
                            special_ids=special)
    items = sample_items(val_items, s.num_examples)
    stats, hit = cached_fp32_statistics(path, model, find_sites(model), items, tokenizer.pad_token_id, device,
                                        s.batch_size, s.top_k, s.reservoir, special_ids=special)
    return stats, hit, path


def run_stats(cfg: DictConfig):
    """The stats-only job; returns the :class:`~transquant.statistics.ActivationStats`."""
    import pandas as pd

    from . import finetune, models
    from .cache import key_of
    from .figures import log_figures
    from .pipeline import prepare
    from .statistics import log_statistics
    from .tasks import encode
    from .tracking import JobRun, job_key

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
            model = models.load_pretrained(cfg.model, num_labels=2, seed=cfg.train.seed)
            checkpoint = {"pretrained": models.identity(cfg.model)}
        model = model.to(device).eval()
        val_items = encode(tokenizer, task.validation, cfg.train.max_length)
        stats, hit, path = job_statistics(cfg, model, checkpoint, task, val_items, tokenizer, device)
        stats.meta["label"] = f"{cfg.model.name} ({which})"
        run.tag("stats_cache", "hit" if hit else "miss")
        log_statistics(run, stats)
        log_figures(run, stats, figure_k(cfg))
        with pd.option_context("display.width", 250, "display.max_rows", 500, "display.max_columns", 20,
                               "display.float_format", "{:.4g}".format):
            print(f"FP32 activation statistics: {cfg.model.name} ({which}), {cfg.task.name} validation, "
                  f"{stats.meta['examples']} examples / {stats.meta['tokens']} non-pad tokens"
                  + ("" if not hit else " (cached)"))
            print(printable(stats, tokenizer).to_string(index=False))
        res = stats.outliers().get("residual_stream", {})
        top = ", ".join(f"{c} ({100 * p:.0f} %)" for c, p in list(res.get("persistence", {}).items())[:6])
        print(f"outlier channels of the residual stream (share of residual sums where top-{stats.top_k}): {top}")
        meta = stats.meta
        if meta.get("stats_cost_vs_fp32_pass"):
            print(f"stats pass {meta['stats_seconds']:.1f} s = {meta['stats_cost_vs_fp32_pass']:.2f} x one FP32 "
                  f"forward pass ({meta['fp32_pass_seconds']:.1f} s)")
        print(f"MLflow run {run.run_id} ({cfg.tracking.uri}); cache {path}")
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
