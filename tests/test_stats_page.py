"""The stats page: the suggested method read off the statistics, and the page run_stats writes."""
import random
import shlex
from html.parser import HTMLParser

import pytest
import torch

from transquant.analysis.accumulators import SiteAccumulator
from transquant.analysis.job import stats_config, validate_stats
from transquant.analysis.results import ActivationStats
from transquant.analysis.statistics import fp32_statistics
from transquant.analysis.suggest import PEG_MAX_GROUPS, suggest
from transquant.core.config import validate_static
from transquant.core.errors import TransquantError
from transquant.quant.sites import find_sites, select

from .conftest import tiny_bert

PLANTED = 7  # channel of layer 0's attention LayerNorm whose gamma is made large
PLANTED_SITE = "layer.0.attn.norm"  # that LayerNorm's output


def items(n=16, vocab=100, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(4, 16)
        out.append({"input_ids": [rng.randint(1, vocab - 1) for _ in range(length)],
                    "token_type_ids": [0] * length, "attention_mask": [1] * length, "labels": 0})
    return out


def model_stats(plant: bool):
    model = tiny_bert()
    if plant:
        with torch.no_grad():
            model.bert.encoder.layer[0].attention.output.LayerNorm.weight[PLANTED] = 60.0
    return model, fp32_statistics(model, find_sites(model), items(), 0, "cpu", batch_size=8, measure_cost=False,
                                  reservoir=0)


@pytest.fixture(scope="module")
def planted():
    return model_stats(plant=True)


def composed_patterns(make_cfg, overrides: str) -> tuple[str, list[str]]:
    """(quant.method, the PEG or 16-bit site patterns) of the suggested overrides, composed as the
    command line would be and validated."""
    cfg = make_cfg(*shlex.split(overrides))
    validate_static(cfg)
    q = cfg.quant
    return q.method, list(q.peg_sites if q.method == "peg" else q.high_bits_sites)


def test_planted_outlier_channel_gets_peg_or_16_bits_at_its_site(planted, make_cfg):
    model, stats = planted
    s = suggest(stats, 8, 8)
    method, patterns = composed_patterns(make_cfg, s.overrides)
    assert method == s.method and method in ("peg", "mixed")
    assert PLANTED_SITE in {site.name for site in select(find_sites(model), patterns)}
    assert PLANTED_SITE in s.sites and PLANTED in s.channels[PLANTED_SITE]
    assert f"{PLANTED} (" in s.reason  # named among the outlier channels
    if method == "peg":
        assert "quant.grouping=gap" in s.overrides and 2 <= int(dict(
            p.split("=", 1) for p in shlex.split(s.overrides))["quant.k"]) <= PEG_MAX_GROUPS


def test_without_the_plant_plain_per_tensor_ranges(make_cfg):
    _, stats = model_stats(plant=False)
    s = suggest(stats, 8, 8)
    assert (s.method, s.overrides, s.sites) == ("w8a8", "quant=w8a8", ())
    assert "no site is coarse" in s.reason
    assert make_cfg(*shlex.split(suggest(stats, 8, 6).overrides)).quant.act_bits == 6


def test_low_activation_bits_suggest_dynamic_ranges_and_say_which_engines(planted, make_cfg):
    _, stats = planted
    s = suggest(stats, 8, 6)
    assert s.method == "dynamic" and PLANTED_SITE in s.sites
    cfg = make_cfg(*shlex.split(s.overrides))
    assert (cfg.quant.estimator, cfg.quant.act_bits, cfg.quant.weight_bits) == ("dynamic", 6, 8)
    assert "onnxruntime" in s.engines and "profile.engine=torch" in s.engines
    assert suggest(stats, 8, 16).method == "w8a8"  # a 16-bit grid resolves the bulk despite the outlier


def test_low_weight_bits_get_per_channel_weight_grids(planted, make_cfg):
    """Below 8-bit weights the line asks for one grid per output channel (per tensor, every method
    fell to chance at W6A6 and W4A8 on MiniLM) and it composes; measured budgets carry no caveat."""
    _, stats = planted
    for wb, ab in ((6, 6), (4, 8)):
        s = suggest(stats, wb, ab)
        cfg = make_cfg(*shlex.split(s.overrides))
        assert (cfg.quant.weight_granularity, cfg.quant.weight_bits, cfg.quant.act_bits) == ("channel", wb, ab)
        assert "per output channel" in s.reason and "extrapolates" not in s.reason
    assert "weight_granularity" not in suggest(stats, 8, 6).overrides
    assert "extrapolates" in suggest(stats, 3, 8).reason


def one_site(x: torch.Tensor) -> ActivationStats:
    acc = SiteAccumulator(x.shape[-1], "cpu")
    acc.update(x)
    return ActivationStats([acc.result("layer.0.ffn.residual", "ffn_residual", 0, top_k=3)])


def test_many_outlier_channels_get_16_bits_and_a_spread_tail_mse():
    torch.manual_seed(0)
    x = torch.randn(2000, 400)
    x[:, :8] *= torch.linspace(400, 120, 8)  # 8 outlier channels: more than PEG groups can isolate
    s = suggest(one_site(x), 8, 8)
    assert s.method == "mixed" and "'quant.high_bits_sites=[*.ffn.residual]'" in s.overrides
    assert s.channels["layer.0.ffn.residual"] == list(range(8))
    y = torch.randn(2000, 400)
    y[0] = 300.0  # one extreme token across every channel: no channel to isolate
    assert suggest(one_site(y), 8, 8).method == "mse"
    assert suggest(one_site(y), 8, 6).method == "dynamic"


@pytest.mark.parametrize("override, match", [
    ("stats.act_bits=1", r"stats.act_bits=1: .*\[2, 16\]"),
    ("stats.weight_bits=17", r"stats.weight_bits=17: .*\[2, 16\]"),
    ("stats.act_bits=true", r"stats.act_bits=True: .*integer"),
    ("stats.page_dir=3", r"stats.page_dir=3: must be a folder path"),
])
def test_bad_stats_settings_are_named(make_cfg, override, match):
    with pytest.raises(TransquantError, match=match):
        validate_stats(stats_config(make_cfg(override)))


class Page(HTMLParser):
    """Headings, table ids, inline images and <pre> text of a page."""

    def __init__(self):
        super().__init__()
        self.h2, self.tables, self.images, self.pre = [], [], 0, []
        self._in = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append(attrs.get("id"))
        if tag == "img" and attrs.get("src", "").startswith("data:image/png;base64,"):
            self.images += 1
        self._in = tag if tag in ("h2", "pre") else self._in

    def handle_endtag(self, tag):
        self._in = None if tag == self._in else self._in

    def handle_data(self, data):
        if self._in == "h2":
            self.h2.append(data)
        elif self._in == "pre":
            self.pre.append(data)


def test_stats_command_writes_and_logs_the_page(make_cfg, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from transquant.stats import run_stats

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()  # a file store: no database migrations to wait for
    cfg = make_cfg("stats.finetune=false", "stats.num_examples=12", "stats.reservoir=2000", f"tracking.uri={uri}",
                   "task.synthetic_train_size=32", "task.synthetic_eval_size=32",
                   f"stats.page_dir={tmp_path}/pages")
    run_stats(cfg)
    out = capsys.readouterr().out
    local = tmp_path / "pages" / "stats-tiny" / "stats.html"
    assert f"stats page: {local}" in out and "suggested at W8A8: python -m transquant.run quant=" in out
    page = Page()
    page.feed(local.read_text(encoding="utf-8"))
    assert {"Suggestion at W8A8", "How the suggestion was derived", "Outlier map", "Per-layer statistics"} <= set(
        page.h2)
    assert {"outlier-grid", "per-layer", "measured"} <= set(page.tables) and page.images >= 3
    assert any(p.startswith("python -m transquant.run quant=") for p in page.pre)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("transquant")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`transquant.role` = 'stats'")
    assert {"stats.html", "outlier_map.png", "depth_curves.png"} <= {a.path for a in client.list_artifacts(
        run.info.run_id)}
    logged = client.download_artifacts(run.info.run_id, "stats.html", str(tmp_path))
    assert open(logged, encoding="utf-8").read() == local.read_text(encoding="utf-8")
