"""Bad input: a clear one-line error naming the value and what is allowed, before any work."""
import os
import sqlite3

import pytest
from hydra.errors import ConfigCompositionException

from transquant.core.config import validate
from transquant.core.errors import TransquantError

from .conftest import ROOT, run_cli

BAD = [
    (["quant=peg", "quant.k=0"], "quant.k=0"),
    (["quant=peg", "quant.k=33"], r"quant.k=33: must be in \[1, 32\]"),
    (["quant=percentile", "quant.percentile=0"], r"quant.percentile=0: must be a number in \(0, 100\]"),
    (["quant=percentile", "quant.percentile=100.5"], "quant.percentile=100.5"),
    (["quant=percentile", "quant.percentile=-3"], "quant.percentile=-3"),
    (["quant.weight_bits=1"], r"quant.weight_bits=1: bits must be an integer in \[2, 16\]"),
    (["quant.act_bits=17"], "quant.act_bits=17"),
    (["quant.act_bits=8.5"], "quant.act_bits=8.5"),
    (["quant=mixed", "quant.high_bits=32"], "quant.high_bits=32"),
    (["quant.estimator=l2"], "quant.estimator=l2: allowed minmax, percentile, dynamic, mse"),
    # PEG comes from quant.peg_sites
    (["quant.estimator=peg"], "quant.estimator=peg: allowed minmax, percentile, dynamic, mse"),
    (["quant.weight_granularity=row"], "quant.weight_granularity=row: allowed tensor, channel"),
    (["quant.bias_correction=maybe"], "quant.bias_correction=maybe: must be true or false"),
    (["quant=dynamic", "profile.engine=onnxruntime"], "quant.estimator=dynamic: per-token ranges have no onnxruntime"),
    (["quant.weight_estimator=l2"], "quant.weight_estimator=l2: allowed minmax, mse"),
    (["quant=peg", "quant.grouping=random"], "quant.grouping=random: allowed contiguous, sorted, gap"),
    (["quant=peg", "quant.peg_sites=[*.ffn.residul]"], r"quant.peg_sites: pattern\(s\) \['\*.ffn.residul'\] match no site"),
    (["quant=mixed", "quant.high_bits_sites=[layer.9.*]"], "quant.high_bits_sites"),
    (["model.name_or_path=/nonexistent/model"], "model.name_or_path=/nonexistent/model: directory does not exist"),
    (["task.max_eval_samples=0"], "task.max_eval_samples=0"),
    (["train.lr=-1"], "train.lr=-1"),
    (["train.epochs=0"], "train.epochs=0"),
    (["train.max_length=4"], "train.max_length=4"),
    (["calibration.num_batches=0"], "calibration.num_batches=0"),
    (["profile.fp32_attention=flash"], "profile.fp32_attention=flash: allowed sdpa, eager"),
    (["profile.op_profile_runs=-1"], r"profile.op_profile_runs=-1: must be an integer >= 0 \(0 = no op profile\)"),
    (["profile.engine=tensorrt"], "profile.engine=tensorrt: allowed onnxruntime, torch, none"),
    (["hardware.device=tpu"], "hardware.device=tpu: allowed cpu, cuda"),
    (["tracking.uri=ftp://x/y"], "tracking.uri=ftp://x/y: unsupported scheme"),
    (["tracking.uri=http://127.0.0.1:9"], "no tracking server answers"),
    (["tracking.uri=http://127.0.0.1:9", "tracking.artifacts=/tmp/a"],
     "tracking.artifacts=/tmp/a: must be null with a tracking server"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_named(make_cfg, overrides, message):
    cfg = make_cfg(*overrides)
    with pytest.raises(TransquantError, match=message) as info:
        validate(cfg)
    assert "\n" not in str(info.value)


def test_model_dir_without_config(make_cfg, tmp_path):
    with pytest.raises(TransquantError, match="no config.json"):
        validate(make_cfg(f"model.name_or_path={tmp_path}", tiny=True))


def test_model_dir_that_is_not_a_classifier(make_cfg, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deberta-v2", "hidden_size": 32, "num_hidden_layers": 1, '
                                          '"num_attention_heads": 4, "intermediate_size": 64}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TransquantError, match="DebertaV2ForSequenceClassification: no registered adapter maps"):
        validate(make_cfg(f"model.name_or_path={tmp_path}"))


def test_unknown_group_option_is_a_composition_error(make_cfg):
    with pytest.raises(ConfigCompositionException, match="quant/peggy"):
        make_cfg("quant=peggy")


def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path):
    db = tmp_path / "mlflow.db"
    res = run_cli("model=tiny", "task=synthetic", "quant=peg", "quant.k=0", f"tracking.uri=sqlite:///{db}",
                  f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'out'}", cwd=ROOT)
    assert res.returncode == 2
    errors = [l for l in res.stderr.splitlines() if l.startswith("transquant: error:")]
    assert errors == ["transquant: error: quant.k=0: must be an integer >= 1"]
    assert not (tmp_path / "cache").exists()
    if db.exists():  # the store may not even be created; if it is, it holds no run
        assert sqlite3.connect(db).execute("select count(*) from runs").fetchone()[0] == 0


def test_cache_dir_under_a_file_is_named(make_cfg, tmp_path):
    (tmp_path / "file").write_text("x")
    for bad, message in ((tmp_path / "file", "exists and is not a directory"),
                         (tmp_path / "file" / "cache", "is a file, not a directory")):
        with pytest.raises(TransquantError, match=f"paths.cache_dir={bad}: .*{message}") as info:
            validate(make_cfg(f"paths.cache_dir={bad}"))
        assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_cache_dir_is_named(make_cfg, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(TransquantError, match="paths.cache_dir=.*/ro/cache: .*/ro is not writable"):
        validate(make_cfg(f"paths.cache_dir={tmp_path / 'ro' / 'cache'}"))
