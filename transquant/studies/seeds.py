"""Statistics over seeds.

* :func:`seed_summary` is the per-method statistic over seeds: median, min–max, mean, sample
  standard deviation and a percentile-bootstrap 95 % interval of the median (fixed RNG seed, so
  the report is reproducible). The bootstrap interval is never wider than min–max and equals it
  for n <= 5 (it narrows from about 6-7 seeds); with n = 1 every statistic collapses to the single
  value (no spread is claimed).
* :func:`paired_deltas` compares two methods seed by seed (same fine-tuned checkpoint): an
  effect is *consistent* when every seed's difference has the same sign, which three seeds can
  show and a single seed cannot.
* :func:`study_metrics` are a study's parent-run metrics: per method, seed statistics of accuracy
  and of the drop vs FP32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from .labels import slug


@dataclass(frozen=True)
class SeedSummary:
    n: int
    median: float
    min: float
    max: float
    mean: float
    std: float          # sample standard deviation (ddof=1); 0 for n = 1
    ci_lo: float        # percentile-bootstrap 95 % interval of the median
    ci_hi: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": getattr(self, k) for k in ("n", "median", "min", "max", "mean", "std", "ci_lo", "ci_hi")}


def bootstrap_median_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median; deterministic (fixed generator seed)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    medians = np.median(x[rng.integers(0, x.size, size=(n_boot, x.size))], axis=1)
    a = (1.0 - level) / 2.0
    return float(np.quantile(medians, a)), float(np.quantile(medians, 1.0 - a))


def seed_summary(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> SeedSummary:
    """Median, min–max, mean, std and bootstrap interval of one method's per-seed values."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size == 0:
        nan = math.nan
        return SeedSummary(0, nan, nan, nan, nan, nan, nan, nan)
    lo, hi = bootstrap_median_ci(x, n_boot=n_boot, seed=seed)
    return SeedSummary(int(x.size), float(np.median(x)), float(x.min()), float(x.max()), float(x.mean()),
                       float(x.std(ddof=1)) if x.size > 1 else 0.0, lo, hi)


def aggregate(df: pd.DataFrame, by: str | list[str] = "label", value: str = "accuracy") -> pd.DataFrame:
    """Per group: seed statistics of ``value`` (one row per group, groups in table order).

    Several runs of the same group and seed (a repeated job) are averaged first, so a method
    run twice on one seed does not count as two seeds."""
    by = [by] if isinstance(by, str) else list(by)
    if df.empty or value not in df:
        return pd.DataFrame(columns=[*by, "n", "median", "min", "max", "mean", "std", "ci_lo", "ci_hi"])
    ok = df[df[value].notna()]
    rows = []
    for keys, grp in ok.groupby(by, sort=False, dropna=False):  # order of first appearance
        keys = keys if isinstance(keys, tuple) else (keys,)
        per_seed = grp.groupby(grp["seed"].map(str), sort=True)[value].mean()
        rows.append({**dict(zip(by, keys)), **seed_summary(per_seed.to_list()).as_dict()})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class PairedDelta:
    n: int
    median: float
    min: float
    max: float
    consistent: bool  # every paired difference has the same (non-zero) sign


def paired_deltas(a: dict, b: dict) -> PairedDelta:
    """Differences a[seed] - b[seed] over the seeds both have (e.g. a method vs FP32)."""
    common = sorted(set(a) & set(b), key=str)
    d = np.asarray([a[s] - b[s] for s in common], dtype=float)
    if d.size == 0:
        return PairedDelta(0, math.nan, math.nan, math.nan, False)
    consistent = bool(d.size > 1 and (np.all(d > 0) or np.all(d < 0)))
    return PairedDelta(int(d.size), float(np.median(d)), float(d.min()), float(d.max()), consistent)


def study_metrics(df: pd.DataFrame) -> dict[str, float]:
    """Parent-run metrics of a study: per method, seed statistics of accuracy and of the drop vs
    FP32 (``median_accuracy.<slug>``, ``min_accuracy.<slug>``, ``max_accuracy.<slug>``,
    ``median_accuracy_drop.<slug>``, ``seeds.<slug>``)."""
    out: dict[str, float] = {}
    if df.empty or "accuracy" not in df:
        return out
    acc = aggregate(df, "label", "accuracy")
    drop = aggregate(df, "label", "accuracy_drop").set_index("label") if "accuracy_drop" in df else None
    for _, row in acc.iterrows():
        key = slug(row["label"])
        out[f"median_accuracy.{key}"] = row["median"]
        out[f"min_accuracy.{key}"] = row["min"]
        out[f"max_accuracy.{key}"] = row["max"]
        out[f"seeds.{key}"] = row["n"]
        if drop is not None and row["label"] in drop.index:
            out[f"median_accuracy_drop.{key}"] = drop.loc[row["label"], "median"]
    return {k: float(v) for k, v in out.items() if v is not None and not math.isnan(v)}
