"""transquant installs like a library: the wheel carries its Hydra configs (``conf/`` at the top of
the repo ships as ``transquant/conf/``), and a non-editable install runs a job from any directory
with the configs it installed, not the checkout's."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from transquant.core import paths

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "__pycache__", "build", "dist", "mlruns", "outputs", "multirun", ".cache",
             ".pytest_cache", "reports"}


def _source_files() -> list[Path]:
    """What a build reads: the checkout's tracked and new (not ignored) files, else the tree less
    the usual leftovers."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [Path(f) for f in out.split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p.relative_to(ROOT) for p in ROOT.rglob("*") if p.is_file()
                and not any(part in SKIP_DIRS or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel .`` of a copy of the checkout (an in-tree build would leave build/ in it)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    for rel in _source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", str(src), "-w", str(base / "dist")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = (base / "dist").glob("transquant-*.whl")
    return whl


def test_checkout_uses_top_level_conf():
    """From a checkout or an editable install the configs are the repo's conf/ (edits take effect)."""
    assert paths.CONF_PATH == ROOT / "conf"
    assert paths.CONF_DIR == str(ROOT / "conf") and os.path.isabs(paths.CONF_DIR)


def test_wheel_ships_every_config_and_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = {f"transquant/conf/{p.relative_to(ROOT / 'conf').as_posix()}"
            for p in (ROOT / "conf").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert conf and not conf - names, f"configs missing from the wheel: {sorted(conf - names)}"
    # pyproject.toml lists the packages by hand (to map transquant.conf): a new subpackage left off
    # that list would be missing here.
    pkg = {f"transquant/{p.relative_to(ROOT / 'transquant').as_posix()}"
           for p in (ROOT / "transquant").rglob("*") if p.is_file() and "__pycache__" not in p.parts
           and p.suffix in (".py", ".gz", ".md")}
    assert pkg and not pkg - names, f"package files missing from the wheel: {sorted(pkg - names)}"
    assert not [n for n in names if n.startswith("conf/")], "the configs must not land in site-packages/conf"


@pytest.mark.slow
def test_wheel_installs_and_runs_from_elsewhere(wheel, tmp_path):
    """Install the wheel (no editable link) into a fresh venv, then run a tiny job from an unrelated
    directory: it exits 0 and its MLflow params come from the installed package's conf/."""
    t0 = time.perf_counter()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # Installed before the dependencies are visible, so pip never sees (or touches) the dev install.
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                          "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies (torch, hydra, mlflow, ...) come from this environment, after the venv's own
    # site-packages on sys.path; its .pth files (the editable finder) are not processed.
    deps = [p for p in (*site.getsitepackages(), sysconfig.get_paths()["purelib"]) if Path(p).is_dir()]
    (purelib / "zz_transquant_test_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")

    installed_conf = purelib / "transquant" / "conf"
    cfg = OmegaConf.load(installed_conf / "config.yaml")
    assert cfg.eval.batch_size != 37
    cfg.eval.batch_size = 37  # a sentinel only the installed copy has
    OmegaConf.save(cfg, installed_conf / "config.yaml")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "MLFLOW_TRACKING_URI",
                                                            "TRANSQUANT_CACHE")}
    env["PYTHONWARNINGS"] = "ignore"
    where = subprocess.run([str(py), "-c", "import transquant.core.paths as p; print(p.__file__); print(p.CONF_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    module_file, conf_dir = where.stdout.split()
    assert Path(module_file).is_relative_to(purelib) and Path(conf_dir) == installed_conf

    db = tmp_path / "m.db"
    job = subprocess.run([str(py), "-m", "transquant.run", "model=tiny", "task=synthetic", "train=quick",
                          "profile.enabled=false", "stats.enabled=false", "hardware.threads=1",
                          f"tracking.uri=sqlite:///{db}", f"paths.cache_dir={tmp_path / 'c'}"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("transquant")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    assert params["eval.batch_size"] == "37"  # from the installed conf/, not the checkout's
    assert params["model.name"] == "tiny" and params["train.epochs"] == "3"
    print(f"wheel install + tiny job: {time.perf_counter() - t0:.0f} s")
