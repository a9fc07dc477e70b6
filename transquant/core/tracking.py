"""MLflow tracking: one run per job; a multirun is a parent run with one child per job.

Uses ``MlflowClient`` (no fluent global state), so in-process sweeps, joblib workers and tests
cannot leak an active run into each other. The parent run id travels to jobs in an environment
variable, which in-process jobs and launcher subprocesses both inherit.
"""
from __future__ import annotations

import atexit
import os
import socket
import tempfile
import traceback
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pandas as pd
from hydra.experimental.callback import Callback
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from . import provenance
from .cache import key_of
from .errors import TransquantError

PARENT_ENV = "TRANSQUANT_PARENT_RUN_ID"
HOST_TAG, PID_TAG = "transquant.host", "transquant.pid"
URI_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "databricks")
# MLflow 3 opens an experiment without this tag on its GenAI (traces) pages, which hide our runs.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite URI (relative to the current directory unless absolute)."""
    if urlparse(uri).scheme.split("+")[0] != "sqlite":
        return None
    return Path(uri.split(":///", 1)[1].split("?")[0])


def check_uri(uri: str, must_exist: bool = False) -> None:
    """Fail fast on a tracking URI that cannot work (MLflow itself retries for minutes).

    ``must_exist``: the caller only reads, so a sqlite database that is not there is a wrong
    path, not a store to create (MLflow would silently create an empty one)."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme not in URI_SCHEMES:
        raise TransquantError(f"tracking.uri={uri}: unsupported scheme '{parsed.scheme}'; allowed "
                              f"{', '.join(URI_SCHEMES)} (default sqlite:///mlruns/mlflow.db)")
    if scheme in ("http", "https"):
        port = parsed.port or (443 if scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=3).close()
        except OSError as err:
            raise TransquantError(f"tracking.uri={uri}: no tracking server answers ({err}); "
                                  "start `mlflow server` or use sqlite:///mlruns/mlflow.db") from err
    db = _sqlite_file(uri)
    if db is None:
        return
    if must_exist and not db.is_file():
        raise TransquantError(f"tracking.uri={uri}: no MLflow store at {db.resolve()}; give the database your runs "
                              "went to with tracking.uri=sqlite:///PATH (default sqlite:///mlruns/mlflow.db, "
                              "relative to the current directory, or $MLFLOW_TRACKING_URI)")
    db.parent.mkdir(parents=True, exist_ok=True)


def check_artifacts(tracking: DictConfig) -> None:
    """A tracking server keeps artifacts where it was told to; the client cannot choose."""
    if tracking.artifacts is not None and urlparse(tracking.uri).scheme in ("http", "https"):
        raise TransquantError(f"tracking.artifacts={tracking.artifacts}: must be null with a tracking server "
                              f"({tracking.uri}); the server decides (mlflow server --artifacts-destination)")


def artifact_location(tracking: DictConfig) -> str | None:
    """Where a new experiment keeps its artifacts: ``tracking.artifacts``, else ``artifacts/``
    beside a sqlite database (MLflow's default is ``./mlruns`` of whatever directory the run
    started in). None: the store decides (a file store keeps them inside, a server where told)."""
    if tracking.artifacts is not None:
        return Path(tracking.artifacts).resolve().as_uri()
    db = _sqlite_file(tracking.uri)
    return (db.resolve().parent / "artifacts").as_uri() if db else None


def client_for(uri: str, must_exist: bool = False) -> MlflowClient:
    """A client of a checked store; ``must_exist`` for callers that only read (:func:`check_uri`)."""
    check_uri(uri, must_exist)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, tracking: DictConfig) -> str:
    """Get or create ``tracking.experiment`` (artifacts at :func:`artifact_location`), tolerating
    a concurrent creator. An existing experiment keeps its location: asking for another one is
    an error, not a silent split of its artifacts."""
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        try:
            return client.create_experiment(tracking.experiment, artifact_location=artifact_location(tracking),
                                            tags={KIND_TAG: KIND})
        except MlflowException:
            exp = client.get_experiment_by_name(tracking.experiment)
    if tracking.artifacts is not None and exp.artifact_location != artifact_location(tracking):
        raise TransquantError(f"tracking.artifacts={tracking.artifacts}: experiment '{tracking.experiment}' already "
                              f"keeps its artifacts at {exp.artifact_location}; use that or another tracking.experiment")
    if KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


def ui_url(uri: str, exp_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment (a sweep) or of one run, in the classic view: without
    ``workflowType`` MLflow 3 may open its GenAI pages, which show none of our runs. A tracking
    server serves its own UI; any other store is shown by ``mlflow ui`` at its default address."""
    parsed = urlparse(uri)
    base = "http://127.0.0.1:5000"
    if parsed.scheme in ("http", "https"):
        base = f"{parsed.scheme}://{parsed.netloc}{parsed.path}".rstrip("/")
    page = f"experiments/{exp_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/#/{page}?workflowType=machine_learning"


