"""The report's figures (PNG, no timestamps): accuracy vs K, percentile, bits and calibration size,
the Pareto front of a search, FP32 statistics by depth."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .labels import GROUPING_ORDER
from .pareto import best_mask
from .tables import DEPTH_METRICS


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
