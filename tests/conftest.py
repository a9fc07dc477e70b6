"""Shared fixtures: composed configs on the tiny model, a per-session MLflow store and cache."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import BertConfig, BertForSequenceClassification

from transquant.core.paths import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=tiny", "task=synthetic", "train=quick", "profile=quick"]
# What Python, pip and pytest themselves leave in a checkout; anything else a test writes there is a leak.
TOOL_LEFTOVERS = {".venv", "__pycache__", ".pytest_cache"}
# New untracked files of these kinds are someone editing the tree while the suite runs, not its output.
SOURCES = (".py", ".md", ".yaml")


def untracked_files() -> set[str] | None:
    """Every ignored file of the checkout and every untracked one except sources, without
    :data:`TOOL_LEFTOVERS` (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "-z", "--ignored=matching"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None

    def kept(rel: Path, status: str) -> bool:
        return (not any(p in TOOL_LEFTOVERS or p.endswith(".egg-info") for p in rel.parts)
                and (status == "!!" or rel.suffix not in SOURCES))

    files = set()
    for entry in filter(None, out.split("\0")):
        status, rel = entry[:2], Path(entry[3:])
        if status not in ("??", "!!") or not kept(rel.parent / "_", status):
            continue
        if not (ROOT / rel).is_dir():
            files.update([str(rel)] if kept(rel, status) else [])
            continue
        for top, dirs, names in os.walk(ROOT / rel):
            dirs[:] = [d for d in dirs if kept(Path(d) / "_", status)]
            files.update(str(f) for f in (Path(top).relative_to(ROOT) / n for n in names) if kept(f, status))
    return files


@pytest.fixture(scope="session", autouse=True)
def leaves_checkout_as_found():
    """The suite writes only to temporary directories: fail it if it left files in the checkout
    (MLflow's default artifact root ./mlruns, Hydra's outputs/, a default cache)."""
    before = untracked_files()
    yield
    after = untracked_files()
    if before is not None and after is not None and after - before:
        pytest.fail(f"the tests left files in the checkout: {sorted(after - before)[:20]}")


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> dict[str, str]:
    """One MLflow sqlite store (artifacts beside it) and one checkpoint cache for the whole
    session (migrations ~2 s)."""
    base = tmp_path_factory.mktemp("store")
    return {"uri": f"sqlite:///{base}/mlflow.db", "cache": str(base / "cache")}


@pytest.fixture
def make_cfg(store):
    """Compose the real conf/ tree with overrides (tiny model + synthetic task by default)."""
    def _make(*overrides: str, tiny: bool = True):
        ov = (TINY if tiny else []) + [f"tracking.uri={store['uri']}", f"paths.cache_dir={store['cache']}", *overrides]
        with initialize_config_dir(config_dir=CONF_DIR):
            return compose(config_name="config", overrides=ov)
    return _make


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m transquant.run`` in a subprocess, as a user would type it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    if not any(a.startswith("profile") for a in args):  # a few timed passes, not the paper's 100 + 500
        args = (*args, "profile=quick")
    return subprocess.run([sys.executable, "-m", "transquant.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_bert(seed: int = 0, layers: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64)).eval()


def random_batches(n: int = 4, batch: int = 4, seq: int = 12, vocab: int = 100, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0  # one padded sequence per batch
        out.append({"input_ids": torch.randint(1, vocab, (batch, seq), generator=g) * mask,
                    "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
                    "attention_mask": mask})
    return out
