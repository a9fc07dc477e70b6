"""Every tiny model family through the whole job: fine-tune, calibrate, W8A8, evaluate, statistics,
error attribution, figures, the ONNX Runtime engine built from the quant state, its profile."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from transquant.deploy.verify import MIN_CODE_AGREEMENT
from transquant.pipeline import run_job

FAMILIES = ["tiny", "tiny-electra", "tiny-distilbert", "tiny-roberta-preln",
            "tiny-gpt2", "tiny-opt", "tiny-mpnet"]
# The smallest sizes every stage still exercises: 64 training pairs (no accuracy asked of the
# model), 64 validation and statistics examples, 2 calibration batches, the quick profile.
SMALL = ("task.synthetic_train_size=64", "task.synthetic_eval_size=64", "train.epochs=1", "calibration.num_batches=2",
         "stats.num_examples=64", "profile.eval_engine_accuracy=false", "hardware.threads=1")


@pytest.mark.parametrize("model", FAMILIES)
def test_every_stage_runs_for_the_family(make_cfg, store, model):
    cfg = make_cfg(f"model={model}", "quant=w8a8", "stats.enabled=true", "profile.enabled=true",
                   f"tracking.experiment=families-{model}", *SMALL)
    run_job(cfg)
    client = MlflowClient(store["uri"])
    exp = client.get_experiment_by_name(f"families-{model}")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert {"accuracy", "fp32_accuracy", "accuracy_drop"} <= set(m)
    assert m["quantized_activation_sites"] > 0 and m["quantized_weight_tensors"] > 0
    assert m["engine_code_agreement"] >= MIN_CODE_AGREEMENT
    assert m["engine_int8_matmuls"] > 0 and m["latency_p50_ms"] > 0
    assert run.data.tags["engine_precision"] == "W8A8"
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"activation_stats.csv", "quantization_error.csv", "quant_state", "profile"} <= top
    assert any(p.endswith(".png") for p in top)  # the figures
