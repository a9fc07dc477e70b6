"""Latency: timers (host clock, CUDA events; injectable), percentiles, interleaved timing of
several candidates so that load from other processes hits them alike, and speed-ups paired by
round-robin turn."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..core.progress import Progress


class CpuTimer:
    """Wall time of one call in nanoseconds (``clock`` injectable for tests)."""

    def __init__(self, clock: Callable[[], int] = time.perf_counter_ns):
        self.clock = clock

    def time(self, fn: Callable[[], Any]) -> int:
        start = self.clock()
        fn()
        return self.clock() - start


class CudaTimer:
    """GPU time of one call measured with CUDA events (waits for the stream)."""

    def time(self, fn: Callable[[], Any]) -> int:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return round(start.elapsed_time(end) * 1e6)  # float ms: round, truncation would lose a ns


def timer_for(device: str) -> CpuTimer | CudaTimer:
    return CudaTimer() if str(device).startswith("cuda") else CpuTimer()


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p95_ms: float
    mean_ms: float
    throughput_seq_s: float
    n: int

    @classmethod
    def from_ns(cls, durations_ns, batch_size: int) -> "LatencyStats":
        """Percentiles by linear interpolation (numpy's default), throughput from the mean."""
        d = np.asarray(list(durations_ns), dtype=np.float64) / 1e6
        if d.size == 0:
            raise ValueError("no timed iterations")
        mean = float(d.mean())
        return cls(float(np.percentile(d, 50)), float(np.percentile(d, 95)), mean,
                   batch_size / (mean / 1e3), int(d.size))


def interleaved(runners: dict[str, Callable[[], Any]], warmup: int, iterations: int, block: int,
                timer=None) -> dict[str, list[int]]:
    """Warm up every runner, then time them round-robin, ``block`` calls at a time, until each
    has ``iterations`` timings (nanoseconds). Warm-up is interleaved the same way."""
    timer = timer or CpuTimer()
    block = max(1, int(block))
    warm, timed = range(0, warmup, block), range(0, iterations, block)
    times: dict[str, list[int]] = {name: [] for name in runners}
    with Progress("profile", len(warm) + len(timed)) as bar:  # counted between turns, never inside a timing
        for done in warm:
            for fn in runners.values():
                for _ in range(min(block, warmup - done)):
                    fn()
            bar.update()
        for done in timed:
            for name, fn in runners.items():
                for _ in range(min(block, iterations - done)):
                    times[name].append(timer.time(fn))
            bar.update()
    return times


@dataclass(frozen=True)
class Speedup:
    """How many times faster a candidate ran than a baseline, with a 95 % interval (NaN bounds
    when there are too few turns for one)."""
    ratio: float
    low: float
    high: float


def paired_speedup(baseline_ns, candidate_ns, block: int) -> Speedup:
    """Speed-up of the candidate over the baseline, paired by round-robin turn of
    :func:`interleaved`: per turn the ratio of the two blocks' medians (timed seconds apart, so
    under the same machine state), then the median over turns, with the distribution-free 95 %
    interval of that median (order statistics of the turns' ratios).

    Why not p50 / p50: a machine whose speed moves in phases (a cloud VM: the same engine file
    measured 56 and 87 ms p50 in two processes minutes apart) can put the two p50s in different
    phases, when the engine's share of slow turns differs from the baseline's; pairing each turn
    cancels the phase. One turn (``iterations`` <= ``block``) is exactly p50 / p50."""
    from scipy.stats import binom

    block = max(1, int(block))
    b, c = np.asarray(list(baseline_ns), dtype=np.float64), np.asarray(list(candidate_ns), dtype=np.float64)
    if b.size != c.size or b.size == 0:
        raise ValueError(f"paired speed-up needs the same number of timings, got {b.size} and {c.size}")
    cuts = range(block, b.size, block)
    ratios = np.sort([np.median(x) / np.median(y) for x, y in zip(np.split(b, cuts), np.split(c, cuts))])
    n = ratios.size
    # The largest j with P(Bin(n, 1/2) <= j) <= 0.025: [ratios[j], ratios[n-1-j]] covers the median >= 95 %.
    j = int(np.searchsorted(binom.cdf(np.arange(n), n, 0.5), 0.025, side="right")) - 1
    low, high = (float(ratios[j]), float(ratios[n - 1 - j])) if j >= 0 else (float("nan"), float("nan"))
    return Speedup(float(np.median(ratios)), low, high)
