"""What one job puts into MLflow: a few headline metrics a user compares across runs, the per-site
and per-candidate detail as tables (CSV artifacts and MLflow tables), and the report still reads
its per-layer numbers from them."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from transquant.analysis.to_mlflow import PROFILE_TABLE_ONLY
from transquant.core.paths import CONF_DIR
from transquant.pipeline import run_job
from transquant.studies.queries import depth_frame, frame_of_runs, transform_frame

from .conftest import TINY
from .test_families import SMALL

# Names the report, the README and the docs read; the per-layer curves are those of the FFN residual sum.
HEADLINE = {"accuracy", "accuracy_ci_low", "accuracy_ci_high", "fp32_accuracy", "accuracy_drop", "drop_ci_low",
            "drop_ci_high", "mcnemar_p", "engine_accuracy", "speedup_vs_torch_fp32", "speedup_vs_fp32",
            "speedup_vs_ort_fp32", "speedup_vs_peer", "size_ratio_vs_fp32", "model_size_mb", "fp32_model_size_mb",
            "latency_p50_ms", "latency_p95_ms", "fp32_latency_p50_ms", "throughput_seq_s", "peak_memory_mb",
            "calibration_seconds", "eval_seconds", "transform_seconds", "stats_seconds", "stats_fp32_pass_seconds",
            "quantized_activation_sites", "engine_int8_matmuls", "engine_float_matmuls", "engine_code_agreement",
            "outlier_error_share", "kurtosis", "variance", "top1pct_channel_energy", "max_abs", "sqnr_db"}
TABLES = ("activation_stats", "activation_stats_transformed", "quantization_error", "profile_candidates",
          "engine_op_profile")


@pytest.fixture(scope="module")
def job(store):
    """One tiny transformed (SmoothQuant) job with statistics and the profile, for the whole module
    (``make_cfg`` is per test): every table a job writes."""
    overrides = [*TINY, f"tracking.uri={store['uri']}", f"paths.cache_dir={store['cache']}", "quant=smoothquant",
                 "stats.enabled=true", "profile.enabled=true", "tracking.experiment=metric-set",
                 *[o for o in SMALL if not o.startswith("profile.eval_engine_accuracy")]]
    with initialize_config_dir(config_dir=CONF_DIR):
        run_job(compose(config_name="config", overrides=overrides))
    client = MlflowClient(store["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("metric-set").experiment_id])
    assert run.info.status == "FINISHED"
    return client, run


def _artifact(client, run, name: str, tmp_path):
    return client.download_artifacts(run.info.run_id, name, str(tmp_path))


def test_metrics_are_the_headline_ones(job):
    client, run = job
    keys = set(run.data.metrics)
    assert HEADLINE <= keys
    assert not [k for k in keys if k.startswith(("stats.", "transformed."))]
    assert not keys & PROFILE_TABLE_ONLY
    assert len(keys) < 60
    layers = [m.step for m in client.get_metric_history(run.info.run_id, "kurtosis")]
    assert sorted(layers) == [0, 1]  # a curve over the layers


def test_tables_hold_the_per_site_and_per_candidate_numbers(job, tmp_path):
    client, run = job
    logged = json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert {(x["path"], x["type"]) for x in logged} == {(f"{t}.json", "table") for t in TABLES}
    for name in TABLES[:3]:
        table = pd.read_json(_artifact(client, run, f"{name}.json", tmp_path), orient="split").set_index("site")
        csv = pd.read_csv(_artifact(client, run, f"{name}.csv", tmp_path)).set_index("site")
        assert list(table.index) == list(csv.index) and list(table.columns) == list(csv.columns), name
        stat = "sqnr_db" if name == "quantization_error" else "kurtosis"
        assert table.loc["layer.1.attn.residual", stat] == pytest.approx(csv.loc["layer.1.attn.residual", stat])
    stats = pd.read_csv(_artifact(client, run, "activation_stats.csv", tmp_path))
    assert {"embedding_sum", "attn_norm", "attn_residual", "ffn_residual"} <= set(stats["kind"])

    cands = pd.read_json(_artifact(client, run, "profile_candidates.json", tmp_path), orient="split")
    assert list(cands["candidate"]) == ["engine", "fp32", "ort_fp32", "peer"]
    profile = json.loads(open(_artifact(client, run, "profile/profile.json", tmp_path)).read())["metrics"]
    c = cands.set_index("candidate")
    assert c.at["engine", "latency_p50_ms"] == pytest.approx(run.data.metrics["latency_p50_ms"])
    assert c.at["peer", "latency_p50_ms"] == pytest.approx(profile["peer_latency_p50_ms"])
    assert c.at["peer", "speedup_vs_torch_fp32"] == pytest.approx(profile["peer_speedup_vs_torch_fp32"])
    assert c.at["ort_fp32", "speedup_vs_torch_fp32"] == pytest.approx(profile["ort_fp32_speedup_vs_torch_fp32"])

    ops = pd.read_json(_artifact(client, run, "engine_op_profile.json", tmp_path), orient="split")
    assert list(ops.columns[:4]) == ["op_type", "calls", "total_ms", "share"]
    assert len(pd.read_csv(_artifact(client, run, "engine_op_profile.csv", tmp_path))) == len(ops)
    assert run.data.tags["cpu_flags"] and run.data.tags["timing_loaded"] in ("true", "false")


def test_report_reads_the_per_layer_numbers(job, tmp_path):
    client, run = job
    df = frame_of_runs([run])
    stats = {when: pd.read_csv(_artifact(client, run, name, tmp_path)) for when, name in
             (("before", "activation_stats.csv"), ("after", "activation_stats_transformed.csv"))}

    tf = transform_frame(client, df)
    assert set(tf["kind"]) == {"embedding_norm", "attn_norm", "ffn_norm", "attn_residual", "ffn_residual"}
    for when, t in stats.items():
        norm = t[t["kind"] == "attn_norm"].set_index("layer")["max_abs"]
        got = tf[(tf["when"] == when) & (tf["kind"] == "attn_norm") & (tf["stat"] == "max_abs")].set_index("layer")
        assert got["value"].to_dict() == pytest.approx(norm.to_dict()), when
    assert (tf.loc[tf["when"] == "after", "value"].sum() != tf.loc[tf["when"] == "before", "value"].sum())

    depth = depth_frame(client, df)
    ffn = stats["before"][stats["before"]["kind"] == "ffn_residual"].set_index("layer")["kurtosis"]
    got = depth[depth["stat"] == "kurtosis"].set_index("layer")["value"]
    assert got.to_dict() == pytest.approx(ffn.to_dict())
