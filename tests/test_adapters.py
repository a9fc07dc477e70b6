"""Model adapters: every family's tiny model maps to sites in forward order, its residual sums are
the tensors the model really adds, and calibration, quantization and evaluation run on it."""
import copy
import importlib
import random
from functools import lru_cache

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    AutoTokenizer,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    OPTConfig,
    OPTForSequenceClassification,
)

from transquant import models
from transquant.core.config import validate_against_model
from transquant.core.paths import CONF_PATH
from transquant.data.tasks import Example, batches, encode
from transquant.models.adapters import ADAPTERS, adapter_for
from transquant.models.adapters.base import get
from transquant.quant.ptq import calibrate, plan_sites, token_values
from transquant.quant.sites import ATTENTION_KINDS, ArchitectureError, Site, find_sites, tap, use_tappable_attention
from transquant.quant.state import QuantState, quantize_
from transquant.train.evaluate import percent_correct, predictions

# Hydra model option -> (family, sites: 2 embedding + 13 per layer (GPT-2: 11, OPT: 13 with no
# embedding norm; MPNet: 11, no attention scores/probs) + final norm / pooler + logits).
TINY = {"tiny": ("bert", 2 + 13 * 2 + 2), "tiny-electra": ("bert", 2 + 13 * 2 + 1),
        "tiny-distilbert": ("distilbert", 2 + 13 * 2 + 2), "tiny-roberta-preln": ("roberta-prelayernorm", 2 + 13 * 2 + 2),
        "tiny-gpt2": ("gpt2", 1 + 11 * 2 + 2), "tiny-opt": ("opt", 1 + 13 * 2 + 2), "tiny-mpnet": ("mpnet", 2 + 11 * 2 + 1)}
HUB = {"gpt2": 768, "opt-125m": 768, "roberta-base": 768, "distilbert-base-uncased": 768, "mpnet-base": 768}
QUANT = OmegaConf.load(CONF_PATH / "quant" / "fp32.yaml")


def model_cfg(name: str):
    return OmegaConf.load(CONF_PATH / "model" / f"{name}.yaml")


@lru_cache(maxsize=None)
def _built(name: str) -> torch.nn.Module:
    return models.load_pretrained(model_cfg(name), num_labels=2, seed=0).eval()


def tiny(name: str) -> torch.nn.Module:
    """A fresh copy of the tiny model with tappable attention (built once per session)."""
    model = copy.deepcopy(_built(name))
    use_tappable_attention(model)
    return model


def items(name: str, lengths, seed=0) -> list[dict]:
    """Random sequences, with token type ids only for a family that has segment embeddings."""
    rng = random.Random(seed)
    types = ADAPTERS[TINY[name][0]].segments
    return [{"input_ids": [rng.randrange(1, 1000) for _ in range(n)], **({"token_type_ids": [0] * n} if types else {}),
             "attention_mask": [1] * n, "labels": i % 2} for i, n in enumerate(lengths)]


LENGTHS = [3, 30, 5, 20, 7, 17, 4, 25]


def one_batch(name: str, seed=0) -> dict:
    batch = next(batches(items(name, LENGTHS[:4], seed), 4, 0))
    batch.pop("labels")
    return batch


def record(model, sites, batch) -> list[tuple[str, torch.Tensor]]:
    """(site name, tensor) in the order the taps fire during one forward pass."""
    seen = []
    with torch.no_grad(), tap(sites, lambda s, x: seen.append((s.name, x.clone())) or x):
        model(**batch)
    return seen


def test_registry_lists_every_family():
    assert list(ADAPTERS) == ["bert", "distilbert", "gpt2", "mpnet", "opt", "roberta-prelayernorm"]
    for name, (family, _) in TINY.items():
        assert adapter_for(_built(name)).family == family, name


