"""The study report: tables and figures from MLflow (never from files lying around).

    python -m transquant.report paper                       # latest sweep tagged transquant.study=paper
    python -m transquant.report <parent-run-id> [--out DIR] [--tracking-uri URI]
    python -m transquant.report paper loo bits --out reports/all   # several studies in one report
    python -m transquant.report peg --all                   # every sweep of the study (shared Optuna study)
    python -m transquant.report paper --compare W8A8 mixed  # two methods, paired per seed (or two run ids)

A study is found by the tag ``transquant.study`` of its parent run (set by
:class:`transquant.search.StudyCallback`), or by ``+experiment=<name>`` / ``+search=<name>`` in the
parent's ``sweep_overrides`` param, or given as a parent run id. Its child runs become one row
each (:func:`transquant.study.run_record`, the method named from its ``quant.*`` params), and the
report writes to ``--out`` (default ``reports/<study>``) and, unless ``--no-log``, as artifacts
``report/`` of the parent run (``report-<names>/`` of each parent for a report over several sweeps)
plus, on each parent, the seed statistics of its own jobs as metrics:

==========================  ===================================================================
table1_accuracy             accuracy and drop vs FP32 per method: median, min–max, McNemar significance
table1_seeds                per method and seed: 95 % intervals of accuracy and drop, McNemar p
table2_deployment           latency, memory, size, speed-up vs each baseline, what the engine runs (profiled runs)
table3_depth                FP32 statistics per layer (metric history, step = layer)
ablation_peg                PEG K x grouping (contiguous = no permutation, sorted, gap)
ablation_percentile         percentile p
ablation_loo                leave-one-out: which site left float recovers how much
ablation_bits               activation bit width per method family
calibration                 accuracy and drop vs FP32 by number of calibration sequences (runs of several sizes)
search_trials               Optuna trials in order, best / Pareto flags
timing                      wall-time split from the *_seconds metrics
runs                        every child run: id, seed, method, metrics
==========================  ===================================================================

each as ``.csv`` and booktabs ``.tex``, figures ``accuracy_vs_k.png``, ``accuracy_vs_percentile.png``,
``accuracy_vs_bits.png``, ``accuracy_vs_calibration.png``, ``pareto.png``, ``depth_stats.png``, and
``report.md``. Tables without data are not written. Files hold no timestamps and rows are in a canonical order, so the same
study gives the same bytes.

``--compare A B`` prints, per seed, A against B on the same validation examples from the runs'
stored ``predictions.npz``: both accuracies with their intervals, the paired interval of A − B and
the exact McNemar p-value (:mod:`transquant.significance`).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .significance import ALPHA, N_BOOT, PREDICTIONS, RULE, accuracy_ci, load_predictions, paired
from .study import (GROUPING_ORDER, aggregate, best_mask, paired_deltas, parse_param, records_frame, run_record,
                    site_preset, site_sort_key, study_metrics)

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
# Each speed-up is named after its baseline, all timed in the same run (transquant.profiling).
PROFILE_METRICS = ("latency_p50_ms", "latency_p95_ms", "peak_memory_mb", "model_size_mb", "speedup_vs_torch_fp32",
                   "speedup_vs_ort_fp32", "speedup_vs_peer", "engine_code_agreement", "engine_int8_matmuls",
                   "engine_float_matmuls", "fp32_latency_p50_ms", "fp32_model_size_mb")
PROFILE_TAGS = ("engine_precision", "fp32_attention")
PROFILE_HEADERS = {"latency_p50_ms": "p50 (ms)", "latency_p95_ms": "p95 (ms)", "peak_memory_mb": "Peak memory (MB)",
                   "model_size_mb": "Size (MB)", "speedup_vs_torch_fp32": "Speed-up vs PyTorch FP32",
                   "speedup_vs_ort_fp32": "Speed-up vs ORT FP32", "speedup_vs_peer": "Speed-up vs ORT dynamic INT8",
                   "engine_code_agreement": "Code agreement", "engine_int8_matmuls": "INT8 MatMuls",
                   "engine_float_matmuls": "Float MatMuls", "fp32_latency_p50_ms": "PyTorch FP32 p50 (ms)",
                   "fp32_model_size_mb": "FP32 size (MB)", "engine_precision": "Engine precision",
                   "fp32_attention": "PyTorch FP32 attention"}
DEPTH_METRICS = ("kurtosis", "top1pct_channel_energy", "max_abs", "variance")
RUN_ID = re.compile(r"[0-9a-f]{32}")
# Cached FP32 statistics: every job logs what computing them cost, but only a cache miss spent it.
PER_CHECKPOINT_SECONDS = ("stats_seconds", "stats_fp32_pass_seconds")


class ReportError(Exception):
    pass


# --- MLflow -------------------------------------------------------------------------------------

def _search_all(client, experiment_ids, filter_string: str, order_by=None):
    out, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by or ["attributes.start_time ASC"], page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def resolve_parents(client, study: str, experiment: str | None = None, all_runs: bool = False) -> list:
    """The parent run(s) of a study name or a parent run id (latest sweep unless ``all_runs``)."""
    if RUN_ID.fullmatch(study):
        try:
            return [client.get_run(study)]
        except Exception as err:  # noqa: BLE001 - MLflow raises a generic exception for unknown ids
            raise ReportError(f"run {study}: not found in this tracking store ({err})") from err
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        exp_ids = [exp.experiment_id] if exp else []
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        raise ReportError(f"no MLflow experiment {experiment or ''} in this tracking store")
    sweeps = _search_all(client, exp_ids, "tags.`transquant.role` = 'sweep'")
    tagged = [r for r in sweeps if r.data.tags.get("transquant.study") == study]
    if not tagged:
        pat = re.compile(rf"(^|\s)\+(experiment|search)={re.escape(study)}(\s|$)")
        tagged = [r for r in sweeps if pat.search(r.data.params.get("sweep_overrides", ""))]
    if not tagged:
        known = sorted({r.data.tags["transquant.study"] for r in sweeps if "transquant.study" in r.data.tags})
        raise ReportError(f"study '{study}': no sweep parent run found (known studies: {', '.join(known) or 'none'}); "
                          "give a study name or a parent run id")
    tagged.sort(key=lambda r: (r.info.start_time, r.info.run_id))
    alive = [r for r in tagged if r.info.status != "KILLED"]  # a sweep killed by hand is not "the latest"
    tagged = alive or tagged
    return tagged if all_runs else tagged[-1:]


def children(client, parent_ids: list[str]) -> list:
    """The job runs of the parent runs: their children, plus the finished runs a sweep reused
    instead of redoing them (``resume=true``; the parent carries a tag ``reused.<run id>``)."""
    runs: dict[str, object] = {}
    for pid in parent_ids:
        parent = client.get_run(pid)
        for r in _search_all(client, [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{pid}'"):
            runs.setdefault(r.info.run_id, r)
        for key in sorted(parent.data.tags):
            rid = key.split(".", 1)[1] if key.startswith("reused.") else None
            if rid and rid not in runs:
                try:
                    runs[rid] = client.get_run(rid)
                except Exception:  # noqa: BLE001 - a deleted run: nothing to report
                    continue
    return list(runs.values())


def frame_of_runs(runs) -> pd.DataFrame:
    return records_frame(run_record(r.info.run_id, r.data.params, r.data.metrics, r.data.tags, r.info.status,
                                    r.info.start_time, r.info.end_time) for r in runs)


def children_frame(client, parent_ids: list[str]) -> pd.DataFrame:
    """Job runs as the study table; ``reused`` marks runs executed by another sweep."""
    df = frame_of_runs(children(client, parent_ids))
    if not df.empty:
        df["reused"] = ~df["parent"].isin(parent_ids)
    return df


def mark_best(client, parent_id: str, df: pd.DataFrame, objectives: list[str], directions: list[str]) -> list[str]:
    """Tag the best trial(s) ``transquant.best=true`` (Pareto front: also ``transquant.pareto``)."""
    if df.empty:
        return []
    mask = best_mask(df, objectives, directions)
    multi = len(objectives) > 1
    best = []
    for (_, row), is_best in zip(df.iterrows(), mask):
        if is_best != row["best"]:
            client.set_tag(row["run_id"], "transquant.best", "true" if is_best else "false")
        if multi and is_best != row["pareto"]:
            client.set_tag(row["run_id"], "transquant.pareto", "true" if is_best else "false")
        if is_best:
            best.append(row["run_id"])
    if best:
        client.set_tag(parent_id, "transquant.best_run_id", ",".join(best)[:5000])
        if not multi:
            value = float(df.loc[mask, objectives[0]].iloc[0])
            client.log_metric(parent_id, f"best_{objectives[0]}", value, step=0)
    return best


def depth_frame(client, df: pd.DataFrame) -> pd.DataFrame:
    """Per-layer FP32 statistics (metric history, step = layer), one run per checkpoint: a job
    run of the study that logged them, else another finished run of the same checkpoint that did
    (a ``transquant.role=stats`` run first). FP32 statistics depend on the checkpoint only."""
    if df.empty:
        return pd.DataFrame()
    ckpt = df["checkpoint"].fillna("") if "checkpoint" in df else pd.Series("", index=df.index)
    picked: dict[str, tuple[str, object]] = {}
    if "kurtosis" in df:
        for (_, r), c in zip(df.iterrows(), ckpt):
            if pd.notna(r["kurtosis"]):
                picked.setdefault(c or str(r["seed"]), (r["run_id"], r["seed"]))
    wanted = sorted({c for c in ckpt if c and c not in picked and "'" not in c})
    if wanted:
        exp = client.get_run(df["run_id"].iloc[0]).info.experiment_id
        for c in wanted:
            found = [r for r in _search_all(client, [exp], f"tags.checkpoint = '{c}'")
                     if "kurtosis" in r.data.metrics and r.info.status == "FINISHED"]
            found.sort(key=lambda r: (r.data.tags.get("transquant.role") != "stats", r.info.start_time, r.info.run_id))
            if found:
                picked[c] = (found[0].info.run_id, parse_param(found[0].data.params.get("train.seed")))
    rows = []
    for c in sorted(picked):
        run_id, seed = picked[c]
        for metric in DEPTH_METRICS:
            last = {}
            for m in client.get_metric_history(run_id, metric):
                if m.step not in last or m.timestamp >= last[m.step][0]:
                    last[m.step] = (m.timestamp, m.value)
            for step in sorted(last):
                rows.append({"seed": seed, "run_id": run_id, "layer": step, "stat": metric, "value": last[step][1]})
    return pd.DataFrame(rows)


# --- tables (pure) ----------------------------------------------------------------------------------

def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.{digits}f}"


def spread(median, lo, hi, n, digits: int = 2) -> str:
    """``median [min, max]`` (just the median when there is one seed)."""
    if n is None or (isinstance(n, float) and math.isnan(n)) or n == 0:
        return ""
    return _fmt(median, digits) if n <= 1 else f"{_fmt(median, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def _seed_map(df: pd.DataFrame, value: str) -> dict:
    return df.groupby(df["seed"].map(str))[value].mean().to_dict()


def table_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Table I: per method, accuracy and drop vs FP32 over seeds (drop is paired per seed)."""
    if df.empty or "accuracy" not in df:
        return pd.DataFrame()
    acc = aggregate(df, "label", "accuracy")
    rows = []
    for _, a in acc.iterrows():
        grp = df[df["label"] == a["label"]]
        d = aggregate(grp, "label", "accuracy_drop").iloc[0] if "accuracy_drop" in grp and grp["accuracy_drop"].notna().any() else None
        # (aggregate drops NaN rows: a group with no value at all yields no row, hence the guards)
        drops = list(_seed_map(grp, "accuracy_drop").values()) if d is not None else []
        consistent = len(drops) > 1 and (all(x > 0 for x in drops) or all(x < 0 for x in drops))
        f = aggregate(grp, "label", "fp32_accuracy") if "fp32_accuracy" in grp else pd.DataFrame()
        fp32 = f.iloc[0]["median"] if not f.empty else math.nan
        p = _latest_per_seed(grp)["mcnemar_p"].dropna() if "mcnemar_p" in grp else pd.Series(dtype=float)
        rows.append({"method": a["label"], "seeds": int(a["n"]), "accuracy_median": a["median"],
                     "accuracy_min": a["min"], "accuracy_max": a["max"], "accuracy_ci_lo": a["ci_lo"],
                     "accuracy_ci_hi": a["ci_hi"], "accuracy_std": a["std"], "fp32_accuracy_median": fp32,
                     "drop_median": d["median"] if d is not None else math.nan,
                     "drop_min": d["min"] if d is not None else math.nan,
                     "drop_max": d["max"] if d is not None else math.nan,
                     "drop_consistent_sign": consistent, "mcnemar_p_max": p.max() if len(p) else math.nan,
                     "significant_seeds": int((p < ALPHA).sum()), "tested_seeds": len(p),
                     "significant": bool(len(p)) and bool((p < ALPHA).all())})
    return pd.DataFrame(rows)


