"""Failures, kills, resume and determinism: what must hold when things go wrong."""
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from transquant.core import cache
from transquant.core.errors import TransquantError
from transquant.pipeline import run_job

from .conftest import run_cli

KILLABLE_WRITER = """
import sys, time
from pathlib import Path
from transquant.core import cache
def build(tmp):
    (tmp / "part1").write_text("x" * 1000)
    print("writing", flush=True)
    time.sleep(60)
    (tmp / "part2").write_text("done")
cache.cached_dir(Path(sys.argv[1]), build)
"""


def test_killed_writer_leaves_nothing_a_later_run_trusts(tmp_path):
    target = tmp_path / "entry"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    assert list(tmp_path.glob(".entry.tmp-*"))  # the half-written staging dir is there ...
    path, was_cached = cache.cached_dir(target, lambda tmp: (tmp / "part2").write_text("done"))
    assert not was_cached and (path / "part2").read_text() == "done"  # ... and is never trusted
    assert not list(tmp_path.glob(".entry.tmp-*"))  # and is cleaned up by the next writer


def test_failed_build_leaves_no_entry(tmp_path):
    def boom(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cache.cached_dir(tmp_path / "e", boom)
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.tmp-*"))


def test_json_write_is_atomic(tmp_path):
    cache.write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text().strip().startswith("{") and not list(tmp_path.glob(".a.json.tmp-*"))


def _runs(uri):
    c = MlflowClient(uri)
    e = c.get_experiment_by_name("transquant")
    return c, (c.search_runs([e.experiment_id], order_by=["attributes.start_time ASC"]) if e else [])


def test_killed_job_is_closed_and_rerun_cleanly(tmp_path):
    """Kill a job mid fine-tune: no checkpoint, its run is left RUNNING; the re-run closes it
    KILLED, fine-tunes from scratch and finishes — never two live runs for one job."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [sys.executable, "-m", "transquant.run", "model=tiny", "task=synthetic", "train=quick",
            "task.synthetic_train_size=3000", "profile=quick", f"tracking.uri={uri}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'out'}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in iter(proc.stderr.readline, ""):
        if "fine-tune:" in line:
            break
    time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["RUNNING"]
    assert not [p for p in (tmp_path / "cache" / "finetune").iterdir() if p.is_dir() and not p.name.startswith(".")]
    res = run_cli(*args[3:6], "task.synthetic_train_size=256", *args[7:], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli(*args[3:], cwd=tmp_path)  # the same job as the killed one
    assert res.returncode == 0, res.stderr[-2000:]
    _, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED", "FINISHED"]
    assert runs[0].data.tags["transquant.stale"].startswith(f"owner process {proc.pid} died")


def test_killed_sweep_parent_is_closed_by_the_next_start(tmp_path):
    """SIGKILL a sweep mid fine-tune: no exit hook runs, its parent and job stay RUNNING; the next
    sweep started in the experiment sees their owner process is gone and closes them KILLED."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["model=tiny", "task=synthetic", "train=quick", "profile.enabled=false", "stats.enabled=false",
              f"tracking.uri={uri}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen([sys.executable, "-m", "transquant.run", "-m", *common, "task.synthetic_train_size=20000",
                             "quant=w8a8,fp32", f"hydra.sweep.dir={tmp_path / 'killed'}"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in iter(proc.stderr.readline, ""):
        if "fine-tune:" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["RUNNING", "RUNNING"]  # the parent and its first job
    assert {r.data.tags["transquant.pid"] for r in runs} == {str(proc.pid)}
    res = run_cli("-m", *common, "quant=fp32", f"hydra.sweep.dir={tmp_path / 'next'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    _, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["KILLED", "KILLED", "FINISHED", "FINISHED"]
    assert all(r.data.tags["transquant.stale"].startswith(f"owner process {proc.pid} died") for r in runs[:2])


def test_nan_loss_marks_run_failed_and_sweep_can_continue(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = run_cli("-m", "model=tiny", "task=synthetic", "train=quick", "train.lr=1e12,1e-3", "on_error=continue",
                  f"tracking.uri={uri}", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'mr'}",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    client, runs = _runs(uri)
    by_lr = {r.data.params.get("train.lr"): r for r in runs if "train.lr" in r.data.params}
    failed = by_lr["1000000000000.0"]
    assert failed.info.status == "FAILED" and "loss became nan" in failed.data.tags["error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(failed.info.run_id)}
    assert by_lr["0.001"].info.status == "FINISHED"
    parent = next(r for r in runs if r.data.tags.get("transquant.role") == "sweep")
    assert parent.info.status == "FAILED" and parent.data.metrics["jobs_failed"] == 1


def test_failure_stops_sweep_by_default_and_parent_is_closed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = run_cli("-m", "model=tiny", "task=synthetic", "train=quick", "train.lr=1e12,1e-3",
                  f"tracking.uri={uri}", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'mr'}",
                  cwd=tmp_path)
    assert res.returncode != 0
    _, runs = _runs(uri)
    # the failed job and the parent; the second job never ran
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]
    assert "failed with TrainingError" in (tmp_path / "mr" / ".transquant_stop").read_text()


def test_same_config_same_numbers(make_cfg, tmp_path):
    """Determinism on CPU: the same config and seed give the same FP32 and quantized accuracy
    and bit-identical fine-tuned weights, from two independent caches."""
    from safetensors.torch import load_file

    accs, weights = [], []
    for i in range(2):
        cfg = make_cfg("quant=w8a8", f"paths.cache_dir={tmp_path / str(i)}", "resume=false")
        accs.append(run_job(cfg))
        ckpt = next(p for p in (tmp_path / str(i) / "finetune").iterdir() if p.is_dir() and not p.name.endswith(".eval"))
        weights.append(load_file(ckpt / "model.safetensors"))
    assert accs[0] == accs[1]
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])


BAD_DATA = [
    ("task=qnli-squad", "task.path={tmp}/missing.jsonl.gz", "cannot read"),
    ("task=qnli-squad", "task.path={tmp}/garbage.jsonl.gz", "cannot read"),
    ("task=qnli-squad", "task.path={tmp}/labels.jsonl.gz", "labels"),
]


@pytest.mark.parametrize("task,override,message", BAD_DATA, ids=["missing", "garbage", "bad-labels"])
def test_bad_data_file(make_cfg, tmp_path, task, override, message):
    import gzip
    import json

    (tmp_path / "garbage.jsonl.gz").write_bytes(b"not gzip at all")
    with gzip.open(tmp_path / "labels.jsonl.gz", "wt") as fh:
        for split in ("train", "validation"):
            fh.write(json.dumps({"split": split, "question": "q", "sentence": "s", "label": 7}) + "\n")
    cfg = make_cfg(task, override.format(tmp=tmp_path))
    with pytest.raises(TransquantError, match=message):
        run_job(cfg)