@pytest.mark.parametrize("name", TINY)
def test_sites_fire_once_each_in_forward_order_at_their_width(name):
    model = tiny(name)
    sites = find_sites(model)
    assert len(sites) == TINY[name][1]
    seen = record(model, sites, one_batch(name))
    assert [n for n, _ in seen] == [s.name for s in sites]  # every tap fires, attention taps included
    width = {s.name: s.channels for s in sites}
    for n, x in seen:
        if width[n] is not None:  # token-wise (OPT's flattened FFN included) or the pooler's one row per sequence
            assert x.shape[:-1] == ((4,) if n == "pooler" else (4, 30)) and x.shape[-1] == width[n], n
    assert seen[-1][1].shape == (4, 2)  # one row of logits per sequence, decoders' pooled ones too


@pytest.mark.parametrize("name", TINY)
def test_residual_sums_are_the_tensors_the_blocks_add(name):
    """Against hooks on the real blocks: each block's input plus its attention output is the
    attention residual; the FFN adds onto the attention norm (post-LN) or the attention sum
    (pre-LN); the block's output is the FFN's norm (post-LN) or its sum (pre-LN)."""
    model = tiny(name)
    adapter = adapter_for(model)
    base = next(m for _, m in model.named_modules() if isinstance(get(m, adapter.layout.blocks), torch.nn.ModuleList))
    blocks = get(base, adapter.layout.blocks)
    block_in, block_out = {}, {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: block_in.__setitem__(i, a[0])) for i, b in enumerate(blocks)]
    hooks += [b.register_forward_hook(lambda m, a, out, i=i: block_out.__setitem__(i, out[0] if isinstance(out, tuple)
                                                                                   else out)) for i, b in enumerate(blocks)]
    seen = dict(record(model, find_sites(model), one_batch(name)))
    for h in hooks:
        h.remove()
    pre = adapter.norm == "pre"
    close = lambda a, b: torch.allclose(a.reshape(b.shape), b, atol=1e-5)
    for i in range(len(blocks)):
        at = lambda s: seen[f"layer.{i}.{s}"]
        assert close(at("attn.residual"), at("attn.output") + block_in[i])
        assert close(at("ffn.residual"), at("ffn.output") + (at("attn.residual") if pre else at("attn.norm")))
        assert close(block_out[i], at("ffn.residual") if pre else at("ffn.norm"))
    if adapter.causal:  # a decoder's stream starts at the embedding sum
        assert close(block_in[0], seen["embeddings.sum"])


@pytest.mark.parametrize("name", TINY)
def test_ranges_do_not_depend_on_padding(name):
    """The same sequences one per batch or eight per batch (padded) give the same range at
    every site: pad tokens never reach a range, and a decoder's head pools the last real token."""
    model = tiny(name)
    sites = find_sites(model)
    plans = plan_sites(sites, OmegaConf.merge(QUANT, {"act_bits": 8}))
    assert len(plans) == len(sites)
    data = items(name, LENGTHS)
    alone = calibrate(model, sites, plans, list(batches(data, 1, 0)), torch.device("cpu"))
    padded = calibrate(model, sites, plans, list(batches(data, 8, 0)), torch.device("cpu"))
    for s in sites:
        a, b = alone.grids[s.name], padded.grids[s.name]
        assert torch.allclose(a.scale, b.scale, rtol=1e-5, atol=0), s.name
        assert torch.equal(a.zero_point, b.zero_point), s.name


def test_causal_attention_ranges_leave_out_future_keys():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    scores = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    assert token_values(scores, mask, causal=True).tolist() == [0, 3, 4, 9, 12, 13, 15, 16, 17]
    model = tiny("tiny-gpt2")
    site = next(s for s in find_sites(model) if s.name == "layer.1.attn.scores")
    assert site.causal
    batch = one_batch("tiny-gpt2")
    (_, raw), = record(model, [site], batch)
    qa = calibrate(model, [site], plan_sites([site], OmegaConf.merge(QUANT, {"act_bits": 8})), [batch],
                   torch.device("cpu"))
    mask = batch["attention_mask"].bool()
    kept, real = token_values(raw, mask, causal=True), token_values(raw, mask)
    lo, hi = qa.estimators[site.name].range()
    assert torch.allclose(lo, kept.min()) and torch.allclose(hi, kept.max())
    assert (kept.min(), kept.max()) != (real.min(), real.max())  # future keys would have set the range


