"""MLflow reads of a study: its parent run(s) by study name or run id, their job runs as the study
table, the per-layer FP32 statistics of Table III, the statistics before and after each transform
(``transform_effect``), the paired comparisons of each bit setting's best method (``best_per_bits``)
and the FP32 statistics of each fine-tuned checkpoint (``finetune_outliers``)."""
from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import pandas as pd

from .labels import parse_param
from .runs import records_frame, run_record
from .significance import PREDICTIONS, load_predictions, paired
from .tables import (
    DEPTH_METRICS,
    TRANSFORM_KINDS,
    TRANSFORM_STATS,
    best_of_cells,
    latest_mitigation_runs,
    mitigation_runs,
    table_mitigations,
)

RUN_ID = re.compile(r"[0-9a-f]{32}")


class ReportError(Exception):
    pass


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
    variant = dict(zip(ckpt, df["finetune"])) if "finetune" in df else {}
    rows = []
    for c in sorted(picked):
        run_id, seed = picked[c]
        for metric in DEPTH_METRICS:
            for step, value in history(client, run_id, metric).items():
                rows.append({"seed": seed, "run_id": run_id, "layer": step, "stat": metric, "value": value,
                             "finetune": variant.get(c, "")})
    return pd.DataFrame(rows)


def history(client, run_id: str, metric: str) -> dict[int, float]:
    """{step: value} of a step metric, the latest value of each step, steps in order (one MLflow call)."""
    last = {}
    for m in client.get_metric_history(run_id, metric):
        if m.step not in last or m.timestamp >= last[m.step][0]:
            last[m.step] = (m.timestamp, m.value)
    return {step: last[step][1] for step in sorted(last)}


# The statistics tables of a job run: the FP32 model's, and the transformed FP32 model's on a transform run.
STATS_TABLES = {"before": "activation_stats.csv", "after": "activation_stats_transformed.csv"}


def _stats_rows(client, run_id: str, when: str, tmp: str) -> list[dict]:
    """The finite :data:`~transquant.studies.tables.TRANSFORM_STATS` of the
    :data:`~transquant.studies.tables.TRANSFORM_KINDS` sites in a run's statistics table
    (:data:`STATS_TABLES`), per layer (0 outside the layers); none when the run has no such table."""
    dst = Path(tmp) / run_id / when
    dst.mkdir(parents=True)
    try:
        t = pd.read_csv(client.download_artifacts(run_id, STATS_TABLES[when], str(dst)))
    except Exception:  # noqa: BLE001 - statistics not computed (MLflow's error type depends on the store)
        return []
    t = t[t["kind"].isin(TRANSFORM_KINDS)].assign(layer=lambda x: x["layer"].fillna(0).astype(int))
    rows = [{"kind": r["kind"], "stat": stat, "when": when, "layer": r["layer"], "value": float(r[stat])}
            for kind in TRANSFORM_KINDS for stat in TRANSFORM_STATS
            for r in t[t["kind"] == kind].sort_values("layer").to_dict("records")]
    return [r for r in rows if math.isfinite(r["value"])]


def transform_frame(client, df: pd.DataFrame) -> pd.DataFrame:
    """Per transform run (``quant.transform`` != none): ``max_abs`` and ``kurtosis`` per layer of
    each kind of :data:`~transquant.studies.tables.TRANSFORM_KINDS`, ``before`` (the FP32 model,
    ``activation_stats.csv``) and ``after`` (the transformed FP32 model,
    ``activation_stats_transformed.csv``). The FP32 table is downloaded once per checkpoint, the
    transformed one once per run."""
    if df.empty or "transform" not in df:
        return pd.DataFrame()
    runs = df[df["transform"].notna() & (df["transform"] != "none")]
    before: dict[str, list[dict]] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="transquant-report-") as tmp:
        for _, r in runs.iterrows():
            ckpt = r.get("checkpoint") or f"run {r['run_id']}"
            if ckpt not in before:
                got = _stats_rows(client, r["run_id"], "before", tmp)
                if got:
                    before[ckpt] = got
            after = _stats_rows(client, r["run_id"], "after", tmp)
            rows += [{"run_id": r["run_id"], **x} for x in before.get(ckpt, []) + after]
    return pd.DataFrame(rows, columns=["run_id", "kind", "stat", "when", "layer", "value"])


