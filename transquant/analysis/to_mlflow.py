"""What the statistics and the error attribution put into a job's MLflow run: per-layer step
metrics, scalars and table artifacts (the names are part of the public contract)."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pandas as pd

from .error_attribution import outlier_error_share
from .results import ActivationStats

HEADLINE_KIND = "ffn_residual"  # the un-prefixed per-layer metrics
HEADLINE_STATS = ("kurtosis", "variance", "top1pct_channel_energy", "max_abs")


def _finite(v) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def _layer_metrics(run, stats: ActivationStats, prefix: str, headline: bool) -> None:
    """``<prefix>.<kind>.<stat>`` per site at step = layer (0 outside the layers); with
    ``headline`` also the un-prefixed statistics of the FFN residual sum."""
    stat_names = HEADLINE_STATS + ("max_over_median",)
    per_step: dict[int, dict[str, float]] = {}
    for s in stats.sites:
        row = per_step.setdefault(s.step, {})
        values = {k: getattr(s, k) for k in stat_names}
        for k, v in values.items():
            row[f"{prefix}.{s.kind}.{k}"] = _finite(v)
        if headline and s.kind == HEADLINE_KIND:
            for k in HEADLINE_STATS:
                row[k] = _finite(values[k])
    for step, values in sorted(per_step.items()):
        run.metrics(values, step=step)


def log_statistics(run, stats: ActivationStats) -> list[str]:
    """Per-layer metrics (step = layer index) and the artifacts; returns the artifact names.

    Metrics: ``kurtosis``, ``variance``, ``top1pct_channel_energy``, ``max_abs`` for the FFN
    residual sum (``ffn.residual``); every kind (that one included) as ``stats.<kind>.<stat>``
    with also ``max_over_median``; sites outside the layers (embeddings, pooler) at step 0.
    Scalars: ``stats_seconds``, ``stats_cost_vs_fp32_pass``, ``stats_examples``, ``stats_tokens``.
    """
    _layer_metrics(run, stats, "stats", headline=True)
    meta = stats.meta
    run.metrics({"stats_seconds": meta.get("stats_seconds"),
                 "stats_cost_vs_fp32_pass": meta.get("stats_cost_vs_fp32_pass"),
                 "stats_fp32_pass_seconds": meta.get("fp32_pass_seconds"), "stats_examples": meta.get("examples"),
                 "stats_tokens": meta.get("tokens")})
    run.table(stats.table(), "activation_stats.csv")
    _log_json(run, stats.outliers(), "outlier_channels.json")
    return ["activation_stats.csv", "outlier_channels.json"]


def log_transformed_statistics(run, stats: ActivationStats) -> list[str]:
    """The statistics of the FP32 model after a function-preserving transform (SmoothQuant, OS,
    OS+): ``transformed.<kind>.<stat>`` per layer and ``activation_stats_transformed.csv``, to
    set beside ``stats.<kind>.<stat>``: what the transform did to the tensors that get quantized."""
    _layer_metrics(run, stats, "transformed", headline=False)
    run.table(stats.table(), "activation_stats_transformed.csv")
    return ["activation_stats_transformed.csv"]


def _log_json(run, payload, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / name
        f.write_text(json.dumps(payload, indent=1))
        run.artifact_file(f)



def log_quantization_error(run, df: pd.DataFrame) -> list[str]:
    """Step metrics ``sqnr_db`` (ffn.residual, step = layer), ``stats.<kind>.sqnr_db``,
    ``stats.<kind>.local_sqnr_db`` and ``stats.<kind>.top1pct_error_share`` per kind; the
    aggregate ``outlier_error_share`` (share of the residual sums' total squared error that
    sits in their top-1 % channels; ``outlier_error_share.ffn_residual`` for the FFN ones
    only) and ``quantization_error.csv``. Infinite SQNRs (no error) are not logged as metrics.

    Note what the share measures: where the error *lands*. Outliers also cause error in the
    other channels, by stretching a per-tensor range; that shows in ``local_sqnr_db`` and
    in comparing methods (per-tensor vs PEG), not in this share."""
    per_step: dict[int, dict[str, float]] = {}
    for r in df.itertuples(index=False):
        step = 0 if pd.isna(r.layer) else int(r.layer)
        row = per_step.setdefault(step, {})
        row[f"stats.{r.kind}.sqnr_db"] = _finite(r.sqnr_db)
        row[f"stats.{r.kind}.local_sqnr_db"] = _finite(r.local_sqnr_db)
        row[f"stats.{r.kind}.top1pct_error_share"] = _finite(r.top1pct_error_share)
        if r.kind == HEADLINE_KIND:
            row["sqnr_db"] = _finite(r.sqnr_db)
    for step, values in sorted(per_step.items()):
        run.metrics(values, step=step)
    run.metrics({"outlier_error_share": _finite(outlier_error_share(df)),
                 "outlier_error_share.ffn_residual": _finite(outlier_error_share(df, (HEADLINE_KIND,)))})
    run.table(df, "quantization_error.csv")
    return ["quantization_error.csv"]
