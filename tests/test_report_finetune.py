"""The report over fine-tune variants (train.regularizer / attention / autocast): runs of one
quantization method fine-tuned differently are different rows, never seeds of one method, and
``finetune_outliers`` sets each fine-tuned checkpoint's outliers beside the default recipe's."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from transquant.core.tracking import flatten
from transquant.run import CONF_DIR
from transquant.studies import report as rp
from transquant.studies.labels import finetune_label
from transquant.studies.queries import children_frame, finetune_frame
from transquant.studies.runs import records_frame, run_record
from transquant.studies.tables import table_accuracy, table_finetune_outliers

from .test_report import CountingClient, _child, _quantized, _stats_table, new_store, qparams

KURT = "kurtosis reg lambda=1e-07 (target 3)"
KURT_PARAMS = {"train.regularizer": "kurtosis", "train.reg_weight": "1e-07", "train.kurtosis_target": "3.0"}


def test_finetune_labels_of_every_train_preset():
    """Each train variant of +experiment=mitigations_train, logged like the pipeline, gets its name;
    the plain recipes (and a run logged before these knobs existed) are the default variant."""
    names = {}
    with initialize_config_dir(config_dir=CONF_DIR):
        for t in ("default", "bondarenko", "paper", "kurtosis", "quanttune", "clipped_softmax", "gated"):
            names[t] = finetune_label(flatten(compose(config_name="config", overrides=[f"train={t}"])))
        bf16 = finetune_label(flatten(compose(config_name="config", overrides=[
            "train=clipped_softmax", "train.clip_zeta=1.1", "train.autocast=bf16"])))
    assert names == {"default": "", "bondarenko": "", "paper": "", "kurtosis": KURT,
                     "quanttune": "QuantTune reg lambda=0.001 margin 10", "clipped_softmax": "clipped softmax gamma=-0.03",
                     "gated": "gated attention"}
    assert bf16 == "clipped softmax gamma=-0.03 zeta=1.1, bf16 autocast"
    assert finetune_label({}) == "" and finetune_label({"train.regularizer": "none", "train.seed": "1"}) == ""
    gated = {"train.attention": "gated", "train.gate_bias_init": "2.0"}
    assert finetune_label(gated) == "gated attention (gate bias 2)"


def test_run_record_keeps_fine_tune_variants_apart():
    def rec(rid, extra, seed=1, t0=0):
        params = {**qparams("w8a8"), "train.seed": str(seed), **extra}
        return run_record(rid, params, {"accuracy": 60.0}, {}, start_time=t0)

    default = rec("d", {"train.regularizer": "none", "train.attention": "softmax"})
    old, kurt = rec("o", {}), rec("k", KURT_PARAMS)
    assert default["finetune"] == old["finetune"] == ""  # train.* params absent: the default variant
    assert default["label"] == old["label"] == "W8A8"
    assert (kurt["finetune"], kurt["label"], kurt["mitigation"]) == (KURT, f"W8A8 [ft: {KURT}]",
                                                                     f"min-max [ft: {KURT}]")
    assert kurt["quant_label"] == "W8A8" and kurt["family"] != default["family"] and kurt["base"] != default["base"]
    # The default variant first for the same method, whatever the start times; then by method.
    df = records_frame([rec("k1", KURT_PARAMS, 1, 1), rec("k2", KURT_PARAMS, 2, 2), rec("d2", {}, 2, 3),
                        rec("d1", {}, 1, 4),
                        run_record("f", {**qparams("fp32"), "train.seed": "1"}, {"accuracy": 90.0}, {}, start_time=5)])
    assert list(df["run_id"]) == ["f", "d1", "d2", "k1", "k2"]
    assert list(table_accuracy(df)["seeds"]) == [1, 2, 2]  # not 4 seeds of W8A8


def _frame(rows: list[tuple[str, str, int, float, float | None]]) -> pd.DataFrame:
    """Runs (run id, variant params key, seed, fp32 accuracy, finetune_seconds) on their checkpoints."""
    recs = []
    for i, (rid, ft, seed, fp32, secs) in enumerate(rows):
        metrics = {"accuracy": fp32 - 5, "fp32_accuracy": fp32, **({"finetune_seconds": secs} if secs else {})}
        params = {**qparams("w8a8"), "train.seed": str(seed), **(KURT_PARAMS if ft == "k" else {})}
        recs.append(run_record(rid, params, metrics, {"checkpoint": f"/ckpt/{ft}/{seed}"}, start_time=i))
    return records_frame(recs)


def _stat_rows(ckpt: str, kind: str, max_abs: list[float], kurt: list[float]) -> list[dict]:
    return [{"checkpoint": ckpt, "run_id": "x", "kind": kind, "stat": stat, "layer": i, "value": v}
            for stat, values in (("max_abs", max_abs), ("kurtosis", kurt)) for i, v in enumerate(values)]


def test_finetune_outliers_table_from_known_values():
    df = _frame([("k1", "k", 1, 88.0, 130.0), ("d1a", "default", 1, 90.0, None), ("d1b", "default", 1, 90.0, 100.0),
                 ("k2", "k", 2, 87.0, None), ("k2b", "k", 2, 87.0, 140.0), ("k3", "k", 3, 86.0, 150.0)])
    stats = pd.DataFrame([*_stat_rows("/ckpt/default/1", "ffn_residual", [10.0, 100.0], [5.0, 300.0]),
                          *_stat_rows("/ckpt/default/1", "attn_norm", [8.0, 4.0], [30.0, 3.0]),
                          *_stat_rows("/ckpt/k/1", "ffn_residual", [10.0, 20.0], [4.0, 30.0]),
                          *_stat_rows("/ckpt/k/1", "attn_norm", [2.0, 2.0], [6.0, 3.0]),
                          *_stat_rows("/ckpt/k/2", "ffn_residual", [1.0, 50.0], [2.0, 60.0]),
                          *_stat_rows("/ckpt/k/3", "ffn_residual", [1.0, 25.0], [2.0, 20.0])])
    t = table_finetune_outliers(df, stats)
    assert list(t.columns[:5]) == ["finetune", "seed", "fp32_accuracy", "finetune_seconds", "extra_finetune_seconds"]
    assert list(t.columns[5:]) == [f"{k}_{s}{v}" for k in ("attn_norm", "ffn_residual") for s in ("max_abs", "kurtosis")
                                   for v in ("", "_vs_default")]  # TRANSFORM_KINDS order
    assert list(zip(t.finetune, t.seed)) == [("default", 1), (KURT, 1), (KURT, 2), (KURT, 3)]
    assert list(t.fp32_accuracy) == [90.0, 88.0, 87.0, 86.0]
    assert list(t.finetune_seconds) == [100.0, 130.0, 140.0, 150.0]  # from the job that trained, whichever it is
    assert list(t.ffn_residual_max_abs) == [100.0, 20.0, 50.0, 25.0]  # max over layers
    assert list(t.ffn_residual_kurtosis) == [300.0, 30.0, 60.0, 20.0]
    assert t.ffn_residual_max_abs_vs_default.tolist()[:2] == [1.0, 0.2] and t.ffn_residual_kurtosis_vs_default[1] == 0.1
    assert t.attn_norm_max_abs_vs_default.tolist()[:2] == [1.0, 0.25] and math.isnan(t.attn_norm_max_abs[2])
    assert t.extra_finetune_seconds.tolist()[:2] == [0.0, 30.0]
    no_default = t.loc[2:, ["extra_finetune_seconds", "ffn_residual_max_abs_vs_default"]]  # seeds 2, 3
    assert no_default.isna().all().all()
    # Only a study with a non-default variant gets the table.
    assert table_finetune_outliers(df[df["finetune"] == ""], stats).empty
    assert "extra_finetune_seconds" not in table_finetune_outliers(df[df["finetune"] != ""], stats)


# --- end to end: +experiment=mitigations_train over a small store ----------------------------------

FP32 = {("default", 1000): 90.0, ("default", 1001): 91.0, ("k", 1000): 89.0, ("k", 1001): 89.5}
ACC = {("default", "W8A8"): {1000: 80.0, 1001: 82.0}, ("default", "W4A8"): {1000: 40.0, 1001: 44.0},
       ("k", "W8A8"): {1000: 87.0, 1001: 88.0}, ("k", "W4A8"): {1000: 60.0, 1001: 61.0}}
SECONDS = {"default": 100.0, "k": 130.0}
STATS = {"default": {"attn_norm": ([4.0, 8.0], [3.0, 30.0]), "ffn_residual": ([10.0, 100.0], [5.0, 300.0])},
         "k": {"attn_norm": ([2.0, 4.0], [3.0, 6.0]), "ffn_residual": ([5.0, 25.0], [4.0, 30.0])}}


@pytest.fixture(scope="module")
def finetune_store(tmp_path_factory):
    base = tmp_path_factory.mktemp("finetune_store")
    uri, client, exp, tick = new_store(base)

    parent = client.create_run(exp, start_time=tick(), tags={"transquant.role": "sweep",
                                                             "transquant.study": "mitigations_train"}).info.run_id
    for (ft, bits), accs in reversed(ACC.items()):  # the kurtosis variant logged first
        for seed, acc in accs.items():
            trained = bits == "W4A8"  # the first job of a checkpoint fine-tunes it; the others hit the cache
            q = {**qparams("w8a8", weight_bits=int(bits[1]), act_bits=8), **(KURT_PARAMS if ft == "k" else {})}
            secs = {"finetune_seconds": SECONDS[ft] + seed - 1000} if trained else {}
            m = _quantized(FP32[(ft, seed)], acc, **secs)
            _child(client, exp, parent, seed, q, m, tick(), tables={"activation_stats.csv": _stats_table(STATS[ft])},
                   tags={"checkpoint": f"/ckpt/{ft}/{seed}", "finetune_cache": "miss" if trained else "hit"})
    return {"uri": uri, "client": client, "parent": parent}


def test_report_finetune_variants(finetune_store, tmp_path):
    out = rp.report(["mitigations_train"], finetune_store["uri"], tmp_path / "ft", log=False)
    t1 = pd.read_csv(out / "table1_accuracy.csv").set_index("method")
    assert list(t1.index) == ["W4A8", f"W4A8 [ft: {KURT}]", "W8A8", f"W8A8 [ft: {KURT}]"]  # each variant its row
    assert list(t1.seeds) == [2] * 4 and list(t1.accuracy_median) == [42.0, 60.5, 81.0, 87.5]
    m = pd.read_csv(out / "mitigations.csv")
    assert list(zip(m.bits, m.method)) == [("W8A8", "min-max"), ("W8A8", f"min-max [ft: {KURT}]"),
                                           ("W4A8", "min-max"), ("W4A8", f"min-max [ft: {KURT}]")]
    assert list(m.fp32_accuracy_median) == [90.5, 89.25, 90.5, 89.25] and list(m.seeds) == [2] * 4

    f = pd.read_csv(out / "finetune_outliers.csv")
    assert list(zip(f.finetune, f.seed)) == [("default", 1000), ("default", 1001), (KURT, 1000), (KURT, 1001)]
    assert list(f.fp32_accuracy) == [90.0, 91.0, 89.0, 89.5]
    assert list(f.finetune_seconds) == [100.0, 101.0, 130.0, 131.0]
    assert list(f.extra_finetune_seconds) == [0.0, 0.0, 30.0, 30.0]
    assert list(f.ffn_residual_max_abs) == [100.0, 100.0, 25.0, 25.0]
    assert list(f.ffn_residual_max_abs_vs_default) == [1.0, 1.0, 0.25, 0.25]
    assert list(f.ffn_residual_kurtosis_vs_default) == [1.0, 1.0, 0.1, 0.1]
    assert list(f.attn_norm_kurtosis) == [30.0, 30.0, 6.0, 6.0]
    assert (out / "finetune_outliers.tex").is_file()
    runs = pd.read_csv(out / "runs.csv", keep_default_na=False)
    assert set(runs["finetune"]) == {"", KURT}
    md = (out / "report.md").read_text()
    assert "What each fine-tune variant did to the outliers" in md and "_vs_default" in md


def test_finetune_frame_reads_each_checkpoint_once(finetune_store):
    client = finetune_store["client"]
    counting = CountingClient(client)
    calls = counting.calls

    df = children_frame(client, [finetune_store["parent"]])
    frame = finetune_frame(counting, df)
    assert len(calls) == 4 and {p for _, p in calls} == {"activation_stats.csv"}  # 2 variants x 2 seeds
    assert frame["checkpoint"].nunique() == 4 and set(frame["kind"]) == {"attn_norm", "ffn_residual"}
    calls.clear()
    assert finetune_frame(counting, df[df["finetune"] == ""]).empty and not calls  # default only: no download