def _latest_per_seed(df: pd.DataFrame) -> pd.DataFrame:
    """One run per (method, seed), the latest: intervals of a repeated job are not averaged."""
    keyed = df.assign(_seed=df["seed"].map(str))  # rows are in (method, seed, start time) order
    return keyed.drop_duplicates(["label", "_seed"], keep="last").drop(columns="_seed")


def table_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """Table I per seed: each run's 95 % interval of accuracy and of the drop vs FP32, McNemar p."""
    if df.empty or "accuracy_ci_low" not in df:
        return pd.DataFrame()
    t = _latest_per_seed(df[df["accuracy_ci_low"].notna()])
    out = t[["label", "seed", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "accuracy_drop", "drop_ci_low",
             "drop_ci_high", "mcnemar_p", "run_id"]].rename(columns={"label": "method"})
    out.insert(len(out.columns) - 1, "significant", out["mcnemar_p"] < ALPHA)
    return out.reset_index(drop=True)


def _p(x) -> str:
    """A p-value cell: three decimals, ``<0.001`` below."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def _star(cell: str, significant: bool) -> str:
    return f"{cell}*" if cell and significant else cell


def _interval(x, lo, hi) -> str:
    return "" if x is None or math.isnan(x) else f"{_fmt(x)} [{_fmt(lo)}, {_fmt(hi)}]"


def latex_accuracy(t: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "Method": t["method"], "Seeds": t["seeds"],
        "Accuracy (\\%)": [spread(r.accuracy_median, r.accuracy_min, r.accuracy_max, r.seeds) for r in t.itertuples()],
        "$\\Delta$ vs FP32": [_star(spread(r.drop_median, r.drop_min, r.drop_max, r.seeds), r.significant)
                              for r in t.itertuples()],
        "McNemar $p$": t["mcnemar_p_max"].map(_p),
    })


def latex_seeds(t: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "Method": t["method"], "Seed": t["seed"],
        "Accuracy (\\%)": [_interval(r.accuracy, r.accuracy_ci_low, r.accuracy_ci_high) for r in t.itertuples()],
        "$\\Delta$ vs FP32": [_star(_interval(r.accuracy_drop, r.drop_ci_low, r.drop_ci_high), r.significant)
                              for r in t.itertuples()],
        "McNemar $p$": t["mcnemar_p"].map(_p),
    })


def table_deployment(df: pd.DataFrame) -> pd.DataFrame:
    """Table II: medians over seeds of the profile metrics, methods that were profiled, with the
    engine's precision and the PyTorch FP32 baseline's attention kernel (tags; values joined)."""
    present = [m for m in PROFILE_METRICS if m in df and df[m].notna().any()]
    if not present:
        return pd.DataFrame()
    out = None
    for m in present:
        a = aggregate(df, "label", m)[["label", "n", "median"]].rename(columns={"median": m, "n": f"n_{m}"})
        out = a if out is None else out.merge(a, on="label", how="outer", sort=False)
    order = {lab: i for i, lab in enumerate(df["label"].drop_duplicates())}
    out = out.sort_values("label", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
    runs = out[[c for c in out if c.startswith("n_")]].max(axis=1)
    out = out.drop(columns=[c for c in out if c.startswith("n_")])
    out.insert(1, "seeds", runs.astype(int))
    profiled = df[df[present].notna().any(axis=1)]
    for i, tag in enumerate(t for t in PROFILE_TAGS if t in df and profiled[t].notna().any()):
        values = profiled.groupby("label")[tag].agg(lambda v: ",".join(sorted(set(v.dropna()))))
        out.insert(2 + i, tag, out["label"].map(values).fillna(""))
    return out.rename(columns={"label": "method"})


def latex_deployment(t: pd.DataFrame) -> pd.DataFrame:
    """Table II with headers that name each speed-up's baseline."""
    digits = {"engine_code_agreement": 4, "engine_int8_matmuls": 0, "engine_float_matmuls": 0}
    out = t.copy()
    for c in out:
        if c in PROFILE_METRICS:
            out[c] = out[c].map(lambda x, d=digits.get(c, 2): _fmt(x, d))
    return out.rename(columns={"method": "Method", "seeds": "Seeds", **PROFILE_HEADERS})


