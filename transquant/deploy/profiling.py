"""Honest profiling of what would actually ship: latency, memory and size of the deployable
artifact, beside its accuracy, measured in the same run as the FP32 model and a peer.

What is measured
- **Latency**: ``warmup`` untimed then ``iterations`` timed forward passes on a fixed
  [batch_size, seq_len] batch of validation sequences. CPU: ``time.perf_counter_ns`` around each
  call; GPU: CUDA events. p50, p95, mean (ms) and throughput = batch_size / mean (sequences/s).
- **Baselines**, each speed-up named after its own: PyTorch FP32 (a fresh copy of the fine-tuned
  model with ``profile.fp32_attention``, default ``sdpa`` as users run it; tag
  ``fp32_attention``) -> ``speedup_vs_torch_fp32`` (= ``speedup_vs_fp32``); on CUDA also that copy
  in half precision, what GPU users serve -> ``speedup_vs_torch_fp16``; ONNX Runtime FP32
  of the very export the engine is built from -> ``speedup_vs_ort_fp32``; the peer, ORT's own
  dynamic INT8 of that export -> ``speedup_vs_peer``. ``bench_base`` runs the same stage.
- **Interleaving and paired speed-ups**: all four are timed round-robin in blocks of ``block``
  iterations, so load from other processes hits them alike. Every ``speedup_*`` is paired by turn
  (:func:`.timing.paired_speedup`: the median over turns of the two blocks' median ratio), with a
  95 % interval ``<name>_ci_low`` / ``_ci_high``: on a machine whose speed moves in phases the
  paired ratio holds where p50 / p50 does not, and absolute milliseconds hold least.
- **What the engine runs**: ``engine_int8_matmuls`` / ``engine_float_matmuls`` count the
  MatMuls of the graph after ORT's optimizer, ``engine_code_agreement`` is the share of the
  engine's integer codes equal to the fake-quant model's, and the tag ``engine_precision``
  (e.g. ``W8A{8,16}``) says what is stored and computed (:mod:`transquant.deploy.verify`).
- **The machine**: tags ``cpu_flags`` (the INT8/BF16 extensions present, :mod:`.cpu`) and
  ``cpu_model``; on CUDA ``gpu_model``. The timing phase (interleaved passes, then the op profile)
  holds a machine-wide lock (:func:`.cpu.timing_lock`) so two jobs never time at once
  (``timing_lock_wait_seconds``);
  ``load_avg_before`` / ``load_avg_after`` are the 1-minute load average around the timed passes,
  and ``timing_loaded`` = "true" flags a machine busy with other work (:func:`.cpu.is_loaded`).
- **Where the time goes** (ORT engines, ``op_profile_runs`` > 0): ONNX Runtime's profiler over a
  few passes after the timed ones, per op type, in the table ``engine_op_profile``
  (:mod:`.op_profile`); ``int8_peak_fraction`` is the engine's integer GEMMs' GMAC/s over this
  machine's peak for that kernel (:func:`.peak.int8_peak`).
- **Peak memory** (``peak_memory_mb``): CPU — peak growth of the resident set of a *fresh*
  process that loads the artifact and runs ``mem_iterations`` passes of the timing batch, over
  its RSS before loading (the kernel's high-water mark VmHWM, reset by writing "5" to
  ``/proc/self/clear_refs``; if that is not permitted, a thread samples VmRSS every 0.5 ms and
  may miss sub-millisecond peaks). So it is weights as the runtime holds them (ORT's prepacked
  copies included; lazily mapped safetensors count once touched) plus the working memory of
  inference (arena/workspace). ``load_memory_mb`` is the part present right after loading and
  ``inference_memory_mb`` the growth during the passes. A fresh process is needed: in this one,
  malloc reuses memory freed by earlier stages and the resident set barely moves. PyTorch
  candidates of the torch/none engines are measured in-process (caveat above); GPU —
  ``torch.cuda`` peak allocated bytes minus the bytes allocated before the passes.
- **Size** (``model_size_mb``): bytes of the serialized deployable file (the ``.onnx`` with int8
  initializers, or a saved PyTorch INT8 state dict), never a state dict of fake-quantized float
  tensors. ``size_ratio_vs_fp32`` divides by the FP32 artifact in the same format.

On GPU the candidates are timed with CUDA events when the engine runs on the GPU too (``none``);
with an engine that runs on the CPU (``onnxruntime``: CPU execution provider only; ``torch``:
``torch.ao`` INT8 kernels are CPU-only) every candidate is timed with the host clock and the GPU
runs end in ``torch.cuda.synchronize()``, so all candidates share one clock.

Timers are injectable (``timer=`` anything with ``time(fn) -> nanoseconds``) so the statistics
are tested with a stub.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from ..core.progress import transformers_bars_off
from ..quant.state import QuantState
from .cpu import cpu_tags, is_loaded, load_average, timing_lock
from .engines import ENGINES, EngineJob, ort_dynamic_int8, require_engine
from .export import export_onnx
from .memory import MB, cuda_peak_growth, peak_rss_growth, probe_artifact, rss_bytes
from .op_profile import int_gemm_gmac_s, op_profile
from .peak import int8_peak
from .runtime import (
    Engine,
    EngineError,
    fixed_batch,
    model_inputs,
    ort_timing_runner,
    sample_batch,
    torch_timing_runner,
)
from .timing import LatencyStats, Speedup, interleaved, paired_speedup, timer_for

log = logging.getLogger("transquant")
# Each candidate and the prefix of its metrics: ``peak_memory_mb`` is the engine's, ``peer_peak_memory_mb`` the peer's.
CANDIDATE_PREFIXES = (("engine", ""), ("fp32", "fp32_"), ("fp16", "fp16_"), ("ort_fp32", "ort_fp32_"),
                      ("peer", "peer_"))
# The engine's speed-up over each baseline other than PyTorch FP32 (``speedup_vs_torch_fp32``).
BASELINE_SPEEDUPS = {"fp16": "speedup_vs_torch_fp16", "ort_fp32": "speedup_vs_ort_fp32", "peer": "speedup_vs_peer"}


def memory_in_subprocess(kind: str, path: Path, batch: dict, threads, repeats: int, workdir: Path,
                         attention: str = "sdpa") -> dict | None:
    """:func:`.memory.probe_artifact` in a child process, so the measurement is not blurred by memory this
    process freed earlier (malloc reuses it without the resident set growing)."""
    npz = Path(workdir) / "memory_batch.npz"
    np.savez(npz, **{k: v.cpu().numpy() for k, v in batch.items()})
    cmd = [sys.executable, "-m", "transquant.deploy.profiling", "--probe", kind, str(path), str(npz),
           str(int(threads or 0)), str(int(repeats)), "--attention", attention]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                             cwd=str(Path(__file__).resolve().parents[2]))
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as err:
        log.warning("memory probe of %s failed (%s); falling back to in-process measurement", path, err)
        return None


# --- candidates --------------------------------------------------------------------------------

@dataclass
class Candidate:
    """A model to profile: ``load()`` returns a callable running one fixed batch."""

    name: str
    load: Callable[[], Callable[[], Any]]
    size_bytes: int | None
    engine: Engine | None = None
    probe: tuple[str, Path] | None = None  # (kind, path) for the out-of-process memory probe


def torch_fp32(model, attention: str):
    """A fresh copy of the FP32 model running the attention kernel users run (``sdpa``, the
    transformers default): the caller's model may have been switched to the Python eager kernel
    with taps (calibration, error attribution), which is slower and not what ships."""
    fresh = copy.deepcopy(model).eval()
    try:
        fresh.set_attn_implementation(attention)
    except (ValueError, ImportError) as err:
        raise EngineError(f"profile.fp32_attention={attention}: {str(err).splitlines()[0]}") from err
    return fresh


def build_candidates(cfg_profile, threads, fp32_model, quant_model, state: QuantState, batch, sample,
                     workdir: Path, device: torch.device) -> tuple[dict[str, Candidate], dict]:
    """({name: candidate}, info): ``fp32`` (PyTorch, fresh copy, ``profile.fp32_attention``),
    ``fp16`` (that copy in half precision, on CUDA only: CPUs have no fast FP16 kernels), ``ort_fp32``
    (ONNX Runtime FP32 of the export every ORT candidate starts from), ``peer`` (ORT dynamic INT8 of
    that export) and ``engine``. ``ort_fp32`` and ``peer`` are skipped only when
    onnxruntime cannot be used."""
    engine = str(cfg_profile.get("engine", "onnxruntime"))
    require_engine(engine)
    fp32_torch = torch_fp32(fp32_model, str(cfg_profile.get("fp32_attention", "sdpa"))).to(device)
    info: dict[str, Any] = {"engine": engine, "fp32_attention": fp32_torch.config._attn_implementation}
    cands = {"fp32": Candidate("fp32", lambda: torch_timing_runner(fp32_torch, batch, device), None)}
    if device.type == "cuda":
        fp16_torch = copy.deepcopy(fp32_torch).half()
        cands["fp16"] = Candidate("fp16", lambda: torch_timing_runner(fp16_torch, batch, device), None)

    fp32_onnx = None
    try:
        require_engine("onnxruntime")
    except EngineError:
        pass
    else:
        fp32_onnx = export_onnx(fp32_model, sample, workdir / "fp32.onnx")
        peer_path = ort_dynamic_int8(fp32_onnx, workdir / "peer_ort_dynamic_int8.onnx")
        cands["ort_fp32"] = Candidate("ort_fp32", lambda: ort_timing_runner(fp32_onnx, threads, batch),
                                      fp32_onnx.stat().st_size, probe=("onnx", fp32_onnx))
        cands["peer"] = Candidate("peer", lambda: ort_timing_runner(peer_path, threads, batch),
                                  peer_path.stat().st_size, probe=("onnx", peer_path))
        info["peer_path"] = str(peer_path)

    job = EngineJob(cfg_profile, fp32_model, quant_model, state, batch, sample, workdir, device, threads, fp32_onnx)
    built = ENGINES[engine].build(job)
    cands["fp32"].size_bytes = built.fp32_size_bytes
    info.update(built.info)
    cands["engine"] = Candidate("engine", built.load, built.engine.size_bytes, built.engine, probe=built.probe)
    return cands, info


# --- the stage ---------------------------------------------------------------------------------

def profile_stage(cfg_profile, hardware_cfg, fp32_model, quant_model, state: QuantState, tokenizer, val_items,
                  pad_id, workdir: Path, timer=None
                  ) -> tuple[dict[str, float], dict[str, str], dict[str, pd.DataFrame], list[Path]]:
    """Profile PyTorch FP32, ORT FP32, the peer and the method's deployable engine in one
    interleaved run.

    Returns (metrics, tags, tables, artifact paths); tables: ``engine_op_profile`` (ORT engines with
    ``profile.op_profile_runs`` > 0). ``state`` is what ``quantize_`` returned for ``quant_model``
    (or applied to it): the engine stores its weight codes and activation grids.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device(str(hardware_cfg.get("device", "cpu")))
    threads = hardware_cfg.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    bs, seq = int(cfg_profile.get("batch_size", 8)), int(cfg_profile.get("seq_len", 128))
    batch = model_inputs(quant_model, fixed_batch(val_items, pad_id, bs, seq))
    sample = model_inputs(quant_model, sample_batch(val_items, pad_id))
    fp32_model.eval()
    quant_model.eval()

    t0 = time.perf_counter()
    cands, info = build_candidates(cfg_profile, threads, fp32_model, quant_model, state, batch, sample,
                                   workdir / "artifacts", device)
    build_s = time.perf_counter() - t0
    fp32, cand = cands["fp32"], cands["engine"]
    kind = ENGINES[info["engine"]]

    # Memory: CPU artifacts are probed in a fresh process each (load, then a few inferences);
    # the PyTorch candidates of the torch/none engines, and GPU runs, are measured in-process.
    runners, memory, load_mem, mem_method, infer_mem = {}, {}, {}, {}, {}
    mem_reps = int(cfg_profile.get("mem_iterations", 3))
    if device.type == "cpu" and cfg_profile.get("memory_probe", "subprocess") == "subprocess":
        fp32_dir = workdir / "artifacts" / "fp32_hf"
        if hasattr(fp32_model, "save_pretrained"):
            with transformers_bars_off():
                fp32_model.save_pretrained(fp32_dir)
            fp32.probe = ("hf", fp32_dir)
        for c in cands.values():
            got = (memory_in_subprocess(*c.probe, batch, threads, mem_reps, workdir, info["fp32_attention"])
                   if c.probe else None)
            if got is not None:
                memory[c.name], load_mem[c.name], mem_method[c.name] = got["peak_mb"], got["load_mb"], "subprocess-" + got["method"]
                infer_mem[c.name] = got["inference_mb"]
    for c in cands.values():
        before = rss_bytes()
        fn = c.load()
        after = rss_bytes()
        runners[c.name] = fn
        if c.name in memory:
            continue
        load_mem[c.name] = None if before is None or after is None else max(0, after - before) / MB
        infer_mem[c.name] = None
        torch_on_gpu = c.name in ("fp32", "fp16") or (c.name == "engine" and kind.on_device)
        if device.type == "cuda" and torch_on_gpu:
            memory[c.name], mem_method[c.name] = cuda_peak_growth(fn, mem_reps), "cuda"
        else:
            infer_mem[c.name], m = peak_rss_growth(fn, mem_reps)
            memory[c.name] = None if infer_mem[c.name] is None else infer_mem[c.name] + (load_mem[c.name] or 0.0)
            mem_method[c.name] = "inprocess-" + m

    timer = timer or timer_for(str(device) if kind.on_device else "cpu")
    warmup, iters = int(cfg_profile.get("warmup", 100)), int(cfg_profile.get("iterations", 500))
    block = int(cfg_profile.get("block", 10))
    engine_onnx = cand.probe is not None and cand.probe[0] == "onnx"  # ORT's profiler reads ONNX engines only
    op_runs = int(cfg_profile.get("op_profile_runs", 0)) if engine_onnx else 0
    timing_threads = int(threads or os.cpu_count() or 1)
    with timing_lock() as lock_wait:  # timings of two jobs never overlap; the rest of the stage runs unlocked
        load_before = load_average()
        t0 = time.perf_counter()
        times = interleaved(runners, warmup, iters, block, timer)
        timing_s = time.perf_counter() - t0
        load_after = load_average()
        # After the timed passes: the profiler's bookkeeping must not perturb them.
        ops = op_profile(Path(info["path"]), threads, batch, op_runs, workdir) if op_runs else None
        peak = int8_peak(threads) if ops is not None else None
    loaded = is_loaded(load_before, timing_threads)
    if loaded:
        log.warning("profile timed on a loaded machine: 1-minute load average %.2f > %d timing thread(s) + 0.5; "
                    "absolute latencies are not this machine's (ratios hold better, candidates are interleaved)",
                    load_before, timing_threads)
    stats = {name: LatencyStats.from_ns(ts, bs) for name, ts in times.items()}
    s_fp, s_c = stats["fp32"], stats["engine"]

    def faster(candidate: str, than: str) -> Speedup:
        return paired_speedup(times[than], times[candidate], block)

    metrics: dict[str, float] = {
        "latency_p50_ms": s_c.p50_ms, "latency_p95_ms": s_c.p95_ms, "latency_mean_ms": s_c.mean_ms,
        "throughput_seq_s": s_c.throughput_seq_s,
        "model_size_mb": cand.size_bytes / MB,
        "size_ratio_vs_fp32": cand.size_bytes / fp32.size_bytes,
        "fp32_latency_p50_ms": s_fp.p50_ms, "fp32_throughput_seq_s": s_fp.throughput_seq_s,
        "fp32_model_size_mb": fp32.size_bytes / MB,
        "profile_build_seconds": build_s, "profile_timing_seconds": timing_s,
        "timing_lock_wait_seconds": lock_wait,
    }
    _speedup(metrics, "speedup_vs_torch_fp32", faster("engine", "fp32"))
    metrics["speedup_vs_fp32"] = metrics["speedup_vs_torch_fp32"]
    for key, value in (("load_avg_before", load_before), ("load_avg_after", load_after)):
        if value is not None:
            metrics[key] = value
    engine_gmac_s = int_gemm_gmac_s(ops) if ops is not None else None
    if engine_gmac_s is not None and peak:
        metrics["int8_peak_fraction"] = engine_gmac_s / peak
    for name, prefix in CANDIDATE_PREFIXES:
        if memory.get(name) is not None:
            metrics[prefix + "peak_memory_mb"] = memory[name]
    if load_mem.get("engine") is not None:
        metrics["load_memory_mb"] = load_mem["engine"]
    if load_mem.get("fp32") is not None:
        metrics["fp32_load_memory_mb"] = load_mem["fp32"]
    if infer_mem.get("engine") is not None:
        metrics["inference_memory_mb"] = infer_mem["engine"]
    for name, prefix in CANDIDATE_PREFIXES:  # the baselines beside PyTorch FP32, where they ran
        if name in BASELINE_SPEEDUPS and name in stats:
            metrics[prefix + "latency_p50_ms"] = stats[name].p50_ms
            metrics[prefix + "speedup_vs_torch_fp32"] = faster(name, "fp32").ratio
            _speedup(metrics, BASELINE_SPEEDUPS[name], faster("engine", name))
    if "peer" in stats:
        metrics["peer_model_size_mb"] = cands["peer"].size_bytes / MB
    report = info.get("report")
    if report is not None:
        metrics.update({"engine_int8_matmuls": report.int_matmuls, "engine_float_matmuls": report.float_matmuls})
        if report.code_agreement is not None:
            metrics["engine_code_agreement"] = report.code_agreement

    if cfg_profile.get("eval_engine_accuracy", True) and cand.engine is not None:
        t0 = time.perf_counter()
        metrics["engine_accuracy"] = cand.engine.accuracy(val_items, int(cfg_profile.get("eval_batch_size", 64)), pad_id)
        metrics["engine_eval_seconds"] = time.perf_counter() - t0

    tags = {"engine": info["engine"], "fp32_attention": info["fp32_attention"],
            "profile_memory_method": mem_method.get("engine", "unavailable"),
            "engine_build": str(info.get("build", ""))[:5000],
            "profile_timer": type(timer).__name__, "timing_loaded": str(loaded).lower(), **cpu_tags()}
    if "precision" in info:
        tags["engine_precision"] = info["precision"]
    if device.type == "cuda":
        tags["gpu_model"] = torch.cuda.get_device_name(device)
    out_report = {"metrics": metrics, "tags": tags, "threads": threads, "batch_size": bs, "seq_len": seq,
                  "warmup": warmup, "iterations": iters, "block": block,
                  "stats": {k: asdict(v) for k, v in stats.items()},
                  "site_tensors": info.get("site_tensors", {}),
                  "site_code_agreement": report.site_agreement if report is not None else {},
                  "load_memory_mb": load_mem, "peak_memory_mb": memory, "inference_memory_mb": infer_mem,
                  "memory_method": mem_method,
                  "cpu_load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
                  "engine_int_gemm_gmac_s": engine_gmac_s, "int8_peak_gmac_s": peak}
    out = workdir / "profile.json"
    out.write_text(json.dumps(out_report, indent=1, default=str))
    log.info("profile %s: p50 %.1f ms (PyTorch FP32 %s %.1f ms, x%.2f; ORT FP32 x%s; peer x%s), %.1f MB (x%.3f FP32)",
             info["engine"], s_c.p50_ms, info["fp32_attention"], s_fp.p50_ms, metrics["speedup_vs_torch_fp32"],
             f"{metrics['speedup_vs_ort_fp32']:.2f}" if "speedup_vs_ort_fp32" in metrics else "-",
             f"{metrics['speedup_vs_peer']:.2f}" if "speedup_vs_peer" in metrics else "-",
             metrics["model_size_mb"], metrics["size_ratio_vs_fp32"])
    artifacts = [out]
    if info.get("path"):
        artifacts.append(Path(info["path"]))
    tables = {"engine_op_profile": ops} if ops is not None else {}
    return metrics, tags, tables, artifacts


def _speedup(metrics: dict[str, float], name: str, sp: Speedup) -> None:
    """``name`` and, where the turns allow one, its 95 % interval ``name_ci_low`` / ``name_ci_high``."""
    metrics[name] = sp.ratio
    if np.isfinite(sp.low):
        metrics[name + "_ci_low"], metrics[name + "_ci_high"] = sp.low, sp.high


def _main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="memory probe (internal)")
    ap.add_argument("--probe", nargs=5, metavar=("KIND", "PATH", "BATCH_NPZ", "THREADS", "REPEATS"), required=True)
    ap.add_argument("--attention", default="sdpa", help="attention kernel of a Hugging Face model")
    args = ap.parse_args(argv)
    kind, path, npz, threads, reps = args.probe
    print(json.dumps(probe_artifact(kind, path, npz, int(threads), int(reps), args.attention)))


if __name__ == "__main__":
    _main()
