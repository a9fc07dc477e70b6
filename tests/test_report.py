"""The study report from a synthetic MLflow store with known values, the seed arithmetic, method
labels of every conf/method preset, and byte-for-byte determinism of the report files."""
from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from transquant.core.tracking import flatten
from transquant.report import main as report_main
from transquant.run import CONF_DIR
from transquant.studies import report as rp
from transquant.studies import significance as S
from transquant.studies.compare import compare
from transquant.studies.labels import method_defaults, method_label, parse_param, quant_params, slug
from transquant.studies.pareto import best_mask, pareto_mask
from transquant.studies.queries import ReportError, children_frame
from transquant.studies.runs import records_frame, run_record
from transquant.studies.seeds import aggregate, paired_deltas, seed_summary
from transquant.studies.tables import table_accuracy

SEEDS = (1000, 1001, 1002)
FP32 = {1000: 90.0, 1001: 91.0, 1002: 92.0}
N_VAL = 200  # validation examples of the runs that store predictions (FP32, W8A8, PEG K=4 gap)
LABELS = np.arange(N_VAL) % 2


# --- pure arithmetic ----------------------------------------------------------------------------

def test_seed_summary_known_values():
    s = seed_summary([50.0, 60.0, 52.0])
    assert (s.n, s.median, s.min, s.max, s.mean) == (3, 52.0, 50.0, 60.0, 54.0)
    assert s.std == pytest.approx(math.sqrt(((50 - 54) ** 2 + (60 - 54) ** 2 + (52 - 54) ** 2) / 2))
    assert (s.ci_lo, s.ci_hi) == (50.0, 60.0)  # 3 seeds: the bootstrap interval of the median is min-max
    s9 = seed_summary([float(x) for x in range(9)])
    assert 0.0 < s9.ci_lo <= s9.median <= s9.ci_hi < 8.0  # from ~7 seeds it narrows
    assert seed_summary([50.0, 60.0, 52.0]) == s  # fixed bootstrap generator: reproducible
    one = seed_summary([71.5])
    assert (one.n, one.median, one.min, one.max, one.std, one.ci_lo, one.ci_hi) == (1, 71.5, 71.5, 71.5, 0.0, 71.5, 71.5)
    assert seed_summary([1.0, float("nan"), 3.0]).n == 2  # NaN is a missing seed, not a value
    assert seed_summary([]).n == 0 and math.isnan(seed_summary([]).median)
    # Five seeds, one outlier: the median ignores it, the bootstrap interval is a sub-range.
    s5 = seed_summary([80.0, 81.0, 82.0, 83.0, 10.0])
    assert s5.median == 81.0 and s5.min == 10.0 and s5.ci_lo >= 10.0 and s5.ci_hi <= 83.0


def test_aggregate_counts_seeds_not_runs():
    df = pd.DataFrame({"label": ["A", "A", "A", "B"], "seed": [1, 1, 2, 1], "accuracy": [10.0, 20.0, 40.0, 5.0]})
    a = aggregate(df, "label", "accuracy").set_index("label")
    assert a.loc["A", "n"] == 2 and a.loc["A", "median"] == pytest.approx(27.5)  # seed 1 averaged to 15
    assert list(a.index) == ["A", "B"]  # order of first appearance


def test_paired_deltas_and_consistency():
    p = paired_deltas({1: 60.0, 2: 61.0, 3: 70.0}, {1: 50.0, 2: 52.0, 3: 60.0})
    assert (p.n, p.median, p.min, p.max, p.consistent) == (3, 10.0, 9.0, 10.0, True)
    q = paired_deltas({1: 60.0, 2: 49.0}, {1: 50.0, 2: 50.0, 3: 1.0})
    assert q.n == 2 and not q.consistent
    assert not paired_deltas({1: 60.0}, {1: 50.0}).consistent  # one seed never shows consistency


def test_run_record_derives_missing_fp32_accuracy():
    """Runs logged without fp32_accuracy (a pipeline version did that) still get it: fp32 = acc + drop."""
    rec = run_record("r", {"quant.method": "w8a8"}, {"accuracy": 60.0, "accuracy_drop": 20.5}, {})
    assert rec["fp32_accuracy"] == 80.5 and rec["label"] == "W8A8"
    assert run_record("r", {"quant.method": "w8a8"}, {"accuracy": 60.0, "fp32_accuracy": 1.0, "accuracy_drop": 2.0},
                      {})["fp32_accuracy"] == 1.0  # a logged value is never replaced
    df = records_frame([run_record("a", {"quant.method": "w8a8", "train.seed": "1"}, {"accuracy": 60.0}, {})])
    t = table_accuracy(df)  # no drop and no FP32 metric at all: the table still builds
    assert t.iloc[0]["accuracy_median"] == 60.0 and math.isnan(t.iloc[0]["drop_median"])


def test_calibration_size_keys_labels_only_when_runs_differ():
    """Runs calibrated on different numbers of sequences are different rows, never seeds of one
    method; FP32 calibrates nothing; a study of one calibration size keeps its labels."""
    def rec(rid, method, nb, bs):
        params = {"quant.method": method, "train.seed": "1", "calibration.num_batches": str(nb),
                  "calibration.batch_size": str(bs)}
        return run_record(rid, params, {"accuracy": 60.0}, {})

    assert rec("a", "w8a8_paper", 16, 16)["calibration_sequences"] == 256
    assert rec("f", "fp32", 16, 16)["calibration_sequences"] is None
    assert run_record("o", {"quant.method": "w8a8"}, {}, {})["calibration_sequences"] is None  # sizes not logged
    one = records_frame([rec("a", "w8a8_paper", 1, 1), rec("b", "mixed_paper", 1, 1), rec("f", "fp32", 1, 1)])
    assert list(one["label"]) == ["FP32", "W8A8 (paper)", "mixed W8A{8,16} (paper)"]
    many = records_frame([rec("c", "w8a8_paper", 16, 1), rec("a", "w8a8_paper", 1, 1), rec("f", "fp32", 16, 1),
                          rec("d", "w8a8_paper", 4, 4)])
    assert list(many["label"]) == ["FP32", "W8A8 (paper) cal=1", "W8A8 (paper) cal=16", "W8A8 (paper) cal=16"]
    assert list(many["quant_label"]) == ["FP32", *["W8A8 (paper)"] * 3]
    assert aggregate(many, "label", "accuracy")["n"].tolist() == [1, 1, 1]  # 16 x 1 and 4 x 4: one size, one seed