def table_calibration(df: pd.DataFrame) -> pd.DataFrame:
    """Per method, calibration size and seed (the latest run): accuracy and drop vs FP32 with their
    95 % intervals and McNemar p. Only for runs calibrated on more than one number of sequences."""
    if df.empty or "accuracy" not in df or "calibration_sequences" not in df or df["calibration_sequences"].nunique() < 2:
        return pd.DataFrame()
    d = _latest_per_seed(df[df["calibration_sequences"].notna() & df["accuracy"].notna()])
    cols = ["accuracy", "accuracy_ci_low", "accuracy_ci_high", "fp32_accuracy", "accuracy_drop", "drop_ci_low",
            "drop_ci_high", "mcnemar_p"]
    out = d.reindex(columns=["quant_label", "calibration_sequences", "seed", *cols, "run_id"])
    out = out.rename(columns={"quant_label": "method", "calibration_sequences": "sequences"})
    out["sequences"] = out["sequences"].astype(int)
    out.insert(len(out.columns) - 1, "significant", out["mcnemar_p"] < ALPHA)
    return out.reset_index(drop=True)


def latex_calibration(t: pd.DataFrame) -> pd.DataFrame:
    """Methods (and seeds, if several) x calibration sequences: ``accuracy [interval] / drop``."""
    def cell(r) -> str:
        lo, hi = r.accuracy_ci_low, r.accuracy_ci_high
        acc = _fmt(r.accuracy) if math.isnan(lo) else _interval(r.accuracy, lo, hi)
        return f"{acc} / {_star(_fmt(r.accuracy_drop), r.significant)}".removesuffix(" / ")

    index = ["method", "seed"] if t["seed"].nunique() > 1 else ["method"]
    rows = []
    for key, g in t.groupby(index, sort=False):  # table order
        rows.append({**dict(zip(index, key)), **{f"{r.sequences} seq.": cell(r) for r in g.itertuples()}})
    cols = [f"{n} seq." for n in sorted(t["sequences"].unique())]
    return pd.DataFrame(rows).reindex(columns=[*index, *cols]).fillna("").rename(
        columns={"method": "Method", "seed": "Seed"})


