"""The paper's exact presets as configuration: calibration group, quant presets, their checks,
and the studies that use them (composition and validation only, no training)."""
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from transquant.core.config import validate
from transquant.core.errors import TransquantError
from transquant.core.tracking import flatten
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
