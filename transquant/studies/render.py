"""Views of the report's tables: cells (``median [min, max]``, intervals, p-values, ``*`` for a
significant difference), LaTeX and markdown, the table files and ``report.md``."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .labels import GROUPING_ORDER
from .significance import N_BOOT, RULE
from .tables import PROFILE_METRICS, WITHIN_BEST

PROFILE_HEADERS = {"latency_p50_ms": "p50 (ms)", "latency_p95_ms": "p95 (ms)", "peak_memory_mb": "Peak memory (MB)",
                   "model_size_mb": "Size (MB)", "speedup_vs_torch_fp32": "Speed-up vs PyTorch FP32",
                   "speedup_vs_ort_fp32": "Speed-up vs ORT FP32", "speedup_vs_peer": "Speed-up vs ORT dynamic INT8",
                   "engine_code_agreement": "Code agreement", "engine_int8_matmuls": "INT8 MatMuls",
                   "engine_float_matmuls": "Float MatMuls", "fp32_latency_p50_ms": "PyTorch FP32 p50 (ms)",
                   "fp32_model_size_mb": "FP32 size (MB)", "engine_precision": "Engine precision",
                   "fp32_attention": "PyTorch FP32 attention"}


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.{digits}f}"


def spread(median, lo, hi, n, digits: int = 2) -> str:
    """``median [min, max]`` (just the median when there is one seed)."""
    if n is None or (isinstance(n, float) and math.isnan(n)) or n == 0:
        return ""
    return _fmt(median, digits) if n <= 1 else f"{_fmt(median, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


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


def latex_deployment(t: pd.DataFrame) -> pd.DataFrame:
    """Table II with headers that name each speed-up's baseline."""
    digits = {"engine_code_agreement": 4, "engine_int8_matmuls": 0, "engine_float_matmuls": 0}
    out = t.copy()
    for c in out:
        if c in PROFILE_METRICS:
            out[c] = out[c].map(lambda x, d=digits.get(c, 2): _fmt(x, d))
    return out.rename(columns={"method": "Method", "seeds": "Seeds", **PROFILE_HEADERS})


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


def latex_mitigations(t: pd.DataFrame) -> pd.DataFrame:
    """``mitigations``: accuracy median [min, max] over seeds (one seed: the run's 95 % interval),
    drop vs FP32 (* = significant on every seed), significant seeds / tested, calibration seconds."""
    def acc(r) -> str:
        if r.seeds == 1 and not math.isnan(r.accuracy_ci_low):
            return _interval(r.accuracy_median, r.accuracy_ci_low, r.accuracy_ci_high)
        return spread(r.accuracy_median, r.accuracy_min, r.accuracy_max, r.seeds)

    return pd.DataFrame({
        "Bits": t["bits"], "Weights": t["weight_granularity"].map(lambda g: f"per {g}"), "Method": t["method"],
        "Seeds": t["seeds"], "Accuracy (\\%)": [acc(r) for r in t.itertuples()],
        "$\\Delta$ vs FP32": [_star(spread(r.drop_median, r.drop_min, r.drop_max, r.seeds),
                                     r.tested_seeds > 0 and r.significant_seeds == r.tested_seeds) for r in t.itertuples()],
        "Significant seeds": [f"{r.significant_seeds}/{r.tested_seeds}" if r.tested_seeds else "" for r in t.itertuples()],
        "Calibration (s)": t["calibration_seconds_median"].map(_fmt),
        "Transform (s)": t["transform_seconds_median"].map(_fmt),
    })


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
    if name == "mitigations":
        return latex_mitigations(t)
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
    header_escaped = name in ("table1_accuracy", "table1_seeds", "ablation_percentile", "ablation_loo",
                              "mitigations")  # by hand
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


def cell_text(x) -> str:
    """A cell as report.md and report.html show it: floats with two decimals, NaN empty."""
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.2f}"
    return str(x)


def _md(x) -> str:
    return cell_text(x).replace("|", "\\|").replace("*", "\\*")


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


