"""Provenance: a finished run or a cached result is reused only while the code that computed it is unchanged."""
import shutil

import pytest
from mlflow.tracking import MlflowClient

from transquant.analysis.statistics import stats_cache_path
from transquant.core import provenance
from transquant.pipeline import run_job

FAST = ("profile.enabled=false", "stats.enabled=false")


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the transquant sources that provenance hashes instead of the real ones."""
    copy = tmp_path / "transquant"
    shutil.copytree(provenance.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "PACKAGE_DIR", copy)
    return copy


def _edit(path):
    with open(path, "a") as fh:
        fh.write("# an edit\n")


def _runs(uri, experiment):
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              order_by=["attributes.start_time ASC"])


def test_source_edit_recomputes_unchanged_tree_reuses(make_cfg, store, package_copy):
    """resume=true reuses a finished job only while the transquant source it ran is unchanged."""
    cfg = make_cfg(*FAST, "tracking.experiment=source-edit")
    first = run_job(cfg)
    assert run_job(cfg) == first and len(_runs(store["uri"], "source-edit")) == 1  # reused
    _edit(package_copy / "evaluate.py")
    assert run_job(cfg) == first
    runs = _runs(store["uri"], "source-edit")
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]  # recomputed
    assert runs[0].data.tags["transquant.source_hash"] != runs[1].data.tags["transquant.source_hash"]
    assert runs[1].data.tags["transquant.source_hash"] == provenance.source_hash()
    assert runs[1].data.tags["transquant.version.torch"] == provenance.library_versions()["torch"]


def test_stats_cache_key_follows_the_statistics_code(package_copy):
    path = stats_cache_path("/c", "ckpt", "fp", 8)
    _edit(package_copy / "report.py")  # computes no statistics
    assert stats_cache_path("/c", "ckpt", "fp", 8) == path
    _edit(package_copy / "quant" / "sites.py")
    assert stats_cache_path("/c", "ckpt", "fp", 8) != path


def test_a_package_in_a_module_set_covers_every_module_in_it(package_copy):
    """A new family adapter changes which tensor a site is: the statistics key must follow it
    without anyone adding the file to a list."""
    path = stats_cache_path("/c", "ckpt", "fp", 8)
    (package_copy / "models" / "adapters" / "new_family.py").write_text("# a new adapter\n")
    assert stats_cache_path("/c", "ckpt", "fp", 8) != path


def test_hash_is_of_the_code_this_process_loaded(tmp_path, monkeypatch):
    """An edit on disk during a sweep is not credited to jobs still running the loaded code."""
    before = provenance.source_hash()
    target = provenance.PACKAGE_DIR / "report.py"
    original = target.read_bytes()
    try:
        target.write_bytes(original + b"# an edit on disk\n")
        assert provenance.source_hash() == before
    finally:
        target.write_bytes(original)
