"""Content-addressed on-disk cache with locks and atomic writes.

Sweeps run jobs in sequence or in parallel (joblib, SLURM); a checkpoint must be computed once
and never be read half-written. Writers take a file lock, build the entry under a temporary
name in the same directory and ``os.replace`` it into place; readers trust only complete entries.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock


def key_of(payload: dict) -> str:
    """Stable short hash of a JSON-able description."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


@contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_dir(target: Path, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return ``target`` after building it once with ``build(tmp_dir)``; (path, was_cached).

    Concurrent callers block on the lock; the loser of the race finds the entry complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            return target, True
        for orphan in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed writer
            shutil.rmtree(orphan, ignore_errors=True)
        with _staging_dir(target) as tmp:
            build(tmp)
            os.replace(tmp, target)
        return target, False


def write_json_atomic(path: Path, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def cached_json(path: Path, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """A JSON value computed once per path, under a lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return json.loads(path.read_text()), True
        value = compute()
        write_json_atomic(path, value)
        return value, False
