"""What the statistics, the error attribution and the profile put into a job's MLflow run (the names
are part of the public contract). Metrics are what a user compares across runs: the FFN residual
sum's per-layer curves (step = layer), a few scalars. Per-site and per-candidate detail goes to
tables, one row per site or candidate: a CSV artifact (full precision, infinities kept) and the
same rows as an MLflow table (``<name>.json``, shown as a table on the run page; non-finite values
are empty there)."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pandas as pd

from ..deploy.profiling import CANDIDATE_PREFIXES
from .error_attribution import outlier_error_share
from .results import ActivationStats

HEADLINE_KIND = "ffn_residual"  # the un-prefixed per-layer metrics
HEADLINE_STATS = ("kurtosis", "variance", "top1pct_channel_energy", "max_abs")
# A profiled candidate's figures, the columns of ``profile_candidates``.
CANDIDATE_FIGURES = ("latency_p50_ms", "latency_p95_ms", "latency_mean_ms", "throughput_seq_s", "model_size_mb",
                     "peak_memory_mb", "load_memory_mb", "inference_memory_mb")
# Profile values only in that table: the baselines' own figures the report does not compare across runs.
PROFILE_TABLE_ONLY = frozenset({
    "latency_mean_ms", "load_memory_mb", "inference_memory_mb", "fp32_throughput_seq_s", "fp32_peak_memory_mb",
    "fp32_load_memory_mb", "fp16_peak_memory_mb", "ort_fp32_latency_p50_ms", "ort_fp32_peak_memory_mb", "ort_fp32_speedup_vs_torch_fp32",
    "peer_latency_p50_ms", "peer_model_size_mb", "peer_peak_memory_mb", "peer_speedup_vs_torch_fp32",
    "fp16_speedup_vs_torch_fp32"})


def _finite(v) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def log_table(run, df: pd.DataFrame, name: str) -> list[str]:
    """``<name>.csv`` and the MLflow table ``<name>.json``; returns both names."""
    run.table(df, f"{name}.csv")
    run.client.log_table(run.run_id, data=df, artifact_file=f"{name}.json")
    return [f"{name}.csv", f"{name}.json"]


def _headline_curves(run, rows, names: tuple[str, ...]) -> None:
    """``names`` of the FFN residual sum's rows as metrics at step = layer."""
    for r in rows:
        if r["kind"] == HEADLINE_KIND:
            run.metrics({k: _finite(r[k]) for k in names}, step=0 if pd.isna(r["layer"]) else int(r["layer"]))


def log_statistics(run, stats: ActivationStats) -> list[str]:
    """Per-layer metrics (step = layer index) and the artifacts; returns the artifact names.

    Metrics: ``kurtosis``, ``variance``, ``top1pct_channel_energy``, ``max_abs`` of the FFN
    residual sum (``ffn.residual``); scalars ``stats_seconds``, ``stats_cost_vs_fp32_pass``,
    ``stats_fp32_pass_seconds``, ``stats_examples``, ``stats_tokens``. Every site, with its layer
    (empty outside the layers), in the table ``activation_stats``.
    """
    table = stats.table()
    _headline_curves(run, table.to_dict("records"), HEADLINE_STATS)
    meta = stats.meta
    run.metrics({"stats_seconds": meta.get("stats_seconds"),
                 "stats_cost_vs_fp32_pass": meta.get("stats_cost_vs_fp32_pass"),
                 "stats_fp32_pass_seconds": meta.get("fp32_pass_seconds"), "stats_examples": meta.get("examples"),
                 "stats_tokens": meta.get("tokens")})
    names = log_table(run, table, "activation_stats")
    _log_json(run, stats.outliers(), "outlier_channels.json")
    return names + ["outlier_channels.json"]


def log_transformed_statistics(run, stats: ActivationStats) -> list[str]:
    """The statistics of the FP32 model after a function-preserving transform (SmoothQuant, OS,
    OS+) as the table ``activation_stats_transformed``, to set beside ``activation_stats``: what
    the transform did to the tensors that get quantized."""
    return log_table(run, stats.table(), "activation_stats_transformed")


def _log_json(run, payload, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / name
        f.write_text(json.dumps(payload, indent=1))
        run.artifact_file(f)


def log_quantization_error(run, df: pd.DataFrame) -> list[str]:
    """Step metric ``sqnr_db`` (ffn.residual, step = layer); the aggregate ``outlier_error_share``
    (share of the residual sums' total squared error that sits in their top-1 % channels;
    ``outlier_error_share.ffn_residual`` for the FFN ones only); every site's ``sqnr_db``,
    ``local_sqnr_db`` and ``top1pct_error_share`` in the table ``quantization_error``. Infinite
    SQNRs (no error) are not logged as metrics.

    Note what the share measures: where the error *lands*. Outliers also cause error in the
    other channels, by stretching a per-tensor range; that shows in ``local_sqnr_db`` and
    in comparing methods (per-tensor vs PEG), not in this share."""
    _headline_curves(run, df.to_dict("records"), ("sqnr_db",))
    run.metrics({"outlier_error_share": _finite(outlier_error_share(df)),
                 "outlier_error_share.ffn_residual": _finite(outlier_error_share(df, (HEADLINE_KIND,)))})
    return log_table(run, df, "quantization_error")


def log_profile(run, values: dict[str, float]) -> list[str]:
    """The profile's values as metrics except :data:`PROFILE_TABLE_ONLY`; every candidate's
    :data:`CANDIDATE_FIGURES` and its ``speedup_vs_torch_fp32`` (paired, as the profile logs it) in
    the table ``profile_candidates``. Returns the table's artifact names."""
    run.metrics({k: v for k, v in values.items() if k not in PROFILE_TABLE_ONLY})
    rows = [{"candidate": name, **{f: values.get(prefix + f) for f in CANDIDATE_FIGURES},
             "speedup_vs_torch_fp32": 1.0 if name == "fp32" else values.get(prefix + "speedup_vs_torch_fp32")}
            for name, prefix in CANDIDATE_PREFIXES if values.get(prefix + "latency_p50_ms") is not None]
    return log_table(run, pd.DataFrame(rows), "profile_candidates")
