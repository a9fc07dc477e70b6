"""What a cached result or a finished run depends on, beyond its config.

A number may be reused only if recomputing it would give the same number. Besides the config,
that depends on the code that computes it, the data, the starting weights and the libraries.
Every cache key and job identity includes :func:`fingerprint` of the modules that compute it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the transquant package
LIBRARIES = ("torch", "transformers", "onnxruntime", "onnx")

# The code each cache depends on, in one place. A package name stands for every module in it
# (so a new adapter file is covered without touching this list).
# A fine-tuned checkpoint's weights:
# (The adapters decide which inputs a family's tokenizer gives, e.g. no token types for GPT-2.)
FINETUNE_MODULES = ("transquant.train.finetune", "transquant.train.regularizers", "transquant.train.attention",
                    "transquant.models.loading", "transquant.models.adapters", "transquant.data.tasks")
# ... and, with a regulariser (it taps the residual sums) or an attention variant (it runs in the
# tapped kernel), the sites too. A plain recipe never runs them: an edit there keeps its checkpoints.
FINETUNE_VARIANT_MODULES = ("transquant.quant.sites",)
# The cached FP32 predictions of a checkpoint:
FP32_EVAL_MODULES = ("transquant.train.evaluate", "transquant.data.tasks", "transquant.models.loading",
                     "transquant.models.adapters", "transquant.train.attention", "transquant.quant.sites")
# The cached FP32 statistics (token masks, site taps, batching, loading):
STATS_MODULES = ("transquant.analysis.accumulators", "transquant.analysis.histogram", "transquant.analysis.results",
                 "transquant.analysis.statistics", "transquant.quant.ptq", "transquant.quant.sites",
                 "transquant.models.adapters", "transquant.data.tasks", "transquant.models.loading",
                 "transquant.train.attention")


def _files(modules: tuple[str, ...] | None) -> list[Path]:
    if modules is None:  # the whole package: any edit counts
        return sorted(PACKAGE_DIR.rglob("*.py"))
    files = []
    for name in modules:  # resolved under PACKAGE_DIR, so a test can point it at an edited copy
        rel = Path(*name.split(".")[1:])
        if (PACKAGE_DIR / rel / "__init__.py").is_file():
            files.extend((PACKAGE_DIR / rel).rglob("*.py"))
        elif (PACKAGE_DIR / f"{rel}.py").is_file():
            files.append(PACKAGE_DIR / f"{rel}.py")
        else:
            raise ValueError(f"provenance: no module {name!r} in {PACKAGE_DIR}")
    return sorted(files)


# The package's sources as this process loaded them: an edit made on disk while a sweep runs must
# not be credited to the jobs that still run the old code.
_LOADED = {f: f.read_bytes() for f in PACKAGE_DIR.rglob("*.py")}


def source_hash(modules: tuple[str, ...] | None = None) -> str:
    """SHA-256 (short) of the given modules' source files; ``None`` = every file of the package."""
    h = hashlib.sha256()
    for f in _files(modules):
        h.update(str(f.relative_to(PACKAGE_DIR)).encode())
        h.update(_LOADED[f] if f in _LOADED else f.read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose kernels produce our numbers."""
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def fingerprint(modules: tuple[str, ...] | None = None) -> dict:
    """Code + library identity to put into a cache key (data and model identity are added by
    the caller, who knows them)."""
    return {"source": source_hash(modules), "libraries": library_versions()}
