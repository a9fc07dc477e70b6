"""Activation statistics and quantization-error attribution against closed forms."""
import copy
import json
import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from transquant.analysis.accumulators import Reservoir, SiteAccumulator, TokenInfo
from transquant.analysis.error_attribution import (
    _ErrorAccumulator,
    outlier_error_share,
    quantization_error,
    sqnr_db,
    top_error_share,
)
from transquant.analysis.histogram import HIST_RESOLUTION, MEDIAN_RESOLUTION, hist_median
from transquant.analysis.results import STAT_COLUMNS, ActivationStats, SiteStats, top_count
from transquant.analysis.statistics import cached_fp32_statistics, fp32_statistics, stats_cache_path
from transquant.analysis.to_mlflow import log_quantization_error, log_statistics
from transquant.quant.ptq import QuantizedActivations, token_values
from transquant.quant.quantizers import asymmetric_grid, fake_quantize
from transquant.quant.sites import RESIDUAL_KINDS, find_sites, tap

from .conftest import tiny_bert


def stats_of(*blocks, tokens=None, reservoir=0):
    acc = SiteAccumulator(blocks[0].shape[-1], "cpu", reservoir=reservoir)
    for i, b in enumerate(blocks):
        acc.update(b, None if tokens is None else tokens[i])
    return acc.result("s", "ffn_residual", 0, top_k=3)


def pearson_kurtosis(x: torch.Tensor) -> float:
    v = x.double().reshape(-1)
    v = v - v.mean()
    return ((v ** 4).mean() / (v ** 2).mean() ** 2).item()


def make_items(n=24, vocab=100, seed=0, min_len=4, max_len=20):
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        items.append({"input_ids": [rng.randint(1, vocab - 1) for _ in range(length)],
                      "token_type_ids": [0] * length, "attention_mask": [1] * length, "labels": 0})
    return items


class FakeRun:
    """Collects what would go to MLflow; with ``keep`` artifact files are copied there. It is its
    own ``client`` too, for the MLflow tables."""

    def __init__(self, keep=None):
        self.logged: list[tuple[str, float, int]] = []
        self.artifacts: list[str] = []
        self.tables: dict[str, pd.DataFrame] = {}
        self.keep = keep
        self.client, self.run_id = self, "fake"

    def metrics(self, values, step=0):
        self.logged += [(k, v, step) for k, v in values.items() if v is not None]

    def table(self, df, name):
        self.artifacts.append(name)

    def artifact_file(self, path, subdir=None):
        self.artifacts.append(str(path).rsplit("/", 1)[-1])
        if self.keep is not None:
            import shutil
            shutil.copy(path, self.keep)

    def log_table(self, run_id, data, artifact_file):
        self.artifacts.append(artifact_file)
        self.tables[artifact_file] = data

    def value(self, name, step=0):
        return [v for k, v, s in self.logged if k == name and s == step]


# --- closed forms on synthetic tensors --------------------------------------------------------

def test_gaussian_kurtosis_is_three():
    torch.manual_seed(0)
    x = torch.randn(4000, 50)  # n = 200,000 values
    st = stats_of(x)
    # Sampling s.e. of the kurtosis of n Gaussian values is sqrt(24 / n) = 0.011; allow 5 s.e.
    assert st.kurtosis == pytest.approx(3.0, abs=5 * math.sqrt(24 / x.numel()))
    # float32 per-batch partial sums (accumulated in float64): ~1e-6 relative
    assert st.kurtosis == pytest.approx(pearson_kurtosis(x), rel=1e-5)
    assert st.variance == pytest.approx(x.double().var(0, unbiased=False).mean().item(), rel=1e-5)


def test_kurtosis_pools_channels_with_different_means():
    """Kurtosis is over all values pooled (about the global mean), not a per-channel average."""
    torch.manual_seed(1)
    x = torch.randn(3000, 8) * torch.tensor([1, 2, 0.5, 3, 1, 1, 1, 1]) + torch.tensor([0, 50, -20, 5, 0, 0, 0, 100])
    st = stats_of(x[:1000], x[1000:])
    assert st.kurtosis == pytest.approx(pearson_kurtosis(x), rel=1e-5)
    assert st.global_mean == pytest.approx(x.double().mean().item(), rel=1e-6)


