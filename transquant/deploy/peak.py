"""The machine's limit: peak GEMM throughput of ONNX Runtime's kernels at the profile's threads.

A speed-up over FP32 says nothing about how close the engine is to what the CPU can do. Here each
kernel multiplies a uint8 activation by a constant weight (prepacked by ORT, as in the engine) on
large shapes, and the median of ``runs`` timed calls after ``warmup`` gives GMAC/s:

- ``MatMulIntegerToFloat`` (u8 x s8, int32 accumulation, float output): the op
  :func:`.fusions.fuse_for_cpu` writes for every weight GEMM, i.e. what the engine runs after
  ORT's optimizer;
- ``MatMulInteger`` (u8 x s8 -> int32): the same MLAS kernel without the float epilogue;
- ``MatMul`` (fp32 x fp32): the float baseline.

``python -m transquant.bench_base peak=true`` prints the table; :func:`int8_peak` is the reference
of a profile's ``int8_peak_fraction``.
"""
from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd

from .runtime import ort_session
from .timing import CpuTimer

KERNELS = ("MatMulIntegerToFloat", "MatMulInteger", "MatMul")
SHAPE = re.compile(r"([1-9]\d*)x([1-9]\d*)x([1-9]\d*)")
# The engine's largest GEMM at BERT-base size: 8 x 128 tokens through the FFN's first layer.
ENGINE_SHAPE = (1024, 768, 3072)


def parse_shape(text: str) -> tuple[int, int, int] | None:
    """``"MxKxN"`` -> (M, K, N), None unless three integers >= 1."""
    m = SHAPE.fullmatch(str(text).strip())
    return None if m is None else tuple(int(g) for g in m.groups())


def gemm_model(kernel: str, m: int, k: int, n: int, seed: int = 0) -> bytes:
    """A one-node ONNX model ``Y = A[m, k] @ W[k, n]`` on ``kernel`` (:data:`KERNELS`), ``W`` an
    initializer."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    if kernel == "MatMul":
        a_type, out_type = TensorProto.FLOAT, TensorProto.FLOAT
        inits = [rng.standard_normal((k, n), dtype=np.float32)]
        inputs, domain = ["A", "W"], ""
    else:
        a_type = TensorProto.UINT8
        out_type = TensorProto.INT32 if kernel == "MatMulInteger" else TensorProto.FLOAT
        w = rng.integers(-127, 128, (k, n), dtype=np.int8)
        za, zw = np.array(128, np.uint8), np.array(0, np.int8)
        if kernel == "MatMulInteger":
            inits, inputs, domain = [w, za, zw], ["A", "W", "za", "zw"], ""
        elif kernel == "MatMulIntegerToFloat":
            inits = [w, np.array(0.02, np.float32), np.array(0.01, np.float32), za, zw]
            inputs, domain = ["A", "W", "sa", "sw", "za", "zw"], "com.microsoft"
        else:
            raise ValueError(f"kernel={kernel}: allowed {', '.join(KERNELS)}")
    names = [x for x in inputs if x != "A"]
    graph = helper.make_graph(
        [helper.make_node(kernel, inputs, ["Y"], domain=domain)], kernel,
        [helper.make_tensor_value_info("A", a_type, [m, k])], [helper.make_tensor_value_info("Y", out_type, [m, n])],
        [numpy_helper.from_array(v, name) for v, name in zip(inits, names)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def gemm_gmac_s(kernel: str, shape: tuple[int, int, int], threads: int | None, warmup: int, runs: int,
                timer=None) -> tuple[float, float]:
    """(median ms, GMAC/s) of ``runs`` timed calls of ``kernel`` on ``shape`` after ``warmup``."""
    m, k, n = shape
    sess = ort_session(gemm_model(kernel, m, k, n), threads)
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((m, k), dtype=np.float32) if kernel == "MatMul"
         else rng.integers(0, 256, (m, k), dtype=np.uint8))

    def call():
        return sess.run(None, {"A": a})

    for _ in range(warmup):
        call()
    timer = timer or CpuTimer()
    median_ms = float(np.median([timer.time(call) for _ in range(runs)])) / 1e6
    return median_ms, m * k * n / (median_ms * 1e6)


def peak_gemm(shapes, threads: int | None, warmup: int = 3, runs: int = 10, kernels=KERNELS,
              timer=None) -> pd.DataFrame:
    """One row per kernel and shape: kernel, shape (MxKxN), threads, median_ms, gmac_s."""
    rows = []
    for shape in shapes:
        for kernel in kernels:
            ms, gmacs = gemm_gmac_s(kernel, shape, threads, warmup, runs, timer)
            rows.append({"kernel": kernel, "shape": "x".join(map(str, shape)), "threads": threads,
                         "median_ms": ms, "gmac_s": gmacs})
    return pd.DataFrame(rows)


@functools.cache
def int8_peak(threads: int | None) -> float:
    """GMAC/s of the engine's integer GEMM (``MatMulIntegerToFloat``, u8 x s8) on
    :data:`ENGINE_SHAPE`, measured once per process and thread count with few calls (about a
    second): the reference of ``int8_peak_fraction``."""
    return gemm_gmac_s("MatMulIntegerToFloat", ENGINE_SHAPE, threads, warmup=2, runs=5)[1]
