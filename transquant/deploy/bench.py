"""Speed and size ratios at BERT-base size (random weights), so the gain at the paper's model
size is known without downloading it.

    python -m transquant.bench_base methods=[mixed,w8a8] iterations=100 threads=4 out=bench.csv
    python -m transquant.bench_base peak=true threads=2 out=peak.csv   # the machine's GEMM limit
    python -m transquant.bench_base device=cuda                         # PyTorch FP32/FP16 on the GPU

Builds ``BertForSequenceClassification(BertConfig())`` (hidden 768, 12 layers, 30522-token
vocabulary) with seeded random weights, calibrates each method on random token sequences, and
runs :func:`transquant.deploy.profiling.profile_stage`, the pipeline's own stage: PyTorch FP32 (sdpa
attention), ONNX Runtime FP32, ORT's dynamic INT8 peer and the engine, interleaved. Accuracy is
meaningless for random weights and is not evaluated. ``device=cuda`` calibrates and runs the
PyTorch candidates (FP32, FP16) on the GPU; the ONNX Runtime ones stay on the CPU (:data:`.runtime.ORT_PROVIDERS`).

``peak=true`` measures instead what the CPU can do at ``threads``: GMAC/s of ONNX Runtime's
integer GEMM (the engine's kernel) and float MatMul on ``peak_shapes`` (:mod:`.peak`), under the
profile's timing lock, with the CPU's flags and load.
"""
from __future__ import annotations

import copy
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import BertConfig, BertForSequenceClassification

from ..core import cli
from ..core.config import check_device
from ..core.paths import CONF_PATH as CONF
from ..quant.state import quantize_
from .cpu import cpu_tags, is_loaded, load_average, timing_lock
from .peak import parse_shape, peak_gemm
from .profiling import profile_stage

COLUMNS = ["method", "engine_precision", "latency_p50_ms", "latency_p95_ms", "throughput_seq_s", "peak_memory_mb",
           "model_size_mb", *(f"{s}{end}" for s in ("speedup_vs_torch_fp32", "speedup_vs_ort_fp32", "speedup_vs_peer")
                              for end in ("", "_ci_low", "_ci_high")), "size_ratio_vs_fp32",
           "fp32_latency_p50_ms", "fp16_latency_p50_ms", "ort_fp32_latency_p50_ms", "peer_latency_p50_ms",
           "engine_int8_matmuls", "engine_float_matmuls", "engine_code_agreement", "fp32_attention"]


def quant_config(method: str, **overrides):
    """``conf/quant/<method>.yaml`` over ``fp32.yaml`` (what Hydra's defaults list composes)."""
    base = OmegaConf.load(CONF / "quant" / "fp32.yaml")
    spec = OmegaConf.load(CONF / "quant" / f"{method}.yaml")
    spec.pop("defaults", None)
    return OmegaConf.merge(base, spec, overrides)


