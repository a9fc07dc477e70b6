"""Function-preserving transforms (SmoothQuant, Outlier Suppression, OS+): exact in FP32 on every
family, they flatten a planted outlier channel, and the quant state re-applies them bit for bit."""
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from transquant.core.errors import TransquantError
from transquant.core.paths import CONF_PATH
from transquant.data.tasks import batches
from transquant.models.adapters import adapter_for
from transquant.quant.ranges import ESTIMATORS
from transquant.quant.sites import find_sites
from transquant.quant.state import STATE_FILE, QuantState, quantize_
from transquant.quant.transforms import (
    RESTORE_NAME,
    TRANSFORMS,
    ResidualRestore,
    TokenClip,
    norm_stats,
    transform_,
    validate_transform,
)

from .test_adapters import TINY, items, one_batch, record, tiny

FP32 = OmegaConf.load(CONF_PATH / "quant" / "fp32.yaml")
NAMES = ["smoothquant", "outlier_suppression", "os_plus"]
CPU = torch.device("cpu")
OUTLIER = 3  # the planted channel


def preset(name, **over):
    return OmegaConf.merge(FP32, OmegaConf.load(CONF_PATH / "quant" / f"{name}.yaml"), over)


def perturbed(name, outlier=False, seed=0):
    """The tiny model with random norm affines (γ in ±[0.5, 2], β ~ N(0, 0.2)): with γ = 1 gamma
    migration would be the identity. ``outlier``: every rewritable norm's channel 3 is 30x larger."""
    model = tiny(name)
    gen = torch.Generator().manual_seed(seed)
    rewritable = {g.norm for g in adapter_for(model).reader_groups(model)}
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.LayerNorm):
                sign = torch.where(torch.rand(m.weight.shape, generator=gen) < 0.1, -1.0, 1.0)
                m.weight.copy_(sign * (0.5 + 1.5 * torch.rand(m.weight.shape, generator=gen)))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
                if outlier and n in rewritable:
                    m.weight[OUTLIER] = 30.0
                    m.bias[OUTLIER] = 4.0
    return model


def calibration(name):
    return list(batches(items(name, [5, 9, 12, 30, 7, 16], seed=1), 3, 0))


@pytest.mark.parametrize("transform", NAMES)
@pytest.mark.parametrize("name", TINY)
def test_transform_preserves_the_fp32_function(name, transform):
    """Logits and every site's tensor are unchanged (a rewritten norm's output once mapped back,
    z * s + δ), so hidden states and residual sums are too, post-LN as well as pre-LN."""
    model = perturbed(name)
    batch = one_batch(name, seed=3)
    sites = find_sites(model)
    before = dict(record(model, sites, batch))
    state = transform_(model, preset(transform), calibration(name), CPU)
    assert len(state.norms) == len(adapter_for(model).reader_groups(model)) >= 4
    after = dict(record(model, find_sites(model), batch))
    by_module = {id(s.module): s.name for s in sites if s.side == "output"}
    modules = dict(model.named_modules())
    mapped = {by_module[id(modules[n])]: p for n, p in state.norms.items()}
    assert after.keys() == before.keys()
    for site, x in after.items():
        if site in mapped:
            p = mapped[site]
            x = x * p.scale + (0 if p.shift is None else p.shift)
        assert (x - before[site]).abs().max() <= 1e-5, site
    if transform == "outlier_suppression":  # the norms no longer scale
        assert all(torch.equal(modules[n].weight, torch.ones_like(modules[n].weight)) for n in state.norms)


@pytest.mark.parametrize("name", ["tiny", "tiny-distilbert", "tiny-gpt2"])
@pytest.mark.parametrize("transform", NAMES)
def test_transform_flattens_a_planted_outlier_channel(transform, name):
    """max over channels / median over channels of max |x| at every rewritten norm's output."""
    model = perturbed(name, outlier=True)
    groups = [g.norm for g in adapter_for(model).reader_groups(model)]
    data = calibration(name)

    def ratios():
        st = norm_stats(model, groups, data, CPU)
        return {n: float(s.absmax.max() / s.absmax.median()) for n, s in st.items()}

    before = ratios()
    transform_(model, preset(transform), data, CPU)
    after = ratios()
    for n in groups:
        assert before[n] > 10 and after[n] < before[n] / 2, (n, before[n], after[n])


@pytest.mark.parametrize("transform", NAMES)
@pytest.mark.parametrize("name", ["tiny", "tiny-distilbert", "tiny-mpnet", "tiny-gpt2", "tiny-opt"])
def test_state_round_trip_reapplies_the_transform_bit_for_bit(tmp_path, name, transform):
    model = perturbed(name, outlier=True)
    state = quantize_(model, preset(transform), calibration(name))
    assert state.transform is not None and state.transform.name == transform
    assert "transform" in state.seconds
    data = list(batches(items(name, [4, 11, 20], seed=2), 3, 0))

    def logits(m, s):
        with torch.no_grad(), s.active(m):
            return torch.cat([m(**{k: v for k, v in b.items() if k != "labels"}).logits for b in data])

    expected = logits(model, state)
    loaded = QuantState.load(state.save(tmp_path / STATE_FILE))
    assert list(loaded.transform.norms) == list(state.transform.norms)
    for n, p in state.transform.norms.items():
        q = loaded.transform.norms[n]
        assert torch.equal(q.scale, p.scale) and (q.shift is None) == (p.shift is None)
        assert q.shift is None or torch.equal(q.shift, p.shift)
    fresh = loaded.apply(perturbed(name, outlier=True))
    assert torch.equal(logits(fresh, loaded), expected)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    restores = [n for n, m in fresh.named_modules() if isinstance(m, ResidualRestore)]
    assert len(restores) == (0 if adapter_for(fresh).norm == "pre" else len(state.transform.norms))