def finetune_frame(client, df: pd.DataFrame) -> pd.DataFrame:
    """Per fine-tuned checkpoint (tag ``checkpoint``) of a study with a non-default fine-tune
    variant: ``max_abs`` and ``kurtosis`` per layer of each kind of
    :data:`~transquant.studies.tables.TRANSFORM_KINDS` in its FP32 model's ``activation_stats.csv``,
    downloaded once per checkpoint (from a run that logged the statistics' metrics, else its first
    run). Empty for a study of the default variant alone: nothing is downloaded."""
    cols = ["checkpoint", "run_id", "kind", "stat", "layer", "value"]
    if df.empty or "finetune" not in df or "checkpoint" not in df or not (df["finetune"] != "").any():
        return pd.DataFrame(columns=cols)
    runs = df[df["checkpoint"].notna() & (df["checkpoint"] != "")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="transquant-report-") as tmp:
        for ckpt, g in runs.groupby("checkpoint", sort=False):
            logged = g[g["kurtosis"].notna()] if "kurtosis" in g else g.iloc[0:0]
            run_id = (logged if not logged.empty else g)["run_id"].iloc[0]
            rows += [{"checkpoint": ckpt, "run_id": run_id, **{k: x[k] for k in cols[2:]}}
                     for x in _stats_rows(client, run_id, "before", tmp)]
    return pd.DataFrame(rows, columns=cols)


def mitigation_pairs(client, df: pd.DataFrame) -> pd.DataFrame:
    """Per bit setting x granularity of the ``mitigations`` table: each method against the best one,
    per seed both have, on the same validation examples from the runs' stored predictions: the best
    minus the method (points) and the exact McNemar p. Each run's predictions are downloaded once;
    a run without them gives no row (its method is reported untested)."""
    t = table_mitigations(df)
    if t.empty:
        return pd.DataFrame()
    runs = latest_mitigation_runs(mitigation_runs(df))
    best = best_of_cells(t)
    rows = []
    with tempfile.TemporaryDirectory(prefix="transquant-report-") as tmp:
        cache: dict[str, tuple | None] = {}

        def correct(run_id: str):
            if run_id not in cache:
                dst = Path(tmp) / run_id
                dst.mkdir()
                try:
                    pred, label = load_predictions(client.download_artifacts(run_id, PREDICTIONS, str(dst)))
                    cache[run_id] = (pred == label, label)
                except Exception:  # noqa: BLE001 - no stored predictions (MLflow's error type depends on the store)
                    cache[run_id] = None
            return cache[run_id]

        for (bits, gran), top in best.items():
            cell = runs[(runs["bits"] == bits) & (runs["weight_granularity"] == gran)]
            top_runs = dict(zip(cell.loc[cell["mitigation"] == top, "seed"].map(str),
                                cell.loc[cell["mitigation"] == top, "run_id"]))
            for _, r in cell[cell["mitigation"] != top].iterrows():
                seed = str(r["seed"])
                a = correct(top_runs[seed]) if seed in top_runs else None
                b = correct(r["run_id"]) if a is not None else None
                if a is None or b is None or len(a[1]) != len(b[1]) or not (a[1] == b[1]).all():
                    continue  # not on the same validation examples: no paired comparison
                d = paired(a[0], b[0])
                rows.append({"bits": bits, "weight_granularity": gran, "best": top, "method": r["mitigation"],
                             "seed": seed, "difference": d.difference, "mcnemar_p": d.p,
                             "run_best": top_runs[seed], "run": r["run_id"]})
    return pd.DataFrame(rows)


def resolve_all(client, studies: list[str], experiment: str | None, all_runs: bool) -> list:
    """The parent runs of several studies, each once."""
    parents = []
    for s in studies:
        parents += [p for p in resolve_parents(client, s, experiment, all_runs)
                    if p.info.run_id not in {q.info.run_id for q in parents}]
    return parents
