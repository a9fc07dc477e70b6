"""QuantState: what quantize_ returns saves, loads and re-applies to a fresh FP32 model exactly."""
import re
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from transquant import api, models
from transquant.core.errors import TransquantError
from transquant.core.paths import CONF_PATH
from transquant.pipeline import run_job
from transquant.quant.quantizers import fake_quantize
from transquant.quant.state import STATE_FILE, QuantState, quantize_
from transquant.studies.significance import PREDICTIONS, load_predictions
from transquant.train.evaluate import predictions

from .conftest import random_batches, tiny_bert

CONF = OmegaConf.load(CONF_PATH / "quant" / "fp32.yaml")
README = Path(__file__).resolve().parent.parent / "README.md"


def _preset(name, **over):
    return OmegaConf.merge(CONF, OmegaConf.load(CONF_PATH / "quant" / f"{name}.yaml"), over)


# PEG with groups shared per layer and MSE weights, 16-bit sites and weights, percentile, weights only.
METHODS = {"peg_paper": _preset("peg_paper", k=3), "mixed16": _preset("mixed", weight_bits=16),
           "percentile": _preset("percentile", percentile=99.0), "w8a32": _preset("w8a32")}


def _quantized(q):
    model = tiny_bert()
    return model, quantize_(model, q, random_batches(4, seed=1))


def _logits(model, state):
    with torch.no_grad(), state.active(model):
        return torch.cat([model(**b).logits for b in random_batches(3, seed=2)])


def _same_grid(a, b):
    assert (a.qmin, a.qmax) == (b.qmin, b.qmax)
    for x, y in ((a.scale, b.scale), (a.zero_point, b.zero_point)):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_keeps_every_field(tmp_path, method):
    _, state = _quantized(METHODS[method])
    loaded = QuantState.load(state.save(tmp_path / STATE_FILE))
    assert loaded.config == state.config == OmegaConf.to_container(METHODS[method])
    assert list(loaded.sites) == list(state.sites) and list(loaded.weights) == list(state.weights)
    for name, s in state.sites.items():
        t = loaded.sites[name]
        assert (t.kind, t.layer, t.plan, t.granularity) == (s.kind, s.layer, s.plan, s.granularity)
        _same_grid(t.grid, s.grid)
        assert (t.groups is None) == (s.groups is None)
        assert t.groups is None or torch.equal(t.groups, s.groups)
    for name, w in state.weights.items():
        _same_grid(loaded.weights[name].grid, w.grid)
        assert loaded.weights[name].codes.dtype == w.codes.dtype and torch.equal(loaded.weights[name].codes, w.codes)
    assert loaded.activations is None


def test_state_holds_plans_groups_and_integer_codes():
    model, state = _quantized(METHODS["peg_paper"])
    peg = {n: s for n, s in state.sites.items() if s.plan.estimator == "peg"}
    assert peg and all(s.granularity == "per_channel" and s.groups.numel() == 32 for s in peg.values())
    assert torch.equal(peg["layer.0.attn.norm"].groups, peg["layer.0.ffn.output"].groups)  # shared per layer
    assert state.sites["layer.0.attn.scores"].granularity == "per_tensor"
    assert state.grids == state.activations.grids and state.plans == state.activations.plans
    weights = dict(model.named_modules())
    for name, w in state.weights.items():
        assert w.codes.dtype == torch.int8 and state.weight_grids[name] is w.grid
        assert torch.equal(w.dequantize(weights[name].weight), weights[name].weight)
    mixed = _quantized(METHODS["mixed16"])[1]
    assert {w.codes.dtype for w in mixed.weights.values()} == {torch.int16}
    assert {s.grid.qmax for s in mixed.sites.values()} == {255, 65535}


@pytest.mark.parametrize("method", METHODS)
def test_loaded_state_applied_to_a_fresh_model_gives_identical_logits(tmp_path, method):
    model, state = _quantized(METHODS[method])
    expected = _logits(model, state)
    loaded = QuantState.load(state.save(tmp_path / STATE_FILE))
    fresh = loaded.apply(tiny_bert())
    assert torch.equal(_logits(fresh, loaded), expected)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert (loaded.activations is None) == (not loaded.sites)


def test_active_refuses_a_model_the_state_was_not_applied_to():
    _, state = _quantized(METHODS["peg_paper"])
    with pytest.raises(TransquantError, match=re.escape("call state.apply(model) first")):
        with state.active(tiny_bert()):
            pass
    with pytest.raises(TransquantError, match="the model has no such module"):
        state.apply(tiny_bert(layers=1))


def test_the_weights_are_what_the_fake_quantizer_makes():
    model, state = _quantized(METHODS["percentile"])
    fp32 = dict(tiny_bert().named_modules())
    for name, w in state.weights.items():
        assert torch.equal(w.dequantize(fp32[name].weight), fake_quantize(fp32[name].weight.detach(), w.grid))


def test_pipeline_logs_the_state_and_it_reproduces_the_job(make_cfg, tmp_path):
    """The job's artifact, applied to the cached FP32 checkpoint, makes the job's predictions."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg("quant=peg", "quant.k=2", "profile.enabled=false", "stats.enabled=false", f"tracking.uri={uri}")
    run_job(cfg)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("transquant").experiment_id])[0]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "quant_state")] == [f"quant_state/{STATE_FILE}"]
    state = QuantState.load(client.download_artifacts(run.info.run_id, f"quant_state/{STATE_FILE}", str(tmp_path)))
    assert state.config["method"] == "peg" and len(state.sites) == run.data.metrics["quantized_activation_sites"]
    assert len(state.weights) == run.data.metrics["quantized_weight_tensors"]
    expected, _ = load_predictions(client.download_artifacts(run.info.run_id, PREDICTIONS, str(tmp_path)))

    job = api.Job("model=tiny", "task=synthetic", "train=quick", f"paths.cache_dir={cfg.paths.cache_dir}")
    model = state.apply(models.load_finetuned(run.data.tags["checkpoint"]))
    with torch.no_grad(), state.active(model):
        pred, _ = predictions(model, job.validation, 64, job.tokenizer.pad_token_id, torch.device("cpu"),
                              original_order=True)
    assert pred.numpy().tolist() == expected.tolist()


def test_readme_python_api_runs(store, tmp_path, monkeypatch):
    """Every line of the README's "Python API" block runs (on the tiny model)."""
    block = README.read_text().split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("TRANSQUANT_CACHE", store["cache"])
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {})
