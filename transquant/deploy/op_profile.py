"""Where the engine's time goes: ONNX Runtime's own profiler, per op type.

A separate session with ``enable_profiling`` runs the timing batch a handful of times *after* the
timed measurement (the profiler's bookkeeping would perturb it), its JSON trace is summed per op
type and deleted. The table (``engine_op_profile``) says whether the integer GEMMs dominate, as
they should, or the float glue and the Quantize passes around them do; ``gmac_s`` of a MatMul-type
row is its multiply-accumulates (from the shapes ORT recorded) over its time, to set beside the
machine's peak (``python -m transquant.bench_base peak=true``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from .runtime import ort_feeds, ort_session
from .verify import FLOAT_MATMULS, INT_MATMULS

# Op types reported on their own row; every other op is summed into "other". MatMulNBits is the
# GEMM ORT makes of int8 weights under float (or 16-bit) activations: it runs float here (see
# runtime.ORT_CONFIG), and hiding it in "other" would hide a GEMM.
GEMMS = INT_MATMULS | FLOAT_MATMULS | {"MatMulNBits"}  # rows that get GMAC/s
OP_GROUPS = (*sorted(INT_MATMULS), *sorted(FLOAT_MATMULS), "MatMulNBits", "DynamicQuantizeLinear", "QuantizeLinear",
             "DequantizeLinear", "Softmax", "LayerNormalization", "SkipLayerNormalization", "Gelu", "BiasGelu",
             "FastGelu")
COLUMNS = ("op_type", "calls", "total_ms", "share", "gmac_s")


def _macs(args: dict) -> float:
    """Multiply-accumulates of one MatMul-type call: output elements x the reduction length (the
    last axis of the first input; the weight, prepacked, is not in the trace)."""
    try:
        (out,) = args["output_type_shape"][0].values()
        (a,) = args["input_type_shape"][0].values()
        return float(math.prod(out) * a[-1])
    except (KeyError, IndexError, ValueError, TypeError):
        return math.nan


def summarise(events: list[dict]) -> pd.DataFrame:
    """:data:`COLUMNS` per op type (:data:`OP_GROUPS`, else "other"), largest total first, from an
    ORT trace; the first ``model_run`` (one-time allocations) is left out."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    start = runs[0]["ts"] + runs[0]["dur"] if len(runs) > 1 else -math.inf
    rows: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e["ts"] < start:
            continue
        op = e.get("args", {}).get("op_name", "?")
        group = op if op in OP_GROUPS else "other"
        row = rows.setdefault(group, {"op_type": group, "calls": 0, "total_ms": 0.0, "macs": 0.0})
        row["calls"] += 1
        row["total_ms"] += e["dur"] / 1e3
        if op in GEMMS:
            row["macs"] += _macs(e["args"])
    df = pd.DataFrame(list(rows.values()), columns=["op_type", "calls", "total_ms", "macs"])
    total = df["total_ms"].sum()
    df["share"] = df["total_ms"] / total if total > 0 else math.nan
    df["gmac_s"] = [m / (t * 1e6) if m > 0 and t > 0 else math.nan for m, t in zip(df["macs"], df["total_ms"])]
    return df.sort_values("total_ms", ascending=False, ignore_index=True)[list(COLUMNS)]


def op_profile(path: Path, threads: int | None, batch: dict, runs: int, workdir: Path) -> pd.DataFrame:
    """:func:`summarise` of ``runs`` passes of the ONNX model at ``path`` on ``batch``, after one
    warm-up pass (traced too, left out of the summary); the trace file is removed."""
    sess = ort_session(Path(path), threads, profile_prefix=Path(workdir).absolute() / "ort_profile")
    feeds = ort_feeds(sess, batch)
    try:
        for _ in range(runs + 1):
            sess.run(None, feeds)
    finally:
        trace = Path(sess.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    return summarise(events)


def int_gemm_gmac_s(table: pd.DataFrame) -> float | None:
    """Multiply-accumulates per second over all integer MatMul-type rows together (None without any)."""
    ints = table[table["op_type"].isin(INT_MATMULS) & table["gmac_s"].notna()]
    if ints.empty:
        return None
    return float((ints["gmac_s"] * ints["total_ms"]).sum() / ints["total_ms"].sum())
