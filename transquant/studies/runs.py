"""Runs as the study table: one row per MLflow run (identification columns plus every metric), in
canonical order."""
from __future__ import annotations

import math
from typing import Iterable

import pandas as pd

from .labels import (
    NAIVE,
    effective_grouping,
    family_of,
    finetune_label,
    finetune_sort_key,
    finetune_suffix,
    join_patterns,
    method_defaults,
    method_label,
    method_sort_key,
    parse_param,
    quant_params,
)


def calibration_sequences(params: dict[str, str], q: dict) -> int | None:
    """Training sequences the activation ranges came from (``num_batches`` x ``batch_size``); None
    for a run that quantizes no activation (nothing is calibrated) or that did not log the sizes."""
    nb, bs = parse_param(params.get("calibration.num_batches")), parse_param(params.get("calibration.batch_size"))
    act_bits = q.get("act_bits", method_defaults(q.get("method", "?")).get("act_bits"))
    return nb * bs if isinstance(nb, int) and isinstance(bs, int) and act_bits is not None else None


# The naive family's name in tables whose rows do not carry the bit widths (``mitigations``).
NAIVE_NAME = "min-max"


def _at_defaults(q: dict) -> dict:
    """``q`` with the widths and the weight granularity of its method's preset."""
    d = method_defaults(q.get("method", "?"))
    return {**q, "weight_bits": d.get("weight_bits"), "act_bits": d.get("act_bits"),
            "weight_granularity": d.get("weight_granularity")}


def mitigation_label(q: dict) -> str:
    """The method without its bit widths and weight granularity (the ``mitigations`` table's rows,
    whose bits and granularity are columns): ``SmoothQuant``, ``PEG K=6 sorted (paper)``, and for
    the naive family ``min-max`` (``min-max +bias-corr``) instead of its preset's widths."""
    d = method_defaults(q.get("method", "?"))
    label = method_label(_at_defaults(q))
    if family_of(q.get("method", "?")) in NAIVE and d.get("weight_bits") is not None and d.get("act_bits") is not None:
        prefix = f"W{d['weight_bits']}A{d['act_bits']}"
        label = NAIVE_NAME + label.removeprefix(prefix) if label.startswith(prefix) else label
    return label


def run_record(run_id: str, params: dict[str, str], metrics: dict[str, float], tags: dict[str, str],
               status: str = "FINISHED", start_time: int | None = None, end_time: int | None = None) -> dict:
    """One row of the study table: identification columns plus every metric.

    A run fine-tuned with a non-default variant (``finetune``) has `` [ft: <variant>]`` at the end
    of ``label``, ``family``, ``base`` and ``mitigation``, so no table pools two variants as seeds
    of one method; ``quant_label`` keeps the label from the ``quant.*`` params alone."""
    q = quant_params(params)
    seed = parse_param(params.get("train.seed"))
    label = method_label(q)
    ft = finetune_label(params)
    ft_suffix = finetune_suffix(ft)
    d = method_defaults(q.get("method", "?"))
    wb, ab = q.get("weight_bits", d.get("weight_bits")), q.get("act_bits", d.get("act_bits"))
    rec = {
        "run_id": run_id,
        "status": status,
        "name": tags.get("mlflow.runName", ""),
        "parent": tags.get("mlflow.parentRunId"),
        "model": params.get("model.name", tags.get("model", "")),
        "task": params.get("task.name", tags.get("task", "")),
        "seed": seed,
        "method": q.get("method", tags.get("quant_method", "?")),
        "label": label + ft_suffix,
        "quant_label": label,
        "finetune": ft,
        "calibration_sequences": calibration_sequences(params, q),
        "family": method_label(q, with_bits=False) + ft_suffix,
        "base": method_label(q, with_exclude=False) + ft_suffix,
        "k": q.get("k") if family_of(q.get("method", "")) == "peg" or q.get("peg_sites") else None,
        "grouping": effective_grouping(q) if family_of(q.get("method", "")) == "peg" or q.get("peg_sites") else None,
        "percentile": q.get("percentile") if q.get("estimator") == "percentile" else None,
        "weight_bits": q.get("weight_bits"),
        "act_bits": q.get("act_bits"),
        "bits": f"W{wb}A{ab}" if wb is not None and ab is not None else None,
        "weight_granularity": q.get("weight_granularity", d.get("weight_granularity")) if wb is not None else None,
        "transform": q.get("transform", d.get("transform")) or "none",
        "bias_correction": bool(q.get("bias_correction", d.get("bias_correction"))),
        "mitigation": mitigation_label(q) + ft_suffix,
        "act_exclude": join_patterns(q.get("act_exclude") or []),
        "peg_sites": join_patterns(q.get("peg_sites") or []),
        "high_bits_sites": join_patterns(q.get("high_bits_sites") or []),
        "finetune_cache": tags.get("finetune_cache"),
        "stats_cache": tags.get("stats_cache"),
        "checkpoint": tags.get("checkpoint"),
        "engine_precision": tags.get("engine_precision"),
        "fp32_attention": tags.get("fp32_attention"),
        "best": tags.get("transquant.best") == "true",
        "pareto": tags.get("transquant.pareto") == "true",
        "wall_seconds": (end_time - start_time) / 1000.0 if start_time and end_time else None,
        "start_time": start_time,
        "source_hash": tags.get("transquant.source_hash"),
        **{k.removeprefix("transquant."): v for k, v in tags.items() if k.startswith("transquant.version.")},
        "_sort": (*method_sort_key(q), finetune_sort_key(ft)),
        "_mitigation_sort": (*method_sort_key(_at_defaults(q)), finetune_sort_key(ft)),
    }
    rec.update(metrics)
    if "fp32_accuracy" not in metrics and "accuracy" in metrics and "accuracy_drop" in metrics:
        rec["fp32_accuracy"] = metrics["accuracy"] + metrics["accuracy_drop"]  # drop = fp32 - accuracy
    return rec


def records_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Records in canonical order (method, calibration size, seed, start time) with a stable index.

    When the runs were calibrated on different numbers of sequences, ``label``, ``family`` and
    ``base`` (and ``mitigation``) end in `` cal=<sequences>``, so no table pools two calibration sizes as seeds of one
    method; ``quant_label`` keeps the label from the ``quant.*`` params alone."""
    df = pd.DataFrame(list(records))
    if df.empty:
        return df
    cal = df["calibration_sequences"]
    if cal.nunique() > 1:
        suffix = cal.map(lambda n: "" if pd.isna(n) else f" cal={int(n)}")
        for col in ("label", "family", "base", "mitigation"):
            df[col] = df[col] + suffix
    df["_seed_key"] = df["seed"].map(lambda s: (0, s) if isinstance(s, (int, float)) else (1, str(s)))
    df = df.sort_values(by=["_sort", "calibration_sequences", "_seed_key", "start_time", "run_id"],
                        key=lambda col: col.map(_sortable) if col.name in ("_sort", "_seed_key") else col,
                        kind="stable")
    return df.drop(columns=["_seed_key"]).reset_index(drop=True)


def _sortable(v):
    """Tuples with None/mixed types -> comparable tuples (pandas sorts an object column by <)."""
    if isinstance(v, tuple):
        return tuple(_sortable(x) for x in v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return (1, "")
    if isinstance(v, (int, float, bool)):
        return (0, v)
    return (0.5, str(v))