def test_pareto_mask():
    pts = [(90, 3), (91, 5), (89, 4), (91, 5), (80, 0), (85, 0)]
    assert pareto_mask(pts, ["maximize", "minimize"]) == [True, True, False, True, False, True]
    assert pareto_mask([(1.0,), (3.0,), (3.0,)], ["maximize"]) == [False, True, True]
    assert pareto_mask([(1.0,), (3.0,)], ["minimize"]) == [True, False]
    df = pd.DataFrame({"accuracy": [90.0, 95.0, 99.0], "status": ["FINISHED", "FINISHED", "FAILED"]})
    assert best_mask(df, ["accuracy"], ["maximize"]) == [False, True, False]  # failed runs are never best


def test_params_round_trip_and_labels_of_every_method_preset():
    """Each conf/method file composes, logs like the pipeline (flatten) and gets a distinct label."""
    methods = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))
    assert len(methods) == 31  # 21 of the 2026 study + 4 exact paper presets + 6 of the mitigations study
    labels = {}
    with initialize_config_dir(config_dir=CONF_DIR):
        for m in methods:
            params = flatten(compose(config_name="config", overrides=[f"+method={m}"]))
            labels[m] = method_label(quant_params(params))
    assert len(set(labels.values())) == len(methods), labels
    assert labels["fp32"] == "FP32" and labels["w8a8"] == "W8A8" and labels["w32a8"] == "W32A8"
    assert labels["peg_k2_noperm"] == "PEG K=2 contiguous" and labels["peg_k2_perm"] == "PEG K=2 sorted"
    assert labels["peg_k6_gap"] == "PEG K=6 gap" and labels["pct_99_9"] == "percentile p=99.9"
    assert labels["mixed"] == "mixed" and labels["os_plus"] == "OS+" and labels["w8a8_bc"] == "W8A8 +bias-corr"
    assert parse_param("['*.ffn.residual']") == ["*.ffn.residual"] and parse_param("None") is None
    assert method_label({"method": "w8a8", "act_bits": 6}) == "W8A6"
    assert method_label({"method": "mixed", "act_bits": 4}, with_bits=False) == "mixed"
    assert method_label({"method": "w8a8", "act_exclude": ["*.ffn.residual"]}) == "W8A8 excl *.ffn.residual"
    assert slug("PEG K=4 sorted") == "peg_k4_sorted" and re.fullmatch(r"[a-z0-9_.\-/]+", slug(labels["mixed"] + " 16-bit@[*]"))


# --- a synthetic store ----------------------------------------------------------------------------

def qparams(method: str, **kw) -> dict[str, str]:
    """quant.* params exactly as JobRun logs them (str of the resolved Python values)."""
    q = {**method_defaults(method), **kw}
    return {f"quant.{k}": str(v) for k, v in q.items()}


def _correct(acc: float) -> np.ndarray:
    """The first acc % of the validation examples right: a run of lower accuracy is wrong on a superset."""
    return np.arange(N_VAL) < round(acc * N_VAL / 100)


def _with_predictions(metrics: dict) -> tuple[dict, tuple]:
    """Metrics plus the interval metrics a job logs, and the (prediction, label) it stores."""
    ok, fp32_ok = _correct(metrics["accuracy"]), _correct(metrics["fp32_accuracy"])
    return {**metrics, **S.job_metrics(ok, fp32_ok), "eval_examples": N_VAL}, (np.where(ok, LABELS, 1 - LABELS), LABELS)


def _child(client, exp, parent, seed, q: dict, metrics: dict, t0: int, history: dict | None = None,
           tags: dict | None = None, predictions: tuple | None = None, tables: dict | None = None) -> str:
    params = {"train.seed": str(seed), "model.name": "tiny", "task.name": "synthetic", **q}
    run = client.create_run(exp, start_time=t0, tags={"mlflow.parentRunId": parent, "mlflow.runName": q["quant.method"],
                                                      "checkpoint": f"/ckpt/{seed}", "finetune_cache": "hit", **(tags or {})})
    rid = run.info.run_id
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    ms = [Metric(k, float(v), 0, 0) for k, v in metrics.items()]
    for name, values in (history or {}).items():
        ms += [Metric(name, float(v), 0, step) for step, v in enumerate(values)]
    client.log_batch(rid, metrics=ms)
    with tempfile.TemporaryDirectory() as tmp:
        if predictions is not None:
            client.log_artifact(rid, str(S.save_predictions(Path(tmp) / S.PREDICTIONS, *predictions)))
        for name, t in (tables or {}).items():
            t.to_csv(Path(tmp) / name, index=False)
            client.log_artifact(rid, str(Path(tmp) / name))
    client.set_terminated(rid, "FINISHED", end_time=t0 + 2000)
    return rid


def _quantized(fp32, acc, **extra):
    return {"accuracy": acc, "fp32_accuracy": fp32, "accuracy_drop": fp32 - acc, "calibration_seconds": 1.0,
            "eval_seconds": 0.5, **extra}


