"""``python -m transquant.deploy.gpu_check``: the one table ``scripts/gpu_check.sh`` prints, read back
from what its runs logged (an MLflow store, ``bench_base``'s CSV), so it shows the numbers the runs
recorded rather than a second measurement.

    python -m transquant.deploy.gpu_check tracking.uri=sqlite:///gpu_check/mlflow.db bench=gpu_check/bench_base.csv

Per experiment of the store: jobs finished, fine-tune minutes (jobs that fine-tuned, not cache
hits), median job seconds (MLflow start to end) and, per profiled job, the p50 latency of every
candidate; per ``bench_base`` row the same latencies; and the machine: the GPU and the ONNX Runtime
execution providers installed beside the one transquant's sessions use.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from ..core import cli
from ..core.tracking import client_for
from .runtime import ORT_PROVIDERS

# (label, metric) of each profiled candidate's p50, as profile_stage names them.
LATENCIES = (("engine", "latency_p50_ms"), ("PyTorch FP32", "fp32_latency_p50_ms"),
             ("PyTorch FP16", "fp16_latency_p50_ms"), ("ORT FP32", "ort_fp32_latency_p50_ms"),
             ("ORT dynamic INT8", "peer_latency_p50_ms"))


@dataclass
class Args:
    """The store (and experiment, null = all) to read, and ``bench_base``'s ``out=`` CSV (null: none)."""
    tracking: cli.Tracking = field(default_factory=cli.Tracking)
    bench: Optional[str] = None


def job_runs(uri: str, experiment: str | None = None) -> pd.DataFrame:
    """One row per job run of the store, or of its ``experiment`` (runs tagged ``quant_method``;
    sweep parents are not jobs): experiment, run name, status, seconds, its metrics and tags."""
    client = client_for(uri, must_exist=True)
    rows = []
    for exp in client.search_experiments():
        if experiment is not None and exp.name != experiment:
            continue
        for run in client.search_runs([exp.experiment_id], max_results=50000):
            tags = run.data.tags
            if "quant_method" not in tags:
                continue
            end = run.info.end_time
            rows.append({"experiment": exp.name, "run_name": run.info.run_name, "status": run.info.status,
                         "seconds": (end - run.info.start_time) / 1e3 if end else None,
                         **run.data.metrics, **tags})
    return pd.DataFrame(rows)


def _latency_rows(source: str, row: pd.Series) -> list[tuple[str, str, str]]:
    timer = row.get("profile_timer")
    engine = f"engine ({row.get('engine', '?')}{', ' + timer if isinstance(timer, str) else ''})"
    return [(source, f"p50 ms {engine if label == 'engine' else label}", f"{row[key]:.2f}")
            for label, key in LATENCIES if pd.notna(row.get(key))]


def gpu_table(runs: pd.DataFrame, bench: pd.DataFrame | None, providers: list[str], gpu: str) -> pd.DataFrame:
    """The table (source, quantity, value) of :func:`job_runs`' rows, ``bench_base``'s CSV, the ORT
    ``providers`` installed and this machine's ``gpu`` (used when no run logged ``gpu_model``)."""
    logged = sorted({str(g) for frame in (runs, bench) if frame is not None and "gpu_model" in frame
                     for g in frame["gpu_model"].dropna()})
    unused = [p for p in providers if p not in ORT_PROVIDERS]
    rows = [("machine", "GPU", ", ".join(logged) or gpu),
            ("machine", "ORT providers installed", ", ".join(providers)),
            ("machine", "ORT provider the engines use",
             ", ".join(ORT_PROVIDERS) + (f" ({', '.join(unused)} installed, not used)" if unused else ""))]
    for exp, jobs in (runs.groupby("experiment", sort=False) if len(runs) else ()):
        done = jobs[jobs["status"] == "FINISHED"]
        rows.append((exp, "jobs finished", f"{len(done)}/{len(jobs)}"))
        tuned = jobs["finetune_seconds"].dropna() / 60 if "finetune_seconds" in jobs else pd.Series(dtype=float)
        rows.append((exp, "fine-tune minutes", ", ".join(f"{m:.1f}" for m in tuned) or "none (cache hits)"))
        if len(done):
            rows.append((exp, "median job seconds", f"{done['seconds'].median():.1f}"))
        for _, job in done.iterrows():
            rows += _latency_rows(f"{exp}: {job['run_name']}", job)
    for _, row in (bench.iterrows() if bench is not None else ()):
        rows += _latency_rows(f"bench_base {row['method']}", row)
    return pd.DataFrame(rows, columns=["source", "quantity", "value"])


def machine_gpu() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to torch"


def run(_: list[str], args) -> int:
    import onnxruntime

    bench = None
    if args.bench is not None:
        if not Path(args.bench).is_file():
            raise cli.CliError(f"bench={args.bench}: no such file (bench_base's out= CSV)")
        bench = pd.read_csv(args.bench)
    runs = job_runs(args.tracking.uri, args.tracking.experiment)
    table = gpu_table(runs, bench, onnxruntime.get_available_providers(), machine_gpu())
    print(table.to_string(index=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("transquant.deploy.gpu_check", Args, run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