@pytest.mark.parametrize("name", TINY)
def test_quantized_model_evaluates_and_its_state_reapplies(name, tmp_path):
    model = tiny(name)
    data = items(name, LENGTHS)
    fp32 = predictions(model, data, 4, 0, torch.device("cpu"))[0]
    q = OmegaConf.merge(QUANT, OmegaConf.load(CONF_PATH / "quant" / "peg_paper.yaml"),
                        {"k": 2, "weight_estimator": "minmax"})  # MSE weight ranges: slow on a 30522-word vocabulary
    state = quantize_(model, q, batches(data, 4, 0))
    assert state.sites and all(s.grid.scale.isfinite().all() for s in state.sites.values())
    assert len(state.weights) == sum(1 for m in model.modules() if hasattr(m, "weight") and m.weight.dim() == 2)
    with state.active(model):
        pred, true = predictions(model, data, 4, 0, torch.device("cpu"))
        logits = model(**one_batch(name)).logits
    assert 0 <= percent_correct(pred, true) <= 100 and pred.shape == fp32.shape
    loaded = QuantState.load(state.save(tmp_path / "state.safetensors"))
    fresh = loaded.apply(tiny(name))
    with loaded.active(fresh):
        assert torch.equal(fresh(**one_batch(name)).logits, logits)


@pytest.mark.parametrize("name", [*TINY, *HUB])
def test_config_validation_builds_every_model_offline(make_cfg, name):
    sites = validate_against_model(make_cfg(f"model={name}", "task=synthetic", "train=quick", tiny=False))
    assert {"layer.0.ffn.residual", "layer.0.attn.norm", "layer.0.ffn.output", "logits"} <= {s.name for s in sites}
    assert models.hidden_size(model_cfg(name)) == HUB.get(name, 32)


def test_identity_names_the_family():
    gpt2 = model_cfg("tiny-gpt2")
    other = OmegaConf.merge(gpt2, {"model_type": "opt"})
    assert models.identity(gpt2)["model_type"] == "gpt2" and models.identity(gpt2) != models.identity(other)


def test_decoders_pad_with_the_tokenizer_pad_id():
    for name in ("tiny-gpt2", "tiny-opt"):
        assert _built(name).config.pad_token_id == models.load_tokenizer(model_cfg(name)).pad_token_id == 0


def test_unknown_architecture_names_what_no_adapter_maps():
    model = DebertaV2ForSequenceClassification(DebertaV2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                               intermediate_size=64, vocab_size=100))
    with pytest.raises(ArchitectureError) as err:
        find_sites(model)
    msg = str(err.value)
    assert msg.startswith("DebertaV2ForSequenceClassification: no registered adapter maps this model")
    assert "bert cannot map deberta.encoder.layer.0.attention.self.query" in msg
    assert "mpnet cannot map deberta.encoder.layer.0.attention.attn.q" in msg
    assert "registered: bert, distilbert, gpt2, mpnet, opt, roberta-prelayernorm" in msg and "\n" not in msg


def test_mpnet_attention_scores_and_probs_are_not_sites():
    """MPNet computes its attention (with the relative position bias) itself, never through the
    registered kernel: a scores/probs tap on it would never fire, so its layout has none (its
    scores and probabilities are never quantized)."""
    model = tiny("tiny-mpnet")
    assert not {s.kind for s in find_sites(model)} & set(ATTENTION_KINDS)
    attn = model.mpnet.encoder.layer[0].attention.attn
    taps = [Site(f"probe.{side}", kind, 0, attn, side, None) for kind, side in zip(ATTENTION_KINDS, ("scores", "probs"))]
    assert record(model, taps, one_batch("tiny-mpnet")) == []


def test_post_ln_opt_is_refused_by_name():
    model = OPTForSequenceClassification(OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                   ffn_dim=64, vocab_size=100, word_embed_proj_dim=32,
                                                   do_layer_norm_before=False))
    with pytest.raises(ArchitectureError, match=r"opt cannot map do_layer_norm_before=False"):
        find_sites(model)


def test_a_wrong_model_type_is_an_error_naming_the_families():
    with pytest.raises(models.ModelError, match=r"model.model_type=gtp2: .* families with site adapters are bert"):
        models.model_config(OmegaConf.merge(model_cfg("tiny-gpt2"), {"model_type": "gtp2"}))