def test_planted_outlier_channel_closed_form():
    """Bulk channels are +-1, channel 7 is +-a (signs alternate, so every mean is exactly 0)."""
    c, n, a = 100, 400, 40.0
    signs = torch.tensor([1.0, -1.0]).repeat(n // 2)[:, None]
    x = signs * torch.ones(n, c)
    x[:, 7] *= a
    st = stats_of(x)
    assert top_count(c) == 1 and top_count(150) == 2 and top_count(5) == 1
    assert st.top_channels[0] == 7
    assert st.top1pct_channel_energy == pytest.approx(a ** 2 / (a ** 2 + c - 1), rel=1e-9)
    # pooled x**4 are float32 dot products: the 400 values a**4 swamp the +-1 ones (rel. ~1e-5)
    assert st.kurtosis == pytest.approx(c * (c - 1 + a ** 4) / (c - 1 + a ** 2) ** 2, rel=1e-4)
    assert st.max_abs == a
    assert st.median_abs == pytest.approx(1.0, rel=MEDIAN_RESOLUTION)
    assert st.max_over_median == pytest.approx(a, rel=MEDIAN_RESOLUTION)
    assert st.variance == pytest.approx((c - 1 + a ** 2) / c)


def test_top_channel_energy_ranks_channels_not_elements():
    """One huge element in an otherwise quiet channel must not beat a channel that is loud on
    every token (an element-wise top-1 % would)."""
    x = torch.ones(1000, 100)
    x[:, 3] = 5.0  # energy 25,000
    x[0, 9] = 100.0  # energy 10,000 - 1 + 1,000 - 1 ... = 10,999
    st = stats_of(x)
    assert st.top1pct_channel_energy == pytest.approx(25_000 / (25_000 + 10_999 + 98 * 1000))
    assert st.top_channels[0] == 9  # ... while by max |x| channel 9 is the outlier


def test_pad_tokens_are_excluded():
    """Only the rows the mask keeps enter the statistics: garbage at pad positions changes nothing."""
    from transquant.quant.ptq import token_values

    torch.manual_seed(2)
    x = torch.randn(3, 10, 16)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 3:] = False
    garbage = x.clone()
    garbage[~mask] = 1e4
    clean = stats_of(token_values(x, mask))
    dirty = stats_of(token_values(garbage, mask))
    polluted = stats_of(garbage.reshape(-1, 16))
    assert dirty.tokens == int(mask.sum()) == clean.tokens
    for attr in ("kurtosis", "max_abs", "variance", "top1pct_channel_energy", "median_abs"):
        assert getattr(dirty, attr) == getattr(clean, attr)
    assert polluted.max_abs == 1e4  # the check above would fail if pads leaked in


def test_pad_positions_do_not_change_model_statistics():
    """End to end on a model: a different pad id (other pad embeddings) changes nothing."""
    model = tiny_bert()
    sites = find_sites(model)
    items = make_items(12)
    a = fp32_statistics(model, sites, items, 0, "cpu", batch_size=4, measure_cost=False, reservoir=0)
    b = fp32_statistics(model, sites, items, 57, "cpu", batch_size=4, measure_cost=False, reservoir=0)
    ta, tb = a.table(), b.table()
    assert a.meta["tokens"] == sum(len(i["input_ids"]) for i in items)
    assert (ta["tokens"][ta["kind"] != "pooler"] == a.meta["tokens"]).all()
    for col in ("kurtosis", "max_abs", "variance", "top1pct_channel_energy"):
        np.testing.assert_allclose(ta[col], tb[col], rtol=1e-4)


def test_streaming_equals_one_batch():
    torch.manual_seed(3)
    x = torch.randn(1000, 24) * torch.linspace(0.1, 5, 24) + 2.0
    x[17, 5] = 80.0
    one = stats_of(x)
    many = stats_of(x[:13], x[13:400], x[400:401], x[401:])
    for attr in ("kurtosis", "variance", "top1pct_channel_energy", "global_mean"):
        assert getattr(many, attr) == pytest.approx(getattr(one, attr), rel=1e-5)
    assert many.max_abs == one.max_abs and many.median_abs == one.median_abs
    np.testing.assert_allclose(many.energy, one.energy, rtol=1e-5)
    np.testing.assert_array_equal(many.lo, one.lo)
    assert many.top_channels == one.top_channels


