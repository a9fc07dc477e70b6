"""Progress of long loops and of sweeps, readable both on a terminal and in a log.

On a terminal a loop is one tqdm line updated in place. Anywhere else (output piped to a file, a
cluster log) in-place updates would be one endless line of carriage returns, so a loop writes a
few complete lines instead: at 10 % steps at most every :data:`MIN_INTERVAL` seconds, and at the
end. ``TRANSQUANT_PLAIN_PROGRESS=1`` asks for those lines on a terminal too (to keep them in the
scrollback, or in a terminal that is being recorded).

:class:`SweepProgress` (a Hydra callback, ``hydra.callbacks.progress``) announces each job of a
multirun with its number, the overrides that set it apart and the sweep's ETA.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

PLAIN_ENV = "TRANSQUANT_PLAIN_PROGRESS"
STEPS = 10          # plain lines at every 1/STEPS of a loop ...
MIN_INTERVAL = 5.0  # ... but not closer than this (seconds): a loop of a few seconds writes only its end

T = TypeVar("T")


def plain_lines(stream: TextIO) -> bool:
    """Whether progress on ``stream`` is written as complete lines (it is not a terminal, or the
    user asked for them) rather than updated in place."""
    if os.environ.get(PLAIN_ENV, "") not in ("", "0"):
        return True
    isatty = getattr(stream, "isatty", None)
    return not (isatty and isatty())


def duration(seconds: float) -> str:
    """``12.3s``, ``4m05s``, ``2h03m``: short enough for a progress line."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


class Progress:
    """Progress of one loop of ``total`` steps called ``stage`` (a context manager).

    ``update(n, **postfix)`` counts finished steps; ``postfix`` (e.g. ``loss=...``) is shown with
    the count. ``stream`` defaults to stderr; ``clock`` is injectable for tests."""

    def __init__(self, stage: str, total: int, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.total, self.n = stage, int(total), 0
        self.stream = stream or sys.stderr
        self.clock = clock
        self.postfix: dict = {}
        self._started = self._written = clock()
        self._step = 0  # the last 1/STEPS of the loop a line was written for
        self._bar = None if plain_lines(self.stream) else tqdm(total=self.total, desc=stage, leave=False,
                                                               file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)  # update() refreshes, throttled
            self._bar.update(n)
            return
        now = self.clock()
        step = STEPS * self.n // max(self.total, 1)
        ended = self.n - n < self.total <= self.n
        if ended or (step > self._step and now - self._written >= MIN_INTERVAL):
            self._step, self._written = step, now
            self._write(now)

    def _write(self, now: float) -> None:
        elapsed = now - self._started
        eta = elapsed / self.n * max(self.total - self.n, 0)
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        self.stream.write(f"{self.stage}: {self.n}/{self.total} ({100 * self.n // max(self.total, 1)}%) "
                          f"elapsed {duration(elapsed)}, ETA {duration(eta)}{extra}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(items: Iterable[T], stage: str, total: int | None = None, stream: TextIO | None = None) -> Iterator[T]:
    """``items``, reporting each one done as a step of ``stage`` (``total``: len(items) if omitted)."""
    with Progress(stage, len(items) if total is None else total, stream) as bar:
        for item in items:
            yield item
            bar.update()


@contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers' own bars ("Loading weights", "Writing model shards") off inside the block: a
    save or load is no step of ours, and in a log each bar is a line of carriage returns. Downloads
    (huggingface_hub's bars), warnings and the loading report still show."""
    from transformers.utils import logging  # here: the sweep callback is loaded before transformers

    previous = logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        logging.set_tqdm_hook(previous)


def sweep_plan(config: DictConfig) -> tuple[int | None, frozenset[str]]:
    """(number of jobs of the multirun ``config`` starts, None where unknown; the overrides all of
    its jobs share). The basic sweeper's jobs are the product of its sweep values (its own parser
    counts them), Optuna's are ``n_trials``."""
    sweeper = config.hydra.sweeper
    basic = str(sweeper.get("_target_", "")).endswith(".BasicSweeper")
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()] if basic else []
    try:
        parsed = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
        values = {o.get_key_element(): [job[0] for job in BasicSweeper.split_arguments([o], None)[0]] for o in parsed}
    except HydraException:  # glob() needs Hydra's config loader; interval() is for Optuna only
        values = None
    shared = frozenset(v[0] for v in (values or {}).values() if len(v) == 1)
    if not basic:
        return OmegaConf.select(config, "hydra.sweeper.n_trials", default=None), shared
    return (None if values is None else math.prod(len(v) for v in values.values())), shared


class SweepProgress(Callback):
    """Hydra callback: ``job i/N: <overrides>, ETA ...`` as each job of a multirun starts and its
    wall time as it ends. ETA: a typical job's wall time times the jobs left, typical being the
    median of the jobs done after the first — the first usually pays the sweep's one-off work (the
    fine-tune, the FP32 caches), which a mean would spread over every job left.

    Launchers that run jobs in other processes (joblib, submitit) get a pickled copy per job,
    which knows N but no earlier job's time: their lines have no ETA."""

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.stream = stream  # None = the stderr of the moment (a stream does not pickle)
        self.clock = clock
        self.jobs: int | None = None
        self.shared: frozenset[str] = frozenset()
        self.durations: list[float] = []
        self.started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.jobs, self.shared = sweep_plan(config)
        self.durations = []

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        self.started = self.clock()
        overrides = list(config.hydra.overrides.task)
        own = [o for o in overrides if o not in self.shared] or overrides
        line = f"{self._name(config)}: {' '.join(own)}"
        if self.durations and self.jobs is not None:
            typical = statistics.median(self.durations[1:] or self.durations)
            left = max(self.jobs - config.hydra.job.num, 1)
            line += f", ETA {duration(typical * left)} (typical job {duration(typical)})"
        self._write(line)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or self.started is None:
            return
        took = self.clock() - self.started
        self.durations.append(took)
        failed = getattr(job_return, "status", None) == JobStatus.FAILED
        self._write(f"{self._name(config)} {'failed after' if failed else 'done in'} {duration(took)}")

    def _name(self, config: DictConfig) -> str:
        i = config.hydra.job.num + 1
        return f"job {i}" if self.jobs is None else f"job {i}/{self.jobs}"

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()
