"""The report's figures (PNG, no timestamps): accuracy vs K, percentile, bits (per method family;
per mitigation, weights per tensor and per channel) and calibration size, the Pareto front of a
search, FP32 statistics by depth."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .labels import GROUPING_ORDER
from .pareto import best_mask
from .tables import DEPTH_METRICS, bits_key, granularity_key, mitigation_runs


def draw_front(ax, df: pd.DataFrame, objectives: list[str], directions: list[str]) -> pd.DataFrame:
    """Every trial grey, the Pareto front red: ``objectives[1]`` on x, ``objectives[0]`` on y.
    Returns the front, sorted along x."""
    x_o, y_o = objectives[1], objectives[0]
    d = df[df[x_o].notna() & df[y_o].notna()]
    mask = np.asarray(best_mask(d, objectives, directions), dtype=bool)
    ax.scatter(d[x_o], d[y_o], color="lightgray", edgecolor="gray", label="trials")
    front = d[mask].sort_values(x_o, kind="stable")
    ax.plot(front[x_o], front[y_o], "o-", color="C3", label="Pareto front")
    return front


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

    def series(t, col, order, xcol, title, name, xlabel):
        """One error-bar line per value of ``col`` over ``xcol``."""
        fig, ax = subplots(figsize=(5, 3.5))
        for v in order:
            s = t[t[col] == v]
            errbar(ax, s[xcol], s, v)
        ax.set_xticks(sorted(set(t[xcol])))
        ax.set_title(title)
        finish(fig, ax, name, xlabel)

    if "ablation_peg" in tables:
        t = tables["ablation_peg"]
        series(t, "grouping", [g for g in GROUPING_ORDER if g in set(t["grouping"])], "k",
               "PEG: accuracy vs groups K", "accuracy_vs_k.png", "K (groups per PEG site)")
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
        series(t, "family", list(dict.fromkeys(t["family"])), "act_bits",
               "Accuracy vs activation bits (weights 8-bit)", "accuracy_vs_bits.png", "activation bits")
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
    if "mitigations" in tables:
        t = tables["mitigations"]
        grans = sorted(set(t["weight_granularity"]), key=granularity_key)
        bits = sorted(set(t["bits"]), key=bits_key)
        methods = list(tables["mitigations_pivot"]["method"]) if "mitigations_pivot" in tables else list(
            dict.fromkeys(t["method"]))
        fig = Figure(figsize=(5 * len(grans), 4.2))
        axes = np.atleast_1d(fig.subplots(1, len(grans), sharey=True))
        runs = mitigation_runs(df)  # FP32: median over seeds (one checkpoint per seed)
        if "finetune" in runs and (runs["finetune"] == "").any():  # of the default fine-tune variant's checkpoints
            runs = runs[runs["finetune"] == ""]
        fp32 = (runs.groupby(runs["seed"].map(str))["fp32_accuracy"].mean().median()
                if "fp32_accuracy" in runs and runs["fp32_accuracy"].notna().any() else math.nan)
        for ax, g in zip(axes, grans):
            for i, m in enumerate(methods):
                s = t[(t["weight_granularity"] == g) & (t["method"] == m)]
                if s.empty:
                    continue
                s = s.iloc[sorted(range(len(s)), key=lambda j: bits_key(s["bits"].iloc[j]))]
                y = s["accuracy_median"].to_numpy(float)
                one = (s["seeds"] == 1).to_numpy() & s["accuracy_ci_low"].notna().to_numpy()
                lo = np.where(one, s["accuracy_ci_low"].to_numpy(float), s["accuracy_min"].to_numpy(float))
                hi = np.where(one, s["accuracy_ci_high"].to_numpy(float), s["accuracy_max"].to_numpy(float))
                ax.errorbar([bits.index(b) for b in s["bits"]], y, yerr=np.vstack([y - lo, hi - y]), marker="o",
                            capsize=3, color=f"C{i % 10}", linestyle="-" if i < 10 else "--", label=m)
            if not math.isnan(fp32):
                ax.axhline(fp32, color="gray", linestyle="--", linewidth=1, label=f"FP32 {fp32:.2f}")
            ax.set_xticks(range(len(bits)), bits)
            ax.set_xlim(-0.3, len(bits) - 0.7)
            ax.set_title(f"weights per {g}")
            ax.set_xlabel("bit setting")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        for ax in axes[1:]:  # every method once, whichever panel has it
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        axes[-1].legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle("Accuracy vs bit setting per method (bars: 95 % interval of one seed, else min-max over seeds)",
                     fontsize=9)
        fig.tight_layout()
        f = out / "accuracy_vs_bits_methods.png"
        fig.savefig(f, dpi=120, metadata={"Software": None}, bbox_inches="tight")
        files.append(f)
    if len(objectives) > 1 and all(o in df for o in objectives[:2]) and not df.empty:
        fig, ax = subplots(figsize=(5, 3.5))
        draw_front(ax, df, objectives, directions)
        ax.set_title("Search: Pareto front")
        finish(fig, ax, "pareto.png", objectives[1], objectives[0])
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
