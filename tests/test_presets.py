"""The paper's exact presets as configuration: calibration group, quant presets, their checks,
the sites they select in every model family, and the studies that use them (composition and
validation only, no training)."""
from functools import lru_cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from transquant.core.config import skeleton, validate
from transquant.core.errors import TransquantError
from transquant.core.tracking import flatten
from transquant.quant.ptq import plan_sites
from transquant.quant.sites import find_sites, select
from transquant.run import CONF_DIR
from transquant.studies.labels import method_label, quant_params

from .conftest import TINY


def _jobs(experiment: str) -> list[list[str]]:
    """The job list Hydra's basic sweeper builds for ``+experiment=<name>``."""
    with initialize_config_dir(config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]


def _job_cfgs(experiment: str, store: dict) -> list:
    """Every job's composed config, on the tiny model."""
    jobs = _jobs(experiment)
    with initialize_config_dir(config_dir=CONF_DIR):
        return [compose(config_name="config", overrides=[f"+experiment={experiment}", *job, *TINY,
                                                            f"tracking.uri={store['uri']}",
                                                            f"paths.cache_dir={store['cache']}"])
                for job in jobs]


def test_calibration_default_and_paper(make_cfg):
    default = make_cfg().calibration
    assert (default.num_batches, default.batch_size, default.seed) == (16, 16, 0)
    paper = make_cfg("calibration=paper").calibration
    assert (paper.num_batches, paper.batch_size, paper.seed) == (1, 1, 0)


