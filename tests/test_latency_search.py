"""Mixed precision against measured latency (``+search=latency_pareto``): the site-group mapping and
its validation, the knee and dominance, the front's CSV / figure / reference lookup on synthetic
runs, and (slow) two workers sharing one Optuna study through sqlite on the tiny model."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import optuna
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from transquant.core.config import validate, validate_static
from transquant.core.errors import TransquantError
from transquant.core.paths import CONF_DIR
from transquant.quant.precision import GROUPS, precision_sites
from transquant.studies import front as F
from transquant.studies.pareto import dominates, knee_index
from transquant.studies.queries import children
from transquant.studies.search import check_objectives, objective_values, site_counts

from .conftest import run_cli

MIXED_PAPER = {"ffn_input": 16, "ffn_output": 16, "ffn_residual": 16, "attn_residual": 8, "attention": 8}
OBJ, DIR = ["accuracy", "latency_p50_ms"], ["maximize", "minimize"]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR):
        return compose(config_name="config", overrides=["model=tiny", "task=synthetic", "+search=latency_pareto",
                                                        *overrides])


def test_precision_sites_maps_each_group_to_one_list():
    p = {"ffn_input": "16", "ffn_output": "peg", "ffn_residual": "float", "attn_residual": 16, "attention": 8}
    assert precision_sites(p, 16) == ["*.ffn.input", "embeddings.sum", "*.attn.residual"]
    assert precision_sites(p, "peg") == ["*.ffn.output"]
    assert precision_sites(p, "float") == ["*.ffn.residual"]
    assert precision_sites(p, 8) == ["*.attn.scores", "*.attn.probs"]
    assert sorted(pat for lvl in (8, 16, "float", "peg") for pat in precision_sites(p, lvl)) == sorted(
        pat for pats in GROUPS.values() for pat in pats)  # every group lands in exactly one list


def test_preset_is_the_quant_knobs_it_names():
    """mixed_paper's choices give mixed_paper's sites and site counts; the search profile is the short one."""
    cfg = _cfg(*(f"precision.{g}={v}" for g, v in MIXED_PAPER.items()))
    validate(cfg)
    assert list(cfg.quant.high_bits_sites) == ["*.ffn.input", "*.ffn.output", "*.ffn.residual"]
    assert list(cfg.quant.act_exclude) == [] and list(cfg.quant.peg_sites) == []
    assert list(cfg.objectives) == ["accuracy", "speedup_vs_peer"] and cfg.quant.method == "precision_search"
    sweeper = OmegaConf.load(f"{CONF_DIR}/search/latency_pareto.yaml").hydra.sweeper
    assert list(sweeper.direction) == ["maximize", "maximize"]
    assert (cfg.profile.warmup, cfg.profile.iterations, cfg.profile.op_profile_runs) == (20, 100, 0)
    with initialize_config_dir(config_dir=CONF_DIR):
        paper = compose(config_name="config", overrides=["model=tiny", "task=synthetic", "quant=mixed_paper"])
    assert site_counts(cfg) == site_counts(paper)


@pytest.mark.parametrize("override, message", [
    ("precision.attention=peg", "precision.attention=peg: allowed 8, 16, float"),
    ("precision.ffn_input=12", "precision.ffn_input=12: allowed 8, 16, float, peg"),
    ("+precision.mlp=8", "precision.mlp: unknown site group; allowed ffn_input, ffn_output"),
    ("quant.high_bits=12", "precision 16 means quant.high_bits=16, but quant.high_bits=12"),
])
def test_bad_precision_fails_at_config_time(override, message):
    extra = ["precision.ffn_input=16"] if "high_bits" in override else []
    with pytest.raises(TransquantError, match=message.replace("(", r"\(")):
        validate_static(_cfg(override, *extra))


def test_latency_objective_needs_the_profile_and_a_failed_job_fails_the_trial():
    with pytest.raises(TransquantError, match=r"\['speedup_vs_peer'\] are measured by the profile stage"):
        check_objectives(_cfg("profile.enabled=false"))
    assert all(math.isnan(v) for v in objective_values(_cfg(), float("nan")))


def test_knee_and_dominance():
    assert dominates((80, 10), (80, 12), DIR) and not dominates((80, 10), (80, 10), DIR)
    assert not dominates((81, 13), (80, 12), DIR)
    # Scaled to [0, 1]: (84, 30) is 0.2 of the accuracy span and 0.25 of the latency span from utopia.
    assert knee_index([(85, 50), (84, 30), (70, 10)], DIR) == 1
    assert knee_index([], DIR) is None


def _trials(rows):
    return pd.DataFrame([{"status": "FINISHED", "start_time": i, "run_id": f"r{i}", "method": "precision_search",
                          "accuracy": a, "latency_p50_ms": lat} for i, (a, lat) in enumerate(rows)])


def _with_reference(t, accuracy, latency, note=""):
    ref = {"role": "reference", "method": "mixed_paper", "run_id": "ref", "accuracy": accuracy,
           "latency_p50_ms": latency, "pareto": False, "knee": False, "note": note}
    return pd.concat([t, pd.DataFrame([ref])], ignore_index=True)


def test_front_table_verdict_and_files(tmp_path):
    df = _trials([(85, 50), (84, 30), (70, 10), (80, 40)])
    t = F.front_table(df, OBJ, DIR, {"r1": {"precision.ffn_input": "16"}})
    assert list(t["pareto"]) == [True, True, True, False] and list(t["run_id"][t["knee"]]) == ["r1"]
    assert t.loc[1, "precision.ffn_input"] == "16" and pd.isna(t.loc[0, "precision.ffn_input"])
    assert F.knee_verdict(_with_reference(t, 83, 35), OBJ, DIR)[0] == "true"
    verdict, why = F.knee_verdict(_with_reference(t, 84.5, 20), OBJ, DIR)
    assert verdict == "false" and "no trial dominates mixed_paper" in why
    verdict, why = F.knee_verdict(_with_reference(t, math.nan, math.nan, "no mixed_paper run"), OBJ, DIR)
    assert (verdict, why) == ("unknown", "no mixed_paper run")
    files = F.write_front(_with_reference(t, math.nan, math.nan, "no mixed_paper run"), OBJ, DIR, tmp_path)
    assert "not a finding" not in F.knee_verdict(_with_reference(t, 83, 35), OBJ, DIR)[1]  # no intervals logged
    csv = pd.read_csv(files[0])
    assert list(csv["role"]) == ["trial"] * 3 + ["reference"] and csv["knee"].sum() == 1
    assert files[1].stat().st_size > 10_000


def test_find_reference_matches_checkpoint_context_and_exact_preset(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "a"))
    context = {"calibration.num_batches": "2", "calibration.batch_size": "8", "calibration.seed": "0",
               "profile.engine": "onnxruntime", "profile.batch_size": "8", "profile.seq_len": "128",
               "hardware.device": "cpu", "hardware.threads": "2"}

    def run(method, ckpt="ck", latency=1.0, tags=(), **params):
        r = client.create_run(exp, tags={"checkpoint": ckpt, "transquant.source_hash": "abc",
                                         "transquant.version.onnxruntime": "1.32.0", "cpu_model": "EPYC",
                                         "cpu_flags": "avx2 avx512_vnni", **dict(tags)})
        for k, v in {**context, "quant.method": method, **params}.items():
            client.log_param(r.info.run_id, k, v)
        client.log_metric(r.info.run_id, "accuracy", 80.0)
        client.log_metric(r.info.run_id, "latency_p50_ms", latency)
        client.set_terminated(r.info.run_id)
        return client.get_run(r.info.run_id)

    trial = run("precision_search")
    run("mixed_paper", ckpt="other")                        # another checkpoint
    run("mixed_paper", **{"profile.batch_size": "1"})       # another batch shape
    run("mixed_paper", **{"quant.act_bits": "6"})           # not the preset as is
    good = run("mixed_paper", latency=2.0)
    run("mixed_paper", tags={"transquant.source_hash": "old"})  # newer, but an older engine's code
    run("mixed_paper", tags={"cpu_flags": "avx2"})               # newer, but timed on another CPU
    assert F.find_reference(client, exp, trial, "mixed_paper", OBJ).info.run_id == good.info.run_id
    assert F.find_reference(client, exp, trial, "peg_paper", OBJ) is None
    assert "batch 8 x 128, cpu, threads 2" in F.missing_note("peg_paper", trial)


# The tiny model shrunk (as tests/test_study.py's FAST) and a few timed passes.
TINY = ["model=tiny", "task=synthetic", "train=quick", "train.max_length=32", "task.synthetic_train_size=64",
        "task.synthetic_eval_size=64", "calibration.num_batches=2", "calibration.batch_size=8", "hardware.threads=1",
        "stats.enabled=false", "profile.warmup=2", "profile.iterations=10", "profile.batch_size=2", "profile.seq_len=16"]


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    """A mixed_paper reference, then two concurrent workers (2 trials each) on one sqlite study: 4
    trials, each parent with its front, knee and verdict against the reference (~70 s on 2 cores)."""
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    common = [*TINY, f"tracking.uri={uri}", f"paths.cache_dir={tmp_path / 'cache'}"]
    ref = run_cli("quant=mixed_paper", "profile=search", *common, cwd=tmp_path, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    workers = [subprocess.Popen(
        [sys.executable, "-m", "transquant.search", "-m", "+search=latency_pareto", "hydra.sweeper.n_trials=2",
         f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=test-latency", f"hydra.sweeper.sampler.seed={i}",
         f"hydra.sweep.dir={tmp_path / f'sweep{i}'}", *common],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="test-latency", storage=storage).trials
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("transquant").experiment_id
    parents = [r for r in client.search_runs([exp]) if r.data.tags.get("transquant.role") == "sweep"]
    assert len(parents) == 2
    for p in parents:
        assert {"pareto_front.csv", "pareto_front.png"} <= {a.path for a in client.list_artifacts(p.info.run_id)}
        assert p.data.tags["transquant.knee_dominates_mixed_paper"] in ("true", "false")
        kids = children(client, [p.info.run_id])
        assert len(kids) == 2 and all(k.data.metrics["speedup_vs_peer"] > 0 for k in kids)
        front = pd.read_csv(client.download_artifacts(p.info.run_id, "pareto_front.csv", str(tmp_path)))
        assert front.loc[front["method"] == "mixed_paper", "note"].isna().all()  # the reference was found


def test_verdict_says_when_an_accuracy_difference_is_inside_its_interval():
    """A knee 0.5 point above the reference, with a ±1.4-point interval, "dominates" on the point
    estimates, but the reason must say the accuracy side is not a finding (and the CSV carries
    the intervals); a 3-point gap is reported without that caveat."""
    df = _trials([(85, 50), (84, 30), (70, 10)]).assign(accuracy_ci_low=lambda d: d["accuracy"] - 1.4,
                                                        accuracy_ci_high=lambda d: d["accuracy"] + 1.4)
    t = F.front_table(df, OBJ, DIR, {})
    assert {"accuracy_ci_low", "accuracy_ci_high"} <= set(t.columns)
    verdict, why = F.knee_verdict(_with_reference(t, 83.5, 40), OBJ, DIR)
    assert verdict == "true" and "accuracy differs by 0.50, inside the knee's 95 % interval [82.60, 85.40]" in why
    verdict, why = F.knee_verdict(_with_reference(t, 81.0, 40), OBJ, DIR)
    assert verdict == "true" and "not a finding" not in why
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    F._interval_bars(ax, t, "latency_p50_ms", "accuracy")  # the figure draws each point's interval
    bars = ax.collections[0].get_segments()
    assert len(ax.collections) == 1 and len(bars) == 3
    assert [tuple(p) for p in bars[0]] == [(50, pytest.approx(83.6)), (50, pytest.approx(86.4))]


def test_speedup_objective_carries_its_interval_into_the_front_and_the_verdict():
    """The search's objectives: accuracy and the paired speed-up over the peer, both maximised, each
    with its interval; a knee 0.05x faster than mixed_paper inside a ±0.1x interval is not a finding."""
    obj, dirs = ["accuracy", "speedup_vs_peer"], ["maximize", "maximize"]
    df = pd.DataFrame([{"status": "FINISHED", "start_time": i, "run_id": f"r{i}", "method": "precision_search",
                        "accuracy": a, "speedup_vs_peer": sp, "speedup_vs_peer_ci_low": sp - 0.1,
                        "speedup_vs_peer_ci_high": sp + 0.1} for i, (a, sp) in enumerate([(85, 0.6), (84, 0.9), (70, 1.2)])])
    t = F.front_table(df, obj, dirs, {})
    assert list(t["pareto"]) == [True, True, True] and list(t["run_id"][t["knee"]]) == ["r1"]
    assert {"speedup_vs_peer_ci_low", "speedup_vs_peer_ci_high"} <= set(t.columns)
    ref = {"role": "reference", "method": "mixed_paper", "run_id": "ref", "accuracy": 80.0, "speedup_vs_peer": 0.85,
           "pareto": False, "knee": False, "note": ""}
    verdict, why = F.knee_verdict(pd.concat([t, pd.DataFrame([ref])], ignore_index=True), obj, dirs)
    assert verdict == "true" and "speedup_vs_peer differs by 0.05, inside the knee's 95 % interval" in why
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    F._interval_bars(ax, t, "speedup_vs_peer", "accuracy")  # horizontal bars: the speed-up's interval
    assert [tuple(p) for p in ax.collections[0].get_segments()[1]] == [(pytest.approx(0.8), 84), (pytest.approx(1.0), 84)]
