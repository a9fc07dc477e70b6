"""Error bars and paired tests against closed forms, predictions in validation order, and one
real job pair on the tiny model: logged intervals, stored predictions and ``report --compare``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy.special import comb

from transquant.report import main as report_main
from transquant.studies import significance as S
from transquant.studies.compare import compare
from transquant.train.evaluate import length_order, predictions

from .conftest import run_cli, tiny_bert


def _pair(n: int, only_a: int, only_b: int, both: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of two runs with the given counts of discordant and concordant-right examples."""
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:only_a] = True
    b[only_a:only_a + only_b] = True
    a[only_a + only_b:only_a + only_b + both] = b[only_a + only_b:only_a + only_b + both] = True
    perm = np.random.default_rng(1).permutation(n)  # order must not matter
    return a[perm], b[perm]


@pytest.mark.parametrize("only_a, only_b", [(10, 2), (2, 10), (5, 5), (0, 7), (30, 12)])
def test_mcnemar_exact_closed_form(only_a, only_b):
    m = only_a + only_b
    expected = min(1.0, 2 * sum(comb(m, k, exact=True) for k in range(min(only_a, only_b) + 1)) / 2 ** m)
    a, b = _pair(100, only_a, only_b, 50)
    assert S.mcnemar_p(a, b) == pytest.approx(expected, rel=1e-9)
    assert S.mcnemar_p(b, a) == pytest.approx(expected, rel=1e-9)  # two-sided: symmetric
    assert S.mcnemar_p(*_pair(100, 10, 2, 0)) == pytest.approx(158 / 4096)  # by hand: 2 * (1 + 12 + 66) / 2^12


def test_accuracy_ci_width_is_the_normal_one_for_large_n():
    n, k = 2824, 2259  # 80 %: the offline default's size
    correct = np.zeros(n, bool)
    correct[:k] = True
    lo, hi = S.accuracy_ci(correct)
    p = k / n
    half = 1.96 * math.sqrt(p * (1 - p) / n) * 100
    assert hi - lo == pytest.approx(2 * half, rel=0.08)  # ~1.5 points: the ±0.75 of the brief
    assert lo < 100 * p < hi and abs((lo + hi) / 2 - 100 * p) < 0.15
    assert S.accuracy_ci(correct) == (lo, hi)  # seeded: the same predictions give the same interval
    assert S.accuracy_ci(np.ones(10, bool)) == (100.0, 100.0)


def test_shortcut_bootstrap_equals_resampling_examples():
    """Counts drawn from the multinomial vs indices drawn with replacement: the same distribution."""
    a, b = _pair(500, 60, 25, 300)
    idx = np.random.default_rng(7).integers(0, a.size, size=(8000, a.size))
    direct = 100.0 * (a[idx].mean(1) - b[idx].mean(1))
    lo, hi = S.difference_ci(a, b, n_boot=8000)
    sd = direct.std()
    assert abs(lo - np.quantile(direct, 0.025)) < 0.2 * sd and abs(hi - np.quantile(direct, 0.975)) < 0.2 * sd
    acc = 100.0 * a[idx].mean(1)
    alo, ahi = S.accuracy_ci(a, n_boot=8000)
    assert abs(alo - np.quantile(acc, 0.025)) < 0.2 * acc.std() and abs(ahi - np.quantile(acc, 0.975)) < 0.2 * acc.std()


def test_paired_difference_interval_closed_form():
    n, only_a, only_b = 2824, 120, 60
    a, b = _pair(n, only_a, only_b, 2000)
    d = S.paired(a, b)
    assert (d.n, d.only_a, d.only_b) == (n, only_a, only_b)
    assert d.difference == pytest.approx(100 * (only_a - only_b) / n)
    # var of the per-example difference in {-1, 0, 1}: (b+c)/n - ((b-c)/n)^2
    sd = 100 * math.sqrt(((only_a + only_b) / n - ((only_a - only_b) / n) ** 2) / n)
    assert d.ci_low == pytest.approx(d.difference - 1.96 * sd, abs=0.1 * sd)
    assert d.ci_high == pytest.approx(d.difference + 1.96 * sd, abs=0.1 * sd)
    assert d.ci_low > 0 and d.significant  # 120 vs 60 discordant: a real difference
    # Pairing removes the shared examples' variance: far narrower than the two marginal intervals combined.
    unpaired = 1.96 * math.hypot(*(100 * math.sqrt(p * (1 - p) / n) for p in (a.mean(), b.mean())))
    assert d.ci_high - d.ci_low < 0.6 * 2 * unpaired
    r = S.paired(b, a)
    assert (r.ci_low, r.ci_high) == pytest.approx((-d.ci_high, -d.ci_low), abs=1e-9) and r.p == d.p