TITLES = {"table1_accuracy": "Table I — accuracy and drop vs FP32 (median [min, max] over seeds)",
          "table1_seeds": "Table I per seed — 95 % intervals over the validation examples",
          "table2_deployment": "Table II — deployment profile (median over seeds)",
          "table3_depth": "Table III — FP32 activation statistics by depth (FFN residual sum)",
          "ablation_peg": "PEG: K x grouping", "ablation_percentile": "Percentile p",
          "ablation_loo": "Leave-one-out (W8A8 with one site kind left float)",
          "ablation_bits": "Activation bit width",
          "calibration": "Calibration set size (accuracy [95 % interval] / drop vs FP32)",
          "mitigations": "Mitigations — method x bits x weight granularity",
          "mitigations_pivot": "Mitigations at a glance — median accuracy (%)",
          "best_per_bits": "Best method per bit setting and weight granularity",
          "transform_effect": "What each transform did to the outliers (FP32 model before / after)",
          "finetune_outliers": "What each fine-tune variant did to the outliers (FP32 model, vs the default recipe)",
          "search_trials": "Search trials", "timing": "Wall-time split"}


# The significance rule, stated where the marks are (LaTeX caption, report.md).
CAPTIONS = {
    "table1_accuracy": f"Brackets: [min, max] over seeds. * = the drop vs FP32 is significant on every seed, "
                       f"by the rule {RULE}; McNemar p: the largest over seeds. Per-seed intervals: table1_seeds.",
    "table1_seeds": f"Brackets: 95 % percentile-bootstrap intervals ({N_BOOT:,} resamples of the validation examples); "
                    f"the drop is paired with FP32 on the same examples. * = significant, by the rule {RULE}.",
    "mitigations": f"Brackets: [min, max] over seeds; with one seed, the run's 95 % percentile-bootstrap interval "
                   f"over the validation examples. * = the drop vs FP32 is significant on every seed, by the rule "
                   f"{RULE}. Calibration / Transform: median seconds of the activation calibration and of the "
                   f"transform's statistics pass and search (SmoothQuant, OS, OS+), as measured on the machine that "
                   f"ran them.",
    "mitigations_pivot": "Cells: median accuracy (%) over seeds. Columns: bit setting and weight granularity.",
    "best_per_bits": f"Best: highest median accuracy. {WITHIN_BEST}: methods the best does not beat on every seed "
                     f"by the rule {RULE}; untested: no stored predictions to pair.",
    "transform_effect": "Largest over layers of max |x| and kurtosis, FP32 model (before) and the transformed FP32 "
                        "model (after); ratio = after / before.",
    "finetune_outliers": "One row per fine-tuned checkpoint. Largest over layers of max |x| and kurtosis per site "
                         "kind of its FP32 model; _vs_default = the value / the default recipe's checkpoint's "
                         "(same model, task and seed); fine-tune seconds from the job that trained it (empty: "
                         "the checkpoint came from the cache); extra_finetune_seconds = its seconds minus the default's.",
    "calibration": f"Columns: calibration sequences (num_batches x batch_size). Cells: accuracy (%) [95 % "
                   f"percentile-bootstrap interval over the validation examples] / drop vs FP32 (points); "
                   f"* = significant, by the rule {RULE}.",
}


_LATEX_LIKE = ("table1_accuracy", "table1_seeds", "table2_deployment", "ablation_peg", "ablation_bits", "calibration",
               "mitigations")


def markdown_view(name: str, t: pd.DataFrame) -> pd.DataFrame:
    """The table a reader sees (report.md, report.html): the LaTeX view where it has spreads and
    marks, the plain table otherwise, headers without LaTeX."""
    view = latex_view(name, t) if name in _LATEX_LIKE else t
    return view.rename(columns=lambda c: c.replace("\\%", "%").replace("$\\Delta$", "Δ").replace("$p$", "p"))


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
            caption = [CAPTIONS[name], ""] if name in CAPTIONS else []
            lines += [f"## {title}", "", *caption, to_markdown(markdown_view(name, tables[name])), ""]
    f = out / "report.md"
    f.write_text("\n".join(lines))
    return f


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
