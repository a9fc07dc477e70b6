"""Figures of the outlier study, from :class:`~transquant.analysis.results.ActivationStats` (PNG).

Matplotlib is used through its object API on the Agg canvas (no ``pyplot``), so nothing global
is touched and figures can be made from any thread or worker. Every figure states what was
measured in its title: FP32 model, non-pad tokens, the sample size.

* ``depth_curves.png`` — kurtosis and top-1 % channel energy against depth, one line per site kind.
* ``outlier_map.png`` — residual sums (LayerNorm inputs) x channels heat map of max |x|.
* ``worst_layer_histogram.png`` — values of the residual sum with the highest kurtosis against
  the W8A8 per-tensor grid and against PEG per-group grids.
* ``peg_ranges.png`` — per-channel ranges in the PEG (sorted) permutation with group boundaries.
* ``sqnr.png`` — quantized runs: SQNR per site kind and layer next to the FP32 kurtosis.
"""
from __future__ import annotations

import importlib.metadata
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ..core import cache, provenance
from ..quant.quantizers import asymmetric_grid
from ..quant.ranges import make_groups
from ..quant.sites import RESIDUAL_KINDS
from .error_attribution import outlier_error_share
from .results import ActivationStats, SiteStats, top_count

FIGURES = ("depth_curves.png", "outlier_map.png", "worst_layer_histogram.png", "peg_ranges.png", "sqnr.png")
# The code that draws them (and the quantizer and PEG grouping it draws grids with).
FIGURE_MODULES = ("transquant.analysis.figures", "transquant.analysis.results", "transquant.quant.quantizers",
                  "transquant.quant.ranges")
BITS = 8
DEFAULT_K = 6
EMB_X = -1  # x position of the embedding sites on per-layer axes

# Kind -> (label, colour, line style, width). Residual sums bold, LayerNorm outputs dashed.
_STYLE = {
    "embedding_sum": ("embedding sum (LN input)", "#1f77b4", "-", 2.5),
    "attn_residual": ("attn residual sum (LN input)", "#d62728", "-", 2.5),
    "ffn_residual": ("FFN residual sum (LN input)", "#000000", "-", 2.8),
    "embedding_norm": ("embedding LN output", "#1f77b4", "--", 1.4),
    "attn_norm": ("attn LN output", "#d62728", "--", 1.4),
    "ffn_norm": ("FFN LN output", "#555555", "--", 1.4),
    "ffn_intermediate": ("FFN intermediate (GELU out)", "#2ca02c", "-", 1.6),
    "ffn_output": ("FFN output (before residual add)", "#9467bd", "-", 1.6),
    "attn_output": ("attn output projection", "#ff7f0e", "-", 1.3),
    "query": ("query", "#8c564b", ":", 1.2),
    "key": ("key", "#e377c2", ":", 1.2),
    "value": ("value", "#7f7f7f", ":", 1.2),
    "context": ("attn context", "#bcbd22", ":", 1.2),
    "pooler": ("pooler", "#17becf", ":", 1.2),
}


def _style(kind: str):
    return _STYLE.get(kind, (kind, None, "-", 1.2))


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _sample_note(stats: ActivationStats) -> str:
    m = stats.meta
    parts = ["FP32", "non-pad tokens only"]
    if m.get("examples"):
        parts.append(f"{m['examples']} examples / {m.get('tokens', '?')} tokens")
    if m.get("label"):
        parts.insert(0, str(m["label"]))
    return ", ".join(parts)


def _layer_ticks(ax, layers: list[int], with_emb: bool) -> None:
    ticks = ([EMB_X] if with_emb else []) + layers
    ax.set_xticks(ticks)
    ax.set_xticklabels((["emb"] if with_emb else []) + [str(i) for i in layers])
    ax.set_xlabel("layer (emb = embeddings)")


def _per_kind(stats: ActivationStats, value) -> dict[str, tuple[list[int], list[float]]]:
    """kind -> (x positions, values); embedding kinds at EMB_X, pooler left out."""
    out = {}
    for kind in stats.kinds:
        if kind == "pooler":
            continue
        rows = stats.of_kind(kind)
        xs = [EMB_X if s.layer is None else s.layer for s in rows]
        out[kind] = (xs, [value(s) for s in rows])
    return out


