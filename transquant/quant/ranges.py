"""Range estimators: turn observed calibration tensors into quantization ranges.

Each estimator streams over calibration batches with memory that does not grow with the data
(except the percentile tails, bounded by (1 - p/100) of the values seen) and then yields
(lo, hi) — scalars for per-tensor ranges, or one value per channel (last dimension) for
per-group / per-channel ranges.

Correctness notes against the seed reproduction (see README "What the anchors got wrong"):
- ``Percentile`` clips *both* tails at p (lo = (100-p)-th, hi = p-th percentile of the values),
  so negatives survive and p = 100 is exactly min-max. The seed code used [p-th percentile, max]
  and then clamped the minimum to 0.
- ``GroupMinMax`` always keeps per-channel ranges, so the PEG permutation can never be skipped.

``HistogramMSE`` (``estimator: mse``) picks the activation range with the least expected
quantization error (clipping + rounding) at the site's bits, from a fixed-size histogram.

Weight estimators are the other kind: a symmetric *weight* range, max |w| or the one minimising
the weight tensor's quantization error (``mse_absmax``, the 2021 authors' estimator for weights),
per tensor or, with an ``axis``, one range per output channel.

Each kind has a registry (``ESTIMATORS``, ``GROUPINGS``, ``WEIGHT_ESTIMATORS``): a new estimator
or grouping is one decorated class or function here, selected by its name in ``conf/quant``.
"""
from __future__ import annotations

import math

import torch
from scipy.optimize import minimize_scalar

from ..core.registry import Registry
from .quantizers import Grid, asymmetric_grid, fake_quantize, per_token_grid, symmetric_grid

# RangeEstimator subclasses, each made per site by ``from_plan``.
ESTIMATORS = Registry("quant.estimator")
# (per-channel lo, per-channel hi, k) -> PEG group id per channel.
GROUPINGS = Registry("quant.grouping")
# (weight tensor, bits) -> the symmetric range r of its grid [-r, r]; per-channel weights call
# (weight, bits, axis) -> one range per index of ``axis`` (the output channel), shaped to broadcast
# against the weight (an estimator without ``axis`` serves per-tensor weights only).
WEIGHT_ESTIMATORS = Registry("quant.weight_estimator")


class RangeEstimator:
    """Accumulates statistics of one site; ``range()`` gives (lo, hi).

    ``passes`` is how many times the calibration data must be shown; between passes the
    caller invokes ``next_pass()``.
    """

    passes = 1

    @classmethod
    def from_plan(cls, plan) -> RangeEstimator:
        """The estimator of one site's :class:`~transquant.quant.ptq.SitePlan`; override to read
        the plan's options."""
        return cls()

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def next_pass(self) -> None:
        """Called between passes over the calibration data."""

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def grid(self, bits: int) -> Grid:
        """The site's grid: asymmetric over ``range()``."""
        return asymmetric_grid(*self.range(), bits)