def test_transform_none_changes_nothing(tmp_path):
    """Absent or ``none``: the same state and logits, and no transform entry in the file."""
    w8a8 = preset("w8a8")
    states, outs = [], []
    for q in (w8a8, OmegaConf.merge(w8a8, {"transform": "none"})):
        model = perturbed("tiny")
        state = quantize_(model, q, calibration("tiny"))
        with torch.no_grad(), state.active(model):
            outs.append(model(**one_batch("tiny")).logits)
        states.append(state)
        assert state.transform is None and not any(isinstance(m, ResidualRestore) for m in model.modules())
    assert torch.equal(*outs)
    assert all(torch.equal(states[0].weights[n].codes, w.codes) for n, w in states[1].weights.items())
    loaded = QuantState.load(states[0].save(tmp_path / STATE_FILE))
    assert loaded.transform is None


def test_post_ln_restore_lives_where_the_residual_enters_the_add():
    model = perturbed("tiny")
    transform_(model, preset("smoothquant"), calibration("tiny"), CPU)
    layer = model.bert.encoder.layer
    assert isinstance(getattr(layer[0].attention.output, RESTORE_NAME), ResidualRestore)  # from the embedding norm
    assert isinstance(getattr(layer[0].output, RESTORE_NAME), ResidualRestore)  # from attention.output.LayerNorm
    assert isinstance(getattr(layer[1].attention.output, RESTORE_NAME), ResidualRestore)  # from layer 0's output norm
    assert not hasattr(layer[1].output.LayerNorm, RESTORE_NAME) and "residual_restore" not in str(model.state_dict())
    distil = perturbed("tiny-distilbert")
    transform_(distil, preset("os_plus"), calibration("tiny-distilbert"), CPU)
    block = distil.distilbert.transformer.layer[0]
    assert getattr(block.sa_layer_norm, RESTORE_NAME).inline and getattr(block.output_layer_norm, RESTORE_NAME).inline


def test_validate_transform_names_the_bad_value():
    validate_transform(preset("smoothquant"))
    validate_transform(FP32)  # absent knobs: the defaults
    with pytest.raises(TransquantError, match=r"quant.transform=smooth: allowed none, smoothquant, outlier_suppression, os_plus"):
        validate_transform(preset("smoothquant", transform="smooth"))
    with pytest.raises(TransquantError, match=r"quant.alpha=1.5: must be a number in \[0, 1\]"):
        validate_transform(preset("smoothquant", alpha=1.5))
    assert list(TRANSFORMS) == NAMES and "token_clip" in ESTIMATORS


def test_token_clip_clips_the_few_outlier_tokens():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=gen)
    x[:5, 2] = 80.0  # five tokens carry an outlier
    est = TokenClip(4)  # at 8 bits min-max is the least-MSE range even with these outliers
    est.observe(x[:1000])
    est.observe(x[1000:])
    lo, hi = est.range()
    assert lo.dim() == hi.dim() == 0
    assert x.min() <= lo < 0 < hi < 20  # the outlier tokens are clipped, the rest kept
    est = TokenClip(8)
    est.observe(torch.randn(500, 8, generator=gen))
    lo, hi = est.range()  # no outliers: (close to) min-max
    assert hi > 2


def test_a_transformed_job_measures_against_the_transformed_reference(make_cfg, store, tmp_path):
    """The job logs the transformed model's statistics beside the FP32 ones, and attributes error
    against the transformed FP32 model: its norm outputs are rescaled on purpose, so comparing
    them with the untransformed ones would report the rescaling as quantization error."""
    from mlflow.tracking import MlflowClient

    from transquant.pipeline import run_job

    run_job(make_cfg("quant=os_plus", "stats.enabled=true", "profile.enabled=false",
                     "tracking.experiment=transformed-job"))
    client = MlflowClient(store["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("transformed-job").experiment_id])

    def last_attn_norm(table: str):
        t = pd.read_csv(client.download_artifacts(run.info.run_id, table, str(tmp_path)))
        return t[t["kind"] == "attn_norm"].iloc[-1]

    after, before = last_attn_norm("activation_stats_transformed.csv"), last_attn_norm("activation_stats.csv")
    assert after["max_abs"] != before["max_abs"]
    assert last_attn_norm("quantization_error.csv")["sqnr_db"] > 25  # 8-bit quantization error only
    assert run.data.metrics["transform_seconds"] > 0
