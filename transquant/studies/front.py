"""The Pareto front of a multi-objective search, on its parent run: ``pareto_front.csv`` and
``pareto_front.png`` (every trial, the front, its knee and reference presets) and whether the knee
dominates the paper's mixed precision (tag ``transquant.knee_dominates_mixed_paper``).

References are earlier runs of preset methods (``conf/quant/<method>.yaml`` as is) found in the
same experiment, never re-run: same fine-tuned checkpoint (model, task, training, seed), same
calibration draw and, since latencies are compared, the same profile engine, batch shape, device,
threads, code, ONNX Runtime version and CPU. A preset without such a run is named in the CSV, the
figure and the tag's reason.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pandas as pd

from .labels import method_label, quant_params
from .pareto import best_mask, dominates, knee_index

# Params a reference run must share with the trials (the checkpoint tag covers model, task, training, seed).
CONTEXT_PARAMS = ("calibration.num_batches", "calibration.batch_size", "calibration.seed", "profile.engine",
                  "profile.batch_size", "profile.seq_len", "hardware.device", "hardware.threads")
# Tags a reference must share too: the same code and ONNX Runtime built and timed the engine, on the
# same CPU (a preset timed before an engine change, or on another machine, is not a reference).
CONTEXT_TAGS = ("transquant.source_hash", "transquant.version.onnxruntime", "cpu_model", "cpu_flags")
KNEE_REFERENCE = "mixed_paper"  # the preset the knee must beat


def interval_of(objective: str) -> tuple[str, str]:
    """The metrics holding an objective's 95 % interval, where the runs log one (``accuracy``:
    Wilson; ``speedup_*``: over the interleaved turns, :func:`transquant.deploy.timing.paired_speedup`)."""
    return f"{objective}_ci_low", f"{objective}_ci_high"


def interval_columns(objectives: list[str], columns) -> list[str]:
    """The interval bound columns of ``objectives`` that ``columns`` has (both bounds or none)."""
    return [c for o in objectives if all(b in columns for b in interval_of(o)) for c in interval_of(o)]


def front_table(df: pd.DataFrame, objectives: list[str], directions: list[str],
                params: dict[str, dict[str, str]]) -> pd.DataFrame:
    """Finished trials with every objective, in start order: run id, the swept ``params`` of each
    run, the objectives, ``pareto`` and ``knee`` (the front point nearest the utopia point)."""
    if df.empty or any(o not in df for o in objectives):
        return pd.DataFrame()
    d = df[(df["status"] == "FINISHED") & df[objectives].notna().all(axis=1)]
    d = d.sort_values(["start_time", "run_id"], kind="stable").reset_index(drop=True)
    keys = sorted({k for p in params.values() for k, v in p.items() if v is not None})
    bounds = interval_columns(objectives, d)
    t = pd.DataFrame({"role": "trial", "method": d["method"], "run_id": d["run_id"],
                      **{k: [params.get(r, {}).get(k) for r in d["run_id"]] for k in keys},
                      **{o: d[o].astype(float) for o in objectives}, **{c: d[c].astype(float) for c in bounds}})
    t["pareto"] = best_mask(d, objectives, directions) if len(d) else []
    t["knee"] = False
    front = t.index[t["pareto"]]
    knee = knee_index(t.loc[front, objectives].to_numpy(), directions)
    if knee is not None:
        t.loc[front[knee], "knee"] = True
    return t


def find_reference(client, experiment_id: str, trial_run, method: str, objectives: list[str]):
    """The newest finished run of preset ``method`` sharing the trial's checkpoint,
    :data:`CONTEXT_PARAMS` and :data:`CONTEXT_TAGS`, with every objective; None if there is none."""
    from .queries import _search_all

    ckpt = trial_run.data.tags.get("checkpoint", "")
    if not ckpt or "'" in ckpt:
        return None
    found = _search_all(client, [experiment_id], f"tags.checkpoint = '{ckpt}' and params.`quant.method` = '{method}' "
                                                 "and attributes.status = 'FINISHED'")
    want = {k: trial_run.data.params.get(k) for k in CONTEXT_PARAMS}
    want_tags = {k: trial_run.data.tags.get(k) for k in CONTEXT_TAGS}
    preset = method_label({"method": method})
    ok = [r for r in found if all(r.data.params.get(k) == v for k, v in want.items())
          and all(r.data.tags.get(k) == v for k, v in want_tags.items())
          and method_label(quant_params(r.data.params)) == preset and all(o in r.data.metrics for o in objectives)]
    return max(ok, key=lambda r: (r.info.start_time, r.info.run_id)) if ok else None


def missing_note(method: str, trial_run) -> str:
    p = trial_run.data.params
    return (f"no {method} run of this checkpoint with the same calibration and profile "
            f"({p.get('profile.engine')}, batch {p.get('profile.batch_size')} x {p.get('profile.seq_len')}, "
            f"{p.get('hardware.device')}, threads {p.get('hardware.threads')}), code, ONNX Runtime and CPU "
            "in this experiment")


def knee_verdict(t: pd.DataFrame, objectives: list[str], directions: list[str]) -> tuple[str, str]:
    """(true / false / unknown, why) for "the knee dominates the :data:`KNEE_REFERENCE` run"."""
    ref = t[(t["role"] == "reference") & (t["method"] == KNEE_REFERENCE)]
    knee = t[t["knee"]]
    if knee.empty:
        return "unknown", "no finished trial with every objective"
    if ref.empty or ref[objectives].isna().any(axis=None):
        note = ref["note"].iloc[0] if not ref.empty and "note" in ref else f"{KNEE_REFERENCE} not a reference"
        return "unknown", note
    k, r = knee[objectives].iloc[0].to_numpy(float), ref[objectives].iloc[0].to_numpy(float)
    sides = ", ".join(f"{o} {a:.4g} vs {b:.4g}" for o, a, b in zip(objectives, k, r))
    noise = _within_noise(knee.iloc[0], ref.iloc[0], objectives)
    if dominates(k, r, directions):
        return "true", f"knee dominates {KNEE_REFERENCE}: {sides}" + noise
    front = t[t["pareto"]][objectives].to_numpy(float)
    n = sum(dominates(p, r, directions) for p in front)
    return "false", (f"knee does not dominate {KNEE_REFERENCE} ({sides}); "
                     + (f"{n} other front point(s) do" if n else f"no trial dominates {KNEE_REFERENCE}") + noise)


def _within_noise(knee: pd.Series, ref: pd.Series, objectives: list[str]) -> str:
    """The objectives on which knee and reference differ by less than the knee's 95 % half-width
    (:func:`interval_of`): on those the comparison is not a finding, and the reason says so."""
    notes = []
    for o in objectives:
        lo, hi = interval_of(o)
        if any(c not in knee or pd.isna(knee[c]) for c in (lo, hi)):
            continue
        half = (knee[hi] - knee[lo]) / 2
        diff = abs(knee[o] - ref[o])
        if diff < half:
            notes.append(f"{o} differs by {diff:.2f}, inside the knee's 95 % interval "
                         f"[{knee[lo]:.2f}, {knee[hi]:.2f}] (±{half:.2f}): not a finding")
    return ("; " + "; ".join(notes)) if notes else ""


def write_front(t: pd.DataFrame, objectives: list[str], directions: list[str], out: Path) -> list[Path]:
    """``pareto_front.csv`` (the front and the references) and ``pareto_front.png`` (every trial
    grey, the front red, the knee circled, references as labelled markers, missing ones in the caption)."""
    from matplotlib.figure import Figure

    from .plots import draw_front

    csv = out / "pareto_front.csv"
    t[(t["role"] == "reference") | t["pareto"]].to_csv(csv, index=False)
    x_o, y_o = objectives[1], objectives[0]
    fig = Figure(figsize=(6, 4.4))
    ax = fig.subplots()
    trials = t[t["role"] == "trial"].assign(status="FINISHED")
    _interval_bars(ax, t, x_o, y_o)
    draw_front(ax, trials, objectives, directions)
    knee = trials[trials["knee"]]
    ax.scatter(knee[x_o], knee[y_o], s=180, facecolors="none", edgecolors="k", linewidths=1.5, label="knee")
    refs = t[(t["role"] == "reference") & t[objectives].notna().all(axis=1)]
    for i, (_, r) in enumerate(refs.iterrows()):
        ax.scatter([r[x_o]], [r[y_o]], marker="sD^v"[i % 4], s=60, color=f"C{i % 10}", zorder=3,
                   label=f"{r['method']} (reference)")
    notes = [f"{r['method']}: {r['note']}" for _, r in t[t["role"] == "reference"].iterrows()
             if isinstance(r.get("note"), str) and r["note"]]
    ax.set_xlabel(x_o)
    bars = [o for o in (y_o, x_o) if interval_columns([o], t)]
    ax.set_ylabel(y_o)
    if bars:
        ax.set_title("Search: Pareto front (bars: 95 % intervals of " + ", ".join(bars) + ")", fontsize=9)
    else:
        ax.set_title("Search: Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=6, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.03 * len(notes), 1, 1))
    png = out / "pareto_front.png"
    fig.savefig(png, dpi=120, metadata={"Software": None})
    return [csv, png]


def _interval_bars(ax, t: pd.DataFrame, x_o: str, y_o: str) -> None:
    """Each point's 95 % interval on the axes whose objective has one (:func:`interval_of`), faint,
    behind the markers: a front whose points lie within each other's bars ranks noise."""
    for o, axis in ((y_o, "yerr"), (x_o, "xerr")):
        if not interval_columns([o], t):
            continue
        lo, hi = interval_of(o)
        d = t[t[[x_o, y_o, lo, hi]].notna().all(axis=1)]
        ax.errorbar(d[x_o], d[y_o], **{axis: [d[o] - d[lo], d[hi] - d[o]]}, fmt="none", ecolor="0.6",
                    alpha=0.5, capsize=2, lw=0.8, zorder=1)


