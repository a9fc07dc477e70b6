"""The machine beside every timing: CPU flags, the timing lock, the load flag, ORT's op profile and
the peak GEMM micro-benchmark."""
from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

from transquant.deploy import cpu
from transquant.deploy.op_profile import int_gemm_gmac_s, summarise
from transquant.deploy.peak import KERNELS, parse_shape, peak_gemm

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512_vnni amx_int8 amx_tile avx512_bf16
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512_vnni amx_int8 amx_tile avx512_bf16
"""


def test_cpu_flags_from_cpuinfo():
    flags, model = cpu.cpu_info(CPUINFO)
    assert flags == ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"]
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu.cpu_tags(CPUINFO) == {"cpu_flags": "avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8",
                                     "cpu_model": "Intel(R) Xeon(R) Platinum 8480+"}
    old = "processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu sse2 avx\n"
    assert cpu.cpu_tags(old) == {"cpu_flags": "none", "cpu_model": "Old CPU"}
    assert cpu.cpu_tags("")["cpu_flags"] == "none" and cpu.cpu_tags("")["cpu_model"]  # no /proc: platform's name


def test_loaded_flag():
    assert not cpu.is_loaded(2.4, threads=2) and cpu.is_loaded(2.6, threads=2)
    assert cpu.is_loaded(1.6, threads=1) and not cpu.is_loaded(None, threads=1)


def test_lock_path_is_fixed_per_user_and_overridable(monkeypatch, tmp_path):
    monkeypatch.delenv(cpu.LOCK_ENV, raising=False)
    assert str(cpu.lock_path()).startswith("/tmp/transquant-timing-") and cpu.lock_path().suffix == ".lock"
    monkeypatch.setenv(cpu.LOCK_ENV, str(tmp_path / "x.lock"))
    assert cpu.lock_path() == tmp_path / "x.lock"


def test_timing_phases_serialize(monkeypatch, tmp_path):
    """Two threads (each its own open file description, as two processes) never hold the lock at
    once: the second waits for the first's timed phase."""
    monkeypatch.setenv(cpu.LOCK_ENV, str(tmp_path / "timing.lock"))
    spans, waits = [], []

    def job():
        with cpu.timing_lock() as waited:
            start = time.perf_counter()
            time.sleep(0.2)  # the timed phase
            spans.append((start, time.perf_counter()))
            waits.append(waited)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0  # no overlap
    assert max(waits) >= 0.1 and min(waits) < 0.1


def _event(op, dur_us, ts, a=(8, 16), out=(8, 32)):
    return {"cat": "Node", "name": f"{op}_{ts}_kernel_time", "ts": ts, "dur": dur_us,
            "args": {"op_name": op, "input_type_shape": [{"uint8": list(a)}], "output_type_shape": [{"float": list(out)}]}}


def test_op_profile_summary():
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
              _event("MatMulIntegerToFloat", 999, 10),  # first run: left out
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100}]
    events += [_event("MatMulIntegerToFloat", 4, 210), _event("MatMulIntegerToFloat", 4, 220),
               _event("QuantizeLinear", 1, 230), _event("Softmax", 1, 240), _event("Add", 1, 250),
               _event("Transpose", 1, 260), {"cat": "Node", "name": "x_fence_before", "ts": 270, "dur": 50}]
    df = summarise(events)
    assert list(df.columns) == ["op_type", "calls", "total_ms", "share", "gmac_s"]
    t = df.set_index("op_type")
    assert list(df["op_type"])[0] == "MatMulIntegerToFloat" and t.at["MatMulIntegerToFloat", "calls"] == 2
    assert t.at["MatMulIntegerToFloat", "total_ms"] == pytest.approx(0.008)
    assert t.at["other", "calls"] == 2 and t.at["other", "share"] == pytest.approx(2 / 12)  # of 12 us
    assert df["share"].sum() == pytest.approx(1.0)
    # 8 x 32 outputs x 16 reduction = 4096 MACs a call, in 4 us: 1.024 GMAC/s
    assert t.at["MatMulIntegerToFloat", "gmac_s"] == pytest.approx(1.024)
    assert pd.isna(t.at["Softmax", "gmac_s"])
    assert int_gemm_gmac_s(df) == pytest.approx(1.024)
    assert int_gemm_gmac_s(df[df["op_type"] != "MatMulIntegerToFloat"]) is None


def test_op_profile_names_the_float_gemm_ort_makes_of_int8_weights():
    """MatMulNBits (int8 weights under a float or 16-bit input) is a GEMM with its own row and
    GMAC/s, not a part of "other" (the mixed engine's largest cost was hidden there)."""
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 1}, _event("MatMulNBits", 8, 10)]
    t = summarise(events).set_index("op_type")
    assert "other" not in t.index and t.at["MatMulNBits", "gmac_s"] == pytest.approx(0.512)


def test_peak_gemm_on_tiny_shapes():
    assert parse_shape("1024x768x3072") == (1024, 768, 3072)
    assert parse_shape("64x32") is None and parse_shape("0x2x2") is None
    df = peak_gemm([(16, 32, 24)], threads=1, warmup=1, runs=2)
    assert list(df["kernel"]) == list(KERNELS) and set(df["shape"]) == {"16x32x24"}
    assert (df["gmac_s"] > 0).all()
    assert df["gmac_s"].iloc[0] == pytest.approx(16 * 32 * 24 / (df["median_ms"].iloc[0] * 1e6))


def test_bench_base_peak_command(tmp_path, monkeypatch, capsys):
    from transquant.deploy.bench import main

    monkeypatch.setenv(cpu.LOCK_ENV, str(tmp_path / "timing.lock"))
    out = tmp_path / "peak.csv"
    assert main(["peak=true", "peak_shapes=[16x32x24]", "peak_runs=2", "threads=1", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "flags: " in printed and "MatMulIntegerToFloat" in printed
    df = pd.read_csv(out)
    assert list(df["kernel"]) == list(KERNELS) and {"cpu_flags", "cpu_model", "gmac_s", "timing_loaded"} <= set(df)
    assert main(["peak=true", "peak_shapes=[16x32]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("transquant.bench_base: error: peak_shapes=[16x32]: bad shape '16x32'; allowed MxKxN")
    assert main(["peak=true", "peak_runs=0"]) == 2
    assert "peak_runs=0: must be an integer >= 1" in capsys.readouterr().err