def random_items(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        ln = length - (i % 4) * (length // 8)  # some shorter sequences, so padding exists
        ids = [101] + torch.randint(1000, vocab, (ln - 2,), generator=g).tolist() + [102]
        items.append({"input_ids": ids, "token_type_ids": [0] * ln, "attention_mask": [1] * ln, "labels": i % 2})
    return items


def bench(methods=("mixed",), config: BertConfig | None = None, threads: int = 2, warmup: int = 20,
          iterations: int = 100, batch_size: int = 8, seq_len: int = 128, engine: str = "onnxruntime",
          workdir: Path | None = None, seed: int = 0, device: str = "cpu") -> pd.DataFrame:
    """One row of profile metrics per method for a random-weight model of ``config`` (BERT-base
    by default)."""
    from ..data.tasks import batches

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    fp32 = BertForSequenceClassification(config or BertConfig(num_labels=2)).eval().to(device)
    vocab = fp32.config.vocab_size
    calib = random_items(64, seq_len, vocab, seed)
    val = random_items(16, seq_len, vocab, seed + 1)
    profile = OmegaConf.create({"engine": engine, "warmup": warmup, "iterations": iterations, "block": 10,
                                "batch_size": batch_size, "seq_len": seq_len, "eval_engine_accuracy": False,
                                "weight_storage": "s8", "mem_iterations": 3, "fp32_attention": "sdpa"})
    hardware = OmegaConf.create({"device": device, "threads": threads})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        for method in methods:
            model = copy.deepcopy(fp32)
            state = quantize_(model, quant_config(method), batches(calib, 16, 0), torch.device(device))
            metrics, tags, _, _ = profile_stage(profile, hardware, fp32, model, state, None, val, 0, root / method)
            rows.append({"method": method, **metrics, **tags})
            del model, state
    df = pd.DataFrame(rows)
    return df[[c for c in COLUMNS if c in df] + [c for c in df if c not in COLUMNS]]


@dataclass
class Args:
    """The options of :func:`main`: :func:`bench`'s own arguments, plus where to write the table."""
    methods: List[str] = field(default_factory=lambda: ["mixed"])  # conf/quant names
    threads: int = 2
    warmup: int = 20
    iterations: int = 100
    engine: str = "onnxruntime"
    device: str = "cpu"  # cpu | cuda: where the PyTorch candidates run
    out: Optional[str] = None  # write the table as CSV here
    peak: bool = False  # instead of the methods: peak GEMM throughput of this machine (deploy/peak.py)
    peak_shapes: List[str] = field(default_factory=lambda: ["1024x1024x1024", "1024x768x3072"])  # MxKxN
    peak_runs: int = 20  # timed calls per kernel and shape (median), after 3 warm-up calls


def peak_table(args: DictConfig) -> tuple[pd.DataFrame, str]:
    """(the peak GEMM table of ``args``, a header line: CPU, flags, load); raises
    :class:`~transquant.core.cli.CliError` naming a bad shape or count."""
    shapes = [parse_shape(s) for s in args.peak_shapes]
    bad = [s for s, got in zip(args.peak_shapes, shapes) if got is None]
    if bad or not shapes:
        raise cli.CliError(f"peak_shapes=[{','.join(map(str, args.peak_shapes))}]: "
                           f"{'bad shape ' + repr(bad[0]) if bad else 'empty'}; allowed MxKxN with integers >= 1 "
                           "(e.g. peak_shapes=[1024x768x3072])")
    for key in ("peak_runs", "threads"):
        if args[key] < 1:
            raise cli.CliError(f"{key}={args[key]}: must be an integer >= 1")
    tags = cpu_tags()
    with timing_lock():
        load = load_average()
        df = peak_gemm(shapes, args.threads, runs=args.peak_runs)
    # Read before this process ran any GEMM: only its single-threaded start-up is in the load (one thread).
    loaded = is_loaded(load, 1)
    df["cpu_flags"], df["cpu_model"] = tags["cpu_flags"], tags["cpu_model"]
    df["load_avg_before"], df["timing_loaded"] = load, str(loaded).lower()
    load_text = "unknown" if load is None else f"{load:.2f}"
    return df, (f"{tags['cpu_model']}; flags: {tags['cpu_flags']}; 1-min load {load_text}"
                + (" (loaded: timings are not this machine's)" if loaded else ""))


def run(_: list[str], args: DictConfig) -> int:
    """Print the table of ``args`` (and write it to ``args.out``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.peak:
        df, header = peak_table(args)
        shown, header = df[["kernel", "shape", "threads", "median_ms", "gmac_s"]], header + "\n"
    else:
        check_device("device", args.device)
        df = bench(list(args.methods), threads=args.threads, warmup=args.warmup, iterations=args.iterations,
                   engine=args.engine, device=args.device)
        shown, header = df[[c for c in COLUMNS if c in df]], ""
    if args.out:
        df.to_csv(args.out, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(header + shown.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("transquant.bench_base", Args, run, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