@ESTIMATORS.register("minmax")
class MinMax(RangeEstimator):
    """Global min and max over every calibration value (running min-max)."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf

    def observe(self, x: torch.Tensor) -> None:
        if x.numel():
            self.lo = min(self.lo, x.min().item())
            self.hi = max(self.hi, x.max().item())

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo > self.hi:
            raise RuntimeError("range requested before any value was observed")
        return torch.tensor(self.lo), torch.tensor(self.hi)


@ESTIMATORS.register("percentile")
class Percentile(RangeEstimator):
    """Exact two-tailed percentile clipping in bounded memory, with two passes.

    Pass 1 counts the values n; pass 2 keeps only the largest and smallest
    ceil((1 - p/100) * n) + 2 values, which is all the p-th and (100-p)-th order statistics
    (interpolated like ``torch.quantile``) depend on. One pass cannot be exact: a value dropped
    early can re-enter the tail as n grows.
    """

    passes = 2

    def __init__(self, p: float) -> None:
        if not 0.0 < p <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {p}")
        self.p = p
        self.n = 0
        self.keep: int | None = None
        self.top = torch.empty(0)
        self.bottom = torch.empty(0)

    @classmethod
    def from_plan(cls, plan) -> Percentile:
        return cls(plan.percentile)

    def next_pass(self) -> None:
        self.keep = min(self.n, math.ceil((1.0 - self.p / 100.0) * self.n) + 2)

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float().cpu()
        if self.keep is None:
            self.n += flat.numel()
            return
        top = torch.cat([self.top, flat])
        self.top = top.topk(min(self.keep, top.numel())).values
        bottom = torch.cat([self.bottom, flat])
        self.bottom = bottom.topk(min(self.keep, bottom.numel()), largest=False).values

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n == 0 or self.keep is None:
            raise RuntimeError("range requested before both calibration passes")
        # torch.quantile's convention: linear interpolation at rank q * (n - 1).
        lo = _interpolate(self.bottom.sort().values, (1.0 - self.p / 100.0) * (self.n - 1))
        hi = _interpolate(self.top.sort(descending=True).values, (1.0 - self.p / 100.0) * (self.n - 1))
        return lo, hi


def _interpolate(tail: torch.Tensor, rank: float) -> torch.Tensor:
    """Value at fractional ``rank`` counted from the tail's extreme (0 = the extreme itself)."""
    i = int(math.floor(rank))
    a = tail[min(i, tail.numel() - 1)]
    b = tail[min(i + 1, tail.numel() - 1)]
    return a + (b - a) * (rank - i)


@ESTIMATORS.register("dynamic")
class PerToken(RangeEstimator):
    """No calibration: each token is quantized on its own [min, max] at run time (the ranges ONNX
    Runtime's dynamic INT8 takes for MatMul inputs, per token instead of per tensor), the
    baseline that needs no data. ``passes = 0``: calibration runs no forward pass for it."""

    passes = 0

    def observe(self, x: torch.Tensor) -> None:
        """Nothing to learn."""

    def grid(self, bits: int) -> Grid:
        return per_token_grid(bits)