def new_store(base):
    """A fresh sqlite MLflow store in ``base`` (artifacts beside it, not ./mlruns): (uri, client,
    experiment id, tick), ``tick()`` a clock that advances 10 s per call, so runs order by start time."""
    uri = f"sqlite:///{base}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("transquant", artifact_location=str(base / "artifacts"))
    t = [1_700_000_000_000]

    def tick():
        t[0] += 10_000
        return t[0]
    return uri, client, exp, tick


class CountingClient:
    """An MLflow client stand-in that records each artifact download in ``calls`` and passes it on."""

    def __init__(self, client):
        self.client, self.calls = client, []

    def download_artifacts(self, run_id, path, dst_path):
        self.calls.append((run_id, path))
        return self.client.download_artifacts(run_id, path, dst_path)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    base = tmp_path_factory.mktemp("report_store")
    uri, client, exp, tick = new_store(base)

    # Study "paper": 3 seeds; W8A8 50/60/52, PEG grid, percentile, profile on two methods, depth stats.
    paper = client.create_run(exp, start_time=tick(), tags={"transquant.role": "sweep", "transquant.study": "paper",
                                                            "mlflow.runName": "sweep: +experiment=paper"}).info.run_id
    w8a8 = {1000: 50.0, 1001: 60.0, 1002: 52.0}
    peg = {(2, "contiguous"): 40.0, (2, "sorted"): 70.0, (4, "contiguous"): 45.0, (4, "sorted"): 85.0, (4, "gap"): 88.0}
    for s in SEEDS:
        off = s - 1000  # seed offsets: +0, +1, +2
        m, pred = _with_predictions({"accuracy": FP32[s], "fp32_accuracy": FP32[s], "accuracy_drop": 0.0,
                                     "finetune_seconds": 100.0, "latency_p50_ms": 10.0 + off, "model_size_mb": 90.0})
        _child(client, exp, paper, s, qparams("fp32"), m, tick(),
               history={"kurtosis": [3.0 + off, 30.0 + off, 300.0 + off], "max_abs": [1.0, 10.0, 100.0]},
               tags={"finetune_cache": "miss"}, predictions=pred)
        m, pred = _with_predictions(_quantized(FP32[s], w8a8[s], latency_p50_ms=5.0, model_size_mb=23.0,
                                               speedup_vs_fp32=2.0, speedup_vs_torch_fp32=2.0, speedup_vs_ort_fp32=1.5,
                                               speedup_vs_peer=1.2, engine_code_agreement=0.9995 - off / 10_000,
                                               engine_int8_matmuls=36, engine_float_matmuls=0))
        _child(client, exp, paper, s, qparams("w8a8"), m, tick(), predictions=pred,
               tags={"engine_precision": "W8A8", "fp32_attention": "sdpa"})
        for (k, g), acc in peg.items():
            kw = {"k": k, "permute": g != "contiguous", "grouping": "sorted" if g == "contiguous" else g}
            m, pred = _with_predictions(_quantized(FP32[s], acc + off))
            if (k, g) != (4, "gap"):  # like runs logged before jobs had intervals and stored predictions
                m, pred = _quantized(FP32[s], acc + off), None
            _child(client, exp, paper, s, qparams("peg", **kw), m, tick(), predictions=pred)
        for p, acc in ((99, 70.0), (99.99, 55.0)):
            _child(client, exp, paper, s, qparams("percentile", percentile=p), _quantized(FP32[s], acc + off), tick())
    # Study "loo": one seed, W8A8 base 50, left-float variants.
    loo = client.create_run(exp, start_time=tick(), tags={"transquant.role": "sweep", "mlflow.runName": "sweep: +experiment=loo"}).info.run_id
    client.log_param(loo, "sweep_overrides", "+experiment=loo model=tiny")  # found by its overrides (no study tag)
    for excl, acc in (([], 50.0), (["*.ffn.residual"], 85.0), (["layer.1.ffn.residual"], 70.0), (["embeddings.sum"], 51.0)):
        _child(client, exp, loo, 1000, qparams("w8a8", act_exclude=excl), _quantized(90.0, acc), tick())
    # Study "bits": W8A8 and mixed at 4/8 bits.
    bits = client.create_run(exp, start_time=tick(), tags={"transquant.role": "sweep", "transquant.study": "bits"}).info.run_id
    for m, b, acc in (("w8a8", 4, 30.0), ("w8a8", 8, 50.0), ("mixed", 4, 60.0), ("mixed", 8, 89.0)):
        _child(client, exp, bits, 1000, qparams(m, act_bits=b), _quantized(90.0, acc), tick())
    # Study "pareto": an Optuna search (accuracy max, high_precision_sites min).
    par = client.create_run(exp, start_time=tick(), tags={"transquant.role": "sweep", "transquant.study": "pareto",
                                                          "transquant.sweeper": "optuna",
                                                          "transquant.objectives": "accuracy,high_precision_sites",
                                                          "transquant.directions": "maximize,minimize"}).info.run_id
    trials = {}
    for k, acc, hp in ((2, 80.0, 10), (4, 90.0, 20), (6, 85.0, 30), (3, 70.0, 5)):
        trials[k] = _child(client, exp, par, 1000, qparams("peg", k=k), _quantized(90.0, acc, high_precision_sites=hp), tick())
    # Study "calibration": the exact presets at 1, 16, 256, 1024 sequences (one seed) and FP32.
    cal = client.create_run(exp, start_time=tick(), tags={"transquant.role": "sweep",
                                                          "transquant.study": "calibration"}).info.run_id
    sizes = {"calibration.num_batches": "1", "calibration.batch_size": "1"}
    m, pred = _with_predictions({"accuracy": 90.0, "fp32_accuracy": 90.0, "accuracy_drop": 0.0})
    _child(client, exp, cal, 1000, {**qparams("fp32"), **sizes}, m, tick(), predictions=pred)
    for method, accs in (("w8a8_paper", (50.0, 60.0, 62.0, 63.0)), ("mixed_paper", (88.0, 89.0, 89.5, 89.5)),
                         ("peg_paper", (80.0, 86.0, 88.0, 88.5))):
        for nb, acc in zip((1, 16, 256, 1024), accs):
            m, pred = _with_predictions(_quantized(90.0, acc))
            _child(client, exp, cal, 1000, {**qparams(method), **sizes, "calibration.num_batches": str(nb)}, m,
                   tick(), predictions=pred)
    return {"uri": uri, "client": client, "paper": paper, "calibration": cal, "loo": loo, "bits": bits, "pareto": par, "trials": trials,
            "base": base}