# --- token type ids: only for families with segment embeddings ---------------------------------

SEGMENTS = {"bert": True, "distilbert": False, "gpt2": False, "mpnet": False, "opt": False,
            "roberta-prelayernorm": True}
PAIRS = [Example("where is the violin?", "river castle violin.", 0), Example("where is the rocket?", "meadow.", 1)]


def family_batch(name: str) -> dict:
    """Two encoded pairs batched as every entry point batches them (the family's tokenizer)."""
    tok = models.load_tokenizer(model_cfg(name))
    batch = next(batches(encode(tok, PAIRS, 32), 2, tok.pad_token_id))
    batch.pop("labels")
    return batch


def test_every_family_says_whether_it_has_segment_embeddings():
    assert {name: ADAPTERS[name].segments for name in ADAPTERS} == SEGMENTS


@pytest.mark.parametrize("name", TINY)
def test_batches_carry_token_types_only_for_families_with_segment_embeddings(name):
    batch = family_batch(name)
    assert ("token_type_ids" in batch) == SEGMENTS[TINY[name][0]]
    # the tokens themselves are the borrowed tokenizer's, whatever the family
    raw = AutoTokenizer.from_pretrained(str(importlib.import_module(model_cfg(name).tokenizer).get_model_path()))
    enc = raw([e.question for e in PAIRS], [e.sentence for e in PAIRS], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], enc["input_ids"]) and torch.equal(batch["attention_mask"], enc["attention_mask"])
    if "token_type_ids" in batch:  # BERT family: exactly as before, the second sentence is segment 1
        assert torch.equal(batch["token_type_ids"], enc["token_type_ids"]) and batch["token_type_ids"].max() == 1


def test_gpt2_is_not_given_token_types_it_would_read_as_words():
    """GPT-2 looks ``token_type_ids`` up in its word embeddings: with the tokenizer's segment ids
    its logits change, so a batch must not carry them."""
    model = tiny("tiny-gpt2")
    batch = family_batch("tiny-gpt2")
    assert "token_type_ids" not in batch
    with torch.no_grad():
        logits = model(**batch).logits
        segments = family_batch("tiny")["token_type_ids"]  # what the MiniLM tokenizer gave it before
        assert not torch.allclose(model(**batch, token_type_ids=segments).logits, logits, atol=1e-4)


def test_load_pretrained_reuses_a_known_pad_id_and_loads_the_tokenizer_at_most_once(monkeypatch):
    calls = []
    load = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(a) or load(*a, **k))
    cfg = model_cfg("tiny-gpt2")
    assert models.load_pretrained(cfg, num_labels=2, seed=0, pad_token_id=0).config.pad_token_id == 0 and not calls
    assert models.load_pretrained(cfg, num_labels=2, seed=0).config.pad_token_id == 0 and len(calls) == 1


@pytest.mark.parametrize("name", TINY)
def test_readers_name_the_linears_that_read_each_norm(name):
    """Each family declares which linears read each norm's output (what the transforms fold into):
    their input width is the norm's, post-LN families say where the residual gets it back, and the
    last post-LN norm (it feeds the head) is left alone."""
    model = tiny(name)
    adapter = adapter_for(model)
    modules = dict(model.named_modules())
    groups = adapter.reader_groups(model)
    assert len(groups) == 4  # two blocks: two norms each (post-LN: embedding norm + 3, the last one left)
    for g in groups:
        width = modules[g.norm].normalized_shape[-1]
        for lin in g.linears:
            m = modules[lin]
            assert (m.nx if hasattr(m, "nx") else m.in_features) == width, lin
        assert (g.restore is None) == (adapter.norm == "pre" or g.linears[-1].endswith("embeddings_project")), g
    sites = find_sites(model)  # the norm feeding the head: final norm (pre-LN), last block's FFN norm (post-LN)
    last = next(s for s in sites if s.name == "final.norm") if adapter.norm == "pre" else \
        [s for s in sites if s.kind == "ffn_norm"][-1]
    assert all(modules[g.norm] is not last.module for g in groups)
