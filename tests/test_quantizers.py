"""Quantizer arithmetic and the range-estimator laws (percentile, PEG)."""

import pytest
import torch

from transquant.quant.quantizers import asymmetric_grid, fake_quantize, quantize, symmetric_grid
from transquant.quant.ranges import GroupMinMax, MinMax, Percentile, make_groups, mse_absmax


def test_asymmetric_grid_error_bounded_by_half_step():
    x = torch.linspace(-3.0, 5.0, 1001)
    grid = asymmetric_grid(torch.tensor(-3.0), torch.tensor(5.0), 8)
    assert grid.scale.item() == pytest.approx(8.0 / 255)
    err = (fake_quantize(x, grid) - x).abs().max().item()
    assert err <= grid.scale.item() / 2 + 1e-6


def test_zero_is_exact_and_range_widened_to_contain_it():
    grid = asymmetric_grid(torch.tensor(0.5), torch.tensor(2.0), 8)  # all-positive range
    assert fake_quantize(torch.tensor([0.0]), grid).item() == 0.0
    assert quantize(torch.tensor([0.0]), grid).item() == grid.zero_point.item() == 0


def test_out_of_range_values_clamp():
    grid = asymmetric_grid(torch.tensor(-1.0), torch.tensor(1.0), 4)
    out = fake_quantize(torch.tensor([-10.0, 10.0]), grid)
    assert out[0].item() == pytest.approx(-1.0, abs=grid.scale.item())
    assert out[1].item() == pytest.approx(1.0, abs=grid.scale.item())
    assert quantize(torch.tensor([10.0]), grid).item() == 15


def test_symmetric_grid_codes():
    w = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    grid = symmetric_grid(w.abs().max(), 8)
    assert torch.equal(quantize(w, grid), torch.tensor([-127.0, -64.0, 0.0, 64.0, 127.0]))
    assert (grid.qmin, grid.qmax) == (-128, 127)


def test_fake_quantize_is_the_closed_form_to_the_bit_and_leaves_its_input_alone():
    """The in-place arithmetic gives the same floats as the textbook formula, ties to even
    included, for per-tensor, per-channel, sub-byte and per-token grids."""
    from transquant.quant.quantizers import per_token_grid

    x = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 2.0]) * (6.0 / 255)  # exact half-steps: round to even
    for grid in (asymmetric_grid(torch.tensor(-3.0), torch.tensor(3.0), 8), symmetric_grid(x.abs().amax((0, 1)), 8),
                 asymmetric_grid(x.amin((0, 1)) * 0.5, x.amax((0, 1)) * 0.3, 4), per_token_grid(8)):
        before = x.clone()
        g = asymmetric_grid(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), 8) if grid.per_token else grid
        codes = torch.clamp(torch.round(x / g.scale) + g.zero_point, g.qmin, g.qmax)
        assert torch.equal(quantize(x, grid), codes)
        assert torch.equal(fake_quantize(x, grid), (codes - g.zero_point) * g.scale)
        assert torch.equal(x, before)


def _stream(est, chunks):
    for i in range(est.passes):
        for c in chunks:
            est.observe(c)
        if i + 1 < est.passes:
            est.next_pass()
    return est.range()


def test_percentile_100_is_minmax():
    torch.manual_seed(0)
    chunks = [torch.randn(5, 7, 16) * (i + 1) for i in range(4)]
    lo_p, hi_p = _stream(Percentile(100.0), chunks)
    lo_m, hi_m = _stream(MinMax(), chunks)
    assert lo_p.item() == lo_m.item() and hi_p.item() == hi_m.item()


@pytest.mark.parametrize("p", [99.0, 99.9, 90.0])
def test_percentile_streamed_equals_torch_quantile_both_tails(p):
    torch.manual_seed(1)
    chunks = [torch.randn(1000) * 2 - 0.5 for _ in range(5)]
    lo, hi = _stream(Percentile(p), chunks)
    allx = torch.cat(chunks)
    assert hi.item() == pytest.approx(torch.quantile(allx, p / 100).item(), rel=1e-5)
    assert lo.item() == pytest.approx(torch.quantile(allx, 1 - p / 100).item(), rel=1e-5)
    assert lo.item() < 0  # negatives survive (the seed repo clamped the minimum to 0)


def test_percentile_thresholds_give_different_ranges():
    torch.manual_seed(2)
    x = torch.randn(20000) ** 3
    ranges = {p: _stream(Percentile(p), [x])[1].item() for p in (99.0, 99.5, 99.9, 99.99)}
    assert len(set(ranges.values())) == 4 and sorted(ranges.values()) == list(ranges.values())