def test_report_tables_from_known_values(synthetic, tmp_path):
    out = rp.report(["paper"], synthetic["uri"], tmp_path / "paper")
    t1 = pd.read_csv(out / "table1_accuracy.csv").set_index("method")
    assert list(t1.index[:2]) == ["FP32", "W8A8"]  # canonical order
    w = t1.loc["W8A8"]
    assert (w.seeds, w.accuracy_median, w.accuracy_min, w.accuracy_max) == (3, 52.0, 50.0, 60.0)
    assert (w.drop_median, w.drop_min, w.drop_max) == (40.0, 31.0, 40.0) and bool(w.drop_consistent_sign)
    assert t1.loc["FP32", "accuracy_median"] == 91.0 and t1.loc["FP32", "drop_median"] == 0.0
    assert t1.loc["PEG K=4 gap", "accuracy_median"] == 89.0  # 88 + seed offsets 0/1/2
    assert len(t1) == 2 + len({"PEG K=2 contiguous", "PEG K=2 sorted", "PEG K=4 contiguous", "PEG K=4 sorted", "PEG K=4 gap"}) + 2

    peg = pd.read_csv(out / "ablation_peg.csv")
    assert list(zip(peg.k, peg.grouping)) == [(2, "contiguous"), (2, "sorted"), (4, "contiguous"), (4, "sorted"), (4, "gap")]
    assert list(peg.accuracy_median) == [41.0, 71.0, 46.0, 86.0, 89.0]
    pct = pd.read_csv(out / "ablation_percentile.csv")
    assert list(pct.percentile) == [99.0, 99.99] and list(pct.accuracy_median) == [71.0, 56.0]
    tex = (out / "ablation_peg.tex").read_text()
    assert "\\toprule" in tex and "41.00 [40.00, 42.00]" in tex
    assert "$\\Delta$ vs FP32" in (out / "table1_accuracy.tex").read_text()

    dep = pd.read_csv(out / "table2_deployment.csv").set_index("method")
    assert dep.loc["FP32", "latency_p50_ms"] == 11.0 and "speedup_vs_fp32" not in dep  # = speedup_vs_torch_fp32
    w = dep.loc["W8A8"]
    assert (w.speedup_vs_torch_fp32, w.speedup_vs_ort_fp32, w.speedup_vs_peer) == (2.0, 1.5, 1.2)
    assert w.engine_code_agreement == pytest.approx(0.9994) and (w.engine_int8_matmuls, w.engine_float_matmuls) == (36, 0)
    assert (w.engine_precision, w.fp32_attention) == ("W8A8", "sdpa") and pd.isna(dep.loc["FP32", "engine_precision"])
    tex = (out / "table2_deployment.tex").read_text()
    for header in ("Speed-up vs PyTorch FP32", "Speed-up vs ORT FP32", "Speed-up vs ORT dynamic INT8",
                   "PyTorch FP32 attention", "0.9994"):
        assert header in tex, header
    depth = pd.read_csv(out / "table3_depth.csv")
    assert list(depth.layer) == [0, 1, 2] and list(depth["kurtosis"]) == [4.0, 31.0, 301.0]  # median over 3 checkpoints
    assert list(depth.max_abs) == [1.0, 10.0, 100.0] and set(depth.checkpoints) == {3}
    timing = pd.read_csv(out / "timing.csv").set_index("metric")
    assert timing.loc["finetune_seconds", "total_seconds"] == 300.0 and timing.loc["finetune_seconds", "jobs"] == 3
    assert timing.loc["fine-tunes (cache misses)", "jobs"] == 3
    assert timing.loc["eval_seconds", "total_seconds"] == pytest.approx(0.5 * 3 * 8)
    for f in ("accuracy_vs_k.png", "accuracy_vs_percentile.png", "depth_stats.png", "report.md", "runs.csv"):
        assert (out / f).is_file(), f
    assert not (out / "ablation_loo.csv").exists() and not (out / "pareto.png").exists()
    assert not (out / "calibration.csv").exists() and not (out / "accuracy_vs_calibration.png").exists()

    # Parent metrics and artifacts.
    client = synthetic["client"]
    m = client.get_run(synthetic["paper"]).data.metrics
    assert m["median_accuracy.w8a8"] == 52.0 and m["min_accuracy.w8a8"] == 50.0 and m["max_accuracy.w8a8"] == 60.0
    assert m["median_accuracy_drop.w8a8"] == 40.0 and m["seeds.peg_k4_gap"] == 3
    arts = {a.path for a in client.list_artifacts(synthetic["paper"], "report")}
    assert {"report/table1_accuracy.csv", "report/table1_accuracy.tex", "report/accuracy_vs_k.png"} <= arts


