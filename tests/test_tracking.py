"""Job identity and where a store keeps its artifacts."""
import pytest
from mlflow.tracking import MlflowClient

from transquant import models
from transquant.core import provenance, tracking
from transquant.core.errors import TransquantError
from transquant.core.tracking import JobRun, job_key
from transquant.data.tasks import load_task

FAST = ("profile.enabled=false", "stats.enabled=false")


def _key(make_cfg, *overrides):
    cfg = make_cfg(*overrides)
    return job_key(cfg, load_task(cfg.task))


def test_knobs_of_disabled_stages_and_objectives_are_not_identity(make_cfg):
    off = _key(make_cfg, *FAST)
    assert off == _key(make_cfg, *FAST, "profile.iterations=9", "stats.top_k=7", "+objectives=[accuracy]")
    assert off != _key(make_cfg, "stats.enabled=false", "profile.enabled=true")
    assert _key(make_cfg, "profile.enabled=true") != _key(make_cfg, "profile.enabled=true", "profile.iterations=9")


def test_knobs_of_the_stats_command_alone_are_not_identity(make_cfg):
    """Where ``python -m transquant.stats`` writes its page and which grid it suggests for do not
    change a pipeline job's numbers; the statistics' own knobs do."""
    on = _key(make_cfg, "profile.enabled=false")
    assert on == _key(make_cfg, "profile.enabled=false", "stats.page_dir=/elsewhere", "stats.act_bits=6",
                      "stats.weight_bits=4", "stats.finetune=false")
    assert on != _key(make_cfg, "profile.enabled=false", "stats.top_k=7")


def test_data_model_and_libraries_are_identity(make_cfg, monkeypatch):
    cfg = make_cfg(*FAST)
    task = load_task(cfg.task)
    key = job_key(cfg, task)
    assert key == job_key(cfg)  # loads the task itself when not given
    task.validation = task.validation[1:]
    assert job_key(cfg, task) != key
    task = load_task(cfg.task)
    monkeypatch.setattr(models, "identity", lambda _: {"kind": "package", "version": "0.2"})  # a new weights package
    assert job_key(cfg, task) != key
    monkeypatch.undo()
    monkeypatch.setattr(provenance, "library_versions", lambda: {"torch": "0.0"})
    assert job_key(cfg, task) != key


def _log_one_artifact(cfg, tmp_path) -> str:
    (tmp_path / "a.txt").write_text("x")
    with JobRun(cfg, "artifact", {}, key="k") as run:
        run.artifact_file(tmp_path / "a.txt")
    return MlflowClient(cfg.tracking.uri).get_run(run.run_id).info.artifact_uri


def test_artifacts_live_with_their_store(make_cfg, tmp_path, monkeypatch):
    """Two stores, both with experiment id 1: each keeps its artifacts beside its database or
    where tracking.artifacts says, never in MLflow's default ./mlruns of the current directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    beside = make_cfg(f"tracking.uri=sqlite:///{tmp_path / 'a'}/x.db")
    _log_one_artifact(beside, tmp_path)
    assert len(list((tmp_path / "a" / "artifacts").rglob("a.txt"))) == 1
    uri = f"sqlite:///{tmp_path / 'b'}/x.db"
    _log_one_artifact(make_cfg(f"tracking.uri={uri}", f"tracking.artifacts={tmp_path / 'elsewhere'}"), tmp_path)
    assert len(list((tmp_path / "elsewhere").rglob("a.txt"))) == 1 and not (tmp_path / "b" / "artifacts").exists()
    assert not list(cwd.iterdir())

    moved = make_cfg(f"tracking.uri={uri}", f"tracking.artifacts={tmp_path / 'moved'}")
    with pytest.raises(TransquantError, match="tracking.artifacts=.*moved: experiment 'transquant' already keeps"):
        tracking.experiment_id(tracking.client_for(uri), moved.tracking)
    _log_one_artifact(make_cfg(f"tracking.uri={uri}"), tmp_path)  # null: wherever the experiment keeps them
    assert len(list((tmp_path / "elsewhere").rglob("a.txt"))) == 2