def depth_curves(stats: ActivationStats, path: str | Path) -> Path:
    """Kurtosis (log) and top-1 % channel energy share against layer, one line per site kind."""
    fig = Figure(figsize=(14, 5.2))
    ax1, ax2 = fig.subplots(1, 2)
    layers = sorted({s.layer for s in stats.sites if s.layer is not None})
    with_emb = any(s.layer is None and s.kind != "pooler" for s in stats.sites)
    for ax, value, ylabel in (
            (ax1, lambda s: s.kurtosis, "kurtosis (Pearson, Gaussian = 3), log scale"),
            (ax2, lambda s: 100 * s.top1pct_channel_energy, "share of energy Σx² in top-1 % channels (%)")):
        for kind, (xs, ys) in _per_kind(stats, value).items():
            label, color, ls, lw = _style(kind)
            marker = "o" if len(xs) == 1 else "."
            ax.plot(xs, ys, ls=ls, lw=lw, color=color, marker=marker, label=label)
        ax.set_ylabel(ylabel)
        _layer_ticks(ax, layers, with_emb)
        ax.grid(alpha=0.3)
    ffn = stats.of_kind("ffn_residual")
    if ffn and any(math.isfinite(s.kurtosis_non_special) for s in ffn):
        ax1.plot([s.layer for s in ffn], [s.kurtosis_non_special for s in ffn], color="#000000", ls=(0, (1, 1)),
                 lw=1.8, marker="x", label="FFN residual sum, without [CLS]/[SEP]/special tokens")
    ax1.set_yscale("log")
    ax1.axhline(3, color="gray", lw=1, ls="-.")
    ax1.annotate("Gaussian (3)", (ax1.get_xlim()[0], 3), xytext=(4, 3), textcoords="offset points",
                 fontsize=8, color="gray", va="bottom")
    widths = {s.channels for s in stats.sites}
    if widths:
        hidden = max(widths, key=lambda c: sum(s.channels == c for s in stats.sites))
        uniform = 100 * top_count(hidden) / hidden
        ax2.axhline(uniform, color="gray", lw=1, ls="-.")
        ax2.annotate(f"equal channels ({uniform:.1f} %)", (ax2.get_xlim()[0], uniform), xytext=(4, 3),
                     textcoords="offset points", fontsize=8, color="gray", va="bottom")
    ax2.set_ylim(0, 100)
    ax1.set_title("Tail heaviness per site")
    ax2.set_title("How concentrated the energy is in a few channels")
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="site kind")
    fig.suptitle(f"Activation statistics against depth ({_sample_note(stats)})")
    fig.tight_layout()
    return _save(fig, path)


def outlier_channels(stats: ActivationStats, max_labels: int = 8) -> list[int]:
    """Channels to label on the residual stream: the most persistent top-k ids."""
    res = stats.outliers().get("residual_stream")
    if not res:
        return []
    return [int(c) for c in list(res["persistence"])[:max_labels]]


def outlier_map(stats: ActivationStats, path: str | Path) -> Path:
    """Residual sums (rows, in forward order) x channels: per-channel max |x|, log colour."""
    names, grid = stats.max_abs_map(RESIDUAL_KINDS)
    if not names:
        raise ValueError("outlier_map: no residual-sum site in the statistics")
    other_width = [s.name for s in stats.residual_sites() if s.name not in names]
    fig = Figure(figsize=(14, 0.42 * len(names) + 2.6))
    ax = fig.subplots()
    positive = grid[grid > 0]
    vmin = max(float(np.percentile(positive, 1)) if positive.size else 1e-3, 1e-6)
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma",
                   norm=LogNorm(vmin=vmin, vmax=max(float(grid.max()), vmin * 10)))
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_ylabel("residual sum (forward order)")
    ax.set_xlabel("channel (hidden unit) index")
    labelled = outlier_channels(stats)
    top = ax.secondary_xaxis("top")
    top.set_xticks(labelled)
    top.set_xticklabels([str(c) for c in labelled], fontsize=8, rotation=90)
    top.set_xlabel("outlier channels (most persistent top-%d ids by max |x|)" % stats.top_k, fontsize=9)
    for i, row in enumerate(grid):
        c = int(row.argmax())
        ax.annotate(f"{row[c]:.0f}", (c, i), xytext=(6, 0), textcoords="offset points", color="cyan",
                    fontsize=7, va="center")
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    cb.set_label("max |x| over non-pad tokens (log scale)")
    skipped = f"; other width, not shown: {', '.join(other_width)}" if other_width else ""
    ax.set_title(f"Outlier map of the residual stream: per-channel max |x| of each residual sum\n"
                 f"({_sample_note(stats)}; numbers: each row's largest value{skipped})")
    fig.tight_layout()
    return _save(fig, path)