@pytest.mark.parametrize("dist", ["gauss", "lognormal", "zeros", "odd", "tiny"])
def test_histogram_median_matches_torch_median(dist):
    g = torch.Generator().manual_seed(4)
    x = {"gauss": lambda: torch.randn(20001, generator=g),
         "lognormal": lambda: torch.exp(4 * torch.randn(50000, generator=g)),  # spans ~17 decades
         "zeros": lambda: torch.cat([torch.zeros(600), torch.randn(400, generator=g)]),
         "odd": lambda: torch.tensor([3.0, -7.0, 0.5]),
         "tiny": lambda: 1e-15 * torch.rand(999, generator=g)}[dist]()
    st = stats_of(x.reshape(-1, 1))
    exact = x.abs().median().item()  # the lower median, as hist_median
    assert st.median_abs == pytest.approx(exact, rel=MEDIAN_RESOLUTION, abs=1e-30)
    if dist == "gauss":  # interpolation inside the bin does much better than the bin width
        assert st.median_abs == pytest.approx(exact, rel=MEDIAN_RESOLUTION / 4)


def test_histogram_median_can_fail():
    counts = np.zeros(1 << 15, dtype=np.int64)
    counts[16256] = 3  # three values in [1, 1 + 1/128)
    assert 1.0 <= hist_median(counts) < 1.0 + HIST_RESOLUTION
    with pytest.raises(ValueError):
        hist_median(np.zeros(1 << 15, dtype=np.int64))


def test_special_tokens_split_and_max_token():
    torch.manual_seed(5)
    x = torch.randn(50, 8)
    x[0, 3] = 300.0  # a [CLS]-like outlier
    ids = torch.arange(50) + 1000
    ids[0] = 101
    info = TokenInfo.of(ids[None], torch.ones(1, 50, dtype=torch.bool), {101, 102})
    st = stats_of(x, tokens=[info])
    assert st.max_token_id == 101 and st.max_token_position == 0
    assert st.special_tokens == 1
    assert st.kurtosis_non_special == pytest.approx(pearson_kurtosis(x[1:]), rel=1e-5)
    assert st.kurtosis == pytest.approx(pearson_kurtosis(x), rel=1e-6)
    assert st.kurtosis > 10 * st.kurtosis_non_special
    info2 = TokenInfo.of(torch.tensor([[101, 7, 102, 0], [101, 9, 9, 102]]),
                         torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool(), {101, 102})
    assert info2.special_rows.tolist() == [0, 2, 3, 6] and info2.n_special == 4
    assert info2.positions.tolist() == [0, 1, 2, 0, 1, 2, 3] and info2.ids.tolist()[3] == 101
    # a [batch, tokens, channels] site tensor with its TokenInfo == the rows of token_values
    y = torch.randn(2, 4, 5)
    y[0, 3] = 1e4  # the pad position
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    direct, rows = stats_of(y, tokens=[info2]), stats_of(token_values(y, mask))
    assert direct.tokens == rows.tokens == 7 and direct.max_abs == rows.max_abs < 1e4
    np.testing.assert_array_equal(direct.energy, rows.energy)


