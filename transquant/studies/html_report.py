"""The study report as one self-contained page (``report.html``): how it was made (parent runs,
commands, code and library versions), report.md's tables with the same cells, the figures inline
and how to read the error bars; and an index page over a folder of reports. One file, no external
links, so it opens the same from disk, in MLflow's artifact viewer and on paper."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from ..core.html import esc, facts, figure, table, write_page
from .render import CAPTIONS, TITLES, cell_text, markdown_view
from .significance import N_BOOT, RULE

# Captions of the figures plots.write_figures draws, in its order.
FIGURES = {
    "accuracy_vs_k.png": "PEG: accuracy vs groups per site K, one line per grouping. Points: median over seeds; "
                         "bars: min–max over seeds; grey lines: the FP32 and W8A8 medians.",
    "accuracy_vs_percentile.png": "Percentile clipping: accuracy vs p (both tails clipped). Points: median over seeds; "
                                  "bars: min–max over seeds.",
    "accuracy_vs_bits.png": "Accuracy vs activation bit width per method family, weights 8-bit. Points: median over "
                            "seeds; bars: min–max over seeds.",
    "accuracy_vs_calibration.png": "Accuracy vs calibration sequences (log scale). Bars: each run's 95 % "
                                   "percentile-bootstrap interval over the validation examples; grey line: FP32.",
    "accuracy_vs_bits_methods.png": "Accuracy vs bit setting per method, one panel per weight granularity. Bars: "
                                    "one seed's 95 % interval, else min–max over seeds; grey line: FP32 median.",
    "pareto.png": "Search trials (grey) and their Pareto front (red) on the first two objectives.",
    "depth_stats.png": "FP32 activation statistics of the FFN residual sum by layer (median over checkpoints; "
                       "kurtosis and max |x| on a log scale).",
}


def reading_note(examples: int | None, accuracy: float | None) -> str:
    """How to read the intervals, with the validation set size and accuracy (%) the runs really had."""
    if examples and accuracy is not None:
        p = min(max(accuracy / 100, 0.0), 1.0)
        se = 100 * (p * (1 - p) / examples) ** 0.5
        size = (f"its {examples:,} examples give an accuracy near {accuracy:.1f} % a standard error of "
                f"{se:.2f} point (a 95 % interval about ±{1.96 * se:.1f} points)")
    else:
        size = "its size was not recorded"
    return (f"Every accuracy is measured on one validation set: {size}, so most differences between good methods "
            f"are noise. Brackets are [min, max] over seeds or, where a table says so, 95 % percentile-bootstrap "
            f"intervals over the validation examples ({N_BOOT:,} resamples); a difference inside its interval is not "
            f"a finding. * = significant by the rule {RULE} (in tables over seeds: on every seed). A drop vs FP32 is "
            f"paired on the same examples, hence tighter than two overlapping intervals: compare two methods the same "
            f"way with python -m transquant.report <study> report.compare=[A,B].")


# A cell that starts like this carries a number (value, interval, p-value, count ratio): right-aligned.
_NUMBER = re.compile(r"[-+<]?\.?\d")


def write_html(tables: dict[str, pd.DataFrame], parents: list, studies: list[str], out: Path,
               df: pd.DataFrame) -> Path:
    """``out/report.html`` from the tables, the parent runs and the study table, after the figures
    are written; its cells are report.md's (:func:`~transquant.studies.render.markdown_view`)."""
    shown = [(name, title) for name, title in TITLES.items() if name in tables]
    order = {name: i for i, name in enumerate(FIGURES)}
    pngs = sorted(out.glob("*.png"), key=lambda p: (order.get(p.name, len(order)), p.name))
    toc = [("provenance", "Provenance"), ("reading", "Reading the numbers"), *shown] + (
        [("figures", "Figures")] if pngs else [])
    body = ['<nav class="note">' + " · ".join(f'<a href="#{esc(i)}">{esc(t)}</a>' for i, t in toc) + "</nav>",
            _provenance(parents, studies, df),
            f'<h2 id="reading">Reading the numbers</h2>\n<p class="note">{esc(reading_note(*_examples(df)))}</p>']
    for name, title in shown:
        view = markdown_view(name, tables[name]).astype(object).map(cell_text)
        text = {c for c in view if any(v and not _NUMBER.match(v) for v in view[c])}
        body += [f'<h2 id="{esc(name)}">{esc(title)}</h2>',
                 *([f'<p class="note">{esc(CAPTIONS[name])}</p>'] if name in CAPTIONS else []),
                 table(view, text_cols=text), f'<p class="note">Files: {esc(name)}.csv, {esc(name)}.tex</p>']
    if pngs:
        body.append('<h2 id="figures">Figures</h2>')
        body += [figure(p, FIGURES.get(p.name, p.stem)) for p in pngs]
    return write_page(out / "report.html", f"transquant report: {', '.join(studies)}", "\n".join(body))