def test_report_marks_significance_and_per_seed_intervals(synthetic, tmp_path):
    """W8A8 loses 62-80 examples FP32 gets right (significant on every seed); PEG K=4 gap loses 4
    (McNemar p = 2/2^4 = 0.125, not significant); PEG runs without stored intervals stay unmarked."""
    out = rp.report(["paper"], synthetic["uri"], tmp_path / "sig", log=False)
    t1 = pd.read_csv(out / "table1_accuracy.csv").set_index("method")
    w, gap, fp32 = t1.loc["W8A8"], t1.loc["PEG K=4 gap"], t1.loc["FP32"]
    assert w.mcnemar_p_max == pytest.approx(2 * 0.5 ** 62) and (w.significant_seeds, w.tested_seeds) == (3, 3)
    assert bool(w.significant) and not bool(gap.significant) and not bool(fp32.significant)
    assert gap.mcnemar_p_max == pytest.approx(0.125) and gap.significant_seeds == 0 and fp32.mcnemar_p_max == 1.0
    old = t1.loc["PEG K=2 contiguous"]
    assert old.tested_seeds == 0 and math.isnan(old.mcnemar_p_max) and not bool(old.significant)
    tex = (out / "table1_accuracy.tex").read_text()
    assert "40.00 [31.00, 40.00]* & \\textless{}0.001" in tex and "2.00 [2.00, 2.00] & 0.125" in tex
    assert "\\caption{" in tex and "exact McNemar p \\textless{} 0.05" in tex  # the rule, in the caption

    seeds = pd.read_csv(out / "table1_seeds.csv")
    assert len(seeds) == 9 and list(seeds["method"].drop_duplicates()) == ["FP32", "W8A8", "PEG K=4 gap"]
    f = seeds[seeds["method"] == "FP32"]
    assert (f["drop_ci_low"] == 0).all() and (f["drop_ci_high"] == 0).all() and (f["mcnemar_p"] == 1).all()
    r = seeds[(seeds["method"] == "W8A8") & (seeds["seed"] == 1001)].iloc[0]
    assert (r.accuracy_ci_low, r.accuracy_ci_high) == pytest.approx(S.accuracy_ci(_correct(60.0)))
    assert r.mcnemar_p == pytest.approx(2 * 0.5 ** 62) and bool(r.significant) and r.accuracy_drop == 31.0
    assert r.drop_ci_low > 0 and r.accuracy_ci_low < 60.0 < r.accuracy_ci_high
    tex = (out / "table1_seeds.tex").read_text()
    assert "60.00 [" in tex and "\\caption{" in tex
    md = (out / "report.md").read_text()
    assert "Table I per seed" in md and S.RULE in md


def test_compare_two_methods_from_stored_predictions(synthetic, capsys):
    client = synthetic["client"]
    df = children_frame(client, [synthetic["paper"]])
    t = compare(client, "W8A8", "FP32", df)
    assert list(t["seed"]) == ["1000", "1001", "1002"] and list(t["examples"]) == [N_VAL] * 3
    assert list(t["difference"]) == pytest.approx([-40.0, -31.0, -40.0])
    assert list(t["only_a"]) == [0, 0, 0] and list(t["only_b"]) == [80, 62, 80]
    assert list(t["mcnemar_p"]) == pytest.approx([2 * 0.5 ** 80, 2 * 0.5 ** 62, 2 * 0.5 ** 80])
    assert (t["difference_ci_high"] < 0).all() and t["significant"].all()
    with pytest.raises(ReportError, match="no predictions.npz"):
        compare(client, "PEG K=4 sorted", "FP32", df)

    by_id = df.set_index(["label", "seed"])["run_id"]
    w, f = by_id[("W8A8", 1002)], by_id[("FP32", 1002)]
    assert report_main([f"report.compare=[{f},{w}]", f"tracking.uri={synthetic['uri']}"]) == 0  # two run ids: no study
    out = capsys.readouterr().out
    assert "A = FP32" not in out and "40.00 [" in out and "| 80 | 0 |" in out
    assert report_main(["report.compare=[W8A8,FP32]", f"tracking.uri={synthetic['uri']}"]) == 2
    assert "needs a study" in capsys.readouterr().err
    assert report_main(["paper", "report.compare=[W8A8,W8A9]", f"tracking.uri={synthetic['uri']}"]) == 2
    assert "no finished run of this method" in capsys.readouterr().err


def test_report_calibration_study(synthetic, tmp_path):
    """Accuracy by calibration sequences: one row per size (never pooled as seeds), its interval,
    the drop marked where McNemar says so, and the figure."""
    out = rp.report(["calibration"], synthetic["uri"], tmp_path / "cal")
    t = pd.read_csv(out / "calibration.csv")
    assert list(t["method"].drop_duplicates()) == ["W8A8 (paper)", "mixed W8A{8,16} (paper)", "PEG K=6 sorted (paper)"]
    assert list(t["sequences"]) == [1, 16, 256, 1024] * 3
    r = t[(t["method"] == "W8A8 (paper)") & (t["sequences"] == 16)].iloc[0]
    assert (r.accuracy, r.accuracy_drop) == (60.0, 30.0) and bool(r.significant)
    assert (r.accuracy_ci_low, r.accuracy_ci_high) == pytest.approx(S.accuracy_ci(_correct(60.0)))
    m = t[t["method"] == "mixed W8A{8,16} (paper)"].set_index("sequences")
    assert m.loc[1024, "mcnemar_p"] == 1.0 and not bool(m.loc[1024, "significant"])  # one example lost
    tex = (out / "calibration.tex").read_text()
    lo, hi = S.accuracy_ci(_correct(60.0))
    assert "1 seq. & 16 seq. & 256 seq. & 1024 seq." in tex and f"60.00 [{lo:.2f}, {hi:.2f}] / 30.00*" in tex
    assert "& 89.50 [" in tex and "/ 0.50 \\\\" in tex and "\\caption{" in tex
    t1 = pd.read_csv(out / "table1_accuracy.csv").set_index("method")
    assert t1.loc["W8A8 (paper) cal=16", "accuracy_median"] == 60.0 and set(t1["seeds"]) == {1}
    assert len(t1) == 1 + 12 and "FP32" in t1.index
    assert synthetic["client"].get_run(synthetic["calibration"]).data.metrics["median_accuracy.w8a8_paper_cal1024"] == 63.0
    assert (out / "accuracy_vs_calibration.png").is_file()
    assert "Calibration set size" in (out / "report.md").read_text()