def table_depth(depth: pd.DataFrame) -> pd.DataFrame:
    """Table III: per layer (step), the median over checkpoints of each FP32 statistic."""
    if depth.empty:
        return pd.DataFrame()
    t = depth.groupby(["layer", "stat"])["value"].median().unstack("stat")
    cols = [c for c in DEPTH_METRICS if c in t]
    t = t[cols].reset_index().sort_values("layer").reset_index(drop=True)
    t.insert(1, "checkpoints", int(depth["run_id"].nunique()))
    return t


def _stats(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    a = aggregate(df, by, "accuracy")
    return a[[*by, "n", "median", "min", "max"]].rename(columns={"n": "seeds", "median": "accuracy_median",
                                                                 "min": "accuracy_min", "max": "accuracy_max"})


def ablation_peg(df: pd.DataFrame) -> pd.DataFrame:
    plain = df[df["label"].str.fullmatch(r"PEG K=\d+ \w+") & df["accuracy"].notna()] if "accuracy" in df else df.iloc[0:0]
    if plain.empty:
        return pd.DataFrame()
    t = _stats(plain, ["k", "grouping"])
    t["k"] = t["k"].astype(int)
    t["_g"] = t["grouping"].map(lambda g: GROUPING_ORDER.index(g) if g in GROUPING_ORDER else 9)
    return t.sort_values(["k", "_g"], kind="stable").drop(columns="_g").reset_index(drop=True)


def ablation_percentile(df: pd.DataFrame) -> pd.DataFrame:
    plain = df[df["label"].str.fullmatch(r"percentile p=[\d.]+") & df["accuracy"].notna()] if "accuracy" in df else df.iloc[0:0]
    if plain.empty:
        return pd.DataFrame()
    t = _stats(plain, ["percentile"])
    return t.sort_values("percentile", kind="stable").reset_index(drop=True)


def ablation_loo(df: pd.DataFrame) -> pd.DataFrame:
    """Leave-one-out: W8A8 runs with one pattern left float, vs the all-quantized W8A8 baseline."""
    if "accuracy" not in df:
        return pd.DataFrame()
    w = df[(df["base"] == "W8A8") & df["accuracy"].notna()]
    if w.empty or not (w["act_exclude"] != "").any():
        return pd.DataFrame()
    base = w[w["act_exclude"] == ""]
    base_map = _seed_map(base, "accuracy") if not base.empty else {}
    t = _stats(w, ["act_exclude"])
    rec, rec_lo, rec_hi, consistent = [], [], [], []
    for _, r in t.iterrows():
        p = paired_deltas(_seed_map(w[w["act_exclude"] == r["act_exclude"]], "accuracy"), base_map)
        rec.append(p.median), rec_lo.append(p.min), rec_hi.append(p.max), consistent.append(p.consistent)
    t["recovery_median"], t["recovery_min"], t["recovery_max"], t["recovery_consistent_sign"] = rec, rec_lo, rec_hi, consistent
    drop = aggregate(w, "act_exclude", "accuracy_drop").set_index("act_exclude")["median"] if "accuracy_drop" in w else None
    t["drop_median"] = t["act_exclude"].map(drop) if drop is not None else math.nan
    t["_o"] = t["act_exclude"].map(lambda e: (0,) if e == "" else (1, *site_sort_key(e.split(",")[0]), e))
    t = t.sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)
    t["left_float"] = t["act_exclude"].replace("", "(none: all quantized)")
    return t[["left_float", *[c for c in t if c not in ("left_float", "act_exclude")]]]


def ablation_bits(df: pd.DataFrame) -> pd.DataFrame:
    if "accuracy" not in df:
        return pd.DataFrame()
    d = df[df["act_bits"].notna() & df["accuracy"].notna() & (df["act_exclude"] == "")]
    fams = [f for f, g in d.groupby("family", sort=False) if g["act_bits"].nunique() > 1]
    d = d[d["family"].isin(fams)]
    if d.empty:
        return pd.DataFrame()
    t = _stats(d, ["family", "act_bits"])
    t["act_bits"] = t["act_bits"].astype(int)
    order = {f: i for i, f in enumerate(fams)}
    t["_f"] = t["family"].map(order)
    return t.sort_values(["_f", "act_bits"], kind="stable").drop(columns="_f").reset_index(drop=True)


def search_trials(df: pd.DataFrame, objectives: list[str]) -> pd.DataFrame:
    if df.empty or not (df["best"].any() or df["pareto"].any()):
        return pd.DataFrame()
    t = df.sort_values(["start_time", "run_id"], kind="stable").reset_index(drop=True)
    cols = ["k", "grouping", "peg_sites", "high_bits_sites", *[o for o in dict.fromkeys(["accuracy", *objectives]) if o in t],
            "best", "pareto", "run_id"]
    out = t[cols].copy()
    out.insert(0, "trial", range(len(out)))
    out.insert(3, "sites_preset", [site_preset(a, b) for a, b in zip(t["peg_sites"], t["high_bits_sites"])])
    out["k"] = out["k"].astype("Int64")
    return out


