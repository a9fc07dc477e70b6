"""Two methods (per seed) or two runs, paired on the same validation examples from the runs'
stored predictions: both accuracies with their intervals, the paired interval of A − B and the
exact McNemar p-value."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .labels import parse_param
from .queries import RUN_ID, ReportError
from .significance import PREDICTIONS, accuracy_ci, load_predictions, paired


def _side(client, spec: str, df: pd.DataFrame | None) -> dict[str, str]:
    """{seed: run id} of one side of a comparison: a run id, or a method label (latest finished run per seed)."""
    if RUN_ID.fullmatch(spec):
        try:
            run = client.get_run(spec)
        except Exception as err:  # noqa: BLE001 - MLflow raises a generic exception for unknown ids
            raise ReportError(f"run {spec}: not found in this tracking store ({err})") from err
        return {str(parse_param(run.data.params.get("train.seed"))): spec}
    if df is None or df.empty:
        raise ReportError(f"report.compare: {spec!r}: a method label needs a study with runs "
                          "(python -m transquant.report <study> report.compare=[A,B])")
    rows = df[(df["label"] == spec) & (df["status"] == "FINISHED")]
    if rows.empty:
        raise ReportError(f"report.compare: {spec!r}: no finished run of this method; "
                          f"methods: {', '.join(dict.fromkeys(df['label']))}")
    return dict(zip(rows["seed"].map(str), rows["run_id"]))  # rows in (seed, start time) order: the latest wins


def _stored_predictions(client, run_id: str, tmp: str) -> tuple[np.ndarray, np.ndarray]:
    dst = Path(tmp) / run_id
    dst.mkdir(exist_ok=True)
    try:
        return load_predictions(client.download_artifacts(run_id, PREDICTIONS, str(dst)))
    except Exception as err:  # noqa: BLE001 - missing artifact: MLflow's error type depends on the store
        raise ReportError(f"run {run_id}: no {PREDICTIONS} artifact; re-run its job with resume=false") from err


def compare(client, a: str, b: str, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """A against B per seed from the stored predictions (both run ids: those two runs)."""
    side_a, side_b = _side(client, a, df), _side(client, b, df)
    if RUN_ID.fullmatch(a) and RUN_ID.fullmatch(b):
        pairs = [(" / ".join(dict.fromkeys([*side_a, *side_b])), side_a.popitem()[1], side_b.popitem()[1])]
    else:
        pairs = [(s, side_a[s], side_b[s]) for s in sorted(set(side_a) & set(side_b), key=lambda s: (len(s), s))]
        if not pairs:
            raise ReportError(f"report.compare: no seed has both {a!r} (seeds {', '.join(side_a)}) "
                              f"and {b!r} (seeds {', '.join(side_b)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="transquant-compare-") as tmp:
        for seed, run_a, run_b in pairs:
            pred_a, label_a = _stored_predictions(client, run_a, tmp)
            pred_b, label_b = _stored_predictions(client, run_b, tmp)
            if not np.array_equal(label_a, label_b):
                raise ReportError(f"runs {run_a} and {run_b}: evaluated on different validation examples; "
                                  "cannot pair them")
            ok_a, ok_b = pred_a == label_a, pred_b == label_b
            d = paired(ok_a, ok_b)
            (lo_a, hi_a), (lo_b, hi_b) = accuracy_ci(ok_a), accuracy_ci(ok_b)
            rows.append({"seed": seed, "examples": d.n, "accuracy_a": d.accuracy_a, "accuracy_a_ci_low": lo_a,
                         "accuracy_a_ci_high": hi_a, "accuracy_b": d.accuracy_b, "accuracy_b_ci_low": lo_b,
                         "accuracy_b_ci_high": hi_b, "difference": d.difference, "difference_ci_low": d.ci_low,
                         "difference_ci_high": d.ci_high, "only_a": d.only_a, "only_b": d.only_b,
                         "mcnemar_p": d.p, "significant": d.significant, "run_a": run_a, "run_b": run_b})
    return pd.DataFrame(rows)