def write_index(root: str | Path) -> Path:
    """``root/index.html`` linking every ``root/*/report.html``: one entry page for several studies."""
    root = Path(root)
    items = "".join(f'<li><a href="{esc(quote(p.parent.name))}/report.html">{esc(p.parent.name)}</a></li>'
                    for p in sorted(root.glob("*/report.html")))
    return write_page(root / "index.html", "transquant reports", f"<ul>{items}</ul>")


def _examples(df: pd.DataFrame) -> tuple[int | None, float | None]:
    """The largest validation set the runs logged (``eval_examples``) and the accuracy the note
    speaks of: the median FP32 accuracy (where the good methods are), else the median accuracy."""
    n = df["eval_examples"].max() if "eval_examples" in df else None
    col = next((c for c in ("fp32_accuracy", "accuracy") if c in df and df[c].notna().any()), None)
    acc = df[col].median() if col else None
    return (int(n) if pd.notna(n) else None), (float(acc) if pd.notna(acc) else None)


def _provenance(parents: list, studies: list[str], df: pd.DataFrame) -> str:
    """Which runs, made by which commands with which code: what a reader needs to trust or redo the numbers."""
    not_finished, reused = int((df["status"] != "FINISHED").sum()), int(df["reused"].sum())
    summary = facts({
        "Studies": ", ".join(studies),
        "Model": ", ".join(sorted(map(str, df["model"].unique()))),
        "Task": ", ".join(sorted(map(str, df["task"].unique()))),
        "Seeds": ", ".join(sorted(map(str, df["seed"].unique()))),
        "Runs": f"{len(df)} ({not_finished} not finished, {reused} reused from another sweep)",
    })
    runs = pd.DataFrame({"Parent run": [p.info.run_id for p in parents],
                         "Name": [p.data.tags.get("mlflow.runName", "") for p in parents],
                         "Status": [p.info.status for p in parents],
                         "Study tag": [p.data.tags.get("transquant.study", "") for p in parents]})
    commands = []
    for p in parents:
        overrides = p.data.params.get("sweep_overrides")
        multi = "," in p.data.tags.get("transquant.objectives", "")  # one value per objective: transquant.search
        entry = "transquant.search" if multi else "transquant.run"
        commands += [f"# sweep {p.info.run_id}",
                     (f"python -m {entry} -m " + " ".join(map(shlex.quote, overrides.split())) if overrides
                      else "(no sweep_overrides param on this run)")]
    again = " report.all=true" if len(parents) > len(studies) else ""  # else a study gives its latest sweep only
    commands += ["# this report", f"python -m transquant.report {' '.join(map(shlex.quote, studies))}{again}"]
    return (f'<h2 id="provenance">Provenance</h2>\n{summary}\n{table(runs)}\n<h3>Commands</h3>\n'
            f"<pre>{esc(chr(10).join(commands))}</pre>\n<h3>Code and library versions</h3>\n{_versions(df)}")


def _versions(df: pd.DataFrame) -> str:
    """Runs per source hash and library versions: runs of different code are not seeds of one experiment."""
    cols = [c for c in df if c == "source_hash" or c.startswith("version.")]
    if not cols:
        return '<p class="note">The study table carries no source hash or library versions.</p>'
    v = df[cols].fillna("not recorded").astype(str).groupby(cols).size().reset_index(name="runs")
    v = v.rename(columns=lambda c: "Source hash" if c == "source_hash" else c.removeprefix("version."))
    note = "" if len(v) == 1 else '<p class="note">The runs ran different code or libraries.</p>'
    return table(v) + note
