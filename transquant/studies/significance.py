"""Error bars for accuracies measured on one validation set, and paired comparisons of two runs.

An accuracy p on n examples has a standard error near sqrt(p(1-p)/n): about ±0.75 point at
n = 2,824 and p = 0.8. Every function takes per-example correctness in the validation set's own
order, so two runs on the same examples are compared example by example (a paired comparison is
much tighter than two overlapping intervals).

Resampling n examples with replacement changes only how many examples fall into each outcome, so
the bootstrap draws those counts directly (binomial, multinomial): the same distribution as
resampling indices, without an n_boot x n index matrix. At 0 % or 100 % the accuracy interval has
zero width (every resample is the same); few discordant pairs make the bootstrap interval of a
difference unreliable, which is why significance is judged by the exact McNemar test.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

N_BOOT = 2000
LEVEL = 0.95
SEED = 0  # fixed: the same predictions always give the same interval
ALPHA = 0.05
RULE = "exact McNemar p < 0.05 (two-sided, paired on the same validation examples)"
PREDICTIONS = "predictions.npz"


def _bools(correct) -> np.ndarray:
    c = np.asarray(correct, dtype=bool).ravel()
    if c.size == 0:
        raise ValueError("significance: no examples")
    return c


def _pair(correct_a, correct_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _bools(correct_a), _bools(correct_b)
    if a.size != b.size:
        raise ValueError(f"significance: {a.size} vs {b.size} examples; a paired comparison needs the same examples")
    return a, b


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def accuracy_ci(correct, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of an accuracy (percent) from per-example correctness."""
    c = _bools(correct)
    draws = np.random.default_rng(seed).binomial(c.size, c.mean(), size=n_boot)
    return _interval(100.0 * draws / c.size, level)


def difference_ci(correct_a, correct_b, n_boot: int = N_BOOT, level: float = LEVEL,
                  seed: int = SEED) -> tuple[float, float]:
    """Paired percentile-bootstrap interval of accuracy(a) - accuracy(b) (points), same examples resampled for both."""
    a, b = _pair(correct_a, correct_b)
    n = a.size
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    small, large = sorted((only_a, only_b))  # the same draws either way round: b vs a mirrors a vs b exactly
    counts = np.random.default_rng(seed).multinomial(n, [small / n, large / n, (n - small - large) / n], size=n_boot)
    sign = 1.0 if only_a <= only_b else -1.0
    return _interval(sign * 100.0 * (counts[:, 0] - counts[:, 1]) / n, level)


def mcnemar_p(correct_a, correct_b) -> float:
    """Exact McNemar test: two-sided binomial test (1/2) of the discordant pairs; 1 when there are none."""
    a, b = _pair(correct_a, correct_b)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


@dataclass(frozen=True)
class Paired:
    """Run a against run b on the same examples (accuracies and difference in percent / points)."""
    n: int
    accuracy_a: float
    accuracy_b: float
    only_a: int          # examples a gets right and b wrong
    only_b: int
    difference: float    # accuracy_a - accuracy_b
    ci_low: float
    ci_high: float
    p: float             # exact McNemar

    @property
    def significant(self) -> bool:
        return self.p < ALPHA


def paired(correct_a, correct_b, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = SEED) -> Paired:
    a, b = _pair(correct_a, correct_b)
    lo, hi = difference_ci(a, b, n_boot, level, seed)
    return Paired(int(a.size), 100.0 * a.mean(), 100.0 * b.mean(), int((a & ~b).sum()), int((~a & b).sum()),
                  100.0 * (a.mean() - b.mean()), lo, hi, mcnemar_p(a, b))


def job_metrics(correct, fp32_correct) -> dict[str, float]:
    """What every job logs: its accuracy interval and, paired with FP32, the drop's interval and McNemar p."""
    lo, hi = accuracy_ci(correct)
    vs = paired(fp32_correct, correct)  # drop = fp32 - accuracy
    return {"accuracy_ci_low": lo, "accuracy_ci_high": hi, "drop_ci_low": vs.ci_low, "drop_ci_high": vs.ci_high,
            "mcnemar_p": vs.p}


def save_predictions(path: str | Path, prediction, label) -> Path:
    """Per-example predictions, ``index`` = position in the validation split, so any two runs align."""
    prediction, label = np.asarray(prediction, dtype=np.int32), np.asarray(label, dtype=np.int32)
    if prediction.shape != label.shape or prediction.ndim != 1:
        raise ValueError(f"predictions: shapes {prediction.shape} and {label.shape}; expected two equal 1-D arrays")
    np.savez_compressed(path, index=np.arange(label.size, dtype=np.int32), label=label, prediction=prediction)
    return Path(path)


def load_predictions(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, label) in validation-set order, from :func:`save_predictions`'s file."""
    with np.load(path) as f:
        order = np.argsort(f["index"], kind="stable")
        return f["prediction"][order], f["label"][order]