@ESTIMATORS.register("mse")
class HistogramMSE(RangeEstimator):
    """The range [lo, hi] with the least expected quantization MSE at ``bits``, in two passes.

    Pass 1 finds min and max; pass 2 counts the values in ``BINS`` equal bins over them (memory
    fixed, whatever the data). Every pair of bin edges lo <= 0 <= hi is a candidate; its expected
    error is exact for the histogram (values uniform within a bin): the clipped bins' squared
    distance to lo or hi, plus the rounding noise step^2 / 12 of every value inside, step =
    (hi - lo) / (2^bits - 1). Outliers are clipped exactly when cutting them costs less than the
    coarser step they would force on every other value (Banner et al.'s ACIQ trade-off, with
    the data's own distribution instead of a Gaussian or Laplace fit).
    """

    passes = 2
    BINS = 2048

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.minmax = MinMax()
        self.counts: torch.Tensor | None = None

    @classmethod
    def from_plan(cls, plan) -> HistogramMSE:
        return cls(plan.bits)

    def next_pass(self) -> None:
        self.counts = torch.zeros(self.BINS, dtype=torch.float64)

    def observe(self, x: torch.Tensor) -> None:
        if self.counts is None:
            self.minmax.observe(x)
        elif x.numel() and self.minmax.hi > self.minmax.lo:
            hist = torch.histc(x.detach().float(), self.BINS, self.minmax.lo, self.minmax.hi)
            self.counts += hist.cpu().double()

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.minmax.range()
        if self.counts is None:
            raise RuntimeError("range requested before both calibration passes")
        if hi == lo:
            return lo, hi
        return self.best_range(self.counts, lo.item(), hi.item(), self.bits)

    @staticmethod
    def best_range(counts: torch.Tensor, lo: float, hi: float, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The least-error (lo, hi) for a histogram of ``counts`` in equal bins over [lo, hi]."""
        edges = torch.linspace(lo, hi, counts.numel() + 1, dtype=torch.float64)
        width = (hi - lo) / counts.numel()
        centres = (edges[1:] + edges[:-1]) / 2
        zero = torch.zeros(1, dtype=torch.float64)
        # prefix sums: values below edge i have count s0[i], sum s1[i], sum of squares s2[i]
        s0, s1, s2 = (torch.cat([zero, torch.cumsum(v, 0)]) for v in
                      (counts, counts * centres, counts * (centres.square() + width**2 / 12)))
        cand_lo = torch.cat([edges[edges < 0], zero])
        cand_hi = torch.cat([zero, edges[edges > 0]])
        # bins [0, i) lie below lo and [j, n) above hi (a bin straddling 0 counts as inside)
        i = (torch.searchsorted(edges, cand_lo, right=True) - 1).clamp(0, counts.numel())
        j = torch.searchsorted(edges, cand_hi).clamp(max=counts.numel())
        a, b = cand_lo[:, None], cand_hi[None, :]
        below = s2[i, None] - 2 * a * s1[i, None] + a.square() * s0[i, None]
        above = (s2[-1] - s2[j])[None, :] - 2 * b * (s1[-1] - s1[j])[None, :] + b.square() * (s0[-1] - s0[j])[None, :]
        inside = s0[-1] - s0[i, None] - (s0[-1] - s0[j])[None, :]
        err = below + above + inside.clamp(min=0) * ((b - a) / (2**bits - 1)).square() / 12
        r, c = divmod(int(err.argmin()), err.shape[1])
        return cand_lo[r].float(), cand_hi[c].float()


@ESTIMATORS.register("peg", selectable=False)
class GroupMinMax(RangeEstimator):
    """Per-embedding-group (PEG) ranges: per-channel min/max, then one range per group.

    ``groups`` is a vector mapping each channel (last dimension) to its group id. Left None, it
    is chosen from this site's own ranges by :func:`make_groups` when ``range()`` is called
    (the permutation depends on the ranges); set beforehand, it imposes a grouping chosen from
    another site's ranges (PEG groups shared by the sites of a layer).
    """

    def __init__(self, k: int, grouping: str) -> None:
        self.k = k
        self.grouping = grouping
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None

    @classmethod
    def from_plan(cls, plan) -> GroupMinMax:
        return cls(plan.k, plan.grouping)

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if not flat.numel():
            return
        lo, hi = flat.min(0).values.cpu(), flat.max(0).values.cpu()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def channel_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (min, max) over everything observed."""
        if self.lo is None:
            raise RuntimeError("range requested before any value was observed")
        return self.lo, self.hi

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.channel_ranges()
        if self.groups is None:
            self.groups = make_groups(lo, hi, self.k, self.grouping)
        elif self.groups.numel() != lo.numel():
            raise ValueError(f"imposed PEG groups cover {self.groups.numel()} channels, the site has {lo.numel()}")
        glo = torch.full((self.k,), math.inf).scatter_reduce(0, self.groups, self.lo, "amin")
        ghi = torch.full((self.k,), -math.inf).scatter_reduce(0, self.groups, self.hi, "amax")
        return glo[self.groups], ghi[self.groups]


def make_groups(lo: torch.Tensor, hi: torch.Tensor, k: int, grouping: str) -> torch.Tensor:
    """Group id per channel, from the per-channel ranges, by the registered ``grouping``."""
    c = lo.numel()
    if not 1 <= k <= c:
        raise ValueError(f"PEG group count k={k} must be in [1, {c}] (the channel count)")
    return GROUPINGS[grouping](lo, hi, k)


def _blocks(order: torch.Tensor, cuts) -> torch.Tensor:
    """Group g = the g-th block of channels in ``order`` split at ``cuts`` (as ``tensor_split``)."""
    ids = torch.empty(order.numel(), dtype=torch.long)
    for g, block in enumerate(order.tensor_split(cuts)):
        ids[block] = g
    return ids


def _by_range(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Channels sorted by range width (stable: ties keep channel order)."""
    return torch.argsort((hi - lo).clamp(min=0), stable=True)


@GROUPINGS.register("contiguous")
def contiguous(lo: torch.Tensor, hi: torch.Tensor, k: int) -> torch.Tensor:
    """K blocks of adjacent channels (no permutation)."""
    return _blocks(torch.arange(lo.numel()), k)


@GROUPINGS.register("sorted")
def sorted_by_range(lo: torch.Tensor, hi: torch.Tensor, k: int) -> torch.Tensor:
    """Bondarenko et al.'s permutation: channels sorted by range, cut into K groups of (near-)equal
    size, so outlier channels share a group."""
    return _blocks(_by_range(lo, hi), k)


@GROUPINGS.register("gap")
def gap(lo: torch.Tensor, hi: torch.Tensor, k: int) -> torch.Tensor:
    """Channels sorted by range, cut at the K-1 largest jumps of log-range, so a handful of outlier
    channels get groups of their own instead of dragging ~C/K bulk channels along."""
    order = _by_range(lo, hi)
    logw = torch.log((hi - lo).clamp(min=0)[order].clamp(min=1e-12))
    cuts = (logw[1:] - logw[:-1]).topk(k - 1).indices + 1 if k > 1 else torch.empty(0, dtype=torch.long)
    return _blocks(order, cuts.sort().values)


MSE_RANGE_MARGIN = 0.5  # the authors' range_margin: the search reaches max|w| + 0.5


MSE_CHANNEL_STEPS = 100  # per-channel MSE weight ranges: candidates i/100 * max|w_c|, i = 1..100


def _channel_absmax(w: torch.Tensor, axis: int) -> torch.Tensor:
    """max |w| over every dimension but ``axis`` (kept, size 1, so the result broadcasts)."""
    return w.detach().abs().amax(dim=[d for d in range(w.dim()) if d != axis], keepdim=True)


@WEIGHT_ESTIMATORS.register("minmax")
def absmax(w: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    """max |w| (per channel of ``axis``): every weight on the grid, none clipped."""
    return w.abs().max() if axis is None else _channel_absmax(w, axis)


@WEIGHT_ESTIMATORS.register("mse")
def mse_absmax(w: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    """Symmetric weight range r minimising the quantization error sum (fq(w; r) - w)^2.

    Per tensor, the 2021 authors' weight range (``--weight-quant-method MSE --weight-opt-method
    golden_section``), copied from Qualcomm-AI-research/transformer-quantization,
    quantization/range_estimators.py (``MSE_Estimator._golden_section_symmetric``): scipy's
    bounded scalar minimiser over r in [0.01 R, R], R = max|w| + 0.5. Per channel of ``axis``
    (their code has none), the best of ``MSE_CHANNEL_STEPS`` fractions of each channel's max|w|,
    all channels at once: never worse than min-max (the fraction 1), and no scalar search per
    channel (tens of thousands in BERT-base).
    """
    if axis is not None:
        return _channel_mse_absmax(w.detach().float(), bits, axis)
    w = w.detach().float()
    top = w.abs().max().item() + MSE_RANGE_MARGIN

    def loss(r: float) -> float:
        # fake_quantize on the symmetric grid (zero point 0), in place: ~30 calls on tables of
        # millions of weights (the word embeddings)
        grid = symmetric_grid(torch.tensor(r), bits)
        scale = grid.scale.to(w.device)
        err = torch.div(w, scale).round_().clamp_(grid.qmin, grid.qmax).mul_(scale).sub_(w)
        return float(err.square_().sum())

    return torch.tensor(minimize_scalar(loss, bounds=(0.01 * top, top), method="bounded").x, dtype=torch.float32)


def _channel_mse_absmax(w: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    top = _channel_absmax(w, axis)
    others = [d for d in range(w.dim()) if d != axis]
    best_r, best_err = top, None
    for i in range(1, MSE_CHANNEL_STEPS + 1):
        r = top * (i / MSE_CHANNEL_STEPS)
        err = fake_quantize(w, symmetric_grid(r, bits)).sub_(w).square_().sum(dim=others, keepdim=True)
        if best_err is None:
            best_r, best_err = r, err
        else:
            better = err < best_err
            best_r, best_err = torch.where(better, r, best_r), torch.where(better, err, best_err)
    return best_r
