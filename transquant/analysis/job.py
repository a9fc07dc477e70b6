"""The statistics stage of a job: its config (``stats.*`` over ``conf/stats/default.yaml``), the
cached FP32 statistics of the job's model, and the table printed for a person."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..core.config import positive_int, writable_dir
from ..core.errors import TransquantError
from ..core.paths import CONF_PATH

STATS_DEFAULTS = CONF_PATH / "stats" / "default.yaml"
PRINT_KINDS = ("embedding_sum", "attn_residual", "attn_norm", "ffn_intermediate", "ffn_residual", "ffn_norm")


def stats_config(cfg: DictConfig) -> DictConfig:
    """``cfg.stats`` over the defaults of ``conf/stats/default.yaml`` (the group may be absent)."""
    base = OmegaConf.load(STATS_DEFAULTS)
    return OmegaConf.merge(base, cfg.get("stats") or {})


def validate_stats(s: DictConfig) -> None:
    positive_int("stats.num_examples", s.num_examples, allow_none=True)
    positive_int("stats.batch_size", s.batch_size)
    positive_int("stats.top_k", s.top_k)
    if not (isinstance(s.reservoir, int) and not isinstance(s.reservoir, bool) and s.reservoir >= 0):
        raise TransquantError(f"stats.reservoir={s.reservoir}: must be an integer >= 0")
    for key in ("finetune", "enabled"):
        if not isinstance(s[key], bool):
            raise TransquantError(f"stats.{key}={s[key]}: must be true or false")
    for key in ("weight_bits", "act_bits"):
        v = s[key]
        if not (isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 16):
            raise TransquantError(f"stats.{key}={v}: the suggestion's bit budget must be an integer in [2, 16]")
    if s.page_dir is not None:
        if not isinstance(s.page_dir, str) or not s.page_dir:
            raise TransquantError(f"stats.page_dir={s.page_dir}: must be a folder path, or null for no local copy")
        writable_dir("stats.page_dir", s.page_dir)


def figure_k(cfg: DictConfig) -> int | None:
    """PEG group count for the figures: the config's when it is a PEG method, else the default."""
    q = cfg.quant
    return int(q.k) if q.get("peg_sites") and q.k > 1 else None


def printable(stats, tokenizer) -> "pd.DataFrame":  # noqa: F821
    """The per-layer table printed to stdout: residual sums, LayerNorm outputs, FFN intermediate."""
    df = stats.table()
    df = df[df["kind"].isin(PRINT_KINDS)].copy()
    df["max_token"] = [tokenizer.convert_ids_to_tokens(int(t)) if t is not None and not _isna(t) else ""
                       for t in df["max_token_id"]]
    cols = ["site", "kurtosis", "kurtosis_non_special", "top1pct_channel_energy", "max_abs", "median_abs",
            "max_over_median", "top_channels", "max_token", "max_token_position"]
    return df[cols].rename(columns={"kurtosis_non_special": "kurt_no_special", "top1pct_channel_energy": "top1%_energy",
                                    "max_over_median": "max/median", "max_token_position": "pos"})


def _isna(v) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def job_statistics(cfg: DictConfig, model, checkpoint, task, val_items: list[dict], tokenizer, device):
    """Cached FP32 statistics of ``model`` for a job: (stats, was_cached, cache path).

    ``checkpoint`` identifies the weights (the fine-tuned checkpoint path, or any JSON-able
    identity); ``val_items`` is the encoded validation split, sampled here with ``stats.*``.
    Call it before the weights are quantized in place."""
    from ..quant.sites import find_sites
    from .statistics import cached_fp32_statistics, sample_items, stats_cache_path

    s = stats_config(cfg)
    special = sorted(tokenizer.all_special_ids)
    path = stats_cache_path(cfg.paths.cache_dir, checkpoint, task.fingerprint("validation"), s.num_examples,
                            top_k=s.top_k, reservoir=s.reservoir, max_length=cfg.train.max_length,
                            special_ids=special)
    items = sample_items(val_items, s.num_examples)
    stats, hit = cached_fp32_statistics(path, model, find_sites(model), items, tokenizer.pad_token_id, device,
                                        s.batch_size, s.top_k, s.reservoir, special_ids=special)
    return stats, hit, path