def test_reservoir_is_uniform_over_the_stream():
    picks = np.zeros(10)
    for seed in range(200):
        r = Reservoir(500, seed)
        for blk in range(10):
            r.add(torch.arange(blk * 1000, (blk + 1) * 1000, dtype=torch.float32).reshape(-1, 4))
        assert r.values.size == 500 and np.unique(r.values).size == 500
        assert np.all(r.channels == (r.values.astype(int) % 4))
        picks += np.bincount((r.values // 1000).astype(int), minlength=10)
    # 100,000 picks, 10,000 expected per block (s.d. ~95): within 5 %
    np.testing.assert_allclose(picks, 10_000, rtol=0.05)


# --- the model pass ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_stats():
    model = tiny_bert()
    return fp32_statistics(model, find_sites(model), make_items(24), 0, "cpu", batch_size=8,
                           reservoir=5000, special_ids={1, 2})


def test_model_statistics_cover_token_sites(tiny_stats):
    df = tiny_stats.table()
    assert list(df.columns[:len(STAT_COLUMNS)]) == STAT_COLUMNS
    kinds = set(df["kind"])
    for kind in ("embedding_sum", "embedding_norm", "attn_residual", "ffn_residual", "attn_norm", "ffn_norm",
                 "ffn_intermediate", "ffn_output", "attn_output", "query", "key", "value", "context"):
        assert kind in kinds
    assert not {"attn_scores", "attn_probs", "logits"} & kinds
    assert (df[df["kind"] == "ffn_intermediate"]["channels"] == 64).all()
    assert df["kurtosis"].notna().all() and (df["max_over_median"] > 1).all()
    meta = tiny_stats.meta
    assert meta["stats_seconds"] > 0 and meta["fp32_pass_seconds"] > 0
    assert meta["stats_cost_vs_fp32_pass"] == pytest.approx(meta["stats_seconds"] / meta["fp32_pass_seconds"])
    kept = [s for s in tiny_stats.sites if s.sample is not None]
    assert len(kept) == 1 and kept[0] is tiny_stats.worst_site() and kept[0].kind in RESIDUAL_KINDS
    assert kept[0].sample.size == 5000 // 32 * 32  # whole tokens (rows of 32 channels)


def test_model_statistics_match_direct_computation(tiny_stats):
    """Same numbers as capturing the tensors and computing on them directly."""
    model = tiny_bert()
    items = make_items(24)
    from transquant.data.tasks import batches
    captured: dict[str, list[torch.Tensor]] = {}
    site = next(s for s in find_sites(model) if s.name == "layer.1.ffn.residual")
    with torch.no_grad():
        for b in batches(items, 8, 0, by_length=True):
            b.pop("labels")
            mask = b["attention_mask"].bool()
            with tap([site], lambda s, x: captured.setdefault(s.name, []).append(x[mask]) or x):
                model(**b)
    x = torch.cat(captured[site.name])
    st = tiny_stats[site.name]
    assert st.kurtosis == pytest.approx(pearson_kurtosis(x), rel=1e-5)
    assert st.max_abs == pytest.approx(x.abs().max().item())
    assert st.median_abs == pytest.approx(x.abs().median().item(), rel=MEDIAN_RESOLUTION)
    energy = (x.double() ** 2).sum(0)
    assert st.top1pct_channel_energy == pytest.approx((energy.max() / energy.sum()).item(), rel=1e-5)


def test_outliers_persistence():
    def site(layer, top):
        hi = np.ones(10)
        hi[top] = [30.0, 20.0, 10.0]
        z = np.zeros(10)
        return SiteStats(f"layer.{layer}.ffn.residual", "ffn_residual", layer, 10, 5, z, z, z, -np.ones(10), hi,
                         3.0, 1.0, 0.0, 1.0)
    st = ActivationStats([site(0, [5, 1, 2]), site(1, [5, 3, 4]), site(2, [1, 5, 9])])
    out = json.loads(json.dumps(st.outliers()))
    ffn = out["kinds"]["ffn_residual"]
    assert ffn["top_channels"] == {"0": [5, 1, 2], "1": [5, 3, 4], "2": [1, 5, 9]}
    assert ffn["persistence"]["5"] == 1.0
    assert ffn["persistence"]["1"] == pytest.approx(2 / 3)
    assert ffn["persistence"]["9"] == pytest.approx(1 / 3)
    assert list(ffn["persistence"])[0] == "5"
    assert out["residual_stream"]["persistence"]["5"] == 1.0


def test_json_round_trip(tiny_stats):
    back = ActivationStats.from_json(json.loads(json.dumps(tiny_stats.to_json())))
    assert back.table().equals(tiny_stats.table())
    assert np.array_equal(back.sampled_site().sample, tiny_stats.sampled_site().sample)
    assert back.meta == tiny_stats.meta


def test_cache_computes_once(tmp_path):
    model = tiny_bert()
    items = make_items(8)
    path = stats_cache_path(tmp_path, "ckpt", "fp", 8)
    assert path != stats_cache_path(tmp_path, "ckpt", "fp", 16)
    assert path != stats_cache_path(tmp_path, "other", "fp", 8)
    a, hit_a = cached_fp32_statistics(path, model, find_sites(model), items, 0, "cpu", batch_size=4, reservoir=100)
    b, hit_b = cached_fp32_statistics(path, None, [], [], 0, "cpu")  # must not recompute
    assert (hit_a, hit_b) == (False, True)
    assert a.table().equals(b.table())


def test_log_statistics_names(tiny_stats):
    run = FakeRun()
    names = log_statistics(run, tiny_stats)
    assert names == ["activation_stats.csv", "activation_stats.json", "outlier_channels.json"] == run.artifacts
    for layer in (0, 1):
        ffn = tiny_stats[f"layer.{layer}.ffn.residual"]
        assert run.value("kurtosis", layer) == [pytest.approx(ffn.kurtosis)]
        assert run.value("top1pct_channel_energy", layer) == [pytest.approx(ffn.top1pct_channel_energy)]
    assert run.value("stats_cost_vs_fp32_pass") and run.value("max_abs", 2) == []
    assert not [k for k, _, _ in run.logged if k.startswith("stats.")]  # per-site numbers: the table
    t = run.tables["activation_stats.json"].set_index("site")
    assert len(t) == len(tiny_stats.sites)
    assert t.loc["layer.1.attn.residual", "kurtosis"] == pytest.approx(tiny_stats["layer.1.attn.residual"].kurtosis)
    assert t.loc["embeddings.sum", "max_abs"] == pytest.approx(tiny_stats["embeddings.sum"].max_abs)


# --- quantization error -----------------------------------------------------------------------

def test_sqnr_closed_forms():
    assert sqnr_db(1.0, 0.0) == math.inf
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    torch.manual_seed(6)
    x = torch.randn(20000, 10)
    acc = _ErrorAccumulator(10, "cpu")
    acc.add(x, x + 0.1 * torch.randn_like(x))  # noise power 0.01 -> 20 dB
    assert sqnr_db(acc.signal.sum().item(), acc.error.sum().item()) == pytest.approx(20.0, abs=0.1)
    # Uniform quantization with a fine step: error power step**2 / 12.
    grid = asymmetric_grid(torch.tensor(-8.0), torch.tensor(8.0), 10)
    acc = _ErrorAccumulator(10, "cpu")
    acc.add(x, fake_quantize(x, grid))
    expected = 10 * math.log10(1.0 / (grid.scale.item() ** 2 / 12))
    assert sqnr_db(acc.signal.sum().item(), acc.error.sum().item()) == pytest.approx(expected, abs=0.15)


def test_top_error_share():
    signal = np.ones(200)
    signal[[4, 9]] = 50.0  # top-1 % of 200 channels = 2 channels
    err = np.ones(200)
    assert top_error_share(signal, err) == pytest.approx(2 / 200)
    err[[4, 9]] = 99.0
    assert top_error_share(signal, err) == pytest.approx(198 / (198 + 198))


def _qa_for(model, grids):
    return QuantizedActivations(find_sites(model), {}, {}, grids)


def test_identical_models_have_infinite_sqnr():
    model = tiny_bert()
    df = quantization_error(model, copy.deepcopy(model), _qa_for(model, {}), find_sites(model), make_items(8),
                            0, "cpu", batch_size=4)
    assert len(df) == len([s for s in find_sites(model) if s.channels is not None])
    assert (df["error"] == 0).all() and np.isinf(df["sqnr_db"]).all()


def test_single_quantized_site_error_is_its_own_quantization_noise():
    """Quantize only layer.1.attn.residual: upstream sites stay exact, that site's SQNR is the
    one of fake-quantizing its FP32 tensor, downstream sites see the error propagate."""
    model = tiny_bert()
    sites = find_sites(model)
    items = make_items(8)
    name = "layer.1.attn.residual"
    grid = asymmetric_grid(torch.tensor(-2.0), torch.tensor(2.0), 4)
    df = quantization_error(model, copy.deepcopy(model), _qa_for(model, {name: grid}), sites, items, 0, "cpu",
                            batch_size=4).set_index("site")
    # direct: capture the FP32 tensor at that site, non-pad tokens
    from transquant.data.tasks import batches
    xs = []
    site = next(s for s in sites if s.name == name)
    with torch.no_grad():
        for b in batches(items, 4, 0, by_length=True):
            b.pop("labels")
            m = b["attention_mask"].bool()
            with tap([site], lambda s, x: xs.append(x[m]) or x):
                model(**b)
    x = torch.cat(xs).double()
    q = fake_quantize(x.float(), grid).double()
    expected = 10 * math.log10((x ** 2).sum().item() / ((q - x) ** 2).sum().item())
    assert df.loc[name, "sqnr_db"] == pytest.approx(expected, rel=1e-4)
    assert df.loc[name, "local_sqnr_db"] == pytest.approx(expected, rel=1e-4)
    assert df.loc[name, "quantized"]
    assert np.isinf(df.loc["layer.1.attn.output", "sqnr_db"]) and np.isinf(df.loc["layer.0.ffn.residual", "sqnr_db"])
    assert np.isfinite(df.loc["layer.1.ffn.residual", "sqnr_db"])
    assert np.isinf(df.loc["layer.1.ffn.residual", "local_sqnr_db"])  # not quantized itself

    run = FakeRun()
    assert log_quantization_error(run, df.reset_index()) == ["quantization_error.csv", "quantization_error.json"]
    assert run.value("sqnr_db", 1) == [pytest.approx(df.loc["layer.1.ffn.residual", "sqnr_db"])]
    assert run.tables["quantization_error.json"].set_index("site").loc[name, "sqnr_db"] == pytest.approx(expected,
                                                                                                          rel=1e-4)
    assert {k for k, _, _ in run.logged} == {"sqnr_db", "outlier_error_share", "outlier_error_share.ffn_residual"}
    assert run.value("sqnr_db", 0) == []  # infinite: not logged
    share = outlier_error_share(df.reset_index())
    assert 0 < share < 1 and run.value("outlier_error_share") == [pytest.approx(share)]


# --- the stats-only command -------------------------------------------------------------------

def _with_stats(*overrides: str) -> tuple[str, ...]:
    """``+stats=default`` until conf/config.yaml lists the stats group in its defaults."""
    from omegaconf import OmegaConf

    from transquant.run import CONF_DIR

    defaults = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/config.yaml")).get("defaults", [])
    listed = any(isinstance(d, dict) and "stats" in d for d in defaults)
    return overrides if listed else ("+stats=default", *overrides)


def test_stats_command_logs_a_stats_run(make_cfg, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from transquant.stats import run_stats

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()  # a file store: no database migrations to wait for
    cfg = make_cfg(*_with_stats("stats.finetune=false", "stats.num_examples=12", "stats.reservoir=2000",
                                f"tracking.uri={uri}", f"stats.page_dir={tmp_path / 'pages'}"))
    stats = run_stats(cfg)
    out = capsys.readouterr().out
    assert "layer.1.ffn.residual" in out and "outlier channels" in out
    assert stats.meta["examples"] == 12
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("transquant")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`transquant.role` = 'stats'")
    assert runs and runs[0].info.status == "FINISHED" and runs[0].data.tags["stats_cache"] == "miss"
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"activation_stats.csv", "outlier_channels.json", "depth_curves.png", "outlier_map.png"} <= arts
    assert {"activation_stats.json", "activation_stats.csv", "stats.html"} <= arts
    assert (tmp_path / "pages" / "stats-tiny" / "stats.html").is_file()
    assert "kurtosis" in runs[0].data.metrics and not [k for k in runs[0].data.metrics if k.startswith("stats.")]


def test_stats_command_rejects_bad_settings(make_cfg):
    from transquant.core.errors import TransquantError
    from transquant.stats import run_stats

    with pytest.raises(TransquantError, match="stats.top_k"):
        run_stats(make_cfg(*_with_stats("stats.top_k=0")))