def print_ui_link(uri: str, exp_id: str, run_id: str | None = None) -> None:
    """How to look at what was just logged: the command that starts the UI, then the page."""
    db = _sqlite_file(uri)
    store = f"sqlite:///{db.resolve()}" if db else uri
    how = (f"MLflow UI of {uri}:" if urlparse(uri).scheme in ("http", "https")
           else f"MLflow UI: start it with `mlflow ui --backend-store-uri {store}`, then open")
    print(f"{how}\n{ui_url(uri, exp_id, run_id)}", flush=True)


def _host() -> str:
    """This machine and PID namespace: containers may share a host name, not their PIDs."""
    try:
        return f"{socket.gethostname()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def owner_tags() -> dict[str, str]:
    """Which process owns a run, so a later process can tell that it died."""
    return {HOST_TAG: _host(), PID_TAG: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def close_orphans(client: MlflowClient, exp: str) -> None:
    """Close KILLED the RUNNING runs (sweep parents and jobs) whose owner process on this host
    is gone: a SIGKILL runs no exit handler, and nothing else would ever close them."""
    runs = client.search_runs([exp], filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{_host()}'")
    for r in runs:
        pid = int(r.data.tags.get(PID_TAG, "0"))
        if pid and not _alive(pid):
            client.set_tag(r.info.run_id, "transquant.stale", f"owner process {pid} died; closed by {os.getpid()}")
            client.set_terminated(r.info.run_id, "KILLED")


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Resolved config as dotted params (MLflow caps a value at 6,000 characters)."""
    out = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(node)[:6000]

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out


JOB_KEY_TAG = "transquant.job_key"


# Knobs of ``python -m transquant.stats`` alone: a pipeline job's numbers do not depend on them.
STATS_COMMAND_ONLY = ("finetune", "weight_bits", "act_bits", "page_dir")


def job_key(cfg: DictConfig, task=None) -> str:
    """Identity of a job: whatever decides its numbers, so a finished run is reused only if a
    re-run would give the same ones — the config (minus where things are stored, how the sweep
    runs and the knobs of disabled stages), the transquant source, the library versions, the task
    data and the starting weights. ``task``: the loaded task, if the caller has it."""
    from ..data.tasks import load_task
    from ..models import identity

    body = OmegaConf.to_container(cfg, resolve=True)
    for k in ("hydra", "tracking", "paths", "resume", "on_error", "objectives"):
        body.pop(k, None)
    for stage in ("profile", "stats"):
        if stage in body and not body[stage]["enabled"]:
            body[stage] = {"enabled": False}
    for k in STATS_COMMAND_ONLY:
        body.get("stats", {}).pop(k, None)
    task = task if task is not None else load_task(cfg.task)
    return key_of({"config": body, "code": provenance.fingerprint(), "model": identity(cfg.model),
                   "data": {split: task.fingerprint(split) for split in ("train", "validation")}})


def previous_runs(cfg: DictConfig, key: str) -> tuple[object | None, list]:
    """(the newest FINISHED run of this job or None, the RUNNING ones).

    Call it only while holding the job's lock: a RUNNING run seen then belongs to a process
    that died, and :class:`JobRun` closes it as KILLED so a job never has two live runs."""
    client = client_for(cfg.tracking.uri)
    exp = experiment_id(client, cfg.tracking)
    runs = client.search_runs([exp], filter_string=f"tags.`{JOB_KEY_TAG}` = '{key}'",
                              order_by=["attributes.start_time DESC"])
    finished = next((r for r in runs if r.info.status == "FINISHED"), None)
    return finished, [r for r in runs if r.info.status == "RUNNING"]


def link_reused(cfg: DictConfig, run) -> None:
    """Record on the current sweep's parent that a finished run was reused instead of redone."""
    parent = os.environ.get(PARENT_ENV)
    if parent:
        client_for(cfg.tracking.uri).set_tag(parent, f"reused.{run.info.run_id}", run.data.tags.get("mlflow.runName", ""))


class JobRun:
    """The MLflow run of one job: opened after validation, closed FINISHED or FAILED."""

    def __init__(self, cfg: DictConfig, run_name: str, tags: dict[str, str], key: str, stale: list = ()):
        self.client, self.uri = client_for(cfg.tracking.uri), cfg.tracking.uri
        self.exp = exp = experiment_id(self.client, cfg.tracking)
        close_orphans(self.client, exp)
        parent = os.environ.get(PARENT_ENV)
        code = provenance.fingerprint()
        all_tags = {"mlflow.runName": run_name, JOB_KEY_TAG: key, **owner_tags(),
                    "transquant.source_hash": code["source"],
                    **{f"transquant.version.{lib}": v for lib, v in code["libraries"].items()}, **tags}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        for old in stale:
            self.client.set_tag(old.info.run_id, "transquant.stale", "owner died; superseded by a re-run")
            self.client.set_terminated(old.info.run_id, "KILLED")
        self.run_id = self.client.create_run(exp, tags=all_tags).info.run_id
        params = [Param(k, v) for k, v in flatten(cfg).items() if not k.startswith("hydra")]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        ms = [Metric(k, float(v), mlflow.utils.time.get_current_time_millis(), step)
              for k, v in values.items() if v is not None]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 500])

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def artifact_dir(self, local_dir: str | Path, path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), path)

    def artifact_file(self, local_file: str | Path, path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_file), path)

    def table(self, df: pd.DataFrame, name: str) -> None:
        """A DataFrame as a CSV artifact."""
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / name
            df.to_csv(f, index=False)
            self.artifact_file(f)

    def __enter__(self) -> "JobRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.client.set_terminated(self.run_id, "FINISHED")
        else:
            self.client.set_tag(self.run_id, "error", f"{exc_type.__name__}: {exc}"[:5000])
            with tempfile.TemporaryDirectory() as tmp:
                f = Path(tmp) / "error.txt"
                f.write_text("".join(traceback.format_exception(exc_type, exc, tb)))
                self.client.log_artifact(self.run_id, str(f))
            self.client.set_terminated(self.run_id, "KILLED" if exc_type is KeyboardInterrupt else "FAILED")
        print_ui_link(self.uri, self.exp, self.run_id)