def test_percentile_rejects_out_of_range():
    for bad in (0.0, -1.0, 100.5):
        with pytest.raises(ValueError, match="percentile"):
            Percentile(bad)


def _channels(c=24):
    torch.manual_seed(3)
    x = torch.randn(6, 10, c)
    x[..., 5] *= 50  # an outlier channel
    x[..., 17] *= 20
    return x


def test_peg_k1_is_per_tensor():
    x = _channels()
    lo, hi = _stream(GroupMinMax(1, "sorted"), [x[:3], x[3:]])
    assert torch.all(lo == x.min()) and torch.all(hi == x.max())


@pytest.mark.parametrize("grouping", ["sorted", "contiguous", "gap"])
def test_peg_k_hidden_is_per_channel(grouping):
    x = _channels()
    lo, hi = _stream(GroupMinMax(24, grouping), [x[:2], x[2:]])
    flat = x.reshape(-1, 24)
    assert torch.equal(lo, flat.min(0).values) and torch.equal(hi, flat.max(0).values)


def test_sorted_permutation_puts_outliers_together():
    x = _channels()
    flat = x.reshape(-1, 24)
    ids = make_groups(flat.min(0).values, flat.max(0).values, 3, "sorted")
    assert ids[5] == ids[17] == 2  # both outliers in the widest group
    assert torch.bincount(ids).tolist() == [8, 8, 8]
    contiguous = make_groups(flat.min(0).values, flat.max(0).values, 3, "contiguous")
    assert contiguous.tolist() == [0] * 8 + [1] * 8 + [2] * 8


def test_gap_grouping_isolates_outliers_unevenly():
    x = _channels()
    flat = x.reshape(-1, 24)
    ids = make_groups(flat.min(0).values, flat.max(0).values, 3, "gap")
    assert torch.bincount(ids).tolist() == [22, 1, 1]
    assert ids[5] != ids[17]


def test_uneven_k_allowed():
    ids = make_groups(torch.zeros(10) - 1, torch.arange(10.0), 3, "sorted")
    assert sorted(torch.bincount(ids).tolist()) == [3, 3, 4]


@pytest.mark.parametrize("k", [0, 25])
def test_peg_k_out_of_range(k):
    with pytest.raises(ValueError, match="k="):
        make_groups(torch.zeros(24), torch.ones(24), k, "sorted")


def test_peg_grid_is_exact_per_group():
    """Quantizing with per-group ranges gives each group its own step size."""
    x = _channels()
    est = GroupMinMax(3, "sorted")
    est.observe(x)
    lo, hi = est.range()
    grid = asymmetric_grid(lo, hi, 8)
    err = (fake_quantize(x, grid) - x).abs().reshape(-1, 24).max(0).values
    assert torch.all(err <= grid.scale / 2 + 1e-5)
    assert grid.scale[5] > 5 * grid.scale.min()  # outlier group is coarse, bulk groups fine


def _weight_mse(w, r, bits):
    return ((fake_quantize(w, symmetric_grid(r, bits)) - w) ** 2).sum().item()


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_weight_range_beats_minmax_on_heavy_tails(bits):
    torch.manual_seed(4)
    w = torch.randn(64, 64) * 0.05
    w[3, 7] = 2.0  # one outlier weight stretches the min-max range
    r = mse_absmax(w, bits)
    assert 0.01 * (2.0 + 0.5) <= r.item() < 2.0
    assert _weight_mse(w, r, bits) < _weight_mse(w, w.abs().max(), bits)
    assert torch.equal(r, mse_absmax(w, bits))  # deterministic


def test_mse_weight_range_keeps_a_uniform_tensor_whole():
    """Without outliers clipping only hurts: the MSE range is (about) the min-max range."""
    w = torch.linspace(-1.0, 1.0, 4001)
    r = mse_absmax(w, 8)
    assert r.item() == pytest.approx(1.0, rel=0.02)
    assert _weight_mse(w, r, 8) <= _weight_mse(w, torch.tensor(1.0), 8) * 1.01


def test_peg_groups_imposed_from_another_site():
    x = _channels()
    est = GroupMinMax(3, "sorted")
    est.observe(x)
    est.groups = torch.arange(24) % 3  # chosen from another site's ranges
    lo, hi = est.range()
    flat = x.reshape(-1, 24)
    for g in range(3):
        assert torch.all(hi[est.groups == g] == flat[:, est.groups == g].max())
        assert torch.all(lo[est.groups == g] == flat[:, est.groups == g].min())
    est.groups = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="cover 10 channels, the site has 24"):
        est.range()
