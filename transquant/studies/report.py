"""The study report: tables and figures from MLflow (never from files lying around).

    python -m transquant.report paper                       # latest sweep tagged transquant.study=paper
    python -m transquant.report <parent-run-id> report.out=DIR tracking.uri=sqlite:///x/mlflow.db
    python -m transquant.report paper loo bits report.out=reports/all   # several studies in one report
    python -m transquant.report peg report.all=true         # every sweep of the study (shared Optuna study)
    python -m transquant.report paper report.compare=[W8A8,mixed]   # two methods, paired per seed (or two run ids)

A study is found by the tag ``transquant.study`` of its parent run (set by
:class:`transquant.studies.search.StudyCallback`), or by ``+experiment=<name>`` / ``+search=<name>`` in the
parent's ``sweep_overrides`` param, or given as a parent run id. Its child runs become one row
each (:func:`transquant.studies.runs.run_record`, the method named from its ``quant.*`` params and its
fine-tune variant), and the report writes to ``report.out`` (default ``reports/<study>``) and, unless
``report.log=false``, as artifacts ``report/`` of the parent run (``report-<names>/`` of each parent for a
report over several sweeps) plus, on each parent, the seed statistics of its own jobs as metrics:

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
mitigations                 per bit setting x method x weight granularity (studies that vary weight widths or
                            granularity, +experiment=mitigations): accuracy median [min, max] (one seed: its 95 %
                            interval), drop vs FP32, seeds with a significant drop, median calibration and
                            transform seconds
mitigations_pivot           median accuracy: methods x (bit setting, weight granularity)
best_per_bits               per bit setting x granularity: the best method and those not significantly below it
                            (paired McNemar on the stored predictions, every seed)
transform_effect            per transform run (SmoothQuant, OS, OS+) and site kind: max over layers of max_abs and
                            kurtosis before and after the transform (the run's activation_stats and
                            activation_stats_transformed tables), and their ratio
finetune_outliers           per fine-tuned checkpoint (studies with a train.* variant: regularizer, attention,
                            autocast): FP32 accuracy, fine-tune seconds, max over layers of max_abs and kurtosis
                            per site kind, each vs the default variant's checkpoint of the same seed
search_trials               Optuna trials in order, best / Pareto flags
timing                      wall-time split from the *_seconds metrics
runs                        every child run: id, seed, method, metrics
==========================  ===================================================================

each as ``.csv`` and booktabs ``.tex``, figures ``accuracy_vs_k.png``, ``accuracy_vs_percentile.png``,
``accuracy_vs_bits.png``, ``accuracy_vs_bits_methods.png``, ``accuracy_vs_calibration.png``, ``pareto.png``, ``depth_stats.png``, and
``report.md``. Tables without data are not written. Files hold no timestamps and rows are in a canonical order, so the same
study gives the same bytes.

``report.compare=[A,B]`` prints, per seed, A against B on the same validation examples from the runs'
stored ``predictions.npz``: both accuracies with their intervals, the paired interval of A − B and
the exact McNemar p-value (:mod:`transquant.studies.significance`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from .html_report import write_html, write_index
from .pareto import best_mask
from .plots import write_figures
from .publish import log_metrics, log_report, mark_best
from .queries import (
    RUN_ID,
    ReportError,
    children_frame,
    depth_frame,
    finetune_frame,
    mitigation_pairs,
    resolve_all,
    transform_frame,
)
from .render import write_markdown, write_tables
from .seeds import study_metrics
from .tables import build_tables

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"


def report(studies: list[str], tracking_uri: str = DEFAULT_URI, out: str | Path | None = None,
           experiment: str | None = None, all_runs: bool = False, log: bool = True) -> Path:
    """Build the report of one or more studies; returns the output directory."""
    from ..core.tracking import client_for

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
    tables = build_tables(df, depth_frame(client, df), objectives, transform=transform_frame(client, df),
                          pairs=mitigation_pairs(client, df), finetune=finetune_frame(client, df))
    name = "-".join(s[:8] if RUN_ID.fullmatch(s) else s for s in studies)
    out = Path(out) if out else Path("reports") / name
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.csv")) + list(out.glob("*.tex")) + list(out.glob("*.png")):
        old.unlink()  # a table that has no data any more must not survive from an earlier report
    write_tables(tables, out)
    write_figures(tables, out, objectives, directions, df)
    write_markdown(tables, parents, studies, out, df)
    write_html(tables, parents, studies, out, df)
    if out.parent.name == "reports":  # reports/index.html over every study there; any other out= stands alone
        write_index(out.parent)
    if log:
        # Each parent gets the seed statistics of its own jobs (never another study's methods), and
        # a report of several studies goes to its own artifact folder, not over a study's report/.
        artifact_path = "report" if len(studies) == 1 and len(parent_ids) == 1 else f"report-{name}"
        for pid in parent_ids:
            own = children_frame(client, [pid]) if len(parent_ids) > 1 else df
            log_metrics(client, pid, study_metrics(own))
            log_report(client, pid, out, artifact_path)
    return out