class MultirunParent(Callback):
    """Hydra callback: a parent MLflow run around a multirun, with a summary table of its children.

    Hydra skips ``on_multirun_end`` when the sweeper raises, so an ``atexit`` hook closes the
    parent as FAILED in that case; after a SIGKILL, which runs no hook, the next run started in
    the experiment closes it (:func:`close_orphans`).
    """

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.client = client_for(config.tracking.uri)
        exp = experiment_id(self.client, config.tracking)
        close_orphans(self.client, exp)
        overrides = list(config.hydra.overrides.task)
        run = self.client.create_run(exp, tags={"mlflow.runName": "sweep: " + " ".join(overrides),
                                                "transquant.role": "sweep", **owner_tags()})
        self.run_id = run.info.run_id
        self.client.log_param(self.run_id, "sweep_overrides", " ".join(overrides)[:6000])
        os.environ[PARENT_ENV] = self.run_id
        atexit.register(self._close, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.run_id is None:
            return
        parent = self.client.get_run(self.run_id)
        children = self.client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'")
        children += [self.client.get_run(k.split(".", 1)[1]) for k in parent.data.tags if k.startswith("reused.")]
        rows = [{"run_id": r.info.run_id, "name": r.data.tags.get("mlflow.runName"), "status": r.info.status,
                 **r.data.metrics} for r in children]
        if rows:
            with tempfile.TemporaryDirectory() as tmp:
                f = Path(tmp) / "sweep_summary.csv"
                pd.DataFrame(rows).sort_values("name").to_csv(f, index=False)
                self.client.log_artifact(self.run_id, str(f))
        failed = sum(r.info.status != "FINISHED" for r in children)
        self.client.log_metric(self.run_id, "jobs_failed", failed)
        self._close("FINISHED" if failed == 0 else "FAILED")
        print_ui_link(config.tracking.uri, parent.info.experiment_id)

    def _close(self, status: str) -> None:
        if self.run_id is None:
            return
        try:
            self.client.set_terminated(self.run_id, status)
        finally:
            os.environ.pop(PARENT_ENV, None)
            self.run_id = None