BAD = [
    (["quant.weight_estimator=absmax"], "quant.weight_estimator=absmax: allowed minmax, mse"),
    (["quant=peg", "quant.share_groups=model"], "quant.share_groups=model: allowed none, layer"),
    (["quant=peg_paper", "quant.peg_sites=[*.ffn.residual]"],
     "layer.0.ffn.residual takes its PEG groups from layer.0.ffn.output, which is not a PEG site"),
    (["quant=peg_paper", "quant.high_bits_sites=[*.ffn.output]"], "which is not a PEG site \\(it is 16-bit minmax\\)"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_preset_value_is_named(make_cfg, overrides, message):
    with pytest.raises(TransquantError, match=message) as info:
        validate(make_cfg(*overrides))
    assert "\n" not in str(info.value)


def test_paper_study_runs_the_exact_presets_with_the_authors_protocol(store):
    labels = []
    for cfg in _job_cfgs("paper", store):
        if cfg.train.seed != 1000:
            continue
        validate(cfg)
        assert (cfg.calibration.num_batches, cfg.calibration.batch_size) == (1, 1)
        labels.append(method_label(quant_params(flatten(cfg))))
    assert len(set(labels)) == len(labels) == 24
    with initialize_config_dir(config_dir=CONF_DIR):  # without the tiny model's train=quick
        train = compose(config_name="config", overrides=["+experiment=paper", "+method=fp32"]).train
    assert (train.lr, train.batch_size, train.epochs, train.weight_decay) == (3e-5, 8, 3, 0.0)
    assert {"W8A8 (paper)", "W8A32 (paper)", "W32A8", "mixed W8A{8,16} (paper)", "PEG K=6 sorted (paper)",
            "W8A8", "mixed", "PEG K=6 sorted"} <= set(labels)


def test_calibration_study_sizes(store):
    seen = set()
    for cfg in _job_cfgs("calibration", store):
        validate(cfg)
        seen.add((cfg.quant.method, cfg.calibration.num_batches * cfg.calibration.batch_size))
    assert seen == {(m, n) for m in ("w8a8_paper", "mixed_paper", "peg_paper") for n in (1, 16, 256, 1024)}


# --- site presets per family: the paper's sites mean the same tensors in every family ----------

QUANT_DIR = Path(CONF_DIR) / "quant"
BERT_FAMILY = ["minilm-l6", "tiny", "tiny-electra", "tiny-distilbert"]  # post-LN; minilm-l6 is the offline default
PRE_LN = ["tiny-roberta-preln", "tiny-gpt2", "tiny-opt"]
# The presets' patterns before roles existed: on post-LN models the roles must select exactly these.
SITE_NAME_PATTERNS = {"mixed_paper": ["*.attn.norm", "*.ffn.output", "*.ffn.residual"],
                      "peg_paper": ["*.attn.norm", "*.ffn.output", "*.ffn.residual"],
                      "peg": ["embeddings.sum", "*.attn.residual", "*.ffn.residual", "*.attn.norm", "*.ffn.output"]}
# What each preset selects in layer i, per norm placement: the paper's FFN input, FFN output and
# FFN residual sum (peg adds the embedding sum and the attention residual sum).
PER_LAYER = {("mixed_paper", "post"): ["attn.norm", "ffn.output", "ffn.residual"],
             ("mixed_paper", "pre"): ["ffn.norm", "ffn.output", "ffn.residual"],
             ("peg", "post"): ["attn.residual", "attn.norm", "ffn.output", "ffn.residual"],
             ("peg", "pre"): ["attn.residual", "ffn.norm", "ffn.output", "ffn.residual"]}
PER_LAYER |= {("peg_paper", norm): sites for (m, norm), sites in PER_LAYER.items() if m == "mixed_paper"}
PRESET_KEY = {"mixed_paper": "high_bits_sites", "peg_paper": "peg_sites", "peg": "peg_sites"}


def preset(method: str):
    return OmegaConf.merge(OmegaConf.load(QUANT_DIR / "fp32.yaml"), OmegaConf.load(QUANT_DIR / f"{method}.yaml"))


@lru_cache(maxsize=None)
def family_sites(model: str) -> tuple:
    """The model's sites, from its module tree on the meta device (nothing loaded)."""
    return tuple(find_sites(skeleton(OmegaConf.load(Path(CONF_DIR) / "model" / f"{model}.yaml"))))


@pytest.mark.parametrize("model", BERT_FAMILY + PRE_LN)
@pytest.mark.parametrize("method", list(PRESET_KEY))
def test_presets_select_the_papers_sites_in_every_family(model, method):
    sites = list(family_sites(model))
    norm = "pre" if model in PRE_LN else "post"
    chosen = [s.name for s in select(sites, list(preset(method)[PRESET_KEY[method]]))]
    layers = sorted({s.layer for s in sites if s.layer is not None})
    outer = ["embeddings.sum"] if method == "peg" else []
    assert sorted(chosen) == sorted(outer + [f"layer.{i}.{n}" for i in layers for n in PER_LAYER[method, norm]])


@pytest.mark.parametrize("model", BERT_FAMILY)
@pytest.mark.parametrize("method", list(PRESET_KEY))
def test_roles_leave_post_ln_plans_exactly_as_the_site_names_made_them(model, method):
    """The offline default's numbers cannot move: every site gets the same plan (bits, estimator,
    PEG groups and their source) from the role patterns as from the old site-name patterns."""
    sites = list(family_sites(model))
    q = preset(method)
    old = OmegaConf.merge(q, {PRESET_KEY[method]: SITE_NAME_PATTERNS[method]})
    assert "*.ffn.input" in q[PRESET_KEY[method]]
    assert plan_sites(sites, q) == plan_sites(sites, old)


@pytest.mark.parametrize("model", PRE_LN)
def test_on_pre_ln_models_the_ffn_input_is_the_ffn_norm_not_the_attention_input(model):
    sites = list(family_sites(model))
    plans = plan_sites(sites, preset("mixed_paper"))
    assert plans["layer.0.ffn.norm"].bits == 16 and plans["layer.0.attn.norm"].bits == 8
    peg = plan_sites(sites, preset("peg_paper"))
    assert peg["layer.1.ffn.norm"].estimator == "peg" and peg["layer.1.ffn.norm"].group_source == "layer.1.ffn.output"
    assert peg["layer.1.attn.norm"].estimator == "minmax"


def test_a_pattern_matching_nothing_lists_the_sites_and_roles(make_cfg):
    with pytest.raises(TransquantError) as info:
        validate(make_cfg("model=tiny-gpt2", "quant=mixed_paper", "quant.high_bits_sites=[*.ffn.inptu]"))
    msg = str(info.value)
    assert msg.startswith("quant.high_bits_sites: pattern(s) ['*.ffn.inptu'] match no site of tiny-gpt2; its sites "
                          "embeddings.sum, layer.<0-1>.{attn.norm, attn.qkv, ")
    assert msg.endswith("final.norm, logits; roles layer.<0-1>.ffn.input (here layer.<0-1>.ffn.norm)")


def test_gemm_inputs_protocol_quantizes_only_what_gemms_read(make_cfg):
    """+sites=gemm_inputs (the Outlier Suppression papers' protocol): every GEMM input of a post-LN
    encoder is quantized, no residual sum, linear output or attention score is."""
    cfg = make_cfg("+sites=gemm_inputs", "+method=os_plus", "+bits=w8a6")
    sites = validate(cfg)
    kinds = {s.kind for s in sites if s.name in plan_sites(sites, cfg.quant)}
    assert kinds == {"embedding_norm", "attn_norm", "ffn_norm", "query", "key", "value", "attn_probs", "context",
                     "ffn_intermediate", "pooler"}
    assert cfg.quant.transform == "os_plus" and cfg.quant.act_bits == 6
