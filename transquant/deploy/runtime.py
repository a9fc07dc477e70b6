"""Running a deployable model: its inputs, ONNX Runtime sessions, the :class:`Engine` handle and
the callables the profile times."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.errors import TransquantError
from ..train.evaluate import percent_correct

INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


class EngineError(TransquantError):
    """An engine cannot be built or is not installed (one line, says what to do)."""


def input_names(batch: dict) -> list[str]:
    """Model inputs present in a batch, in export order."""
    return [k for k in INPUT_ORDER if k in batch]


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """``batch`` without the inputs ``model``'s ``forward`` does not name (DistilBERT and OPT take
    no ``token_type_ids``; transformers' ``**kwargs`` would swallow them, and the ONNX export
    would then lack an input the feeds carry)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in batch.items() if k not in INPUT_ORDER or k in params}


def sample_batch(items: list[dict], pad_id: int, n: int = 3, extra_pad: int = 3) -> dict[str, torch.Tensor]:
    """A small batch where every row has padding, so masked and unmasked scores differ (the
    site matcher relies on it) and pad handling is exercised."""
    chunk = items[:n]
    width = max(len(c["input_ids"]) for c in chunk) + extra_pad
    out = {}
    for key in input_names(chunk[0]):
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([c[key] + [fill] * (width - len(c[key])) for c in chunk])
    return out


def fixed_batch(items: list[dict], pad_id: int, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A [batch_size, seq_len] batch for timing: real items truncated/padded to seq_len (the
    attention cost does not depend on padding; pads are still real work)."""
    rows = [items[i % len(items)] for i in range(batch_size)]
    out = {}
    for key in input_names(rows[0]):
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([(r[key] + [fill] * seq_len)[:seq_len] for r in rows])
    return out


@dataclass
class Engine:
    """A deployable model and a way to run it. ``run(feeds)`` takes numpy int64 inputs."""

    name: str
    path: Path | None
    run: Callable[[dict[str, np.ndarray]], np.ndarray]
    inputs: list[str]
    info: dict = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        """Bytes of the serialized artifact on disk (what would ship)."""
        if self.path is None:
            raise EngineError(f"engine {self.name}: no serialized artifact")
        return Path(self.path).stat().st_size

    def logits(self, batch: dict) -> np.ndarray:
        return self.run({k: np.ascontiguousarray(batch[k].cpu().numpy()) for k in self.inputs})

    def predictions(self, items: list[dict], batch_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted, true) labels over items, in the same length-sorted order as
        :func:`transquant.train.evaluate.predictions`."""
        from ..data.tasks import batches

        preds, labels = [], []
        for batch in batches(items, batch_size, pad_id, by_length=True):
            labels.append(batch.pop("labels"))
            preds.append(torch.from_numpy(self.logits(batch)).argmax(-1))
        return torch.cat(preds), torch.cat(labels)

    def accuracy(self, items: list[dict], batch_size: int, pad_id: int) -> float:
        pred, true = self.predictions(items, batch_size, pad_id)
        return percent_correct(pred, true)


def torch_runner(model: nn.Module, names: list[str]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    def run(feeds):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(feeds[k]) for k in names}).logits.float().numpy()
    return run


# ORT rewrites that would run another method than the one we built: a float weight between
# quantized activations gets quantized to int8 (WeightBiasQuantization, W32A8), and int8 weights
# under float activations become MatMulNBits that quantizes the activations per block at
# accuracy level 4 (W8A32). Level 1 keeps its arithmetic float.
ORT_CONFIG = {"optimization.disable_specified_optimizers": "WeightBiasQuantization",
              "session.qdq_matmulnbits_accuracy_level": "1"}
# Every session runs on ORT's CPU execution provider, even on a GPU machine: the engines' QDQ graphs are
# checked against its integer kernels, and the CUDA/TensorRT providers need onnxruntime-gpu.
ORT_PROVIDERS = ["CPUExecutionProvider"]


def ort_session(path_or_bytes, threads: int | None, optimize: bool = True, optimized_path: Path | None = None,
                profile_prefix: Path | None = None):
    """A CPU session; ``optimized_path`` saves the graph ORT's optimizer produced (what runs);
    ``profile_prefix`` turns ORT's profiler on (its JSON trace: ``end_profiling()``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    for key, value in ORT_CONFIG.items():
        so.add_session_config_entry(key, value)
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(src, so, providers=ORT_PROVIDERS)


def ort_engine(name: str, path: Path, threads: int | None, names: list[str], info: dict | None = None) -> Engine:
    sess = ort_session(Path(path), threads)
    return Engine(name, Path(path), lambda feeds: sess.run(["logits"], feeds)[0], names, info or {})


def torch_timing_runner(model: nn.Module, batch: dict, device: torch.device, context=None) -> Callable[[], Any]:
    """A callable running ``model`` once on ``batch`` (moved to ``device`` once), inside ``context()``."""
    feeds = {k: v.to(device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode(), (context or nullcontext)():
            out = model(**feeds).logits
        sync()  # so a host clock is valid when GPU and CPU (ORT) candidates are compared
        return out
    return run


def ort_timing_runner(path: Path, threads: int | None, batch: dict) -> Callable[[], Any]:
    """A callable running the ONNX model at ``path`` once on ``batch``."""
    sess = ort_session(Path(path), threads)
    feeds = ort_feeds(sess, batch)
    return lambda: sess.run(None, feeds)


def ort_feeds(sess, batch: dict) -> dict[str, np.ndarray]:
    """The inputs ``sess`` names, from ``batch``, as contiguous numpy arrays."""
    return {i.name: np.ascontiguousarray(batch[i.name].cpu().numpy()) for i in sess.get_inputs()}
