"""Figures are produced, are real PNGs with content, and only when the statistics allow them.

Rendering is the slow part (~0.5 s a figure), so every figure is drawn once, by ``log_figures``
in a module fixture, and the tests inspect the files."""
import copy

import numpy as np
import pytest
import torch

from transquant.analysis.error_attribution import quantization_error
from transquant.analysis.figures import FIGURES, log_figures, make_figures, peg_groups, worst_layer_histogram
from transquant.analysis.results import ActivationStats
from transquant.analysis.statistics import fp32_statistics
from transquant.quant.ptq import QuantizedActivations
from transquant.quant.quantizers import asymmetric_grid
from transquant.quant.sites import find_sites

from .conftest import tiny_bert
from .test_statistics import FakeRun, make_items

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stats_and_error():
    model = tiny_bert()
    sites = find_sites(model)
    items = make_items(16)
    stats = fp32_statistics(model, sites, items, 0, "cpu", batch_size=8, reservoir=4000, measure_cost=False)
    grids = {s.name: asymmetric_grid(torch.tensor(-3.0), torch.tensor(3.0), 8) for s in sites if s.channels}
    err = quantization_error(model, copy.deepcopy(model), QuantizedActivations(sites, {}, {}, grids), sites, items,
                             0, "cpu", batch_size=8)
    return stats, err


@pytest.fixture(scope="module")
def logged(stats_and_error, tmp_path_factory):
    stats, err = stats_and_error
    out = tmp_path_factory.mktemp("figures")
    run = FakeRun(keep=out)
    names = log_figures(run, stats, 4, err)
    return names, run, out


def test_log_figures_logs_every_figure(logged):
    names, run, _ = logged
    assert sorted(names) == sorted(FIGURES) == sorted(run.artifacts)


@pytest.mark.parametrize("name", FIGURES)
def test_figure_is_a_nonempty_png(logged, name):
    from matplotlib.image import imread

    path = logged[2] / name
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    img = imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_only_the_figures_the_statistics_allow(stats_and_error, tmp_path):
    """FP32 only, no residual sums, no sample: just the depth curves (no SQNR, map, histogram)."""
    stats, _ = stats_and_error
    bare = ActivationStats([copy.deepcopy(s) for s in stats.sites if s.kind in ("ffn_intermediate", "query")])
    assert [p.name for p in make_figures(bare, tmp_path)] == ["depth_curves.png"]
    with pytest.raises(ValueError, match="sample"):
        worst_layer_histogram(bare, tmp_path / "x.png")


def test_peg_groups_follow_the_sorted_permutation(stats_and_error):
    stats, _ = stats_and_error
    site = stats.worst_site()
    groups, order, glo, ghi = peg_groups(site, 4)
    assert np.all(np.diff(groups[order]) >= 0)  # contiguous blocks along the permutation
    width = site.hi - site.lo
    assert np.all(np.diff(width[order]) >= -1e-6)
    assert np.bincount(groups).tolist() == [8, 8, 8, 8]
    for g in range(4):
        assert glo[g] == site.lo[groups == g].min() and ghi[g] == site.hi[groups == g].max()


def test_statistics_figures_are_drawn_once_per_statistics_and_k(logged, stats_and_error, tmp_path, monkeypatch):
    """A study's jobs share a checkpoint's statistics: its figures are drawn once, logged from the
    cache byte for byte as drawn afresh, and a different PEG k is another entry, never a stale one."""
    import transquant.analysis.figures as figures

    stats, err = stats_and_error
    _, _, fresh = logged  # drawn without the cache, k=4
    (tmp_path / "first").mkdir()
    first = FakeRun(keep=tmp_path / "first")
    assert sorted(log_figures(first, stats, 4, err, cache_at=tmp_path / "cache")) == sorted(FIGURES)
    for name in FIGURES[:-1]:
        assert (tmp_path / "first" / name).read_bytes() == (fresh / name).read_bytes()

    def draw(*args, **kwargs):
        raise AssertionError("drawn again")

    with monkeypatch.context() as m:
        m.setattr(figures, "stats_figures", draw)
        assert log_figures(FakeRun(), stats, 4, cache_at=tmp_path / "cache") == list(FIGURES[:-1])
        with pytest.raises(AssertionError, match="drawn again"):
            log_figures(FakeRun(), stats, 2, cache_at=tmp_path / "cache")
