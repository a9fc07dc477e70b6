"""Site discovery from the module tree, and the taps."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from transquant.analysis.statistics import fp32_statistics
from transquant.quant.ptq import calibrate, plan_sites
from transquant.quant.sites import (
    ROLES,
    ArchitectureError,
    available,
    find_sites,
    matches,
    select,
    tap,
    unmatched,
    use_tappable_attention,
)

from .conftest import random_batches, tiny_bert


def test_bert_sites_cover_every_quantizer_of_the_paper():
    sites = find_sites(tiny_bert(layers=3))
    names = [s.name for s in sites]
    assert len(sites) == 2 + 13 * 3 + 2
    for expected in ("embeddings.sum", "layer.2.attn.residual", "layer.2.ffn.residual", "layer.0.attn.scores",
                     "layer.0.attn.probs", "layer.1.ffn.intermediate", "pooler", "logits"):
        assert expected in names
    residual = select(sites, ["*.ffn.residual"])
    assert [s.layer for s in residual] == [0, 1, 2] and all(s.channels == 32 for s in residual)
    assert next(s for s in sites if s.name == "layer.0.ffn.intermediate").channels == 64


def test_residual_site_is_the_layernorm_input():
    model = tiny_bert()
    use_tappable_attention(model)
    sites = find_sites(model)
    seen = {}
    def record(site, x):
        seen[site.name] = x
        return x

    with tap(select(sites, ["layer.0.attn.residual", "layer.0.attn.output"]), record):
        hidden_in = {}
        h = model.bert.encoder.layer[0].attention.register_forward_pre_hook(lambda m, a: hidden_in.update(x=a[0]))
        model(**random_batches(1)[0])
        h.remove()
    # residual sum = attention output (dropout is off in eval) + the layer's input
    assert torch.allclose(seen["layer.0.attn.residual"], seen["layer.0.attn.output"] + hidden_in["x"], atol=1e-5)


def test_taps_are_removed_and_eager_attention_matches_sdpa():
    model = tiny_bert()
    batch = random_batches(1)[0]
    ref = model(**batch).logits
    use_tappable_attention(model)
    sites = find_sites(model)
    with tap(sites, lambda s, x: x * 0):
        zeroed = model(**batch).logits
    after = model(**batch).logits
    assert not torch.allclose(zeroed, ref)
    assert torch.allclose(after, ref, atol=1e-6)  # also proves the padding mask reaches the taps


def test_pad_tokens_do_not_leak_through_tappable_attention():
    model = tiny_bert()
    use_tappable_attention(model)
    batch = random_batches(1)[0]
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][0, 6:] = 7  # change only the padded positions of sequence 0
    assert torch.allclose(model(**batch).logits[0], model(**other).logits[0], atol=1e-6)


def test_roberta_is_supported():
    model = RobertaForSequenceClassification(RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100))
    assert len(find_sites(model)) == 2 + 13 * 2 + 0 + 1  # RoBERTa's head has no pooler


def test_unmatched_patterns_are_reported():
    sites = find_sites(tiny_bert())
    assert unmatched(sites, ["*.ffn.residual", "*.ffn.residul"]) == ["*.ffn.residul"]


def test_a_role_is_selected_only_by_a_pattern_that_names_it():
    """Post-LN: the FFN input is the attention sublayer's norm. ``*`` and ``*.ffn.*`` select
    by site names only, as they always did; ``*.ffn.input`` and ``layer.1.ffn.input`` name the role."""
    sites = find_sites(tiny_bert())
    names = lambda patterns: [s.name for s in select(sites, patterns)]
    assert names(["*.ffn.input"]) == ["layer.0.attn.norm", "layer.1.attn.norm"]
    assert names(["layer.1.ffn.input"]) == ["layer.1.attn.norm"]
    assert "layer.0.attn.norm" not in names(["*.ffn.*"]) and len(names(["*.ffn.*"])) == 2 * 4
    assert names(["*"]) == [s.name for s in sites] and not names(["*.input"])
    norm = next(s for s in sites if s.name == "layer.0.attn.norm")
    assert norm.roles == ("ffn.input",) and norm.role_names == ["layer.0.ffn.input"]
    assert matches(norm, "layer.0.attn.norm") and matches(norm, "layer.?.ffn.input")
    assert not matches(norm, "layer.1.ffn.input")
    assert sum(len(s.roles) for s in sites) == 2 * len(ROLES)  # each role held by one site per layer
    assert unmatched(sites, ["*.ffn.input", "*.attn.input"]) == ["*.attn.input"]
    assert available(sites).endswith("pooler, logits; roles layer.<0-1>.ffn.input (here layer.<0-1>.attn.norm)")


def tiny_electra() -> ElectraForSequenceClassification:
    """Embeddings narrower than the layers (16 vs 32), projected up; no pooler."""
    torch.manual_seed(0)
    return ElectraForSequenceClassification(ElectraConfig(
        embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64)).eval()


ELECTRA_WIDTHS = {"embeddings.sum": 16, "embeddings.norm": 16, "attn.query": 32, "attn.scores": None,
                  "attn.probs": None, "attn.context": 32, "attn.output": 32, "attn.residual": 32, "attn.norm": 32,
                  "ffn.intermediate": 64, "ffn.output": 32, "ffn.residual": 32, "ffn.norm": 32, "logits": None}


def test_every_width_comes_from_its_own_module():
    sites = {s.name: s for s in find_sites(tiny_electra())}
    assert "pooler" not in sites
    for name, width in ELECTRA_WIDTHS.items():
        for site in (sites.get(name), sites.get(f"layer.1.{name}")):
            if site is not None:
                assert site.channels == width, site.name


def test_electra_calibration_and_statistics_see_the_right_channels():
    model = tiny_electra()
    sites = find_sites(model)
    batches = random_batches(2, seed=3)
    plans = plan_sites(sites, OmegaConf.merge(OmegaConf.load("conf/quant/fp32.yaml"),
                                              {"act_bits": 8, "k": 16, "peg_sites": ["*"]}))
    qa = calibrate(model, sites, plans, batches, torch.device("cpu"))
    for s in sites:
        if s.channels is not None:
            assert qa.grids[s.name].scale.shape == (s.channels,), s.name
    items = [{k: v[i][b["attention_mask"][i].bool()].tolist() for k, v in b.items()}
             for b in batches for i in range(len(b["input_ids"]))]  # the same sequences, unpadded
    stats = {r.name: r for r in fp32_statistics(model, sites, items, 0, "cpu", batch_size=3, measure_cost=False,
                                                reservoir=0).sites}
    for s in sites:
        if s.channels is not None:
            assert stats[s.name].channels == s.channels, s.name
    # per-channel max of the last hidden state (layer.1.ffn.norm) over real tokens, computed directly
    last = torch.cat([model.electra(**b).last_hidden_state[b["attention_mask"].bool()] for b in batches])
    assert np.allclose(stats["layer.1.ffn.norm"].hi, last.max(0).values.detach().numpy(), atol=1e-5)


def test_a_tensor_of_another_width_is_an_error_naming_the_site():
    model = tiny_bert()
    site = next(s for s in find_sites(model) if s.name == "layer.0.ffn.residual")
    site.channels = 31
    with pytest.raises(ArchitectureError, match=r"site layer.0.ffn.residual: expected width 31 .* got 32"):
        with tap([site], lambda s, x: x):
            model(**random_batches(1)[0])
