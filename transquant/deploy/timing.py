"""Latency: timers (host clock, CUDA events; injectable), percentiles, and interleaved timing of
several candidates so that load from other processes hits them alike."""
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
