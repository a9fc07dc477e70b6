"""The report's tables, pure functions of the study table (:mod:`.runs`): accuracy and drop vs
FP32 per method and per seed, deployment profile, depth statistics, ablations, calibration sizes,
search trials, the mitigations study (method x bits x weight granularity, the best per setting,
what a transform did to the outliers), what each fine-tune variant did to them and the wall-time split."""
from __future__ import annotations

import math
import re

import pandas as pd

from .labels import GROUPING_ORDER, family_of, finetune_sort_key, finetune_suffix, site_preset, site_sort_key
from .runs import _sortable
from .seeds import aggregate, paired_deltas, seed_summary
from .significance import ALPHA

# Each speed-up is named after its baseline, all timed in the same run (transquant.deploy.profiling).
PROFILE_METRICS = ("latency_p50_ms", "latency_p95_ms", "peak_memory_mb", "model_size_mb", "speedup_vs_torch_fp32",
                   "speedup_vs_ort_fp32", "speedup_vs_peer", "engine_code_agreement", "engine_int8_matmuls",
                   "engine_float_matmuls", "fp32_latency_p50_ms", "fp32_model_size_mb")
PROFILE_TAGS = ("engine_precision", "fp32_attention")
DEPTH_METRICS = ("kurtosis", "top1pct_channel_energy", "max_abs", "variance")
# Cached FP32 statistics: every job logs what computing them cost, but only a cache miss spent it.
PER_CHECKPOINT_SECONDS = ("stats_seconds", "stats_fp32_pass_seconds")
# The mitigations study (conf/experiment/mitigations.yaml): +bits settings and weight granularities in table order.
BITS_ORDER = ("W8A8", "W8A6", "W6A6", "W4A8")
GRANULARITY_ORDER = ("tensor", "channel")
MITIGATION_CELL = ["bits", "weight_granularity", "mitigation"]
# Method families that only the mitigations studies run.
BEYOND_PAPER = ("mse", "dynamic", "smoothquant", "outlier_suppression", "os_plus")
# transform_effect: the site kinds a transform rewrites or feeds, and the statistics compared.
TRANSFORM_KINDS = ("embedding_norm", "attn_norm", "ffn_norm", "attn_residual", "ffn_residual")
TRANSFORM_STATS = ("max_abs", "kurtosis")
WITHIN_BEST = "not_significantly_below_best"


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
    if "finetune" in d:  # two fine-tune variants of a method are two rows of the view, never one
        out["method"] = out["method"] + d["finetune"].map(finetune_suffix)
    out["sequences"] = out["sequences"].astype(int)
    out.insert(len(out.columns) - 1, "significant", out["mcnemar_p"] < ALPHA)
    return out.reset_index(drop=True)


def table_depth(depth: pd.DataFrame) -> pd.DataFrame:
    """Table III: per layer (step), the median over checkpoints of each FP32 statistic, of the
    checkpoints of one fine-tune variant (the default where there is one: a variant changes the
    statistics, so its checkpoints are not more seeds; ``finetune_outliers`` compares them)."""
    if depth.empty:
        return pd.DataFrame()
    if "finetune" in depth:
        depth = depth[depth["finetune"] == min(depth["finetune"], key=finetune_sort_key)]
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


def bits_key(bits) -> tuple:
    """W8A8, W8A6, W6A6, W4A8, then other settings by weight then activation bits, descending."""
    if bits in BITS_ORDER:
        return (0, BITS_ORDER.index(bits), 0, 0)
    m = re.fullmatch(r"W(\d+)A(\d+)", str(bits))
    return (1, 0, -int(m.group(1)), -int(m.group(2))) if m else (2, 0, 0, 0)


def granularity_key(g) -> int:
    return GRANULARITY_ORDER.index(g) if g in GRANULARITY_ORDER else len(GRANULARITY_ORDER)