def test_report_loo_and_bits(synthetic, tmp_path):
    out = rp.report(["loo", "bits"], synthetic["uri"], tmp_path / "lb")
    loo = pd.read_csv(out / "ablation_loo.csv", keep_default_na=False)
    assert list(loo.left_float) == ["(none: all quantized)", "embeddings.sum", "*.ffn.residual", "layer.1.ffn.residual"]
    assert list(loo.recovery_median.astype(float)) == [0.0, 1.0, 35.0, 20.0]
    assert list(loo.drop_median.astype(float)) == [40.0, 39.0, 5.0, 20.0]
    bits = pd.read_csv(out / "ablation_bits.csv")
    assert list(zip(bits.family, bits.act_bits, bits.accuracy_median)) == [
        ("W8A*", 4, 30.0), ("W8A*", 8, 50.0), ("mixed", 4, 60.0), ("mixed", 8, 89.0)]
    assert (out / "accuracy_vs_bits.png").is_file()
    client = synthetic["client"]
    bits_metrics = client.get_run(synthetic["bits"]).data.metrics  # each parent: its own methods only
    assert bits_metrics["median_accuracy.w8a4"] == 30.0 and not any("excl" in k for k in bits_metrics)
    assert "median_accuracy.w8a8_excl_x.ffn.residual" in client.get_run(synthetic["loo"]).data.metrics
    arts = {a.path for a in client.list_artifacts(synthetic["bits"])}
    assert "report-loo-bits" in arts and "report" not in arts  # a multi-study report never overwrites report/
    # No job of these studies logged statistics: Table III comes from another run of the same
    # checkpoint (paper's FP32 job of seed 1000), since FP32 statistics depend on the checkpoint only.
    depth = pd.read_csv(out / "table3_depth.csv")
    assert list(depth["kurtosis"]) == [3.0, 30.0, 300.0] and set(depth["checkpoints"]) == {1}


def test_search_best_and_pareto_tags(synthetic, tmp_path):
    out = rp.report([synthetic["pareto"]], synthetic["uri"], tmp_path / "par")  # by parent run id
    client, trials = synthetic["client"], synthetic["trials"]
    tags = {k: client.get_run(r).data.tags for k, r in trials.items()}
    assert {k for k, t in tags.items() if t.get("transquant.pareto") == "true"} == {2, 4, 3}  # K=6 is dominated by K=4
    assert tags[6].get("transquant.best") != "true" and tags[4]["transquant.best"] == "true"
    s = pd.read_csv(out / "search_trials.csv")
    assert list(s.k) == [2, 4, 6, 3] and list(s.pareto) == [True, True, False, True]
    assert (out / "pareto.png").is_file()
    assert set(client.get_run(synthetic["pareto"]).data.tags["transquant.best_run_id"].split(",")) == {trials[k] for k in (2, 4, 3)}


def test_report_is_deterministic(synthetic, tmp_path):
    client = synthetic["client"]
    old = tmp_path / "old_table.csv"
    old.write_text("from an earlier report\n")
    client.log_artifact(synthetic["paper"], str(old), "report")
    a = rp.report(["paper"], synthetic["uri"], tmp_path / "a")
    arts = {Path(x.path).name for x in client.list_artifacts(synthetic["paper"], "report")}
    assert arts == {p.name for p in a.iterdir()}  # the artifact folder mirrors the report: no stale file
    b = rp.report(["paper"], synthetic["uri"], tmp_path / "b", log=False)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len(files) > 10
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    text = "".join((a / f).read_text() for f in files if not f.endswith(".png"))
    assert not re.search(r"20\d\d-\d\d-\d\d", text)  # no dates in the files


def test_report_cli_unknown_study(synthetic, capsys):
    assert report_main(["nosuch", f"tracking.uri={synthetic['uri']}", "report.log=false"]) == 2
    err = capsys.readouterr().err
    assert "study 'nosuch'" in err and "paper" in err  # lists the known studies


# --- the mitigations study: method x bits x weight granularity -------------------------------------

MIT_FP32 = {1000: 90.0, 1001: 91.0}
# (method, bits, granularity) -> accuracy per seed; min-max (w8a8) on two seeds, SmoothQuant on one.
MIT_ACC = {("w8a8", "W8A8", "tensor"): {1000: 80.0, 1001: 82.0}, ("w8a8", "W8A8", "channel"): {1000: 85.0, 1001: 86.0},
           ("w8a8", "W4A8", "tensor"): {1000: 40.0, 1001: 44.0}, ("w8a8", "W4A8", "channel"): {1000: 70.0, 1001: 73.0},
           ("smoothquant", "W8A8", "tensor"): {1000: 88.0}, ("smoothquant", "W8A8", "channel"): {1000: 89.0},
           ("smoothquant", "W4A8", "tensor"): {1000: 60.0}, ("smoothquant", "W4A8", "channel"): {1000: 71.0}}
# Site kind -> (max_abs, kurtosis) per layer, as the statistics tables hold them.
FP32_STATS = {"attn_norm": ([4.0, 8.0], [3.0, 30.0]), "ffn_residual": ([10.0, 100.0], [5.0, 300.0])}
# After SmoothQuant: at W4A8 the ffn residual sums come out flatter than at W8A8 (the numbers only need to differ).
TRANSFORMED = {"W8A8": {"attn_norm": ([2.0, 2.0], [3.0, 6.0]), "ffn_residual": ([5.0, 20.0], [4.0, 30.0])},
               "W4A8": {"attn_norm": ([2.0, 2.0], [3.0, 6.0]), "ffn_residual": ([5.0, 10.0], [4.0, 15.0])}}


