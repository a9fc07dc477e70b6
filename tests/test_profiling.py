"""Profiler statistics on a stub timer, interleaving, memory and the stage on a tiny model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.test_engine import VAL, one_thread, quantized  # noqa: F401 (fixture)
from transquant.deploy import profiling as P
from transquant.deploy.build import build_onnx_int8
from transquant.deploy.runtime import EngineError, fixed_batch, sample_batch
from transquant.deploy.timing import CpuTimer, LatencyStats, interleaved
from transquant.run import CONF_DIR


class StubClock:
    """perf_counter_ns stand-in: each call pair (start, end) spans the next known duration."""

    def __init__(self, durations_ms):
        self.ticks = []
        t = 0
        for d in durations_ms:
            self.ticks += [t, t + int(d * 1e6)]
            t += int(d * 1e6) + 1000
        self.i = 0

    def __call__(self) -> int:
        self.i += 1
        return self.ticks[self.i - 1]


def test_stats_from_stub_timer():
    durations = [float(x) for x in range(1, 101)]  # 1 .. 100 ms
    timer = CpuTimer(clock=StubClock(durations))
    measured = [timer.time(lambda: None) for _ in durations]
    s = LatencyStats.from_ns(measured, batch_size=8)
    assert s.n == 100
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p95_ms == pytest.approx(95.05)  # linear interpolation between 95 and 96
    assert s.mean_ms == pytest.approx(50.5)
    assert s.throughput_seq_s == pytest.approx(8 / 0.0505)


def test_interleaved_round_robin_in_blocks():
    calls = []

    class CountingTimer:
        def time(self, fn):
            fn()
            return 1_000_000

    runners = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = interleaved(runners, warmup=3, iterations=5, block=2, timer=CountingTimer())
    assert {k: len(v) for k, v in times.items()} == {"a": 5, "b": 5, "c": 5}
    timed = calls[9:]  # 3 warm-up calls each first
    assert calls[:9] == ["a", "a", "b", "b", "c", "c", "a", "b", "c"]
    assert timed == ["a", "a", "b", "b", "c", "c"] * 2 + ["a", "b", "c"]


PEAK_PROBE = """
import json, numpy as np
from transquant.deploy.memory import peak_rss_growth
def alloc():
    x = np.ones(64 * 1024 * 1024 // 8)  # 64 MB, touched
    return float(x.sum())
print(json.dumps(peak_rss_growth(alloc, repeats=1)))
"""


def test_peak_rss_growth_sees_an_allocation():
    # A fresh interpreter: inside the suite other threads (ORT pools, MLflow) free memory while
    # the allocation runs, which lowers the resident set under the baseline.
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, check=True)
    grown, method = json.loads(out.stdout.strip().splitlines()[-1])
    assert method in ("vmhwm", "sampled")
    assert 60.0 <= grown <= 72.0


def profile_cfg(**over):
    base = OmegaConf.load(f"{CONF_DIR}/profile/default.yaml")
    quick = OmegaConf.load(f"{CONF_DIR}/profile/quick.yaml")
    quick.pop("defaults", None)
    return OmegaConf.merge(base, quick, over)


HW = OmegaConf.create({"device": "cpu", "threads": 1})
KEYS = {"latency_p50_ms", "latency_p95_ms", "latency_mean_ms", "throughput_seq_s", "peak_memory_mb",
        "model_size_mb", "speedup_vs_fp32", "speedup_vs_torch_fp32", "speedup_vs_ort_fp32", "speedup_vs_peer",
        "peer_speedup_vs_torch_fp32", "size_ratio_vs_fp32", "engine_accuracy", "fp32_latency_p50_ms",
        "ort_fp32_latency_p50_ms", "peer_latency_p50_ms"}
ENGINE_KEYS = {"engine_int8_matmuls", "engine_float_matmuls", "engine_code_agreement"}


def test_default_config_is_the_papers():
    cfg = OmegaConf.load(f"{CONF_DIR}/profile/default.yaml")
    assert (cfg.enabled, cfg.engine, cfg.fp32_attention, cfg.warmup, cfg.iterations, cfg.batch_size, cfg.seq_len,
            cfg.eval_engine_accuracy) == (True, "onnxruntime", "sdpa", 100, 500, 8, 128, True)


@pytest.mark.parametrize("engine,method", [("onnxruntime", "mixed"), ("torch", "w8a8"), ("none", "w8a8"),
                                           ("onnxruntime", "fp32")])
def test_profile_stage_tiny(tmp_path, engine, method):
    fp32, model, state = quantized(method)
    metrics, tags, tables, artifacts = P.profile_stage(profile_cfg(engine=engine), HW, fp32, model, state, None,
                                                       VAL, 0, tmp_path)
    assert KEYS <= set(metrics)
    assert tags["cpu_flags"] and tags["cpu_model"] and tags["timing_loaded"] in ("true", "false")
    assert metrics["timing_lock_wait_seconds"] >= 0 and {"load_avg_before", "load_avg_after"} <= set(metrics)
    if engine == "onnxruntime":  # ORT's profiler on the engine, its trace removed
        ops = tables["engine_op_profile"]
        assert list(ops.columns[:4]) == ["op_type", "calls", "total_ms", "share"]
        assert ops["share"].sum() == pytest.approx(1.0) and (ops["calls"] > 0).all()
        assert not list(tmp_path.rglob("ort_profile*"))
        if method != "fp32":
            assert "MatMulIntegerToFloat" in set(ops["op_type"]) and metrics["int8_peak_fraction"] > 0
    else:
        assert tables == {} and "int8_peak_fraction" not in metrics
    assert tags["engine"] == engine and tags["fp32_attention"] == "sdpa"
    assert metrics["speedup_vs_fp32"] == metrics["speedup_vs_torch_fp32"]
    if engine == "onnxruntime" and method != "fp32":
        assert ENGINE_KEYS <= set(metrics) and metrics["engine_code_agreement"] >= 0.999
        assert metrics["engine_int8_matmuls"] == 18 and metrics["engine_float_matmuls"] == 0
        assert tags["engine_precision"] == "W8A{8,16}"
    assert all(p.exists() for p in artifacts)
    report = json.loads(artifacts[0].read_text())
    assert report["stats"]["engine"]["n"] == 4 and report["stats"]["fp32"]["n"] == 4
    assert 0.0 <= metrics["engine_accuracy"] <= 100.0
    assert metrics["latency_p50_ms"] > 0 and metrics["throughput_seq_s"] > 0
    assert metrics["model_size_mb"] * 1024 * 1024 == pytest.approx(artifacts[1].stat().st_size)
    if engine == "onnxruntime" and method != "fp32":
        assert metrics["size_ratio_vs_fp32"] < 0.9  # int8 weights (the tiny graph's float rest is large)
    if engine == "none":
        assert metrics["size_ratio_vs_fp32"] == pytest.approx(1.0, abs=0.01)  # fake quantization saves nothing


def test_profile_stage_stub_timer_gives_exact_ratio(tmp_path):
    class Alternating:
        """Round-robin order torch fp32, ORT fp32, peer, engine: 30, 15, 20 and 10 ms a call."""

        def __init__(self):
            self.i = 0

        def time(self, fn):
            fn()
            self.i += 1
            return [30, 15, 20, 10][((self.i - 1) // 2) % 4] * 1_000_000  # block=2

    fp32, model, state = quantized("w8a8")
    metrics, _, _, _ = P.profile_stage(profile_cfg(eval_engine_accuracy=False), HW, fp32, model, state, None, VAL,
                                       0, tmp_path, timer=Alternating())
    assert metrics["fp32_latency_p50_ms"] == 30 and metrics["latency_p50_ms"] == 10
    assert metrics["ort_fp32_latency_p50_ms"] == 15 and metrics["peer_latency_p50_ms"] == 20
    assert metrics["speedup_vs_torch_fp32"] == metrics["speedup_vs_fp32"] == 3
    assert metrics["speedup_vs_ort_fp32"] == 1.5 and metrics["speedup_vs_peer"] == 2
    assert metrics["peer_speedup_vs_torch_fp32"] == 1.5 and metrics["ort_fp32_speedup_vs_torch_fp32"] == 2
    assert "engine_accuracy" not in metrics


def test_speedups_are_paired_by_turn_on_a_machine_that_changes_phase(tmp_path):
    """Everything runs 2x slower from the middle of the sixth timed turn on (between the peer's
    block and the engine's), as a cloud VM does in phases. In every turn but that one the engine is
    2x faster than the peer; p50 / p50 says 1.33x (the peer's p50 lands in the fast phase, the
    engine's between the phases). The paired speed-ups say what each turn says."""
    order = ["fp32", "ort_fp32", "peer", "engine"]  # the round-robin order, block=2
    fast = {"fp32": 30, "ort_fp32": 15, "peer": 20, "engine": 10}

    class Phased:
        def __init__(self):
            self.i = 0  # timed calls so far (warm-up calls are not timed)

        def time(self, fn):
            fn()
            name = order[(self.i % 8) // 2]
            slow = self.i >= 5 * 8 + 6  # turn 5: fp32, ORT FP32 and peer fast, the engine slow
            self.i += 1
            return fast[name] * (2 if slow else 1) * 1_000_000

    fp32, model, state = quantized("w8a8")
    cfg = profile_cfg(eval_engine_accuracy=False, warmup=2, iterations=20)
    metrics, _, _, _ = P.profile_stage(cfg, HW, fp32, model, state, None, VAL, 0, tmp_path, timer=Phased())
    assert metrics["latency_p50_ms"] == 15 and metrics["peer_latency_p50_ms"] == 20  # p50 / p50: 1.33
    assert metrics["speedup_vs_peer"] == 2 and metrics["speedup_vs_torch_fp32"] == 3
    assert metrics["speedup_vs_ort_fp32"] == 1.5 and metrics["ort_fp32_speedup_vs_torch_fp32"] == 2
    assert metrics["speedup_vs_peer_ci_low"] == metrics["speedup_vs_peer_ci_high"] == 2  # 9 of 10 turns say 2


def test_memory_probe_in_fresh_process(tmp_path):
    """The default CPU memory measurement: a child process loads the .onnx and runs it."""
    fp32, model, state = quantized("w8a8")
    sample = sample_batch(VAL, pad_id=0)
    _, path, _ = build_onnx_int8(fp32, model, state, sample, tmp_path, threads=1)
    got = P.memory_in_subprocess("onnx", path, fixed_batch(VAL, 0, 2, 16), 1, 2, tmp_path)
    assert got is not None and got["method"] in ("vmhwm", "sampled")
    assert got["peak_mb"] >= got["load_mb"] >= 0 and got["peak_mb"] > 0
    assert got["inference_mb"] == pytest.approx(got["peak_mb"] - got["load_mb"])


def test_fp32_baseline_is_a_fresh_sdpa_copy(tmp_path):
    """PyTorch FP32 is timed with the attention users run, even when the caller's model was
    switched to the eager kernel with taps (error attribution does that), and the caller's
    model is left as it was."""
    from transquant.quant.sites import use_tappable_attention

    fp32, model, state = quantized("w8a8")
    use_tappable_attention(fp32)
    before = fp32.config._attn_implementation
    assert before != "sdpa"
    _, tags, _, _ = P.profile_stage(profile_cfg(eval_engine_accuracy=False), HW, fp32, model, state, None, VAL, 0,
                                    tmp_path)
    assert tags["fp32_attention"] == "sdpa" and fp32.config._attn_implementation == before
    assert P.torch_fp32(fp32, "eager").config._attn_implementation == "eager"


def test_unknown_fp32_attention_is_one_line_error():
    fp32, *_ = quantized("fp32")
    with pytest.raises(EngineError, match="profile.fp32_attention=nope") as err:
        P.torch_fp32(fp32, "nope")
    assert "\n" not in str(err.value)


def test_bench_base_reports_every_baseline(monkeypatch):
    """bench_base goes through the same stage: torch FP32 (sdpa), ORT FP32, the peer, the engine."""
    from transformers import BertConfig

    from transquant.deploy.bench import bench

    monkeypatch.setattr(P, "memory_in_subprocess", lambda *a, **k: None)  # in-process memory: faster
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=1100, max_position_embeddings=64, num_labels=2)
    df = bench(["mixed"], config=config, threads=1, warmup=1, iterations=2, batch_size=2, seq_len=16)
    row = df.iloc[0]
    assert row["fp32_attention"] == "sdpa" and row["engine_precision"] == "W8A{8,16}"
    assert {"speedup_vs_torch_fp32", "speedup_vs_ort_fp32", "speedup_vs_peer", "engine_code_agreement"} <= set(df)
