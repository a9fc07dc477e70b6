"""The library from Python, without Hydra's command line or MLflow.

A :class:`Job` holds what every stage needs (config, task, tokenizer, device), composed from the
same overrides the command line takes; :func:`quantize_` and :class:`QuantState` do the rest::

    job = Job("model=tiny", "task=synthetic", "train=quick", "quant=peg", "quant.k=2")
    model = job.model()
    state = quantize_(model, job.cfg.quant, job.calibration_batches())
    job.accuracy(model, state)
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import Iterator

from hydra import compose, initialize_config_dir
from torch import nn

from . import models
from .analysis.job import stats_config
from .analysis.results import ActivationStats
from .analysis.statistics import fp32_statistics, sample_items
from .core.paths import CONF_DIR
from .data.tasks import encode
from .deploy.build import build_onnx_int8
from .deploy.runtime import Engine, input_names, model_inputs, ort_engine, sample_batch
from .pipeline import calibration_batches, prepare
from .quant.sites import find_sites
from .quant.state import QuantState, quantize_
from .train import finetune
from .train.evaluate import percent_correct, predictions

__all__ = ["Job", "QuantState", "quantize_"]


class Job:
    """One configuration's inputs: ``Job(*overrides)`` composes ``conf/`` as ``python -m
    transquant.run <overrides>`` would, validates it and loads the task and tokenizer."""

    def __init__(self, *overrides: str) -> None:
        with initialize_config_dir(config_dir=CONF_DIR):
            self.cfg = compose(config_name="config", overrides=list(overrides))
        self.device, self.task, self.tokenizer = prepare(self.cfg)

    @cached_property
    def validation(self) -> list[dict]:
        """The encoded validation split."""
        return encode(self.tokenizer, self.task.validation, self.cfg.train.max_length)

    def model(self) -> nn.Module:
        """A fresh copy of the fine-tuned FP32 model (fine-tuned once, then read from the cache)."""
        ckpt, _ = finetune.finetuned(self.cfg.model, self.task, self.cfg.train, self.tokenizer,
                                     Path(self.cfg.paths.cache_dir), self.device)
        return models.load_finetuned(ckpt).to(self.device).eval()

    def calibration_batches(self) -> Iterator[dict]:
        """The job's calibration sequences (``calibration.*``) as padded batches."""
        return calibration_batches(self.cfg, self.tokenizer, self.task)

    def accuracy(self, model: nn.Module | Engine, state: QuantState | None = None) -> float:
        """Validation accuracy (%) of a model, with ``state``'s activation quantization when
        given, or of an exported engine."""
        pad = self.tokenizer.pad_token_id
        if isinstance(model, Engine):
            return model.accuracy(self.validation, self.cfg.eval.batch_size, pad)
        with state.active(model) if state is not None else nullcontext():
            pred, true = predictions(model, self.validation, self.cfg.eval.batch_size, pad, self.device)
        return percent_correct(pred, true)

    def statistics(self, model: nn.Module) -> ActivationStats:
        """Outlier statistics of an FP32 model on the validation sample (``stats.*``)."""
        s = stats_config(self.cfg)
        return fp32_statistics(model, find_sites(model), sample_items(self.validation, s.num_examples),
                               self.tokenizer.pad_token_id, self.device, s.batch_size, s.top_k, s.reservoir,
                               special_ids=self.tokenizer.all_special_ids)

    def export(self, fp32_model: nn.Module, model: nn.Module, state: QuantState, workdir: str | Path) -> Engine:
        """The ONNX Runtime INT8 engine of a quantized model (``model`` with ``state``), written
        under ``workdir`` and checked against the fake-quantized model; ``fp32_model`` is the
        graph it starts from."""
        sample = model_inputs(model, sample_batch(self.validation, self.tokenizer.pad_token_id))
        _, path, report = build_onnx_int8(fp32_model, model, state, sample, Path(workdir),
                                          threads=self.cfg.hardware.threads)
        return ort_engine("onnxruntime", path, self.cfg.hardware.threads, input_names(sample), {"report": report})
