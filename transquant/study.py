"""Whole studies: method identification from logged params, seed statistics, Pareto fronts.

Everything here is a pure function of MLflow-style values (params are strings, metrics floats),
so the report works on any run, whichever command produced it, and the arithmetic is testable
without MLflow.

* :func:`method_label` names a run's method from its ``quant.*`` params alone: the knobs of
  ``conf/quant/<method>.yaml`` are the defaults, and every knob that differs is spelled out
  (``PEG K=4 sorted``, ``percentile p=99.9``, ``W8A8 excl *.ffn.residual``, ``mixed W8A6``); the
  2021 authors' exact presets (``conf/quant/*_paper.yaml``) say so: ``W8A8 (paper)``,
  ``mixed W8A{8,16} (paper)``, ``PEG K=6 sorted (paper)``.
* :func:`seed_summary` is the per-method statistic over seeds: median, min–max, mean, sample
  standard deviation and a percentile-bootstrap 95 % interval of the median (fixed RNG seed, so
  the report is reproducible). The bootstrap interval is never wider than min–max and equals it
  for n <= 5 (it narrows from about 6-7 seeds); with n = 1 every statistic collapses to the single
  value (no spread is claimed).
* :func:`paired_deltas` compares two methods seed by seed (same fine-tuned checkpoint): an
  effect is *consistent* when every seed's difference has the same sign, which three seeds can
  show and a single seed cannot.
"""
from __future__ import annotations

import ast
import functools
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .paths import CONF_PATH as CONF_DIR

# Display order of method families in every table (unknown families sort after, by name).
FAMILY_ORDER = ("fp32", "w8a32", "w32a8", "w8a8", "mixed", "peg", "percentile")
GROUPING_ORDER = ("contiguous", "sorted", "gap")
NAIVE = ("fp32", "w8a8", "w8a32", "w32a8")  # families named by their bit widths alone
QUANT_KEYS = ("method", "weight_bits", "weight_estimator", "act_bits", "estimator", "percentile", "act_sites",
              "act_exclude", "high_bits", "high_bits_sites", "k", "permute", "grouping", "peg_sites", "share_groups")
PAPER_SUFFIX = "_paper"  # conf/quant/<family>_paper.yaml: the 2021 authors' exact preset of a family
FAMILY_NAMES = {"peg": "PEG", "mixed": "mixed", "percentile": "percentile", "mixed_paper": "mixed W8A{8,16}"}
# Site kinds in forward order, for ordering leave-one-out rows.
SITE_ORDER = ("embeddings.sum", "embeddings.norm", "attn.query", "attn.key", "attn.value", "attn.scores",
              "attn.probs", "attn.context", "attn.output", "attn.residual", "attn.norm", "ffn.intermediate",
              "ffn.output", "ffn.residual", "ffn.norm", "pooler", "logits")


# --- params -------------------------------------------------------------------------------------

def parse_param(value):
    """An MLflow param string (``str()`` of the resolved config value) back to a Python value."""
    if not isinstance(value, str):
        return value
    s = value.strip()
    if s in ("None", "null", ""):
        return None
    if s in ("True", "true"):
        return True
    if s in ("False", "false"):
        return False
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s


def quant_params(params: dict[str, str]) -> dict:
    """The ``quant.*`` knobs of a run, parsed; missing knobs are absent."""
    return {k: parse_param(params[f"quant.{k}"]) for k in QUANT_KEYS if f"quant.{k}" in params}


