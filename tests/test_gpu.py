"""The CUDA path: the event timer against a fake device clock and the summary of
scripts/gpu_check.sh on CPU; real jobs with ``hardware=cuda`` under the ``gpu`` marker (deselected
by default, skipped without a GPU: ``python -m pytest -q -m gpu``)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from transquant.deploy import gpu_check
from transquant.deploy.bench import main as bench_main
from transquant.deploy.runtime import ORT_PROVIDERS
from transquant.deploy.timing import CpuTimer, CudaTimer, interleaved, timer_for
from transquant.pipeline import run_job

from .test_families import SMALL


class FakeDevice:
    """A GPU stream on a clock the test moves: events are stamped when recorded but, as on a real
    device, their time can be read only once a synchronize has completed them."""

    def __init__(self):
        self.now_ms = 0.0
        self.log: list[str] = []
        self.pending: list[FakeEvent] = []

    def run(self, ms: float):
        """A kernel of ``ms`` milliseconds, queued on the stream."""
        return lambda: setattr(self, "now_ms", self.now_ms + ms)

    def synchronize(self):
        self.log.append("synchronize")
        for event in self.pending:
            event.done = True
        self.pending.clear()


class FakeEvent:
    def __init__(self, device: FakeDevice, enable_timing: bool = False):
        assert enable_timing, "an event without enable_timing has no time to read"
        self.device, self.stamp, self.done = device, None, False

    def record(self):
        self.device.log.append("record")
        self.stamp, self.done = self.device.now_ms, False
        self.device.pending.append(self)

    def synchronize(self):
        self.device.synchronize()

    def elapsed_time(self, end: "FakeEvent") -> float:
        self.device.log.append("elapsed_time")
        if not (self.done and end.done):
            raise RuntimeError("CUDA error: device not ready (elapsed_time before the events completed)")
        return end.stamp - self.stamp


@pytest.fixture
def device(monkeypatch) -> FakeDevice:
    dev = FakeDevice()
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing=False: FakeEvent(dev, enable_timing))
    monkeypatch.setattr(torch.cuda, "synchronize", dev.synchronize)
    return dev


def test_cuda_timer_records_around_the_call_and_synchronizes_before_reading(device):
    assert CudaTimer().time(device.run(1.25)) == 1_250_000  # ms -> ns
    assert device.log == ["record", "record", "synchronize", "elapsed_time"]


def test_cuda_timer_times_each_call(device):
    timer = CudaTimer()
    assert [timer.time(device.run(ms)) for ms in (0.5, 2.0, 0.001)] == [500_000, 2_000_000, 1_000]


def test_interleaved_with_the_cuda_timer_returns_the_device_durations(device):
    runners = {"fp32": device.run(3.0), "fp16": device.run(1.5)}
    times = interleaved(runners, warmup=2, iterations=5, block=2, timer=CudaTimer())
    assert times == {"fp32": [3_000_000] * 5, "fp16": [1_500_000] * 5}


@pytest.mark.parametrize("name, timer", [("cuda", CudaTimer), ("cuda:1", CudaTimer), ("cpu", CpuTimer)])
def test_timer_for_device(name, timer):
    assert type(timer_for(name)) is timer


# --- the summary of scripts/gpu_check.sh, on a synthetic store ---------------------------------

def _job(client, exp, name, seconds, status="FINISHED", metrics=(), tags=()):
    run = client.create_run(exp, start_time=1_000_000, run_name=name, tags={"quant_method": name, **dict(tags)})
    for key, value in dict(metrics).items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status, end_time=1_000_000 + int(seconds * 1e3))


@pytest.fixture
def summary_store(tmp_path) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    study = client.create_experiment("transquant", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(study, tags={"transquant.role": "sweep"})  # not a job
    client.set_terminated(parent.info.run_id, "FINISHED")
    _job(client, study, "fp32", 400, metrics={"finetune_seconds": 300})
    _job(client, study, "w8a8_paper", 20)
    _job(client, study, "mixed_paper", 30)
    _job(client, study, "peg_paper", 5, status="FAILED")
    profile = client.create_experiment("gpu_profile", artifact_location=(tmp_path / "artifacts2").as_uri())
    _job(client, profile, "w8a8_paper", 60,
         metrics={"latency_p50_ms": 9.5, "fp32_latency_p50_ms": 4.0, "fp16_latency_p50_ms": 1.25,
                  "ort_fp32_latency_p50_ms": 20.0, "peer_latency_p50_ms": 10.0},
         tags={"engine": "onnxruntime", "profile_timer": "CpuTimer", "gpu_model": "NVIDIA Fake 80GB"})
    return uri


def test_gpu_table_reads_the_store_and_the_bench(summary_store):
    bench = pd.DataFrame([{"method": "mixed_paper", "latency_p50_ms": 30.0, "fp32_latency_p50_ms": 12.0,
                           "fp16_latency_p50_ms": 4.0, "engine": "onnxruntime", "gpu_model": "NVIDIA Fake 80GB"}])
    table = gpu_check.gpu_table(gpu_check.job_runs(summary_store), bench,
                                ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                                gpu="unused: the runs logged theirs")
    got = {(r.source, r.quantity): r.value for r in table.itertuples()}
    assert got[("machine", "GPU")] == "NVIDIA Fake 80GB"
    assert got[("machine", "ORT provider the engines use")] == (
        "CPUExecutionProvider (TensorrtExecutionProvider, CUDAExecutionProvider installed, not used)")
    assert got[("transquant", "jobs finished")] == "3/4"
    assert got[("transquant", "fine-tune minutes")] == "5.0"
    assert got[("transquant", "median job seconds")] == "30.0"  # of 400, 20, 30: the failed job is not counted
    assert got[("gpu_profile", "fine-tune minutes")] == "none (cache hits)"
    job = "gpu_profile: w8a8_paper"
    assert got[(job, "p50 ms engine (onnxruntime, CpuTimer)")] == "9.50"
    assert (got[(job, "p50 ms PyTorch FP32")], got[(job, "p50 ms PyTorch FP16")]) == ("4.00", "1.25")
    assert (got[(job, "p50 ms ORT FP32")], got[(job, "p50 ms ORT dynamic INT8")]) == ("20.00", "10.00")
    assert got[("bench_base mixed_paper", "p50 ms engine (onnxruntime)")] == "30.00"
    assert got[("bench_base mixed_paper", "p50 ms PyTorch FP16")] == "4.00"
    assert ("bench_base mixed_paper", "p50 ms ORT FP32") not in got  # not in its row: no line


def test_gpu_table_without_runs_names_this_machine(tmp_path):
    MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()  # an empty store
    table = gpu_check.gpu_table(gpu_check.job_runs(f"sqlite:///{tmp_path}/mlflow.db"), None, ORT_PROVIDERS,
                                gpu="NVIDIA Here")
    assert table.values.tolist() == [["machine", "GPU", "NVIDIA Here"],
                                     ["machine", "ORT providers installed", "CPUExecutionProvider"],
                                     ["machine", "ORT provider the engines use", "CPUExecutionProvider"]]


def test_gpu_check_cli(summary_store, tmp_path, capsys):
    assert gpu_check.main([f"tracking.uri={summary_store}", "tracking.experiment=gpu_profile"]) == 0
    out = capsys.readouterr().out
    assert "p50 ms PyTorch FP16" in out and "median job seconds" in out and "transquant " not in out
    assert gpu_check.main([f"tracking.uri={summary_store}", f"bench={tmp_path}/none.csv"]) == 2
    assert "bench=" in capsys.readouterr().err
    assert gpu_check.main([f"tracking.uri=sqlite:///{tmp_path}/missing/mlflow.db"]) == 2
    assert not (tmp_path / "missing").exists()


def test_bench_base_refuses_a_device_it_cannot_use(capsys):
    assert bench_main(["device=tpu"]) == 2
    assert "device=tpu: allowed cpu, cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench_main(["device=cuda"]) == 2
        assert "device=cuda: no CUDA device visible to torch" in capsys.readouterr().err


# --- on a real GPU ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("engine, timer", [("onnxruntime", "CpuTimer"), ("torch", "CpuTimer"), ("none", "CudaTimer")])
def test_tiny_job_on_cuda(make_cfg, store, engine, timer):
    """The whole job on the GPU with each engine: the CPU engines (ORT, torch.ao INT8) time every
    candidate on the host clock, the fake-quant model on the GPU with CUDA events."""
    experiment = f"gpu-{engine}"
    run_job(make_cfg("hardware=cuda", f"profile.engine={engine}", f"tracking.experiment={experiment}", *SMALL))
    client = MlflowClient(store["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    m, tags = run.data.metrics, run.data.tags
    for key in ("accuracy", "latency_p50_ms", "fp32_latency_p50_ms", "fp16_latency_p50_ms", "speedup_vs_torch_fp16"):
        assert m[key] > 0, key
    assert tags["profile_timer"] == timer  # a CPU engine puts every candidate on the host clock
    assert tags["gpu_model"] == torch.cuda.get_device_name(0)
