"""One command line for every entry point (``key=value`` overrides), no silent empty stores, and
MLflow UI links that open our runs in the classic view."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from transquant.core import cli, tracking
from transquant.core.tracking import KIND, KIND_TAG, JobRun, MultirunParent, ui_url
from transquant.report import Args
from transquant.report import main as report_main

ALLOWED = "tracking.uri, tracking.experiment, report.out, report.all, report.log, report.compare"


def test_words_and_overrides(monkeypatch):
    words, cfg = cli.parse(["paper", "tracking.uri=sqlite:///x/mlflow.db", "loo", "report.all=true",
                            "report.compare=['W8A8 (paper)','mixed W8A{8,16} (paper)']"], Args)
    assert words == ["paper", "loo"]
    assert cfg.tracking.uri == "sqlite:///x/mlflow.db" and cfg.report.all and cfg.report.log
    assert list(cfg.report.compare) == ["W8A8 (paper)", "mixed W8A{8,16} (paper)"]
    assert cfg.tracking.experiment is None and cfg.report.out is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from/env.db")  # resolved as conf/config.yaml does
    assert cli.parse([], Args)[1].tracking.uri == "sqlite:///from/env.db"


@pytest.mark.parametrize("argv, message", [
    (["paper", "report.outdir=x"], "unknown key 'report.outdir' in 'report.outdir=x' (allowed keys: " + ALLOWED),
    (["paper", "--tracking-uri", "sqlite:///x.db"], "'--tracking-uri': write tracking.uri=sqlite:///x.db"),
    (["paper", "--no-log"], "'--no-log': write report.log=false"),
    (["paper", "--compare", "W8A8 (paper)", "mixed"], "write \"report.compare=['W8A8 (paper)',mixed]\""),
    (["paper", "report.all=maybe"], "'report.all=maybe': "),
    (["paper", "report.compare=[a"], "malformed override 'report.compare=[a'"),
    (["paper", "+report.out=x"], "'+report.out=x': write plain key=value"),
])
def test_bad_input_is_one_error_line_naming_it(argv, message, capsys):
    assert report_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("transquant.report: error: ") and message in err and err.count("\n") == 1


def test_help_lists_every_key(capsys):
    assert report_main(["-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m transquant.report [STUDY|PARENT_RUN_ID ...] [key=value ...]")
    assert "  report.log=true\n" in out and "  tracking.experiment=null\n" in out


def test_bench_speaks_the_same_convention(capsys):
    from transquant.deploy.bench import Args as BenchArgs
    from transquant.deploy.bench import main as bench_main

    _, cfg = cli.parse(["methods=[mixed,w8a8]", "threads=4", "out=t.csv"], BenchArgs, words=False)
    assert list(cfg.methods) == ["mixed", "w8a8"] and cfg.threads == 4 and cfg.iterations == 100
    assert bench_main(["--methods", "mixed,w8a8"]) == 2
    assert "write methods=[mixed,w8a8]" in capsys.readouterr().err
    assert bench_main(["methods=mixed,w8a8"]) == 2  # Hydra's sweep syntax: one value here
    assert "a list is written methods=[mixed,w8a8]" in capsys.readouterr().err
    assert bench_main(["mixed"]) == 2
    assert "unexpected word 'mixed'" in capsys.readouterr().err


def test_report_on_a_missing_store_creates_nothing(tmp_path):
    db = tmp_path / "missing" / "mlflow.db"
    r = subprocess.run([sys.executable, "-m", "transquant.report", "paper", f"tracking.uri=sqlite:///{db}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2
    assert r.stderr.startswith("transquant.report: error: ") and f"no MLflow store at {db}" in r.stderr
    assert "tracking.uri=" in r.stderr and not db.parent.exists() and not list(tmp_path.iterdir())


def test_ui_url():
    run = "#/experiments/3/runs/abc?workflowType=machine_learning"
    assert ui_url("sqlite:///mlruns/mlflow.db", "3", "abc") == "http://127.0.0.1:5000/" + run
    assert ui_url("file:///tmp/mlruns", "3") == "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    assert ui_url("https://mlflow.example.org/team/", "3", "abc") == "https://mlflow.example.org/team/" + run
    assert ui_url("http://10.0.0.2:8080", "3") == "http://10.0.0.2:8080/#/experiments/3?workflowType=machine_learning"


def test_experiments_open_in_the_classic_view(make_cfg, store, capsys, monkeypatch):
    """A new experiment is created with MLflow's kind tag, an old one without it gets it, and a
    job and a sweep each end with the command that starts the UI and the link to their page."""
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    uri = store["uri"]
    cfg = make_cfg("tracking.experiment=cli-new")
    with JobRun(cfg, "job", {}, key="k") as run:
        pass
    client = MlflowClient(uri)
    assert client.get_experiment(run.exp).tags[KIND_TAG] == KIND
    out = capsys.readouterr().out
    assert f"mlflow ui --backend-store-uri {uri}" in out
    assert out.endswith(ui_url(uri, run.exp, run.run_id) + "\n")

    old = client.create_experiment("cli-old")
    assert KIND_TAG not in client.get_experiment(old).tags
    sweep = MultirunParent()
    conf = OmegaConf.create({"tracking": {"uri": uri, "experiment": "cli-old", "artifacts": None},
                             "hydra": {"overrides": {"task": ["quant=w8a8"]}}})
    sweep.on_multirun_start(conf)
    sweep.on_multirun_end(conf)
    assert client.get_experiment(old).tags[KIND_TAG] == KIND
    assert capsys.readouterr().out.endswith(ui_url(uri, old) + "\n")