@functools.lru_cache(maxsize=None)
def _method_defaults(method: str) -> dict:
    """The knobs of conf/quant/<method>.yaml over conf/quant/fp32.yaml (fp32's if unknown)."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(CONF_DIR / "quant" / "fp32.yaml")
    f = CONF_DIR / "quant" / f"{method}.yaml"
    if f.is_file():
        own = OmegaConf.load(f)
        own.pop("defaults", None)
        base = OmegaConf.merge(base, own)
    return OmegaConf.to_container(base)


def method_defaults(method: str) -> dict:
    return dict(_method_defaults(method))


def effective_grouping(q: dict) -> str:
    """PEG grouping as executed: permute=false means contiguous blocks (quant/ptq.peg_grouping)."""
    return q.get("grouping", "sorted") if q.get("permute", True) else "contiguous"


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _bits(wb, ab) -> str:
    return f"W{wb or 32}A{ab or 32}"


def _patterns(v) -> str:
    return ",".join(v) if isinstance(v, (list, tuple)) else str(v)


def family_of(method: str) -> str:
    """The method family: ``peg_paper`` (the exact preset) belongs to ``peg``."""
    return method.removesuffix(PAPER_SUFFIX)


def method_label(q: dict, with_bits: bool = True, with_exclude: bool = True) -> str:
    """Human-readable, unique name of a quantization configuration (see module docstring).

    ``with_bits=False`` leaves out the weight/activation widths of non-naive methods (the bit-width
    ablation's family); ``with_exclude=False`` leaves out ``act_exclude`` (leave-one-out's base)."""
    method = q.get("method", "?")
    family = family_of(method)
    d = method_defaults(method)
    get = lambda key: q.get(key, d.get(key))  # noqa: E731
    wb, ab = get("weight_bits"), get("act_bits")
    parts: list[str] = []
    if family in NAIVE:
        if wb is None and ab is None:
            parts.append("FP32")
        else:
            parts.append(_bits(wb, ab) if with_bits else f"W{wb or 32}A*")
    else:
        parts.append(FAMILY_NAMES.get(method, FAMILY_NAMES.get(family, family)))
        if family == "peg":
            parts.append(f"K={get('k')} {effective_grouping({**d, **q})}")
    if method != family:
        parts.append("(paper)")
    if family not in NAIVE and with_bits and (wb, ab) != (d.get("weight_bits"), d.get("act_bits")):
        parts.append(_bits(wb, ab))
    if get("weight_estimator") != d.get("weight_estimator"):
        parts.append(f"w={get('weight_estimator')}")
    if get("estimator") == "percentile":
        parts.append(f"p={_num(get('percentile'))}")
    elif get("estimator") != d.get("estimator"):
        parts.append(f"est={get('estimator')}")
    if family != "peg" and get("k") not in (None, d.get("k")) and get("peg_sites"):
        parts.append(f"K={get('k')} {effective_grouping({**d, **q})}")
    if list(get("peg_sites") or []) != list(d.get("peg_sites") or []):
        parts.append(f"PEG@[{_patterns(get('peg_sites'))}]")
    if list(get("high_bits_sites") or []) != list(d.get("high_bits_sites") or []):
        parts.append(f"{get('high_bits')}-bit@[{_patterns(get('high_bits_sites'))}]")
    elif get("high_bits_sites") and get("high_bits") != d.get("high_bits"):
        parts.append(f"high={get('high_bits')}")
    if get("share_groups") != d.get("share_groups"):
        parts.append(f"share={get('share_groups')}")
    if list(get("act_sites") or []) != list(d.get("act_sites") or []):
        parts.append(f"sites=[{_patterns(get('act_sites'))}]")
    if with_exclude and get("act_exclude"):
        parts.append(f"excl {_patterns(get('act_exclude'))}")
    return " ".join(parts)


def slug(label: str) -> str:
    """An MLflow-metric-safe key for a label: ``PEG K=4 sorted`` -> ``peg_k4_sorted``."""
    s = label.lower().replace("*", "x").replace("=", "").replace("@", "_at_")
    s = re.sub(r"[^a-z0-9_.\-/]+", "_", s)
    s = re.sub(r"_+", "_", s).strip("_") or "method"
    if len(s) > 200:  # MLflow metric keys are capped at 250 characters (with the prefix)
        import hashlib

        s = s[:190] + "_" + hashlib.sha1(s.encode()).hexdigest()[:8]
    return s


def method_sort_key(q: dict) -> tuple:
    """Canonical table order: family (its exact paper preset first), then K and grouping,
    percentile, bits, excluded site."""
    method = q.get("method", "")
    family = family_of(method)
    fam = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
    excl = q.get("act_exclude") or []
    excl_key = (len(excl) > 0, *[site_sort_key(p) for p in excl])
    grouping = effective_grouping(q) if family == "peg" else ""
    return (fam, family, method == family, int(q.get("k") or 0) if family == "peg" else 0,
            GROUPING_ORDER.index(grouping) if grouping in GROUPING_ORDER else 9,
            float(q.get("percentile") or 0) if q.get("estimator") == "percentile" else 0.0,
            -(q.get("act_bits") or 99), excl_key, method_label(q))


def site_sort_key(pattern: str) -> tuple:
    """Leave-one-out order: site kinds in forward order (any layer), then single layers."""
    m = re.fullmatch(r"layer\.(\d+)\.(.+)", pattern)
    kind = m.group(2) if m else pattern.removeprefix("*.")
    idx = SITE_ORDER.index(kind) if kind in SITE_ORDER else len(SITE_ORDER)
    return (1 if m else 0, int(m.group(1)) if m else -1, idx, pattern)


@functools.lru_cache(maxsize=None)
def _site_presets() -> dict[tuple[str, str], str]:
    from omegaconf import OmegaConf

    out = {}
    for f in sorted((CONF_DIR / "search" / "sites").glob("*.yaml")):
        c = OmegaConf.to_container(OmegaConf.load(f))
        out[(_patterns(c.get("peg_sites") or []), _patterns(c.get("high_bits_sites") or []))] = f.stem
    return out


def site_preset(peg_sites: str, high_bits_sites: str) -> str:
    """Name of the conf/search/sites preset with these (comma-joined) patterns, or ''."""
    return _site_presets().get((peg_sites, high_bits_sites), "")


# --- runs as a table ------------------------------------------------------------------------------

def calibration_sequences(params: dict[str, str], q: dict) -> int | None:
    """Training sequences the activation ranges came from (``num_batches`` x ``batch_size``); None
    for a run that quantizes no activation (nothing is calibrated) or that did not log the sizes."""
    nb, bs = parse_param(params.get("calibration.num_batches")), parse_param(params.get("calibration.batch_size"))
    act_bits = q.get("act_bits", method_defaults(q.get("method", "?")).get("act_bits"))
    return nb * bs if isinstance(nb, int) and isinstance(bs, int) and act_bits is not None else None


def run_record(run_id: str, params: dict[str, str], metrics: dict[str, float], tags: dict[str, str],
               status: str = "FINISHED", start_time: int | None = None, end_time: int | None = None) -> dict:
    """One row of the study table: identification columns plus every metric."""
    q = quant_params(params)
    seed = parse_param(params.get("train.seed"))
    label = method_label(q)
    rec = {
        "run_id": run_id,
        "status": status,
        "name": tags.get("mlflow.runName", ""),
        "parent": tags.get("mlflow.parentRunId"),
        "model": params.get("model.name", tags.get("model", "")),
        "task": params.get("task.name", tags.get("task", "")),
        "seed": seed,
        "method": q.get("method", tags.get("quant_method", "?")),
        "label": label,
        "quant_label": label,
        "calibration_sequences": calibration_sequences(params, q),
        "family": method_label(q, with_bits=False),
        "base": method_label(q, with_exclude=False),
        "k": q.get("k") if family_of(q.get("method", "")) == "peg" or q.get("peg_sites") else None,
        "grouping": effective_grouping(q) if family_of(q.get("method", "")) == "peg" or q.get("peg_sites") else None,
        "percentile": q.get("percentile") if q.get("estimator") == "percentile" else None,
        "weight_bits": q.get("weight_bits"),
        "act_bits": q.get("act_bits"),
        "act_exclude": _patterns(q.get("act_exclude") or []),
        "peg_sites": _patterns(q.get("peg_sites") or []),
        "high_bits_sites": _patterns(q.get("high_bits_sites") or []),
        "finetune_cache": tags.get("finetune_cache"),
        "stats_cache": tags.get("stats_cache"),
        "checkpoint": tags.get("checkpoint"),
        "engine_precision": tags.get("engine_precision"),
        "fp32_attention": tags.get("fp32_attention"),
        "best": tags.get("transquant.best") == "true",
        "pareto": tags.get("transquant.pareto") == "true",
        "wall_seconds": (end_time - start_time) / 1000.0 if start_time and end_time else None,
        "start_time": start_time,
        "_sort": method_sort_key(q),
    }
    rec.update(metrics)
    if "fp32_accuracy" not in metrics and "accuracy" in metrics and "accuracy_drop" in metrics:
        rec["fp32_accuracy"] = metrics["accuracy"] + metrics["accuracy_drop"]  # drop = fp32 - accuracy
    return rec


def records_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Records in canonical order (method, calibration size, seed, start time) with a stable index.

    When the runs were calibrated on different numbers of sequences, ``label``, ``family`` and
    ``base`` end in `` cal=<sequences>``, so no table pools two calibration sizes as seeds of one
    method; ``quant_label`` keeps the label from the ``quant.*`` params alone."""
    df = pd.DataFrame(list(records))
    if df.empty:
        return df
    cal = df["calibration_sequences"]
    if cal.nunique() > 1:
        suffix = cal.map(lambda n: "" if pd.isna(n) else f" cal={int(n)}")
        for col in ("label", "family", "base"):
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


