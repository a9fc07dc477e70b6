"""Whole studies on the tiny model: the paper experiment in one multirun (job list, order, MLflow
parent/children, methods, report), every experiment's jobs composing and validating, and Optuna
searches end to end (single objective with a shared RDB study, and the Pareto variant)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient

from transquant.core.config import validate
from transquant.core.tracking import flatten
from transquant.run import CONF_DIR
from transquant.studies import report as rp
from transquant.studies import significance as S
from transquant.studies.labels import method_label, quant_params
from transquant.studies.queries import children
from transquant.studies.runs import records_frame, run_record

from .conftest import run_cli

# The tiny model, shrunk further: short sequences, 64 examples, 2 calibration batches, 1 thread.
# Statistics and profiling are off: the report's Tables II/III are tested on a synthetic store (test_report).
FAST = ["model=tiny", "task=synthetic", "train=quick", "train.max_length=32", "task.synthetic_train_size=64",
        "task.synthetic_eval_size=64", "calibration.num_batches=2", "calibration.batch_size=8", "hardware.threads=1",
        "stats.enabled=false", "profile.enabled=false"]
LOADED = 900  # subprocess guard: ~30 s each on 2 idle cores, but the cores are shared with other jobs
PAPER_METHODS = {"FP32", "W8A8 (paper)", "W8A32 (paper)", "W32A8", "mixed W8A{8,16} (paper)", "PEG K=6 sorted (paper)",
                 "W8A8", "mixed", "percentile p=99", "percentile p=99.5",
                 "percentile p=99.9", "percentile p=99.99",
                 *(f"PEG K={k} {g}" for k in (2, 3, 4, 6) for g in ("contiguous", "sorted", "gap"))}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One fine-tune cache for the searches: the tiny model is fine-tuned once for both."""
    return tmp_path_factory.mktemp("study_cache")


def _sweep_jobs(*overrides: str) -> list[list[str]]:
    """The job list Hydra's basic sweeper builds for a command line (params first, in order)."""
    with initialize_config_dir(config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + [o for o in overrides if not o.startswith("+experiment")])
    return BasicSweeper.split_arguments(parsed, None)[0]


def _runs(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("transquant")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("transquant.role") == "sweep"]
    return client, parents, runs


def test_paper_job_list_seed_slowest():
    jobs = _sweep_jobs("+experiment=paper")
    assert len(jobs) == 3 * 24
    seeds = [next(o for o in j if o.startswith("train.seed=")) for j in jobs]
    assert seeds == [f"train.seed={s}" for s in (1000, 1001, 1002) for _ in range(24)]  # one fine-tune per seed
    assert jobs[0][1] == "+method=fp32"  # each seed starts with FP32 (the fine-tune's cache miss)
    one = _sweep_jobs("+experiment=paper", "train.seed=7")
    assert len(one) == 24 and all("train.seed=7" in j for j in one)
    assert len(_sweep_jobs("+experiment=loo")) == 24
    assert len(_sweep_jobs("+experiment=bits")) == 4 * 6
    assert len(_sweep_jobs("+experiment=calibration")) == 3 * 4


@pytest.mark.parametrize("experiment", ["paper", "loo", "bits", "calibration"])
def test_every_job_of_an_experiment_validates_on_the_default_model(experiment):
    """Every job composes and passes config validation against MiniLM-L6's sites (no weights), and
    the report gives each job its own row (label)."""
    jobs = [j for j in _sweep_jobs(f"+experiment={experiment}") if "train.seed=1001" not in j and "train.seed=1002" not in j]
    records = []
    with initialize_config_dir(config_dir=CONF_DIR):
        for i, job in enumerate(jobs):
            cfg = compose(config_name="config", overrides=[f"+experiment={experiment}", *job])
            validate(cfg)
            records.append(run_record(str(i), flatten(cfg), {}, {}))
    labels = list(records_frame(records)["label"])
    assert len(set(labels)) == len(jobs), "two jobs of one experiment would be the same method"
    if experiment == "paper":
        assert set(labels) == PAPER_METHODS
    if experiment == "calibration":
        assert {lab.rsplit(" cal=", 1)[1] for lab in labels} == {"1", "16", "256", "1024"}


def test_paper_experiment_end_to_end(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = run_cli("-m", "+experiment=paper", *FAST, "train.seed=1000", f"tracking.uri={uri}",
                  f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'multirun'}", cwd=tmp_path,
                  timeout=LOADED)
    assert res.returncode == 0, res.stderr[-3000:]
    client, parents, runs = _runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["transquant.study"] == "paper" and parent.data.tags["transquant.sweeper"] == "basic"
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(kids) == 24 and all(k.info.status == "FINISHED" for k in kids)
    labels = [method_label(quant_params(k.data.params)) for k in kids]
    assert set(labels) == PAPER_METHODS
    assert labels[0] == "FP32" and [k.data.tags["finetune_cache"] for k in kids] == ["miss"] + ["hit"] * 23
    assert len({k.data.tags["checkpoint"] for k in kids}) == 1
    # Seed statistics as parent metrics (StudyCallback, before the parent was closed).
    m = parent.data.metrics
    w8a8 = next(k for k, lab in zip(kids, labels) if lab == "W8A8").data.metrics["accuracy"]
    assert m["median_accuracy.w8a8"] == w8a8 and m["seeds.peg_k6_gap"] == 1 and m["jobs_failed"] == 0

    out = rp.report(["paper"], uri, tmp_path / "report")
    t1 = pd.read_csv(out / "table1_accuracy.csv")
    assert set(t1["method"]) == PAPER_METHODS and list(t1["method"][:5]) == ["FP32", "W8A32 (paper)", "W32A8", "W8A8 (paper)", "W8A8"]
    assert (t1["seeds"] == 1).all()
    peg = pd.read_csv(out / "ablation_peg.csv")
    assert len(peg) == 12 and list(peg["grouping"][:3]) == ["contiguous", "sorted", "gap"]
    assert len(pd.read_csv(out / "ablation_percentile.csv")) == 4
    timing = pd.read_csv(out / "timing.csv").set_index("metric")
    assert timing.loc["fine-tunes (cache misses)", "jobs"] == 1 and timing.loc["eval_seconds", "jobs"] == 23
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/table1_accuracy.tex" in arts and "report/accuracy_vs_k.png" in arts
    # Every job logged its intervals and stored its predictions: one row per job in the per-seed table.
    seeds = pd.read_csv(out / "table1_seeds.csv")
    assert len(seeds) == len(kids) and ((seeds.accuracy_ci_low <= seeds.accuracy)
                                        & (seeds.accuracy <= seeds.accuracy_ci_high)).all()
    fp32 = seeds[seeds["method"] == "FP32"].iloc[0]
    assert (fp32.drop_ci_low, fp32.drop_ci_high, fp32.mcnemar_p) == (0.0, 0.0, 1.0)
    assert all(S.PREDICTIONS in {a.path for a in client.list_artifacts(k.info.run_id)} for k in kids)