def _stats_table(stats: dict) -> pd.DataFrame:
    """``activation_stats.csv`` as a job writes it, for the kinds of ``stats`` (an embedding sum outside the layers)."""
    rows = [{"site": "embeddings.sum", "kind": "embedding_sum", "layer": None, "max_abs": 1.0, "kurtosis": 3.0}]
    rows += [{"site": f"layer.{i}.{kind}", "kind": kind, "layer": i, "max_abs": m, "kurtosis": k}
             for kind, (max_abs, kurt) in stats.items() for i, (m, k) in enumerate(zip(max_abs, kurt))]
    return pd.DataFrame(rows).astype({"layer": "Int64"})


@pytest.fixture(scope="module")
def mitigations_store(tmp_path_factory):
    base = tmp_path_factory.mktemp("mitigations_store")
    uri, client, exp, tick = new_store(base)

    parent = client.create_run(exp, start_time=tick(), tags={"transquant.role": "sweep", "transquant.study": "mitigations",
                                                             "mlflow.runName": "sweep: +experiment=mitigations"}).info.run_id
    runs = {}
    for (method, bits, gran), accs in reversed(MIT_ACC.items()):  # logged out of table order
        wb, ab = int(bits[1]), int(bits[3])
        for seed, acc in accs.items():
            off = seed - 1000
            extra = {"transform_seconds": 7.0 + off} if method == "smoothquant" else {}
            m, pred = _with_predictions(_quantized(MIT_FP32[seed], acc, calibration_seconds=1.0 + off
                                                   if method == "w8a8" else 3.0, **extra))
            if (method, bits, gran) == ("smoothquant", "W8A8", "tensor"):
                pred = None  # intervals logged, predictions not stored: nothing to pair with
            tables = {"activation_stats.csv": _stats_table(FP32_STATS)}
            if method == "smoothquant":
                tables["activation_stats_transformed.csv"] = _stats_table(TRANSFORMED[bits])
            runs[(method, bits, gran, seed)] = _child(
                client, exp, parent, seed, qparams(method, weight_bits=wb, act_bits=ab, weight_granularity=gran), m,
                tick(), predictions=pred, tables=tables)
    return {"uri": uri, "client": client, "parent": parent, "runs": runs}


def test_mitigation_labels_leave_out_bits_and_granularity():
    def rec(method, **kw):
        return run_record("r", qparams(method, **kw), {"accuracy": 1.0}, {})

    r = rec("w8a8", weight_bits=4, act_bits=8, weight_granularity="channel", bias_correction=True)
    assert (r["label"], r["mitigation"], r["bits"], r["weight_granularity"]) == (
        "W4A8 w/channel +bias-corr", "min-max +bias-corr", "W4A8", "channel")
    assert rec("peg_paper", weight_bits=6, act_bits=6)["mitigation"] == "PEG K=6 sorted (paper)"
    assert rec("mixed_paper", weight_bits=4)["mitigation"] == "mixed W8A{8,16} (paper)"
    assert rec("smoothquant")["transform"] == "smoothquant" and rec("w8a8")["transform"] == "none"
    f = rec("fp32")
    assert f["bits"] is None and f["weight_granularity"] is None


def test_report_mitigations_tables(mitigations_store, tmp_path):
    out = rp.report(["mitigations"], mitigations_store["uri"], tmp_path / "mit", log=False)
    t = pd.read_csv(out / "mitigations.csv", keep_default_na=False, na_values=[""])
    assert list(zip(t.bits, t.method, t.weight_granularity)) == [
        ("W8A8", "min-max", "tensor"), ("W8A8", "min-max", "channel"), ("W8A8", "SmoothQuant", "tensor"),
        ("W8A8", "SmoothQuant", "channel"), ("W4A8", "min-max", "tensor"), ("W4A8", "min-max", "channel"),
        ("W4A8", "SmoothQuant", "tensor"), ("W4A8", "SmoothQuant", "channel")]
    r = t.iloc[0]  # min-max W8A8 per tensor: 80 / 82 of FP32 90 / 91
    assert (r.seeds, r.accuracy_median, r.accuracy_min, r.accuracy_max) == (2, 81.0, 80.0, 82.0)
    assert (r.drop_median, r.drop_min, r.drop_max, r.fp32_accuracy_median) == (9.5, 9.0, 10.0, 90.5)
    assert math.isnan(r.accuracy_ci_low) and (r.significant_seeds, r.tested_seeds) == (2, 2)
    assert r.calibration_seconds_median == 1.5 and math.isnan(r.transform_seconds_median)  # no transform
    s = t.iloc[2]  # SmoothQuant W8A8 per tensor, one seed: its interval; drop 2 points = 4 examples, p = 0.125
    assert (s.seeds, s.accuracy_median, s.drop_median) == (1, 88.0, 2.0)
    assert (s.accuracy_ci_low, s.accuracy_ci_high) == pytest.approx(S.accuracy_ci(_correct(88.0)))
    assert (s.significant_seeds, s.tested_seeds) == (0, 1) and s.mcnemar_p_max == pytest.approx(0.125)
    assert s.calibration_seconds_median == 3.0 and s.transform_seconds_median == 7.0
    tex = (out / "mitigations.tex").read_text()
    lo, hi = S.accuracy_ci(_correct(88.0))
    assert "81.00 [80.00, 82.00]" in tex and "9.50 [9.00, 10.00]* & 2/2" in tex
    assert f"88.00 [{lo:.2f}, {hi:.2f}]" in tex and "per channel" in tex and "\\caption{" in tex

    p = pd.read_csv(out / "mitigations_pivot.csv")
    assert list(p.columns) == ["method", "W8A8 tensor", "W8A8 channel", "W4A8 tensor", "W4A8 channel"]
    assert list(p.method) == ["min-max", "SmoothQuant"]
    assert p.iloc[0, 1:].tolist() == [81.0, 85.5, 42.0, 71.5] and p.iloc[1, 1:].tolist() == [88.0, 89.0, 60.0, 71.0]

    b = pd.read_csv(out / "best_per_bits.csv", keep_default_na=False)
    assert list(zip(b.bits, b.weight_granularity, b.best)) == [
        ("W8A8", "tensor", "SmoothQuant"), ("W8A8", "channel", "SmoothQuant"), ("W4A8", "tensor", "SmoothQuant"),
        ("W4A8", "channel", "min-max")]
    assert list(b.best_accuracy_median) == [88.0, 89.0, 60.0, 71.5] and list(b.methods) == [2] * 4
    # W8A8 tensor: the best stored no predictions; W8A8 channel: 4 points = 8 examples (p = 0.008);
    # W4A8 channel: SmoothQuant is 1 point *above* min-max on the one seed they share: not below it.
    assert list(b.untested) == ["min-max", "", "", ""]
    assert list(b.significantly_below_best) == [0, 1, 1, 0]
    assert list(b.not_significantly_below_best) == ["", "", "", "SmoothQuant"]

    e = pd.read_csv(out / "transform_effect.csv")
    runs = mitigations_store["runs"]
    assert list(e.run_id) == [runs[("smoothquant", b_, g, 1000)] for b_ in ("W8A8", "W4A8") for g in ("tensor", "channel")
                              for _ in range(2)]
    assert list(e.kind) == ["attn_norm", "ffn_residual"] * 4 and set(e.layers) == {2} and set(e["transform"]) == {"smoothquant"}
    ffn = e[e.kind == "ffn_residual"]
    assert list(ffn.max_abs_before) == [100.0] * 4 and list(ffn.max_abs_after) == [20.0, 20.0, 10.0, 10.0]
    assert list(ffn.max_abs_ratio) == pytest.approx([0.2, 0.2, 0.1, 0.1])
    assert list(ffn.kurtosis_before) == [300.0] * 4 and list(ffn.kurtosis_ratio) == pytest.approx([0.1, 0.1, 0.05, 0.05])
    attn = e[e.kind == "attn_norm"].iloc[0]
    assert (attn.max_abs_before, attn.max_abs_after, attn.kurtosis_before, attn.kurtosis_after) == (8.0, 2.0, 30.0, 6.0)

    assert (out / "accuracy_vs_bits_methods.png").is_file()
    assert not (out / "finetune_outliers.csv").exists()  # one fine-tune variant (the default): nothing to compare
    md = (out / "report.md").read_text()
    assert "Best method per bit setting" in md and "What each transform did" in md
    again = rp.report(["mitigations"], mitigations_store["uri"], tmp_path / "again", log=False)
    for f in ("mitigations.csv", "mitigations.tex", "best_per_bits.csv", "transform_effect.csv",
              "accuracy_vs_bits_methods.png", "report.md"):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f