def table_timing(df: pd.DataFrame) -> pd.DataFrame:
    """Wall-time split: every *_seconds metric (and each job's wall time) summed over the jobs."""
    if df.empty:
        return pd.DataFrame()
    reused = int(df["reused"].sum()) if "reused" in df else 0
    df = df[~df["reused"]] if "reused" in df else df  # time spent by another sweep is not this study's
    cols = sorted(c for c in df if (c.endswith("_seconds") or c.endswith("_seconds_job")) and c != "wall_seconds"
                  and pd.api.types.is_numeric_dtype(df[c]))
    wall = df["wall_seconds"].sum(min_count=1)
    rows = []
    for c in cols + ["wall_seconds"]:
        v = df[c].dropna()
        if c in PER_CHECKPOINT_SECONDS and "stats_cache" in df:  # logged by every job, spent on a cache miss only
            v = df.loc[df["stats_cache"] == "miss", c].dropna()
        if v.empty:
            continue
        rows.append({"metric": "job wall time" if c == "wall_seconds" else c, "jobs": len(v), "total_seconds": v.sum(),
                     "median_seconds": v.median(),
                     "share_of_wall": v.sum() / wall if wall and not math.isnan(wall) else math.nan})
    t = pd.DataFrame(rows)
    if "finetune_cache" in df:
        t = pd.concat([t, pd.DataFrame([{"metric": "fine-tunes (cache misses)",
                                          "jobs": int((df["finetune_cache"] == "miss").sum())}])], ignore_index=True)
    if reused:
        t = pd.concat([t, pd.DataFrame([{"metric": "runs reused from other sweeps (resume)", "jobs": reused}])],
                      ignore_index=True)
    return t


RUN_COLUMNS = ["run_id", "status", "seed", "method", "label", "k", "grouping", "percentile", "weight_bits", "act_bits",
               "act_exclude", "calibration_sequences", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
               "fp32_accuracy", "accuracy_drop", "drop_ci_low", "drop_ci_high", "mcnemar_p", *PROFILE_METRICS, *PROFILE_TAGS, "high_precision_sites",
               "calibration_seconds", "eval_seconds", "finetune_seconds", "finetune_cache", "reused", "best", "pareto"]


def build_tables(df: pd.DataFrame, depth: pd.DataFrame | None = None, objectives: list[str] | None = None
                 ) -> dict[str, pd.DataFrame]:
    """Every table of the report from the run table (and the depth statistics)."""
    tables = {
        "table1_accuracy": table_accuracy(df),
        "table1_seeds": table_seeds(df),
        "table2_deployment": table_deployment(df),
        "table3_depth": table_depth(depth if depth is not None else pd.DataFrame()),
        "ablation_peg": ablation_peg(df) if not df.empty else pd.DataFrame(),
        "ablation_percentile": ablation_percentile(df) if not df.empty else pd.DataFrame(),
        "ablation_loo": ablation_loo(df) if not df.empty else pd.DataFrame(),
        "ablation_bits": ablation_bits(df) if not df.empty else pd.DataFrame(),
        "calibration": table_calibration(df),
        "search_trials": search_trials(df, objectives or ["accuracy"]) if not df.empty else pd.DataFrame(),
        "timing": table_timing(df),
        "runs": df[[c for c in RUN_COLUMNS if c in df]].copy() if not df.empty else pd.DataFrame(),
    }
    return {k: v for k, v in tables.items() if not v.empty}


# --- output -----------------------------------------------------------------------------------------

_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
          ">": r"\textgreater{}"}


def _latex_escape(s) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in str(s))


def latex_view(name: str, t: pd.DataFrame) -> pd.DataFrame:
    """Human table for LaTeX: spreads as ``median [min, max]``, ablations pivoted."""
    if name == "table1_accuracy":
        return latex_accuracy(t)
    if name == "table1_seeds":
        return latex_seeds(t)
    if name == "table2_deployment":
        return latex_deployment(t)
    if name == "calibration":
        return latex_calibration(t)
    if name == "ablation_peg":
        t = t.assign(cell=[spread(r.accuracy_median, r.accuracy_min, r.accuracy_max, r.seeds) for r in t.itertuples()])
        p = t.pivot(index="k", columns="grouping", values="cell")
        p = p[[g for g in GROUPING_ORDER if g in p] + [g for g in p if g not in GROUPING_ORDER]].fillna("")
        return p.reset_index().rename(columns={"k": "K"})
    if name == "ablation_bits":
        t = t.assign(cell=[spread(r.accuracy_median, r.accuracy_min, r.accuracy_max, r.seeds) for r in t.itertuples()])
        fams = list(dict.fromkeys(t["family"]))
        p = t.pivot(index="act_bits", columns="family", values="cell")[fams].fillna("")
        return p.reset_index().rename(columns={"act_bits": "Activation bits"})
    if name == "ablation_percentile":
        return pd.DataFrame({"p": t["percentile"].map(lambda x: f"{x:g}"), "Seeds": t["seeds"],
                             "Accuracy (\\%)": [spread(r.accuracy_median, r.accuracy_min, r.accuracy_max, r.seeds) for r in t.itertuples()]})
    if name == "ablation_loo":
        return pd.DataFrame({"Left float": t["left_float"], "Seeds": t["seeds"],
                             "Accuracy (\\%)": [spread(r.accuracy_median, r.accuracy_min, r.accuracy_max, r.seeds) for r in t.itertuples()],
                             "Recovery vs W8A8": [spread(r.recovery_median, r.recovery_min, r.recovery_max, r.seeds) for r in t.itertuples()],
                             "$\\Delta$ vs FP32": t["drop_median"].map(_fmt)})
    out = t.copy()
    for c in out:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].map(lambda x: _fmt(x, 3))
    return out.rename(columns=lambda c: _latex_escape(c))


def to_latex(name: str, t: pd.DataFrame) -> str:
    v = latex_view(name, t).astype(str)
    header_escaped = name in ("table1_accuracy", "table1_seeds", "ablation_percentile", "ablation_loo")  # by hand
    if not header_escaped:
        v = v.rename(columns=lambda c: c if "\\" in c else _latex_escape(c))
    v = v.map(_latex_escape)
    caption = _latex_escape(CAPTIONS[name]) if name in CAPTIONS else None
    return v.to_latex(index=False, escape=False, column_format="l" + "r" * (v.shape[1] - 1), caption=caption)


