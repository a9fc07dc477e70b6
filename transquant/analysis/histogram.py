"""A fixed log-spaced histogram of float32 values: streamed medians and quantiles in O(1) memory.

Bins are the float32 bit patterns shifted right by ``HIST_SHIFT``: ``2**HIST_SUBBITS`` equal bins per
power of two, so a quantile is known to within ``HIST_RESOLUTION`` of its value, whatever the range."""
from __future__ import annotations

import math

import numpy as np

HIST_SUBBITS = 7  # 2**7 bins per power of two of the histogrammed value (x**2)
HIST_SHIFT = 23 - HIST_SUBBITS  # float32 mantissa bits dropped
HIST_BINS = 1 << (31 - HIST_SHIFT)  # every non-negative float32 bit pattern >> HIST_SHIFT
HIST_RESOLUTION = 2.0 ** -HIST_SUBBITS  # max bin width relative to the bin's lower edge
# The histogram is of x**2 (monotone in |x|, and computed anyway), so for |x| a bin spans at
# most sqrt(1 + 2**-7) - 1 = 0.39 % of its lower edge.
MEDIAN_RESOLUTION = math.sqrt(1.0 + HIST_RESOLUTION) - 1.0


def hist_edges() -> np.ndarray:
    """Edges of the histogram of non-negative float32 values, as float64: bin i holds
    [edges[i], edges[i + 1]), the values whose bit pattern >> HIST_SHIFT is i."""
    bits = (np.arange(HIST_BINS + 1, dtype=np.int64) << HIST_SHIFT)
    bits = np.minimum(bits, 0x7F800000)  # edges at and above +inf (the NaN patterns) are +inf
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


_EDGES: np.ndarray | None = None


def hist_quantile(counts: np.ndarray, rank: int) -> float:
    """The 0-based ``rank``-th smallest histogrammed value, interpolated inside its bin."""
    global _EDGES
    if _EDGES is None:
        _EDGES = hist_edges()
    cum = np.cumsum(counts)
    if rank < 0 or rank >= cum[-1]:
        raise ValueError(f"rank {rank} outside [0, {cum[-1]})")
    b = int(np.searchsorted(cum, rank, side="right"))
    before = cum[b] - counts[b]
    lo, hi = _EDGES[b], _EDGES[b + 1]
    if b == 0 or not math.isfinite(hi):  # bin 0: zeros and values below 9.2e-41, reported as 0
        return float(lo)
    return float(lo + (hi - lo) * (rank - before + 0.5) / counts[b])


def hist_median(counts: np.ndarray) -> float:
    """The lower median, as ``torch.median`` defines it: rank (n - 1) // 2."""
    n = int(counts.sum())
    return hist_quantile(counts, (n - 1) // 2)

