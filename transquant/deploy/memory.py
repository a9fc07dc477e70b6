"""Peak memory: resident-set growth of this process (the kernel's high-water mark, or sampled),
CUDA peak allocation, and :func:`probe_artifact`, which loads one artifact in a fresh interpreter
(:func:`transquant.deploy.profiling.memory_in_subprocess` starts it)."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .runtime import ort_session

MB = 1024 * 1024


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_growth(fn: Callable[[], Any], repeats: int = 3) -> tuple[float | None, str]:
    """(MB the resident set grew to at its peak while running ``fn`` ``repeats`` times, method)."""
    base = rss_bytes()
    if base is None:
        return None, "unavailable"
    if _reset_hwm() and (hwm_kb := _status_kb("VmHWM")) is not None:
        base = hwm_kb * 1024  # the reset sets the mark to the resident set of this instant
        for _ in range(repeats):
            fn()
        return max(0, _status_kb("VmHWM") * 1024 - base) / MB, "vmhwm"
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes() or 0)
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        for _ in range(repeats):
            fn()
    finally:
        stop.set()
        t.join()
    return max(0, peak[0] - base) / MB, "sampled"


def cuda_peak_growth(fn: Callable[[], Any], repeats: int = 3) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MB


def probe_artifact(kind: str, path: str, batch_npz: str, threads: int, repeats: int, attention: str = "sdpa") -> dict:
    """Runs in a fresh interpreter: load one artifact, run it ``repeats`` times, and report MB of
    resident-set growth over the pre-load baseline: after loading, and at the peak (VmHWM, reset
    before loading) over load + inference. Lazily mapped weights (safetensors) only become
    resident when the first inference touches them, so the total is the comparable number."""
    data = dict(np.load(batch_npz))
    base = rss_bytes()
    hwm = _reset_hwm() and _status_kb("VmHWM") is not None
    if kind == "onnx":
        sess = ort_session(Path(path), threads or None)
        feeds = {i.name: data[i.name] for i in sess.get_inputs()}
        fn = lambda: sess.run(None, feeds)  # noqa: E731
    else:
        from transformers import AutoModelForSequenceClassification

        if threads:
            torch.set_num_threads(threads)
        model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=attention).eval()
        feeds = {k: torch.from_numpy(v) for k, v in data.items()}

        def fn():
            with torch.inference_mode():
                return model(**feeds).logits
    loaded = rss_bytes()
    if hwm:
        for _ in range(repeats):
            fn()
        peak, method = _status_kb("VmHWM") * 1024, "vmhwm"
    else:
        grown, method = peak_rss_growth(fn, repeats)
        peak = loaded + grown * MB
    return {"load_mb": (loaded - base) / MB, "peak_mb": (peak - base) / MB,
            "inference_mb": (peak - loaded) / MB, "method": method}