def _vlines(ax, xs, **kw) -> None:
    """Full-height vertical lines as one collection (hundreds of axvline artists are slow)."""
    if len(xs):
        ax.vlines(xs, 0, 1, transform=ax.get_xaxis_transform(), **kw)


def _codes(x: np.ndarray, scale: float, zero: float, qmax: int) -> np.ndarray:
    return np.clip(np.round(x / scale) + zero, 0, qmax)


def _grid_of(lo: float, hi: float, bits: int = BITS) -> tuple[float, float, int]:
    g = asymmetric_grid(torch.tensor(lo), torch.tensor(hi), bits)
    return float(g.scale), float(g.zero_point), g.qmax


def _bins_spanned(values: np.ndarray, lo: float, hi: float, bits: int = BITS,
                  central: float = 0.99) -> tuple[int, float, float]:
    """Grid bins (integer codes) the central ``central`` share of ``values`` falls into."""
    a, b = np.quantile(values, [(1 - central) / 2, (1 + central) / 2])
    scale, zero, qmax = _grid_of(lo, hi, bits)
    ca, cb = _codes(np.array([a, b]), scale, zero, qmax)
    return int(cb - ca + 1), float(a), float(b)


def _grid_edges(lo: float, hi: float, bits: int = BITS) -> np.ndarray:
    scale, zero, qmax = _grid_of(lo, hi, bits)
    return (np.arange(qmax + 2) - zero - 0.5) * scale


