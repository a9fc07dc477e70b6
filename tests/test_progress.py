"""Progress output: sparse complete lines in a log, one line in place on a terminal, no
transformers load bars, and "job i/N" lines with an ETA for a sweep."""
import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf
from transformers.utils import logging as hf_logging

from transquant import models
from transquant.core.paths import CONF_DIR
from transquant.core.progress import PLAIN_ENV, Progress, SweepProgress, progress, sweep_plan, transformers_bars_off

from .conftest import ROOT, tiny_bert

BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A clock that moves only when told (``tick`` seconds per reading by default)."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    monkeypatch.delenv(PLAIN_ENV, raising=False)


def test_log_gets_about_ten_complete_lines():
    out = io.StringIO()
    with Progress("fine-tune", 100, stream=out, clock=Clock(tick=1.0)) as bar:
        for step in range(100):
            bar.update(epoch=0, loss=f"{1 - step / 100:.3f}")
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 10 and text.endswith("\n")
    assert lines[0] == "fine-tune: 10/100 (10%) elapsed 10.0s, ETA 1m30s, epoch=0, loss=0.910"
    assert lines[-1].startswith("fine-tune: 100/100 (100%) elapsed 1m40s, ETA 0.0s") and "loss=0.010" in lines[-1]


def test_log_of_a_short_loop_is_its_end_line():
    out = io.StringIO()
    assert list(progress(range(50), "evaluate", stream=out)) == list(range(50))
    assert out.getvalue().splitlines() == ["evaluate: 50/50 (100%) elapsed 0.0s, ETA 0.0s"]


def test_terminal_updates_one_line_in_place():
    out = Terminal()
    with Progress("fine-tune", 100, stream=out) as bar:
        for _ in range(100):
            bar.update(loss="0.500")
    text = out.getvalue()
    assert "\r" in text and "\n" not in text and "fine-tune" in text


def test_plain_lines_can_be_forced_on_a_terminal(monkeypatch):
    monkeypatch.setenv(PLAIN_ENV, "1")
    out = Terminal()
    list(progress(range(3), "calibrate", stream=out))
    assert out.getvalue() == "calibrate: 3/3 (100%) elapsed 0.0s, ETA 0.0s\n"


def test_model_saves_and_loads_show_no_transformers_bar(tmp_path, capfd):
    with transformers_bars_off():  # as the fine-tune cache and the profile's memory probe save
        tiny_bert().save_pretrained(tmp_path)
    models.load_finetuned(tmp_path)
    models.load_pretrained(OmegaConf.create({"name": "local", "name_or_path": str(tmp_path)}), num_labels=2, seed=0)
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err and "Writing model shards" not in out + err
    assert hf_logging.set_tqdm_hook(None) is None  # transformers' bars are back for everyone else


def test_a_new_head_is_one_line_not_a_load_report(tmp_path, capfd):
    """A base checkpoint lacks the classification head: one plain line says so, instead of
    transformers' coloured multi-line LOAD REPORT."""
    tiny_bert().bert.save_pretrained(tmp_path)  # the encoder alone, as a hub checkpoint ships it
    models.load_pretrained(OmegaConf.create({"name": "base", "name_or_path": str(tmp_path)}), num_labels=2, seed=0)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "\x1b[" not in out + err
    assert "model base: loaded; new (fine-tuned from scratch): classifier.bias, classifier.weight" in out


def multirun_cfg(task: list[str], num: int = 0, params: dict | None = None, target: str = BASIC, **sweeper):
    return OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "job": {"num": num}, "overrides": {"task": task},
                                       "sweeper": {"_target_": target, "params": params, **sweeper}}})


def test_sweep_lines_count_jobs_and_give_an_eta():
    out, clock = io.StringIO(), Clock()
    cb = SweepProgress(stream=out, clock=clock)
    cb.on_multirun_start(multirun_cfg(["model=tiny", "quant.k=2,3,4"]))
    for num, k in enumerate((2, 3, 4)):
        job = multirun_cfg(["model=tiny", f"quant.k={k}"], num=num)
        cb.on_job_start(job, task_function=None)
        clock.now += 10.0 * (num + 1)
        cb.on_job_end(job, job_return=JobReturn(status=JobStatus.FAILED if k == 4 else JobStatus.COMPLETED))
    assert out.getvalue().splitlines() == [
        "job 1/3: quant.k=2",
        "job 1/3 done in 10.0s",
        "job 2/3: quant.k=3, ETA 20.0s (typical job 10.0s)",
        "job 2/3 done in 20.0s",
        "job 3/3: quant.k=4, ETA 20.0s (typical job 20.0s)",  # the first job (fine-tune) left out
        "job 3/3 failed after 30.0s"]


def test_sweep_size_from_params_trials_or_unknown():
    with initialize_config_dir(config_dir=CONF_DIR):
        bits = compose(config_name="config", overrides=["+experiment=bits"], return_hydra_config=True)
    assert bits.hydra.callbacks.progress._target_ == "transquant.core.progress.SweepProgress"
    jobs, shared = sweep_plan(bits)
    assert jobs == 4 * 6 and shared == {"train.seed=1000", "+experiment=bits"}
    assert sweep_plan(multirun_cfg(["quant.k=2,3"], target=OPTUNA, n_trials=30))[0] == 30
    assert sweep_plan(multirun_cfg(["model=glob(tiny*)"]))[0] is None  # globs need Hydra's config loader

    out = io.StringIO()
    cb = SweepProgress(stream=out)
    cb.on_multirun_start(multirun_cfg(["model=glob(tiny*)"]))
    cb.on_job_start(multirun_cfg(["model=tiny-opt"], num=4), task_function=None)
    assert out.getvalue() == "job 5: model=tiny-opt\n"


def test_sweep_callback_is_silent_in_a_single_run_and_pickles():
    out = io.StringIO()
    cb = SweepProgress(stream=out)
    single = OmegaConf.create({"hydra": {"mode": RunMode.RUN, "overrides": {"task": []}}})
    cb.on_job_start(single, task_function=None)
    cb.on_job_end(single, job_return=JobReturn(status=JobStatus.COMPLETED))
    assert out.getvalue() == ""
    worker = SweepProgress()  # what joblib and submitit ship to a worker process
    worker.on_multirun_start(multirun_cfg(["quant.k=2,3"]))
    assert pickle.loads(pickle.dumps(worker)).jobs == 2


def test_real_multirun_prints_job_lines(tmp_path):
    (tmp_path / "app.py").write_text(textwrap.dedent("""
        import hydra

        @hydra.main(config_path=".", config_name="app", version_base=None)
        def main(cfg):
            pass

        main()
        """))
    (tmp_path / "app.yaml").write_text("x: 0\nhydra:\n  callbacks:\n    progress:\n"
                                       "      _target_: transquant.core.progress.SweepProgress\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "app.py", "-m", "x=1,2,3", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("job ")]
    assert [ln.split(",")[0] for ln in lines[::2]] == ["job 1/3: x=1", "job 2/3: x=2", "job 3/3: x=3"]
    assert "ETA" in lines[2] and lines[-1].startswith("job 3/3 done in ")