# --- seed statistics --------------------------------------------------------------------------------

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


# --- Pareto fronts ----------------------------------------------------------------------------------

def pareto_mask(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[bool]:
    """True for the non-dominated points (``directions``: 'maximize' / 'minimize' per objective).

    A point is dominated if another is at least as good in every objective and better in one;
    duplicates of a non-dominated point are all kept."""
    sign = np.asarray([1.0 if d.startswith("max") else -1.0 for d in directions])
    p = np.asarray(points, dtype=float).reshape(len(points), len(directions)) * sign
    out = []
    for i in range(len(p)):
        dominated = np.any(np.all(p >= p[i], axis=1) & np.any(p > p[i], axis=1))
        out.append(not bool(dominated) and not np.any(np.isnan(p[i])))
    return out


def best_mask(df: pd.DataFrame, objectives: Sequence[str], directions: Sequence[str]) -> list[bool]:
    """The best finished run(s) of a search: the optimum for one objective (ties all kept), the
    Pareto front for several. Runs missing an objective are never best."""
    if df.empty or any(o not in df for o in objectives):
        return [False] * len(df)
    ok = (df["status"] == "FINISHED") if "status" in df else pd.Series(True, index=df.index)
    pts = df[list(objectives)].to_numpy(dtype=float)
    mask = pareto_mask([tuple(p) if o else (math.nan,) * len(objectives) for p, o in zip(pts, ok)], directions)
    return mask


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