def peg_groups(site: SiteStats, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(group id per channel, channel order of the PEG permutation, group lo, group hi)."""
    lo, hi = torch.from_numpy(site.lo).float(), torch.from_numpy(site.hi).float()
    k = max(1, min(k, site.channels))
    groups = make_groups(lo, hi, k, "sorted").numpy()
    order = np.argsort((site.hi - site.lo).clip(min=0).astype(np.float32), kind="stable")
    glo = np.array([site.lo[groups == g].min() for g in range(k)])
    ghi = np.array([site.hi[groups == g].max() for g in range(k)])
    return groups, order, glo, ghi


def worst_layer_histogram(stats: ActivationStats, path: str | Path, k: int | None = None) -> Path:
    """The sampled residual sum (highest kurtosis): values vs the 8-bit per-tensor grid and vs
    PEG per-group grids. Ranges are min-max over the statistics sample."""
    site = stats.sampled_site()
    if site is None or site.sample is None or not site.sample.size:
        raise ValueError("worst_layer_histogram: the statistics kept no value sample (reservoir=0?)")
    k = k or DEFAULT_K
    v, ch = site.sample.astype(np.float64), site.sample_channels
    lo, hi = float(site.lo.min()), float(site.hi.max())
    n_bins, a, b = _bins_spanned(v, lo, hi)
    scale = _grid_of(lo, hi)[0]
    groups, _, glo, ghi = peg_groups(site, k)
    vg = groups[ch]
    colors = [f"C{g % 10}" for g in range(k)]

    fig = Figure(figsize=(14, 9.5))
    (ax_full, ax_zoom), (ax_peg, ax_bar) = fig.subplots(2, 2)
    # (a) full range, per-tensor grid
    ax_full.hist(v, bins=np.linspace(lo, hi, 400), color="0.35", log=True, histtype="stepfilled")
    _vlines(ax_full, _grid_edges(lo, hi), color="tab:red", lw=0.3, alpha=0.35)
    ax_full.axvspan(a, b, color="tab:blue", alpha=0.25, label=f"central 99 % of values [{a:.2f}, {b:.2f}]")
    ax_full.set_title(f"(a) full range with the W{BITS}A{BITS} per-tensor grid "
                      f"(red: its {2 ** BITS} bins, step {scale:.3g})", fontsize=10)
    ax_full.set_xlabel("activation value")
    ax_full.set_ylabel("count in the sample (log)")
    ax_full.legend(fontsize=8, loc="upper right")
    # (b) zoom on the bulk, per-tensor grid
    pad = 0.6 * (b - a) + 1e-9
    zlo, zhi = a - pad, b + pad
    inside = v[(v >= zlo) & (v <= zhi)]
    zbins = np.linspace(zlo, zhi, 160)
    ax_zoom.hist(inside, bins=zbins, color="0.35", log=True, histtype="stepfilled")
    edges = _grid_edges(lo, hi)
    _vlines(ax_zoom, edges[(edges >= zlo) & (edges <= zhi)], color="tab:red", lw=1.2)
    ax_zoom.axvspan(a, b, color="tab:blue", alpha=0.2)
    ax_zoom.set_xlim(zlo, zhi)
    ax_zoom.set_title(f"(b) zoom on the bulk: per-tensor grid gives the central 99 % only {n_bins} of {2 ** BITS} bins",
                      fontsize=10)
    ax_zoom.set_xlabel("activation value")
    ax_zoom.set_ylabel("count (log)")
    # (c) zoom, PEG groups
    per_group = []
    for g in range(k):
        vals = v[vg == g]
        if not vals.size:
            per_group.append(0)
            continue
        nb, _, _ = _bins_spanned(vals, float(glo[g]), float(ghi[g]))
        per_group.append(nb)
        sel = vals[(vals >= zlo) & (vals <= zhi)]
        n_ch = int((groups == g).sum())
        ax_peg.hist(sel, bins=zbins, histtype="step", lw=1.5, color=colors[g], log=True,
                    label=f"group {g}: {n_ch} ch, range [{glo[g]:.2f}, {ghi[g]:.2f}], {nb} bins")
        ge = _grid_edges(float(glo[g]), float(ghi[g]))
        ge = ge[(ge >= zlo) & (ge <= zhi)]
        if ge.size <= 80:  # finer grids would just paint the panel
            _vlines(ax_peg, ge, color=colors[g], lw=0.5, alpha=0.5)
    ax_peg.set_xlim(zlo, zhi)
    ax_peg.set_title(f"(c) zoom, PEG with K={k} sorted groups (lines: grid edges of coarse groups)", fontsize=10)
    ax_peg.set_xlabel("activation value")
    ax_peg.set_ylabel("count (log)")
    ax_peg.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False,
                  title="group: channels, min-max range, bins the central 99 % of its values get", title_fontsize=8)
    # (d) bins per group
    labels = ["per-tensor"] + [f"PEG g{g}" for g in range(k)]
    vals = [n_bins] + per_group
    bars = ax_bar.bar(range(len(vals)), vals, color=["0.35"] + colors)
    for rect, n in zip(bars, vals):
        ax_bar.annotate(str(n), (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center",
                        va="bottom", fontsize=9)
    ax_bar.set_xticks(range(len(vals)))
    ax_bar.set_xticklabels(labels, fontsize=8)
    ax_bar.set_ylabel(f"grid bins covering the central 99 % (of {2 ** BITS})")
    ax_bar.set_ylim(0, 2 ** BITS * 1.08)
    ax_bar.set_title("(d) resolution the bulk gets: per-tensor vs each PEG group's own grid", fontsize=10)
    layer = "embeddings" if site.layer is None else f"layer {site.layer}"
    fig.suptitle(f"Highest-kurtosis residual sum: {site.name} ({layer}, kurtosis {site.kurtosis:.0f}); "
                 f"{v.size:,} sampled values; {BITS}-bit min-max ranges over the statistics sample\n"
                 f"({_sample_note(stats)})")
    fig.tight_layout()
    return _save(fig, path)


def peg_ranges(stats: ActivationStats, path: str | Path, k: int | None = None, site: str | None = None) -> Path:
    """Per-channel [min, max] of one residual sum sorted by range (the PEG permutation), with
    the K group boundaries and each group's 8-bit step."""
    s = stats[site] if site else (stats.sampled_site() or stats.worst_site())
    k = k or DEFAULT_K
    groups, order, glo, ghi = peg_groups(s, k)
    x = np.arange(s.channels)
    fig = Figure(figsize=(13, 5.5))
    ax = fig.subplots()
    ax.fill_between(x, s.lo[order], s.hi[order], step="mid", color="tab:blue", alpha=0.35, label="channel [min, max]")
    ax.plot(x, s.hi[order], color="tab:blue", lw=1, drawstyle="steps-mid")
    ax.plot(x, s.lo[order], color="tab:blue", lw=1, drawstyle="steps-mid")
    sorted_groups = groups[order]
    bounds = np.flatnonzero(np.diff(sorted_groups)) + 0.5
    for bnd in bounds:
        ax.axvline(bnd, color="k", ls="--", lw=1)
    starts = np.concatenate([[0], np.ceil(bounds).astype(int)])
    ends = np.concatenate([np.ceil(bounds).astype(int), [s.channels]])
    for g0, g1 in zip(starts, ends):
        g = int(sorted_groups[g0])
        step = (max(ghi[g], 0) - min(glo[g], 0)) / (2 ** BITS - 1)
        ax.hlines([glo[g], ghi[g]], g0 - 0.5, g1 - 0.5, color="tab:red", lw=1.5)
        ax.annotate(f"g{g}: {g1 - g0} ch\nstep {step:.3g}", ((g0 + g1) / 2, glo[g]), xytext=(0, -6),
                    textcoords="offset points", ha="center", va="top", fontsize=8, color="tab:red")
    ax.hlines([], 0, 0, color="tab:red", lw=1.5, label=f"group range ({BITS}-bit grid per group)")
    for j, rank in enumerate(range(s.channels - 1, max(-1, s.channels - 4), -1)):
        c = int(order[rank])
        y = s.hi[c] if abs(s.hi[c]) >= abs(s.lo[c]) else s.lo[c]
        ax.annotate(f"ch {c}", (rank, y), xytext=(-60 - 45 * j, 14 if y > 0 else -18), textcoords="offset points",
                    fontsize=8, ha="right", arrowprops={"arrowstyle": "-", "lw": 0.6})
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(min(-1.0, float(s.lo.min()) * 30), max(1.0, float(s.hi.max()) * 12))  # room for labels
    ax.set_xlim(-1, s.channels)
    ax.set_xlabel("channel rank in the PEG permutation (sorted by range max − min)")
    ax.set_ylabel("activation value (symlog: linear within ±1)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"PEG ranges of {s.name}: K={k} groups of equal size after sorting channels by range\n"
                 f"(min/max over the statistics sample; {_sample_note(stats)})")
    fig.tight_layout()
    return _save(fig, path)


def sqnr_figure(error_df: pd.DataFrame, stats: ActivationStats | None, path: str | Path,
                title: str | None = None) -> Path:
    """SQNR (dB) per site kind against layer, next to the FP32 kurtosis of the same sites."""
    fig = Figure(figsize=(14, 5.2))
    ax1, ax2 = fig.subplots(1, 2)
    df = error_df.copy()
    df["x"] = [EMB_X if pd.isna(layer) else int(layer) for layer in df["layer"]]
    layers = sorted(int(v) for v in df["layer"].dropna().unique())
    with_emb = bool((df["x"] == EMB_X).any())
    capped = False
    for kind, sub in df[df["kind"] != "pooler"].groupby("kind", sort=False):
        label, color, ls, lw = _style(kind)
        sub = sub.sort_values("x")
        y = sub["sqnr_db"].to_numpy(dtype=float)
        finite = np.isfinite(y)
        capped |= bool((~finite).any())
        ax1.plot(sub["x"][finite], y[finite], ls=ls, lw=lw, color=color, marker="o" if finite.sum() == 1 else ".",
                 label=label)
    ax1.set_ylabel("SQNR (dB) = 10 log10(Σ x_fp² / Σ (x_q − x_fp)²), end-to-end")
    ax1.set_title("Quantized vs FP32 model, per site" + (" (no-error sites omitted)" if capped else ""))
    _layer_ticks(ax1, layers, with_emb)
    ax1.grid(alpha=0.3)
    if stats is not None:
        for kind, (xs, ys) in _per_kind(stats, lambda s: s.kurtosis).items():
            if kind not in set(df["kind"]):
                continue
            label, color, ls, lw = _style(kind)
            ax2.plot(xs, ys, ls=ls, lw=lw, color=color, marker=".", label=label)
        ax2.set_yscale("log")
        ax2.axhline(3, color="gray", lw=1, ls="-.")
        ax2.set_ylabel("FP32 kurtosis (Gaussian = 3), log scale")
        ax2.set_title("FP32 tail heaviness of the same sites")
        _layer_ticks(ax2, layers, with_emb)
        ax2.grid(alpha=0.3)
    else:
        ax2.axis("off")
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="site kind")
    share = outlier_error_share(df) if {"error", "top1pct_error"} <= set(df.columns) else float("nan")
    fig.suptitle((title or "Quantization error per site") +
                 (f" — the top-1 % channels (by FP32 energy) hold {100 * share:.0f} % of the residual sums' "
                  "squared error" if math.isfinite(share) else ""))
    fig.tight_layout()
    return _save(fig, path)