def to_markdown(t: pd.DataFrame) -> str:
    cells = [[str(c) for c in t.columns]] + [[_md(x) for x in row] for row in t.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in t.columns) + "|")
    return "\n".join(lines)


def _md(x) -> str:
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.2f}"
    return str(x).replace("|", "\\|").replace("*", "\\*")


def write_tables(tables: dict[str, pd.DataFrame], out: Path) -> list[Path]:
    files = []
    for name, t in tables.items():
        f = out / f"{name}.csv"
        t.to_csv(f, index=False, float_format="%.6g", lineterminator="\n")
        files.append(f)
        if name != "runs":
            g = out / f"{name}.tex"
            g.write_text(to_latex(name, t))
            files.append(g)
    return files


def write_figures(tables: dict[str, pd.DataFrame], out: Path, objectives: list[str], directions: list[str],
                  df: pd.DataFrame) -> list[Path]:
    from matplotlib.figure import Figure  # object API on the Agg canvas: no pyplot global state

    def subplots(*grid, figsize):
        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*grid)

    files = []
    acc = tables.get("table1_accuracy")
    refs = {}
    if acc is not None:
        for lab in ("FP32", "W8A8"):
            m = acc[acc["method"] == lab]
            if not m.empty:
                refs[lab] = float(m["accuracy_median"].iloc[0])

    def finish(fig, ax, name, xlabel, ylabel="accuracy (%)", lines=None):
        for (lab, v), style in zip((refs if lines is None else lines).items(), ("--", ":")):
            ax.axhline(v, color="gray", linestyle=style, linewidth=1, label=f"{lab} {v:.2f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        f = out / name
        fig.savefig(f, dpi=120, metadata={"Software": None})
        files.append(f)

    def errbar(ax, x, t, label, **kw):
        y = t["accuracy_median"].to_numpy(float)
        yerr = np.vstack([y - t["accuracy_min"].to_numpy(float), t["accuracy_max"].to_numpy(float) - y])
        ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, label=label, **kw)

    if "ablation_peg" in tables:
        t = tables["ablation_peg"]
        fig, ax = subplots(figsize=(5, 3.5))
        for g in [g for g in GROUPING_ORDER if g in set(t["grouping"])]:
            s = t[t["grouping"] == g]
            errbar(ax, s["k"], s, g)
        ax.set_xticks(sorted(set(t["k"])))
        ax.set_title("PEG: accuracy vs groups K")
        finish(fig, ax, "accuracy_vs_k.png", "K (groups per PEG site)")
    if "ablation_percentile" in tables:
        t = tables["ablation_percentile"]
        fig, ax = subplots(figsize=(5, 3.5))
        x = np.arange(len(t))
        errbar(ax, x, t, "percentile")
        ax.set_xticks(x, [f"{p:g}" for p in t["percentile"]])
        ax.set_title("Percentile clipping: accuracy vs p")
        finish(fig, ax, "accuracy_vs_percentile.png", "p (both tails clipped)")
    if "ablation_bits" in tables:
        t = tables["ablation_bits"]
        fig, ax = subplots(figsize=(5, 3.5))
        for fam in dict.fromkeys(t["family"]):
            s = t[t["family"] == fam]
            errbar(ax, s["act_bits"], s, fam)
        ax.set_xticks(sorted(set(t["act_bits"])))
        ax.set_title("Accuracy vs activation bits (weights 8-bit)")
        finish(fig, ax, "accuracy_vs_bits.png", "activation bits")
    if "calibration" in tables:
        t = tables["calibration"]
        fig, ax = subplots(figsize=(5, 3.5))
        several = t["seed"].nunique() > 1
        for (method, seed), s in t.groupby(["method", "seed"], sort=False):
            y = s["accuracy"].to_numpy(float)
            yerr = np.nan_to_num(np.vstack([y - s["accuracy_ci_low"].to_numpy(float),
                                            s["accuracy_ci_high"].to_numpy(float) - y]))
            ax.errorbar(s["sequences"], y, yerr=yerr, marker="o", capsize=3,
                        label=f"{method} (seed {seed})" if several else method)
        sizes = sorted(set(t["sequences"]))
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_title("Accuracy vs calibration set (95 % intervals)")
        fp32 = t["fp32_accuracy"].median()
        finish(fig, ax, "accuracy_vs_calibration.png", "calibration sequences",
               lines={} if math.isnan(fp32) else {"FP32": fp32})
    if len(objectives) > 1 and all(o in df for o in objectives[:2]) and not df.empty:
        x_o, y_o = objectives[1], objectives[0]
        d = df[df[x_o].notna() & df[y_o].notna()]
        mask = np.asarray(best_mask(d, objectives, directions), dtype=bool)
        fig, ax = subplots(figsize=(5, 3.5))
        ax.scatter(d[x_o], d[y_o], color="lightgray", edgecolor="gray", label="trials")
        front = d[mask].sort_values(x_o, kind="stable")
        ax.plot(front[x_o], front[y_o], "o-", color="C3", label="Pareto front")
        ax.set_title("Search: Pareto front")
        finish(fig, ax, "pareto.png", x_o, y_o)
    if "table3_depth" in tables:
        t = tables["table3_depth"]
        stats = [c for c in DEPTH_METRICS if c in t]
        fig, axes = subplots(1, len(stats), figsize=(3.2 * len(stats), 3))
        for ax, s in zip(np.atleast_1d(axes), stats):
            ax.plot(t["layer"], t[s], marker="o")
            ax.set_title(s, fontsize=9)
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
            if s in ("kurtosis", "max_abs"):
                ax.set_yscale("log")
        fig.tight_layout()
        f = out / "depth_stats.png"
        fig.savefig(f, dpi=120, metadata={"Software": None})
        files.append(f)
    return files


TITLES = {"table1_accuracy": "Table I — accuracy and drop vs FP32 (median [min, max] over seeds)",
          "table1_seeds": "Table I per seed — 95 % intervals over the validation examples",
          "table2_deployment": "Table II — deployment profile (median over seeds)",
          "table3_depth": "Table III — FP32 activation statistics by depth (FFN residual sum)",
          "ablation_peg": "PEG: K x grouping", "ablation_percentile": "Percentile p",
          "ablation_loo": "Leave-one-out (W8A8 with one site kind left float)",
          "ablation_bits": "Activation bit width",
          "calibration": "Calibration set size (accuracy [95 % interval] / drop vs FP32)",
          "search_trials": "Search trials", "timing": "Wall-time split"}


