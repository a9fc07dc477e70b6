"""The machine a timing ran on: the CPU's integer/matrix extensions, its load, and a machine-wide
lock so that two profiles never time at once.

A speed-up is only readable beside the hardware that produced it: VNNI (``vpdpbusd``, int8 dot
products accumulated in int32) or AMX make INT8 GEMMs several times faster than AVX2's
``vpmaddubsw``, so every profiled job is tagged with what the CPU offers (``cpu_flags``,
``cpu_model``). Timings taken while other processes compete for the cores are not the
machine's, so the load average around the timing phase is logged and a loaded machine flagged.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger("transquant")

# The extensions that decide INT8/BF16 GEMM speed on x86, in the order the tag lists them.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                  "amx_bf16")
LOCK_ENV = "TRANSQUANT_TIMING_LOCK"


def cpu_info(cpuinfo: str | None = None) -> tuple[list[str], str]:
    """(the :data:`RELEVANT_FLAGS` the CPU has, in that order; its model name), from
    ``/proc/cpuinfo`` (or the text given). Without it (not Linux) the flags are unknown (empty)
    and the model is what :mod:`platform` says."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    have = set(fields.get("flags", fields.get("Features", "")).split())
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    return [f for f in RELEVANT_FLAGS if f in have], model


def cpu_tags(cpuinfo: str | None = None) -> dict[str, str]:
    """``cpu_flags`` (space-separated, "none" if none) and ``cpu_model``."""
    flags, model = cpu_info(cpuinfo)
    return {"cpu_flags": " ".join(flags) or "none", "cpu_model": model}


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def is_loaded(load: float | None, threads: int) -> bool:
    """Whether a timing with ``threads`` threads ran on a loaded machine.

    The load average counts runnable threads, and it is read right after this process ran its
    own ``threads`` threads (build, warm-up), so up to ``threads`` of it is the timing itself;
    more than half a thread beyond that means another process was runnable on average, taking
    cores, memory bandwidth or turbo headroom from the candidates. Unknown load is not flagged."""
    return load is not None and load > threads + 0.5


def lock_path() -> Path:
    """``$TRANSQUANT_TIMING_LOCK``, else ``/tmp/transquant-timing-<uid>.lock``: a fixed path (not
    ``$TMPDIR``, which differs between shells) so every process of the user finds the same lock."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(os.environ.get(LOCK_ENV) or f"/tmp/transquant-timing-{uid}.lock")


@contextmanager
def timing_lock(path: Path | None = None):
    """Hold the machine-wide timing lock (the project's ``filelock``, as the caches use; released
    by the OS if the process dies); yields the seconds spent waiting for it."""
    lock = FileLock(str(path or lock_path()))
    t0 = time.perf_counter()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for the timing lock %s (another profile is timing)", lock.lock_file)
        lock.acquire()
    try:
        yield time.perf_counter() - t0
    finally:
        lock.release()
