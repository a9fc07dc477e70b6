"""MLflow writes of a study: best-trial tags, the parent run's metrics, the report's artifacts."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .pareto import best_mask


def mark_best(client, parent_id: str, df: pd.DataFrame, objectives: list[str], directions: list[str]) -> list[str]:
    """Tag the best trial(s) ``transquant.best=true`` (Pareto front: also ``transquant.pareto``)."""
    if df.empty:
        return []
    mask = best_mask(df, objectives, directions)
    multi = len(objectives) > 1
    best = []
    for (_, row), is_best in zip(df.iterrows(), mask):
        if is_best != row["best"]:
            client.set_tag(row["run_id"], "transquant.best", "true" if is_best else "false")
        if multi and is_best != row["pareto"]:
            client.set_tag(row["run_id"], "transquant.pareto", "true" if is_best else "false")
        if is_best:
            best.append(row["run_id"])
    if best:
        client.set_tag(parent_id, "transquant.best_run_id", ",".join(best)[:5000])
        if not multi:
            value = float(df.loc[mask, objectives[0]].iloc[0])
            client.log_metric(parent_id, f"best_{objectives[0]}", value, step=0)
    return best


def log_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    """Log ``metrics`` on ``run_id`` at step 0 with one timestamp, 500 per call."""
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()  # MLflow's "latest" value ties on timestamp by max value
    ms = [Metric(k, v, now, 0) for k, v in sorted(metrics.items())]
    for i in range(0, len(ms), 500):
        client.log_batch(run_id, metrics=ms[i:i + 500])


def log_report(client, run_id: str, out: Path, artifact_path: str) -> None:
    """The report's files as artifacts ``artifact_path`` of ``run_id``, an earlier report's removed first."""
    _clear_artifacts(client, run_id, artifact_path)
    client.log_artifacts(run_id, str(out), artifact_path)


def _clear_artifacts(client, run_id: str, path: str) -> None:
    """Remove an earlier report's files first, so the artifact folder mirrors this report (a file
    from an older report must not survive). Artifact stores that cannot delete keep old files."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(client.get_run(run_id).info.artifact_uri).delete_artifacts(path)
    except Exception:  # noqa: BLE001 - NotImplementedError, permissions, remote stores: best effort
        pass
