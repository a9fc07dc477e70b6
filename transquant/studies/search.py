"""Studies and searches on top of a multirun: a Hydra callback and a multi-objective entry point.

:class:`StudyCallback` (registered by ``conf/experiment/*.yaml`` and ``conf/search/*.yaml`` under
``hydra.callbacks.study``) runs after :class:`transquant.core.tracking.MultirunParent` has opened the
sweep's parent MLflow run:

* at the start it tags the parent ``transquant.study=<name>`` (how ``python -m transquant.report
  <name>`` finds it) and, for an Optuna sweep, records the study name, objectives and directions;
* at the end (before the parent is closed) it logs the per-method seed statistics as parent
  metrics (``median_accuracy.<method>`` …, :func:`transquant.studies.seeds.study_metrics`) and, for an
  Optuna sweep, tags the best trial(s) ``transquant.best=true`` (the Pareto front for several
  objectives, also ``transquant.pareto=true``) and the parent ``transquant.best_run_id``; with
  several objectives it logs the front, its knee and the ``references`` presets on the parent
  (:mod:`transquant.studies.front`).

``python -m transquant.search`` is ``python -m transquant.run`` for multi-objective searches: when
the config has ``objectives: [accuracy, <metric>, …]`` it returns the tuple of those values
(Optuna needs one value per direction), where ``<metric>`` is any metric of the job's run or one
of the site counts of :func:`site_counts`, which it also logs on the job's run. A job that failed
(``on_error=continue``) returns NaNs, a failed Optuna trial; a missing objective is an error.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import warnings

warnings.filterwarnings("ignore", message="(?s).*_execution_whitelist_")

import hydra  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from ..core.errors import TransquantError  # noqa: E402
from ..core.paths import CONF_DIR  # noqa: E402
from ..core.tracking import PARENT_ENV  # noqa: E402

log = logging.getLogger("transquant")

SITE_COUNT_KEYS = ("activation_sites", "peg_activation_sites", "high_bits_activation_sites",
                   "float_activation_sites", "high_precision_sites")


def sweeper_kind(config: DictConfig) -> str:
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    return "optuna" if "optuna" in target.lower() else "basic"


def directions_of(config: DictConfig) -> list[str]:
    d = OmegaConf.select(config, "hydra.sweeper.direction", default="maximize")
    d = OmegaConf.to_container(d) if OmegaConf.is_config(d) else d
    items = d if isinstance(d, (list, tuple)) else [d]
    return [getattr(x, "name", str(x)).split(".")[-1] for x in items]


def objectives_of(config: DictConfig) -> list[str]:
    obj = OmegaConf.select(config, "objectives", default=None)
    return list(obj) if obj else ["accuracy"]


def init_storage(storage) -> None:
    """Create an Optuna sqlite storage's tables under a file lock beside the database: workers
    started together would otherwise race on the schema (alembic's version row) and all but one
    fail. Other RDBs: create the study once first (``optuna create-study``), then start the workers."""
    if not storage or not str(storage).startswith("sqlite:///"):
        return
    import optuna
    from filelock import FileLock

    with FileLock(str(storage).removeprefix("sqlite:///") + ".lock"):
        optuna.storages.RDBStorage(str(storage))


class StudyCallback(Callback):
    """Tags a sweep's parent run as study ``name``; seed statistics and best trials at the end."""

    def __init__(self, name: str, references: list[str] | None = None) -> None:
        self.name = name
        self.references = list(references or [])  # preset methods drawn beside a Pareto front (studies/front.py)
        self.parent: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from ..core.tracking import client_for

        if sweeper_kind(config) == "optuna":  # before the sweeper opens the study
            init_storage(OmegaConf.select(config, "hydra.sweeper.storage", default=None))
        self.parent = os.environ.get(PARENT_ENV)
        if not self.parent:
            log.warning("StudyCallback: no parent MLflow run (is the mlflow_parent callback configured?)")
            return
        client = client_for(config.tracking.uri)
        kind = sweeper_kind(config)
        client.set_tag(self.parent, "transquant.study", self.name)
        client.set_tag(self.parent, "transquant.sweeper", kind)
        if kind == "optuna":
            client.set_tag(self.parent, "transquant.objectives", ",".join(objectives_of(config)))
            client.set_tag(self.parent, "transquant.directions", ",".join(directions_of(config)))
            study_name = OmegaConf.select(config, "hydra.sweeper.study_name", default=None)
            storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
            client.set_tag(self.parent, "transquant.optuna_study", str(study_name))
            # The scheme only: an RDB URL may carry a password.
            client.set_tag(self.parent, "transquant.optuna_storage", str(storage).split(":", 1)[0] if storage else "memory")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not self.parent:
            return
        from ..core.tracking import client_for
        from .publish import log_metrics, mark_best
        from .queries import children_frame
        from .seeds import study_metrics

        client = client_for(config.tracking.uri)
        df = children_frame(client, [self.parent])
        log_metrics(client, self.parent, study_metrics(df))
        if sweeper_kind(config) == "optuna":
            objectives, directions = objectives_of(config), directions_of(config)
            mark_best(client, self.parent, df, objectives, directions)
            if len(objectives) > 1:
                from .front import log_front

                swept = list(OmegaConf.select(config, "hydra.sweeper.params", default=None) or {})
                log_front(client, self.parent, df, objectives, directions, swept, self.references)


# --- multi-objective entry point ------------------------------------------------------------------

def count_sites(sites, plans, act_bits) -> dict[str, int]:
    """Site counts of a quantization plan (``plan_sites``): how many activation sites are kept
    above the plain per-tensor grid. ``high_precision_sites`` = PEG sites with K > 1 (K = 1 is
    per-tensor min-max) + high-bit (mixed-precision) sites + float sites: the cost side of
    accuracy-vs-cost searches."""
    peg = sum(p.estimator == "peg" and p.k > 1 for p in plans.values())
    high = sum(act_bits is not None and p.bits > act_bits for p in plans.values())
    floating = len(sites) - len(plans)
    return {"activation_sites": len(sites), "peg_activation_sites": peg, "high_bits_activation_sites": high,
            "float_activation_sites": floating, "high_precision_sites": peg + high + floating}


def site_counts(cfg: DictConfig) -> dict[str, int]:
    """:func:`count_sites` of a config, from the model's module tree alone (no weights loaded)."""
    from ..core.config import validate_against_model
    from ..quant.ptq import plan_sites

    sites = validate_against_model(cfg)
    return count_sites(sites, plan_sites(sites, cfg.quant), cfg.quant.act_bits)


def job_run_id(cfg: DictConfig) -> str | None:
    """The MLflow run that holds this job's result: the newest FINISHED run with the job's key
    (the one run_job just closed, or the earlier run it reused with resume=true)."""
    from ..core.tracking import job_key, previous_runs

    finished, _ = previous_runs(cfg, job_key(cfg))
    return finished.info.run_id if finished is not None else None


def objective_values(cfg: DictConfig, result) -> tuple[float, ...] | float:
    """``result`` (run_job's return) as the tuple of ``cfg.objectives``; logs the site counts."""
    objectives = list(cfg.get("objectives") or [])
    if not objectives or isinstance(result, (tuple, list)):
        return result
    if math.isnan(result):  # the job failed with on_error=continue: a failed trial, never a made-up value
        return tuple(math.nan for _ in objectives)
    from ..core.tracking import client_for

    counts = site_counts(cfg)
    values: dict[str, float] = {"accuracy": float(result), **counts}
    run_id = job_run_id(cfg)
    if run_id is not None:
        client = client_for(cfg.tracking.uri)
        for k, v in counts.items():
            client.log_metric(run_id, k, float(v))
        values = {**client.get_run(run_id).data.metrics, **values}
    missing = [o for o in objectives if o not in values]
    if missing:
        raise TransquantError(f"objectives {missing}: not a metric of this job; known: {', '.join(sorted(values))}")
    return tuple(float(values[o]) for o in objectives)


# Objectives only the profile stage logs (deploy/profiling.py): a job with profile.enabled=false cannot give them.
PROFILE_OBJECTIVE_PREFIXES = ("latency_", "throughput_", "speedup_", "peak_memory", "model_size", "size_ratio")


def check_objectives(cfg: DictConfig) -> None:
    """Before the job runs: a profile metric as objective needs the profile stage."""
    needs = [o for o in cfg.get("objectives") or [] if str(o).startswith(PROFILE_OBJECTIVE_PREFIXES)]
    if needs and not cfg.profile.enabled:
        raise TransquantError(f"objectives {needs} are measured by the profile stage; profile.enabled=false")


@hydra.main(config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig):
    from ..run import main as run_main

    try:
        check_objectives(cfg)
        result = run_main.__wrapped__(cfg)  # exactly `python -m transquant.run`'s job (errors, on_error)
        return objective_values(cfg, result)
    except TransquantError as err:
        print(f"transquant: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