# The significance rule, stated where the marks are (LaTeX caption, report.md).
CAPTIONS = {
    "table1_accuracy": f"Brackets: [min, max] over seeds. * = the drop vs FP32 is significant on every seed, "
                       f"by the rule {RULE}; McNemar p: the largest over seeds. Per-seed intervals: table1_seeds.",
    "table1_seeds": f"Brackets: 95 % percentile-bootstrap intervals ({N_BOOT:,} resamples of the validation examples); "
                    f"the drop is paired with FP32 on the same examples. * = significant, by the rule {RULE}.",
    "calibration": f"Columns: calibration sequences (num_batches x batch_size). Cells: accuracy (%) [95 % "
                   f"percentile-bootstrap interval over the validation examples] / drop vs FP32 (points); "
                   f"* = significant, by the rule {RULE}.",
}


def write_markdown(tables, parents, studies, out: Path, df: pd.DataFrame) -> Path:
    lines = [f"# transquant report: {', '.join(studies)}", ""]
    for p in parents:
        lines.append(f"- parent run `{p.info.run_id}` ({p.data.tags.get('mlflow.runName', '')}), status {p.info.status}")
    if not df.empty:
        lines.append(f"- {len(df)} child runs ({int((df['status'] != 'FINISHED').sum())} not finished); "
                     f"model {', '.join(sorted(map(str, df['model'].unique())))}; task {', '.join(sorted(map(str, df['task'].unique())))}; "
                     f"seeds {', '.join(sorted(map(str, df['seed'].unique())))}")
    lines.append("")
    for name, title in TITLES.items():
        if name in tables:
            latex_like = ("table1_accuracy", "table1_seeds", "table2_deployment", "ablation_peg", "ablation_bits",
                          "calibration")
            view = latex_view(name, tables[name]) if name in latex_like else tables[name]
            view = view.rename(columns=lambda c: c.replace("\\%", "%").replace("$\\Delta$", "Δ").replace("$p$", "p"))
            caption = [CAPTIONS[name], ""] if name in CAPTIONS else []
            lines += [f"## {title}", "", *caption, to_markdown(view), ""]
    f = out / "report.md"
    f.write_text("\n".join(lines))
    return f


def resolve_all(client, studies: list[str], experiment: str | None, all_runs: bool) -> list:
    """The parent runs of several studies, each once."""
    parents = []
    for s in studies:
        parents += [p for p in resolve_parents(client, s, experiment, all_runs)
                    if p.info.run_id not in {q.info.run_id for q in parents}]
    return parents


# --- two methods or runs, paired on the same examples -------------------------------------------------

def _side(client, spec: str, df: pd.DataFrame | None) -> dict[str, str]:
    """{seed: run id} of one side of a comparison: a run id, or a method label (latest finished run per seed)."""
    if RUN_ID.fullmatch(spec):
        try:
            run = client.get_run(spec)
        except Exception as err:  # noqa: BLE001 - MLflow raises a generic exception for unknown ids
            raise ReportError(f"run {spec}: not found in this tracking store ({err})") from err
        return {str(parse_param(run.data.params.get("train.seed"))): spec}
    if df is None or df.empty:
        raise ReportError(f"--compare {spec!r}: a method label needs a study with runs "
                          "(python -m transquant.report <study> --compare A B)")
    rows = df[(df["label"] == spec) & (df["status"] == "FINISHED")]
    if rows.empty:
        raise ReportError(f"--compare {spec!r}: no finished run of this method; "
                          f"methods: {', '.join(dict.fromkeys(df['label']))}")
    return dict(zip(rows["seed"].map(str), rows["run_id"]))  # rows in (seed, start time) order: the latest wins


def _stored_predictions(client, run_id: str, tmp: str) -> tuple[np.ndarray, np.ndarray]:
    dst = Path(tmp) / run_id
    dst.mkdir(exist_ok=True)
    try:
        return load_predictions(client.download_artifacts(run_id, PREDICTIONS, str(dst)))
    except Exception as err:  # noqa: BLE001 - missing artifact: MLflow's error type depends on the store
        raise ReportError(f"run {run_id}: no {PREDICTIONS} artifact; re-run its job with resume=false") from err