def stats_figures(stats: ActivationStats, out_dir: str | Path, k: int | None = None) -> list[Path]:
    """The figures drawn from the FP32 statistics (and PEG's ``k``) alone, written into ``out_dir``:
    the same files for every job of one checkpoint."""
    out_dir = Path(out_dir)
    paths = [depth_curves(stats, out_dir / "depth_curves.png")]
    if stats.residual_sites():
        paths.append(outlier_map(stats, out_dir / "outlier_map.png"))
        paths.append(peg_ranges(stats, out_dir / "peg_ranges.png", k))
    if stats.sampled_site() is not None:
        paths.append(worst_layer_histogram(stats, out_dir / "worst_layer_histogram.png", k))
    return paths


def make_figures(stats: ActivationStats, out_dir: str | Path, k: int | None = None,
                 error_df: pd.DataFrame | None = None, title: str | None = None) -> list[Path]:
    """Every figure the statistics allow, written into ``out_dir``."""
    paths = stats_figures(stats, out_dir, k)
    if error_df is not None and not error_df.empty:
        paths.append(sqnr_figure(error_df, stats, Path(out_dir) / "sqnr.png", title))
    return paths


def cached_stats_figures(stats: ActivationStats, cache_at: str | Path, k: int | None = None) -> list[Path]:
    """:func:`stats_figures` drawn once per (statistics, ``k``, plotting code and matplotlib) into
    ``cache_at`` (a folder kept beside the statistics' own cache entry): a study draws them once
    per checkpoint, not once per job (~4 s a job)."""
    key = cache.key_of({"k": k, "code": provenance.fingerprint(FIGURE_MODULES),
                        "matplotlib": importlib.metadata.version("matplotlib")})
    folder, _ = cache.cached_dir(Path(cache_at) / key, lambda tmp: stats_figures(stats, tmp, k))
    return [folder / name for name in FIGURES if (folder / name).is_file()]


def log_figures(run, stats: ActivationStats, k: int | None, error_df: pd.DataFrame | None = None,
                title: str | None = None, cache_at: str | Path | None = None) -> list[str]:
    """Log the figures as artifacts; returns their names. ``k`` is the run's PEG group count
    (None: 6); with ``cache_at`` the statistics-only figures come from :func:`cached_stats_figures`."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = stats_figures(stats, tmp, k) if cache_at is None else cached_stats_figures(stats, cache_at, k)
        if error_df is not None and not error_df.empty:
            paths.append(sqnr_figure(error_df, stats, Path(tmp) / "sqnr.png", title))
        for p in paths:
            run.artifact_file(p)
        return [p.name for p in paths]