def test_identical_predictions_no_difference():
    a, _ = _pair(300, 40, 0, 200)
    d = S.paired(a, a)
    assert (d.difference, d.ci_low, d.ci_high, d.p, d.significant) == (0.0, 0.0, 0.0, 1.0, False)
    m = S.job_metrics(a, a)  # an FP32 job against its own predictions
    assert (m["drop_ci_low"], m["drop_ci_high"], m["mcnemar_p"]) == (0.0, 0.0, 1.0)
    assert (m["accuracy_ci_low"], m["accuracy_ci_high"]) == S.accuracy_ci(a)
    fp32, quantized = _pair(200, 4, 0, 100)  # FP32 alone right on 4 examples: a 2-point drop
    m = S.job_metrics(quantized, fp32)
    assert m["mcnemar_p"] == pytest.approx(2 / 2 ** 4)  # not significant
    assert 0 <= m["drop_ci_low"] <= 2.0 <= m["drop_ci_high"]


def test_unpaired_inputs_refused():
    with pytest.raises(ValueError, match="same examples"):
        S.paired(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="no examples"):
        S.accuracy_ci([])


def test_predictions_file_round_trip(tmp_path):
    pred, label = np.array([1, 0, 1, 1]), np.array([1, 1, 0, 1])
    f = S.save_predictions(tmp_path / S.PREDICTIONS, pred, label)
    got_pred, got_label = S.load_predictions(f)
    assert got_pred.tolist() == pred.tolist() and got_label.tolist() == label.tolist()
    with np.load(f) as z:
        assert z["index"].tolist() == [0, 1, 2, 3]
    np.savez_compressed(tmp_path / "shuffled.npz", index=[2, 0, 3, 1], label=[0, 1, 1, 1], prediction=[1, 1, 1, 0])
    assert S.load_predictions(tmp_path / "shuffled.npz")[0].tolist() == [1, 0, 1, 1]  # by index, not by row
    with pytest.raises(ValueError, match="1-D"):
        S.save_predictions(tmp_path / "bad.npz", [1, 0], [1])


def test_predictions_in_validation_order():
    """original_order undoes the length sort: labels come back as the items hold them."""
    g = torch.Generator().manual_seed(3)
    items = []
    for i in range(23):
        n = int(torch.randint(3, 14, (1,), generator=g))
        items.append({"input_ids": torch.randint(1, 100, (n,), generator=g).tolist(), "token_type_ids": [0] * n,
                      "attention_mask": [1] * n, "labels": i % 2})
    model = tiny_bert()
    order = length_order(items)
    assert order != list(range(len(items)))  # the test needs a real permutation
    sorted_pred, sorted_true = predictions(model, items, 4, 0, torch.device("cpu"))
    pred, true = predictions(model, items, 4, 0, torch.device("cpu"), original_order=True)
    assert true.tolist() == [i % 2 for i in range(len(items))]
    assert sorted_true.tolist() == [items[i]["labels"] for i in order]
    assert torch.equal(pred[order], sorted_pred)


FAST = ["model=tiny", "task=synthetic", "train=quick", "train.max_length=32", "task.synthetic_train_size=64",
        "task.synthetic_eval_size=64", "calibration.num_batches=2", "calibration.batch_size=8", "hardware.threads=1",
        "stats.enabled=false", "profile.enabled=false"]


def test_jobs_log_intervals_predictions_and_compare(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = run_cli("-m", "quant=fp32,w8a8", *FAST, f"tracking.uri={uri}",
                  f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'multirun'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("transquant").experiment_id])
    jobs = {r.data.params["quant.method"]: r for r in runs if "quant.method" in r.data.params}
    for method, run in jobs.items():
        m = run.data.metrics
        assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
        assert m["drop_ci_low"] <= m["accuracy_drop"] <= m["drop_ci_high"]
        pred, label = S.load_predictions(client.download_artifacts(run.info.run_id, S.PREDICTIONS, str(tmp_path)))
        assert label.tolist() == [i % 2 for i in range(64)]  # the synthetic split's labels, in its own order
        assert 100 * (pred == label).mean() == pytest.approx(m["accuracy"])
    fp32 = jobs["fp32"].data.metrics
    assert (fp32["drop_ci_low"], fp32["drop_ci_high"], fp32["mcnemar_p"]) == (0.0, 0.0, 1.0)
    cached = list((tmp_path / "cache").rglob("*.eval/*.json"))
    assert len(cached) == 1  # FP32 predictions computed once, cached beside the checkpoint

    # The report's comparison from the stored predictions agrees with what the job logged.
    w, f = jobs["w8a8"].info.run_id, jobs["fp32"].info.run_id
    t = compare(client, f, w)
    assert t.iloc[0]["difference"] == pytest.approx(jobs["w8a8"].data.metrics["accuracy_drop"])
    assert t.iloc[0]["mcnemar_p"] == pytest.approx(jobs["w8a8"].data.metrics["mcnemar_p"])
    parent = next(r for r in runs if r.data.tags.get("transquant.role") == "sweep").info.run_id
    assert report_main([parent, "report.compare=[FP32,W8A8]", f"tracking.uri={uri}"]) == 0
    out = capsys.readouterr().out
    assert "McNemar p" in out and "A = FP32, B = W8A8" in out and S.RULE in out
    assert report_main([parent, "report.compare=[FP32,W9A9]", f"tracking.uri={uri}"]) == 2
    assert "no finished run of this method" in capsys.readouterr().err