def compare(client, a: str, b: str, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """A against B per seed from the stored predictions (both run ids: those two runs)."""
    side_a, side_b = _side(client, a, df), _side(client, b, df)
    if RUN_ID.fullmatch(a) and RUN_ID.fullmatch(b):
        pairs = [(" / ".join(dict.fromkeys([*side_a, *side_b])), side_a.popitem()[1], side_b.popitem()[1])]
    else:
        pairs = [(s, side_a[s], side_b[s]) for s in sorted(set(side_a) & set(side_b), key=lambda s: (len(s), s))]
        if not pairs:
            raise ReportError(f"--compare: no seed has both {a!r} (seeds {', '.join(side_a)}) "
                              f"and {b!r} (seeds {', '.join(side_b)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="transquant-compare-") as tmp:
        for seed, run_a, run_b in pairs:
            pred_a, label_a = _stored_predictions(client, run_a, tmp)
            pred_b, label_b = _stored_predictions(client, run_b, tmp)
            if not np.array_equal(label_a, label_b):
                raise ReportError(f"runs {run_a} and {run_b}: evaluated on different validation examples; "
                                  "cannot pair them")
            ok_a, ok_b = pred_a == label_a, pred_b == label_b
            d = paired(ok_a, ok_b)
            (lo_a, hi_a), (lo_b, hi_b) = accuracy_ci(ok_a), accuracy_ci(ok_b)
            rows.append({"seed": seed, "examples": d.n, "accuracy_a": d.accuracy_a, "accuracy_a_ci_low": lo_a,
                         "accuracy_a_ci_high": hi_a, "accuracy_b": d.accuracy_b, "accuracy_b_ci_low": lo_b,
                         "accuracy_b_ci_high": hi_b, "difference": d.difference, "difference_ci_low": d.ci_low,
                         "difference_ci_high": d.ci_high, "only_a": d.only_a, "only_b": d.only_b,
                         "mcnemar_p": d.p, "significant": d.significant, "run_a": run_a, "run_b": run_b})
    return pd.DataFrame(rows)


def compare_markdown(t: pd.DataFrame, a: str, b: str) -> str:
    view = pd.DataFrame({
        "seed": t["seed"], "examples": t["examples"],
        f"{a} (%)": [_interval(*r) for r in zip(t["accuracy_a"], t["accuracy_a_ci_low"], t["accuracy_a_ci_high"])],
        f"{b} (%)": [_interval(*r) for r in zip(t["accuracy_b"], t["accuracy_b_ci_low"], t["accuracy_b_ci_high"])],
        "A − B (points)": [_star(_interval(*r[:3]), r[3]) for r in
                           zip(t["difference"], t["difference_ci_low"], t["difference_ci_high"], t["significant"])],
        f"only {a} right": t["only_a"], f"only {b} right": t["only_b"], "McNemar p": t["mcnemar_p"].map(_p),
    })
    return (f"A = {a}, B = {b}, paired on the same validation examples. Brackets: 95 % percentile-bootstrap "
            f"intervals ({N_BOOT:,} resamples). * = significant, by the rule {RULE}.\n\n{to_markdown(view)}")


def report(studies: list[str], tracking_uri: str = DEFAULT_URI, out: str | Path | None = None,
           experiment: str | None = None, all_runs: bool = False, log: bool = True) -> Path:
    """Build the report of one or more studies; returns the output directory."""
    from .tracking import client_for

    client = client_for(tracking_uri)
    parents = resolve_all(client, studies, experiment, all_runs)
    parent_ids = [p.info.run_id for p in parents]
    df = children_frame(client, parent_ids)
    if df.empty:
        raise ReportError(f"study {', '.join(studies)}: the parent run(s) {', '.join(parent_ids)} have no child runs")
    tags = parents[-1].data.tags
    objectives = tags.get("transquant.objectives", "accuracy").split(",")
    directions = tags.get("transquant.directions", "maximize").split(",")
    if log:
        for p in parents:
            if p.data.tags.get("transquant.sweeper") == "optuna":
                mark_best(client, p.info.run_id, children_frame(client, [p.info.run_id]), objectives, directions)
        df = children_frame(client, parent_ids)  # re-read the best tags
    elif any(p.data.tags.get("transquant.sweeper") == "optuna" for p in parents):
        df["best"] = best_mask(df, objectives, directions)
        df["pareto"] = df["best"] & (len(objectives) > 1)
    mixed = [c for c in ("model", "task") if df[c].nunique() > 1]
    if mixed:  # methods are identified by quant.* only: different models would be pooled as "seeds"
        print(f"transquant.report: warning: the runs span several {' and '.join(c + 's' for c in mixed)}; "
              "their tables pool them per method — report one model/task at a time", file=sys.stderr)
    tables = build_tables(df, depth_frame(client, df), objectives)
    name = "-".join(s[:8] if RUN_ID.fullmatch(s) else s for s in studies)
    out = Path(out) if out else Path("reports") / name
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.csv")) + list(out.glob("*.tex")) + list(out.glob("*.png")):
        old.unlink()  # a table that has no data any more must not survive from an earlier report
    write_tables(tables, out)
    write_figures(tables, out, objectives, directions, df)
    write_markdown(tables, parents, studies, out, df)
    if log:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        # Each parent gets the seed statistics of its own jobs (never another study's methods), and
        # a report of several studies goes to its own artifact folder, not over a study's report/.
        artifact_path = "report" if len(studies) == 1 and len(parent_ids) == 1 else f"report-{name}"
        for pid in parent_ids:
            own = children_frame(client, [pid]) if len(parent_ids) > 1 else df
            now = get_current_time_millis()  # MLflow's "latest" value ties on timestamp by max value
            metrics = [Metric(k, v, now, 0) for k, v in sorted(study_metrics(own).items())]
            for i in range(0, len(metrics), 500):
                client.log_batch(pid, metrics=metrics[i:i + 500])
            _clear_artifacts(client, pid, artifact_path)
            client.log_artifacts(pid, str(out), artifact_path)
    return out


def _clear_artifacts(client, run_id: str, path: str) -> None:
    """Remove an earlier report's files first, so the artifact folder mirrors this report (a file
    from an older report must not survive). Artifact stores that cannot delete keep old files."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(client.get_run(run_id).info.artifact_uri).delete_artifacts(path)
    except Exception:  # noqa: BLE001 - NotImplementedError, permissions, remote stores: best effort
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m transquant.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("study", nargs="*",
                    help="study name (transquant.study tag, e.g. paper, loo, bits, peg) or parent run id")
    ap.add_argument("--tracking-uri", default=DEFAULT_URI, help=f"MLflow tracking URI (default {DEFAULT_URI})")
    ap.add_argument("--experiment", default=None, help="MLflow experiment name to search (default: all)")
    ap.add_argument("--out", default=None, help="output directory (default reports/<study>)")
    ap.add_argument("--all", action="store_true", help="merge every sweep of the study, not only the latest")
    ap.add_argument("--no-log", action="store_true", help="write files only; no artifacts, metrics or tags in MLflow")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"),
                    help="print A against B, paired per seed on the same examples, instead of the report: two method "
                         "labels of the study (as in its tables, e.g. 'W8A8' 'mixed') or two run ids")
    args = ap.parse_args(argv)
    if not args.study and not args.compare:
        ap.error("give a study name or parent run id (or --compare RUN_ID RUN_ID)")
    try:
        if args.compare:
            from .tracking import client_for

            client = client_for(args.tracking_uri)
            parents = resolve_all(client, args.study, args.experiment, args.all)
            df = children_frame(client, [p.info.run_id for p in parents]) if parents else None
            print(compare_markdown(compare(client, *args.compare, df), *args.compare))
            return 0
        out = report(args.study, args.tracking_uri, args.out, args.experiment, args.all, not args.no_log)
    except ReportError as err:
        print(f"transquant.report: error: {err}", file=sys.stderr)
        return 2
    print(f"report written to {out}")
    for f in sorted(out.iterdir()):
        print(f"  {f.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
