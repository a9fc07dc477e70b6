"""The statistics page ``stats.html`` of ``python -m transquant.stats``: does the model have
outliers, where, and which method to run at the bit budget — one self-contained file, logged to
the stats run and kept in a local folder, so it can be read without MLflow."""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from ..core.html import esc, figure, table, write_page
from .figures import make_figures
from .results import ActivationStats
from .suggest import MEASURED, MEASURED_COLUMNS, Suggestion, rule_lines, site_verdicts

PAGE = "stats.html"
FIGURE_CAPTIONS = {
    "outlier_map.png": "Per-channel max |x| of every residual sum (LayerNorm input), in forward order: "
                       "bright columns are outlier channels.",
    "depth_curves.png": "Kurtosis and the top-1 % channel energy share against depth, one line per site kind.",
    "worst_layer_histogram.png": "The highest-kurtosis residual sum against the 8-bit per-tensor grid and "
                                 "against PEG per-group grids.",
    "peg_ranges.png": "Per-channel ranges of the highest-kurtosis residual sum in the PEG (sorted) permutation, "
                      "with the group boundaries.",
}
GRID_MARKS = {"outliers": "outliers", "outliers (fit)": "fit", "coarse": "coarse", "ok": "·"}
OUTSIDE = "outside layers"


def outlier_grid(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Site kinds (rows, forward order) x layers: the verdict of each site and its top outlier
    channels; blank where the model has no such site."""
    def cell(r) -> str:
        mark = GRID_MARKS[r.verdict]
        ids = " ".join(str(c) for c in r.outlier_channels[:3]) if r.verdict.startswith("outliers") else ""
        return f"{mark}: {ids}" if ids else mark

    df = verdicts.assign(where=[OUTSIDE if pd.isna(v) else str(int(v)) for v in verdicts["layer"]],
                         cell=[cell(r) for r in verdicts.itertuples()])
    grid = df.pivot_table(index="kind", columns="where", values="cell", aggfunc="first", sort=False).fillna("")
    layers = sorted((c for c in grid.columns if c != OUTSIDE), key=int)
    grid = grid[([OUTSIDE] if OUTSIDE in grid.columns else []) + layers]
    grid.columns = [c if c == OUTSIDE else f"layer {c}" for c in grid.columns]
    return grid.reset_index().rename(columns={"kind": "site kind"})


def residual_channels(stats: ActivationStats, limit: int = 10) -> pd.DataFrame:
    """The most persistent top-k channels of the residual stream: how often each is among a
    residual sum's top-k, the first residual sum where it is, its largest |x| and that against the
    typical channel's."""
    res = stats.outliers().get("residual_stream")
    names, grid = stats.max_abs_map()
    if not res or not names:
        return pd.DataFrame()
    peak = grid.max(axis=0)
    typical = float(pd.Series(peak).median())
    rows = []
    for c, share in list(res["persistence"].items())[:limit]:
        c = int(c)
        rows.append({"channel": c, "top-k in residual sums (%)": round(100 * share, 1),
                     "first at": next(n for n, top in res["top_channels"].items() if c in top),
                     "max |x|": round(float(peak[c]), 2),
                     "max |x| / typical channel's": round(float(peak[c]) / typical, 1) if typical > 0 else math.inf})
    return pd.DataFrame(rows)


def _suggestion_html(s: Suggestion) -> str:
    alts = "".join(f"<li><code>{esc(line)}</code> — {esc(note)}</li>" for line, note in s.alternatives)
    return (f"<pre>{esc(s.command)}</pre>\n<p>{esc(s.reason)}</p>\n"
            f'<p class="note">Engines: {esc(s.engines)}.</p>\n'
            + (f"<p>Alternatives:</p><ul>{alts}</ul>\n" if alts else ""))


def _where(verdicts: pd.DataFrame, bits: int) -> str:
    hot = verdicts[verdicts["verdict"] == "outliers"]
    if hot.empty:
        return f"<p>No site has channel outliers that break a per-tensor {bits}-bit grid.</p>"
    parts = []
    for kind, sub in hot.groupby("kind", sort=False):
        layers = [str(int(v)) for v in sub["layer"] if not pd.isna(v)]
        parts.append(f"{kind} ({'layers ' + ', '.join(layers) if layers else 'outside the layers'})")
    return f"<p>Channel outliers that break a per-tensor {bits}-bit grid: {esc('; '.join(parts))}.</p>"


def stats_page_body(stats: ActivationStats, suggestion: Suggestion, per_layer: pd.DataFrame,
                    figures: list[Path]) -> str:
    """The page's HTML body: suggestion, how it was derived, outlier map, figures, per-layer table."""
    bits = suggestion.act_bits
    verdicts = site_verdicts(stats, bits)
    flagged = verdicts[verdicts["verdict"] != "ok"].drop(columns=["coarse", "concentrated"])
    m = stats.meta
    rules = "".join(f"<li>{esc(line)}</li>" for line in rule_lines())
    measured = pd.DataFrame(MEASURED, columns=["method", *(f"{c} (%)" for c in MEASURED_COLUMNS)])
    channels = residual_channels(stats)
    parts = [
        f'<p class="note">FP32 statistics of {esc(m.get("label", "the model"))} over {esc(m.get("examples", "?"))} '
        f'validation examples / {esc(m.get("tokens", "?"))} non-pad tokens.</p>',
        f"<h2>Suggestion at W{suggestion.weight_bits}A{bits}</h2>", _suggestion_html(suggestion),
        "<h2>How the suggestion was derived</h2>", f"<ol>{rules}</ol>",
        "<p>What the branches rest on: the fine-tuned MiniLM-L6 on qnli-squad (docs/RESULTS.md, "
        "\"Mitigations\"). Its residual sums hold a few outlier channels; SmoothQuant, Outlier Suppression and "
        "OS+ flatten the LayerNorm outputs but leave the residual sums of this post-LN encoder as they are, so "
        "the rule never suggests them.</p>",
        table(measured, "measured", "Accuracy of each method on MiniLM-L6 (qnli-squad, one seed)"),
        "<h2>Outlier map</h2>", _where(verdicts, bits),
        table(outlier_grid(verdicts), "outlier-grid",
              f"Verdict per site at A{bits}: outliers = coarse grid and concentrated (outlier channel ids); "
              "fit = concentrated but the grid resolves the bulk; coarse = coarse without a few dominant "
              "channels; · = fine; blank = no such site"),
    ]
    if not flagged.empty:
        parts.append(table(flagged, "flagged-sites", f"Sites that are not fine at A{bits}; bulk_steps = grid "
                           "steps a median |x| spans"))
    if not channels.empty:
        parts.append(table(channels, "residual-channels", f"Outlier channels of the residual stream (top-{stats.top_k} "
                           "per residual sum by max |x|), most persistent first"))
    parts.append("<h2>Figures</h2>")
    order = list(FIGURE_CAPTIONS)
    parts += [figure(p, FIGURE_CAPTIONS.get(p.name, "")) for p in
              sorted(figures, key=lambda p: order.index(p.name) if p.name in order else len(order))]
    parts += ["<h2>Per-layer statistics</h2>", table(per_layer, "per-layer")]
    return "\n".join(parts)


def log_stats_page(run, stats: ActivationStats, suggestion: Suggestion, per_layer: pd.DataFrame, k: int | None,
                   local_dir: str | Path | None) -> Path | None:
    """Make the figures, write the page beside them and log both to ``run``; copy the page into
    ``local_dir`` (created) when given and return that copy's path."""
    with tempfile.TemporaryDirectory() as tmp:
        figures = make_figures(stats, tmp, k)
        page = write_page(Path(tmp) / PAGE, f"Outliers of {stats.meta.get('label', 'the model')}",
                          stats_page_body(stats, suggestion, per_layer, figures))
        run.artifact_dir(tmp)
        if local_dir is None:
            return None
        local = Path(local_dir)
        local.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copyfile(page, local / PAGE))