def test_optuna_search_shared_storage(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = ["-m", "+search=peg", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=test-peg", *FAST, f"tracking.uri={uri}", f"paths.cache_dir={cache_dir}"]
    for i in range(2):  # two invocations = two workers sharing one Optuna study through the RDB storage
        # (each worker needs its own sampler seed, or both propose the same first trials)
        res = run_cli(*args, f"hydra.sweeper.sampler.seed={i}", f"hydra.sweep.dir={tmp_path / f'sweep{i}'}", cwd=tmp_path,
                      timeout=LOADED)
        assert res.returncode == 0, res.stderr[-3000:]
        results = yaml.safe_load((tmp_path / f"sweep{i}" / "optimization_results.yaml").read_text())
        assert set(results["best_params"]) == {"quant.k", "quant.grouping", "+search/sites"}
    assert len(optuna.load_study(study_name="test-peg", storage=storage).trials) == 4
    client, parents, runs = _runs(uri)
    assert len(parents) == 2
    for p in parents:
        assert p.info.status == "FINISHED" and p.data.tags["transquant.study"] == "peg"
        assert p.data.tags["transquant.optuna_study"] == "test-peg" and p.data.tags["transquant.optuna_storage"] == "sqlite"
        kids = children(client, [p.info.run_id])  # a repeated trial is a reused run (resume=true)
        assert len(kids) == 2 and all(k.data.params["quant.method"] == "peg" for k in kids)
        kids = [client.get_run(k.info.run_id) for k in kids]
        best = [k for k in kids if k.data.tags.get("transquant.best") == "true"]
        assert best and max(k.data.metrics["accuracy"] for k in kids) == best[0].data.metrics["accuracy"]
        assert set(p.data.tags["transquant.best_run_id"].split(",")) == {k.info.run_id for k in best}


def test_pareto_search(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "transquant.search", "-m", "+search=peg_pareto", "hydra.sweeper.n_trials=2",
           *FAST, f"tracking.uri={uri}", f"paths.cache_dir={cache_dir}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=LOADED,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-3000:]
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["solutions"] and all(len(s["values"]) == 2 for s in results["solutions"])
    client, parents, runs = _runs(uri)
    assert len(parents) == 1 and parents[0].data.tags["transquant.objectives"] == "accuracy,high_precision_sites"
    kids = [client.get_run(k.info.run_id) for k in children(client, [parents[0].info.run_id])]
    assert len(kids) == 2
    for k in kids:
        m = k.data.metrics
        assert m["high_precision_sites"] == (m["peg_activation_sites"] + m["high_bits_activation_sites"]
                                             + m["float_activation_sites"])
        assert (m["peg_activation_sites"] == 0) == (k.data.params["quant.k"] == "1")  # K=1 costs nothing
    front = {(s["values"][0], s["values"][1]) for s in results["solutions"]}
    tagged = {(k.data.metrics["accuracy"], k.data.metrics["high_precision_sites"]) for k in kids
              if k.data.tags.get("transquant.pareto") == "true"}
    assert tagged == front  # MLflow tags agree with Optuna's Pareto front
    out = rp.report(["peg_pareto"], uri, tmp_path / "report")
    assert (out / "pareto.png").is_file() and len(pd.read_csv(out / "search_trials.csv")) == 2


@pytest.mark.parametrize("overrides, expected", [
    (["+search=peg", "+search/sites=peg_default", "quant.k=2"], (9, 0, 0, 9)),   # 1 + 2 layers x 4 sites
    (["+search=peg", "+search/sites=peg_default", "quant.k=1"], (0, 0, 0, 0)),   # K=1 is per-tensor: no cost
    (["+search=peg", "+search/sites=hi_residual", "quant.k=4"], (4, 5, 0, 9)),
    (["quant=fp32"], (0, 0, 30, 30)),                                            # everything float
    (["quant=w8a8", "quant.act_exclude=[*.ffn.residual]"], (0, 0, 2, 2)),
])
def test_site_counts(overrides, expected):
    """The cost objective of the Pareto search (peg, high-bit, float, high-precision sites)."""
    from transquant.studies.search import site_counts

    with initialize_config_dir(config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=["model=tiny", "task=synthetic", *overrides])
    c = site_counts(cfg)
    assert c["activation_sites"] == 30
    assert (c["peg_activation_sites"], c["high_bits_activation_sites"], c["float_activation_sites"],
            c["high_precision_sites"]) == expected