def mitigation_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The runs of the ``mitigations`` tables: weights and activations quantized, with an accuracy,
    in a study that varies the weight granularity or the weight width (what ``+bits`` and
    ``quant.weight_granularity`` sweep) or runs a method beyond the paper's (a transform, MSE or
    dynamic ranges, bias correction), ordered by bit setting, method
    (canonical order), weight granularity, then seed and start time. Empty for any other study."""
    need = ("bits", "weight_granularity", "mitigation", "_mitigation_sort", "accuracy", "weight_bits", "method",
            "bias_correction")
    if df.empty or any(c not in df for c in need):
        return df.iloc[0:0]
    d = df[df["bits"].notna() & df["accuracy"].notna()]
    beyond = d["method"].map(family_of).isin(BEYOND_PAPER) | (d["bias_correction"] == True)  # noqa: E712
    if d.empty or (d["weight_granularity"].nunique() < 2 and d["weight_bits"].nunique() < 2 and not beyond.any()):
        return df.iloc[0:0]
    keys = {i: (bits_key(b), _sortable(m), granularity_key(g)) for i, b, m, g in
            zip(d.index, d["bits"], d["_mitigation_sort"], d["weight_granularity"])}
    return d.loc[sorted(d.index, key=lambda i: (keys[i], i))]  # the index keeps (seed, start time) order


def method_order(df: pd.DataFrame) -> list[str]:
    """The mitigation labels of :func:`mitigation_runs` in canonical method order."""
    d = mitigation_runs(df)
    ranked = sorted(zip(d["_mitigation_sort"].map(_sortable), d["mitigation"]), key=lambda x: x[0])
    return list(dict.fromkeys(m for _, m in ranked))


def latest_mitigation_runs(d: pd.DataFrame) -> pd.DataFrame:
    """One run per (bit setting, granularity, method, seed): the latest (rows in start-time order)."""
    keyed = d.assign(_seed=d["seed"].map(str))
    return keyed.drop_duplicates([*MITIGATION_CELL, "_seed"], keep="last").drop(columns="_seed")


def _per_seed(grp: pd.DataFrame, value: str):
    if value not in grp:
        return seed_summary([])
    return seed_summary(grp.groupby(grp["seed"].map(str), sort=True)[value].mean().dropna().to_list())


def table_mitigations(df: pd.DataFrame) -> pd.DataFrame:
    """Per bit setting x method x weight granularity: accuracy median [min, max] over seeds (and
    the run's 95 % interval when there is one seed), FP32, drop vs FP32 (paired per seed), on how
    many seeds the drop is significant (McNemar p < 0.05) and the median seconds of calibration and
    of the transform (SmoothQuant / OS / OS+: its statistics pass and search; none for the others)."""
    d = mitigation_runs(df)
    if d.empty:
        return pd.DataFrame()
    rows = []
    for (bits, gran, method), grp in d.groupby(MITIGATION_CELL, sort=False):  # table order
        acc, drop, fp32 = _per_seed(grp, "accuracy"), _per_seed(grp, "accuracy_drop"), _per_seed(grp, "fp32_accuracy")
        latest = latest_mitigation_runs(grp)
        one = acc.n == 1 and "accuracy_ci_low" in latest
        p = latest["mcnemar_p"].dropna() if "mcnemar_p" in latest else pd.Series(dtype=float)
        cal, tr = (grp[c].dropna() if c in grp else pd.Series(dtype=float)
                   for c in ("calibration_seconds", "transform_seconds"))
        rows.append({"bits": bits, "weight_granularity": gran, "method": method, "seeds": acc.n,
                     "accuracy_median": acc.median, "accuracy_min": acc.min, "accuracy_max": acc.max,
                     "accuracy_ci_low": latest["accuracy_ci_low"].iloc[-1] if one else math.nan,
                     "accuracy_ci_high": latest["accuracy_ci_high"].iloc[-1] if one else math.nan,
                     "fp32_accuracy_median": fp32.median, "drop_median": drop.median, "drop_min": drop.min,
                     "drop_max": drop.max, "significant_seeds": int((p < ALPHA).sum()), "tested_seeds": len(p),
                     "mcnemar_p_max": p.max() if len(p) else math.nan,
                     "calibration_seconds_median": cal.median() if len(cal) else math.nan,
                     "transform_seconds_median": tr.median() if len(tr) else math.nan})
    return pd.DataFrame(rows)


def mitigations_pivot(t: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Median accuracy: rows methods (canonical order), columns ``<bits> <granularity>``."""
    if t.empty:
        return pd.DataFrame()
    cells = sorted(set(zip(t["bits"], t["weight_granularity"])), key=lambda c: (bits_key(c[0]), granularity_key(c[1])))
    cols = [f"{b} {g}" for b, g in cells]
    p = t.assign(_col=[f"{b} {g}" for b, g in zip(t["bits"], t["weight_granularity"])]).pivot(
        index="method", columns="_col", values="accuracy_median")
    p = p.reindex(index=[m for m in methods if m in p.index], columns=cols)
    p.columns.name = None
    return p.reset_index()


def best_of_cells(t: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Per (bit setting, granularity): the method of the highest median accuracy (ties: canonical order)."""
    out = {}
    for cell, g in t.groupby(["bits", "weight_granularity"], sort=False):
        out[cell] = g.loc[g["accuracy_median"].idxmax(), "method"]  # idxmax: the first of equal maxima
    return out


def best_per_bits(t: pd.DataFrame, pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per bit setting x granularity: the best method and every method not significantly below it.

    ``pairs`` (:func:`transquant.studies.queries.mitigation_pairs`): per cell, method and seed, the
    best minus the method on the same validation examples (points) and the exact McNemar p, from the
    runs' stored predictions. A method is significantly below the best when, on every seed both
    have, the best is ahead with p < 0.05; a method without stored predictions is ``untested``."""
    if t.empty:
        return pd.DataFrame()
    pairs = pairs if pairs is not None and not pairs.empty else pd.DataFrame(
        columns=["bits", "weight_granularity", "best", "method", "seed", "difference", "mcnemar_p"])
    best = best_of_cells(t)
    rows = []
    for (bits, gran) in sorted(best, key=lambda c: (bits_key(c[0]), granularity_key(c[1]))):
        g = t[(t["bits"] == bits) & (t["weight_granularity"] == gran)]
        top = g[g["method"] == best[(bits, gran)]].iloc[0]
        tied, below, untested = [], [], []
        for m in g["method"]:
            if m == top["method"]:
                continue
            pm = pairs[(pairs["bits"] == bits) & (pairs["weight_granularity"] == gran) & (pairs["best"] == top["method"])
                       & (pairs["method"] == m)]
            if pm.empty:
                untested.append(m)
            elif ((pm["difference"] > 0) & (pm["mcnemar_p"] < ALPHA)).all():
                below.append(m)
            else:
                tied.append(m)
        rows.append({"bits": bits, "weight_granularity": gran, "best": top["method"],
                     "best_accuracy_median": top["accuracy_median"], "best_seeds": int(top["seeds"]),
                     "methods": len(g), WITHIN_BEST: "; ".join(tied), "significantly_below_best": len(below),
                     "untested": "; ".join(untested)})
    return pd.DataFrame(rows)


def table_transform_effect(df: pd.DataFrame, transform: pd.DataFrame | None) -> pd.DataFrame:
    """Per transform run (``quant.transform`` != none) and site kind: the largest over layers of
    ``max_abs`` and ``kurtosis`` of the FP32 model (``activation_stats.csv``) and of the transformed
    FP32 model (``activation_stats_transformed.csv``), and after / before. ``transform``:
    :func:`transquant.studies.queries.transform_frame`."""
    if transform is None or transform.empty or df.empty:
        return pd.DataFrame()
    runs = df.set_index("run_id")
    top = transform.groupby(["run_id", "kind", "when", "stat"], sort=False)["value"].max()
    layers = transform.groupby(["run_id", "kind"], sort=False)["layer"].nunique()
    order = sorted(dict.fromkeys(transform["run_id"]),
                   key=lambda r: (bits_key(runs.at[r, "bits"]), _sortable(runs.at[r, "_mitigation_sort"]),
                                  granularity_key(runs.at[r, "weight_granularity"]), _sortable(runs.at[r, "seed"]),
                                  _sortable(runs.at[r, "start_time"]), r))
    rows = []
    for r in order:
        for kind in TRANSFORM_KINDS:
            if (r, kind) not in layers.index:
                continue
            row = {"bits": runs.at[r, "bits"], "weight_granularity": runs.at[r, "weight_granularity"],
                   "method": runs.at[r, "mitigation"], "transform": runs.at[r, "transform"], "seed": runs.at[r, "seed"],
                   "kind": kind, "layers": int(layers[(r, kind)])}
            for stat in TRANSFORM_STATS:
                before = top.get((r, kind, "before", stat), math.nan)
                after = top.get((r, kind, "after", stat), math.nan)
                row[f"{stat}_before"], row[f"{stat}_after"] = before, after
                row[f"{stat}_ratio"] = after / before if before and not math.isnan(before) else math.nan
            rows.append({**row, "run_id": r})
    return pd.DataFrame(rows)


def _first(g: pd.DataFrame, col: str) -> float:
    v = g[col].dropna() if col in g else ()
    return v.iloc[0] if len(v) else math.nan


def table_finetune_outliers(df: pd.DataFrame, stats: pd.DataFrame | None) -> pd.DataFrame:
    """Per fine-tuned checkpoint of a study with a fine-tune variant besides the default: the
    variant, seed, FP32 accuracy and fine-tune seconds (logged by the job that trained it), the
    largest over layers of ``max_abs`` and ``kurtosis`` per site kind of its FP32 model, and each
    against the default variant's checkpoint of the same model, task and seed (ratio; extra
    seconds). ``stats``: :func:`transquant.studies.queries.finetune_frame`."""
    if stats is None or stats.empty or df.empty or "finetune" not in df or not (df["finetune"] != "").any():
        return pd.DataFrame()
    top = stats.groupby(["checkpoint", "kind", "stat"], sort=False)["value"].max()
    values = [(kind, stat) for kind in TRANSFORM_KINDS if kind in set(stats["kind"]) for stat in TRANSFORM_STATS]
    rows = []
    for ckpt in dict.fromkeys(stats["checkpoint"]):
        g = df[df["checkpoint"] == ckpt]
        if g.empty:
            continue
        r = g.iloc[0]
        rows.append({"finetune": r["finetune"], "seed": r["seed"], "fp32_accuracy": _first(g, "fp32_accuracy"),
                     "finetune_seconds": _first(g, "finetune_seconds"),
                     **{f"{kind}_{stat}": top.get((ckpt, kind, stat), math.nan) for kind, stat in values},
                     "_same": f"{r['model']}|{r['task']}|{r['seed']}",
                     "_order": (finetune_sort_key(r["finetune"]), _sortable(r["seed"]), ckpt)})
    if not rows:
        return pd.DataFrame()
    t = pd.DataFrame(sorted(rows, key=lambda x: x["_order"]))
    default = t[t["finetune"] == ""].drop_duplicates("_same").set_index("_same")
    out = t[["finetune", "seed", "fp32_accuracy", "finetune_seconds"]].copy()
    if not default.empty:
        out["extra_finetune_seconds"] = t["finetune_seconds"] - t["_same"].map(default["finetune_seconds"])
    for kind, stat in values:
        c = f"{kind}_{stat}"
        out[c] = t[c]
        if not default.empty:
            out[f"{c}_vs_default"] = t[c] / t["_same"].map(default[c].where(default[c] != 0))
    out["finetune"] = out["finetune"].replace("", "default")
    return out


RUN_COLUMNS = ["run_id", "status", "seed", "method", "label", "k", "grouping", "percentile", "weight_bits", "act_bits",
               "weight_granularity", "transform", "act_exclude", "calibration_sequences", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
               "fp32_accuracy", "accuracy_drop", "drop_ci_low", "drop_ci_high", "mcnemar_p", *PROFILE_METRICS, *PROFILE_TAGS, "high_precision_sites",
               "calibration_seconds", "eval_seconds", "finetune_seconds", "finetune_cache", "reused", "best", "pareto"]


def _run_columns(df: pd.DataFrame) -> list[str]:
    """:data:`RUN_COLUMNS`, with ``finetune`` after ``label`` when some run has a non-default variant."""
    if "finetune" not in df or not (df["finetune"] != "").any():
        return RUN_COLUMNS
    i = RUN_COLUMNS.index("label") + 1
    return [*RUN_COLUMNS[:i], "finetune", *RUN_COLUMNS[i:]]


def build_tables(df: pd.DataFrame, depth: pd.DataFrame | None = None, objectives: list[str] | None = None,
                 transform: pd.DataFrame | None = None, pairs: pd.DataFrame | None = None,
                 finetune: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Every table of the report from the run table (and the depth statistics, the statistics of
    the transform runs, the paired comparisons with each setting's best method and the statistics
    of each fine-tuned checkpoint)."""
    mitigations = table_mitigations(df)
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
        "mitigations": mitigations,
        "mitigations_pivot": mitigations_pivot(mitigations, method_order(df)),
        "best_per_bits": best_per_bits(mitigations, pairs),
        "transform_effect": table_transform_effect(df, transform),
        "finetune_outliers": table_finetune_outliers(df, finetune),
        "search_trials": search_trials(df, objectives or ["accuracy"]) if not df.empty else pd.DataFrame(),
        "timing": table_timing(df),
        "runs": df[[c for c in _run_columns(df) if c in df]].copy() if not df.empty else pd.DataFrame(),
    }
    return {k: v for k, v in tables.items() if not v.empty}