def log_front(client, parent_id: str, df: pd.DataFrame, objectives: list[str], directions: list[str],
              swept: list[str], references: list[str]) -> pd.DataFrame:
    """Build the front of the parent's trials, look up ``references``, log the files and tags."""
    from .publish import log_metrics
    from .queries import children

    runs = {r.info.run_id: r for r in children(client, [parent_id])}
    params = {rid: {k: r.data.params.get(k) for k in swept} for rid, r in runs.items()}
    t = front_table(df, objectives, directions, params)
    if t.empty:
        return t
    context = runs[t["run_id"].iloc[0]]
    exp = client.get_run(parent_id).info.experiment_id
    rows = []
    bounds = interval_columns(objectives, t)
    for method in references:
        ref = find_reference(client, exp, context, method, objectives)
        rows.append({"role": "reference", "method": method, "run_id": ref.info.run_id if ref else None,
                     **{o: ref.data.metrics[o] if ref else math.nan for o in objectives},
                     **{c: ref.data.metrics.get(c, math.nan) if ref else math.nan for c in bounds},
                     "pareto": False, "knee": False, "note": "" if ref else missing_note(method, context)})
    if rows:
        t = pd.concat([t, pd.DataFrame(rows)], ignore_index=True)
    verdict, why = knee_verdict(t, objectives, directions)
    with tempfile.TemporaryDirectory() as tmp:
        for f in write_front(t, objectives, directions, Path(tmp)):
            client.log_artifact(parent_id, str(f))
    knee = t[t["knee"]]
    if not knee.empty:
        client.set_tag(parent_id, "transquant.knee_run_id", knee["run_id"].iloc[0])
        log_metrics(client, parent_id, {f"knee_{o}": float(knee[o].iloc[0]) for o in objectives})
    if KNEE_REFERENCE in references:
        client.set_tag(parent_id, f"transquant.knee_dominates_{KNEE_REFERENCE}", verdict)
        client.set_tag(parent_id, f"transquant.knee_vs_{KNEE_REFERENCE}", why[:5000])
    return t
