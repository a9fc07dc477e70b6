"""What a user sees in a real browser: scripts/browser_check.py end to end (store, report, mlflow server,
headless Chromium). Slow (minutes; much longer on a loaded machine) and needs Debian's chromium."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("browser_check", ROOT / "scripts" / "browser_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


browser_check = _script()


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(browser_check.find_chromium() is None,
                    reason="chromium is not installed (apt-get update && apt-get install -y chromium)")
def test_browser_check(tmp_path, capsys):
    out = tmp_path / "screenshots"
    rc = browser_check.main(["--workdir", str(tmp_path / "work"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for name in ("experiment.png", "experiment_charts.png", "run.png", "report.png", "report_mlflow.png"):
        assert (out / name).stat().st_size > 0, printed


def test_renderings_match_how_pages_round():
    """The report and MLflow round the same accuracy differently; each form must count as a match."""
    assert browser_check.shows("accuracy 97.27 %", 97.265625)
    assert browser_check.shows("<td>97.2656</td>", 97.265625)
    assert browser_check.shows("96.9", 96.875)
    assert not browser_check.shows("95.12", 97.265625)
    assert not browser_check.shows("96.92", 96.875)  # a longer number is not a match