def test_transform_frame_reads_each_table_once(mitigations_store):
    """Each transform run's transformed statistics table is downloaded once, the FP32 one once per checkpoint."""
    from transquant.studies.queries import transform_frame

    client = mitigations_store["client"]
    counting = CountingClient(client)
    calls = counting.calls

    df = children_frame(client, [mitigations_store["parent"]])
    tf = transform_frame(counting, df)
    assert len(calls) == len(set(calls)) == 4 + 1  # 4 SmoothQuant runs, one checkpoint
    assert [p for _, p in calls].count("activation_stats.csv") == 1
    assert set(tf["when"]) == {"before", "after"} and tf["run_id"].nunique() == 4
    assert set(tf["kind"]) == {"attn_norm", "ffn_residual"}  # the embedding sum is no transform kind


def test_report_without_mitigation_runs_writes_none_of_their_tables(synthetic, tmp_path):
    out = rp.report(["paper", "loo", "bits", "calibration"], synthetic["uri"], tmp_path / "none", log=False)
    for name in ("mitigations", "mitigations_pivot", "best_per_bits", "transform_effect", "finetune_outliers"):
        assert not (out / f"{name}.csv").exists() and not (out / f"{name}.tex").exists(), name
    assert not (out / "accuracy_vs_bits_methods.png").exists() and (out / "table1_accuracy.csv").is_file()


def test_mitigations_experiment_jobs_are_distinct_cells_in_canonical_order():
    """Every job of +experiment=mitigations is its own (bits, granularity, method) cell, with the
    method named without its widths; the table's method order is the canonical one (a family's
    exact paper preset first)."""
    from omegaconf import OmegaConf

    from transquant.studies.tables import method_order, table_mitigations

    sweep = OmegaConf.load(Path(CONF_DIR) / "experiment" / "mitigations.yaml").hydra.sweeper.params
    methods, bits = sweep["+method"].split(","), sweep["+bits"].split(",")
    grans = sweep["quant.weight_granularity"].split(",")
    records = []
    with initialize_config_dir(config_dir=CONF_DIR):
        for m in methods:
            for b in bits:
                for g in grans:
                    cfg = compose(config_name="config", overrides=[f"+method={m}", f"+bits={b}",
                                                                   f"quant.weight_granularity={g}"])
                    records.append(run_record(f"{m}-{b}-{g}", {**flatten(cfg), "train.seed": "1000"},
                                              {"accuracy": 50.0}, {}))
    df = records_frame(records)
    t = table_mitigations(df)
    assert len(t) == len(methods) * len(bits) * len(grans) == 80
    assert list(dict.fromkeys(t["bits"])) == ["W8A8", "W8A6", "W6A6", "W4A8"]
    assert method_order(df) == ["min-max", "min-max +bias-corr", "mixed W8A{8,16} (paper)",
                                "PEG K=6 sorted (paper)", "PEG K=2 gap", "MSE", "dynamic", "SmoothQuant", "OS", "OS+"]
    assert list(t["method"][:20]) == [m for m in method_order(df) for _ in grans]
    assert set(df.loc[df["transform"] != "none", "mitigation"]) == {"SmoothQuant", "OS", "OS+"}
