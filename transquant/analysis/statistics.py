"""FP32 activation statistics of every token-wise site: what is measured, the pass, its cache.

What is measured, exactly (the anchor reproduction measured post-LayerNorm outputs, with pad
tokens, and a "top-1 %" over *elements*; none of that here):

* **Tensors.** Every token-wise site (``site.channels`` is not None): the embedding sum and its
  LayerNorm output, and per layer the query/key/value projections, the attention context, the
  attention and FFN output projections, the FFN intermediate (after GELU), the two *residual
  sums* (``attn.residual``, ``ffn.residual`` = the LayerNorm **inputs**) and the two LayerNorm
  outputs (``attn.norm``, ``ffn.norm``), plus the pooler. Values are taken over **non-pad
  tokens only** (the attention mask), one row per token, one column per channel (hidden unit).
* **variance**: the mean over channels of each channel's population variance over tokens.
* **kurtosis**: Pearson's (Gaussian = 3, not excess) over *all* values of the site pooled,
  i.e. m4 / m2**2 with central moments about the site's global mean.
* **top1pct_channel_energy**: share of the site's energy sum(x**2) held by the top 1 % of
  *channels* (ceil(0.01 * channels), at least 1), channels ranked by their own energy.
* **max_abs** and **max_over_median**: max |x| and max |x| / median |x| over all values.
  The median is streamed with a fixed log-spaced histogram of x**2 (same order as |x|, and
  already computed for the moments) whose bins are the float32 bit patterns shifted right by
  16 bits: 128 equal bins per power of two of x**2, so for |x| a bin spans at most 0.39 % of
  its lower edge (``MEDIAN_RESOLUTION``). The median is interpolated inside its bin and is
  within that relative resolution of ``torch.median`` (tested); |x| below 1e-19 (x**2 below
  float32's normal range) counts as 0.
* **top_channels**: the ``top_k`` channel ids with the largest max |x|; their *persistence*
  is, per site kind, the fraction of layers in which an id is among those top-k.
* **kurtosis_non_special** (given the tokenizer's special ids): the same kurtosis over the
  non-special tokens only, and **max_token_id / max_token_position**: the token holding the
  site's max |x|. In all-MiniLM-L6-v2 the largest values sit on [CLS] (one token per sequence),
  which a pooled kurtosis cannot tell from a heavy tail over ordinary tokens.

Streaming: float64 running sums of x and x**2 per channel and of x, x**2, x**3, x**4 over all
values (and over non-special tokens), per-channel min and max, the histogram, and for the
residual sums a uniform reservoir sample of whole tokens for histograms. Memory does not grow
with the number of examples. A batch's partial sums are BLAS products (gemv, dot) in float32
over an x**2 workspace shared by all sites (relative error ~1e-6, then accumulated in
float64); the accumulation runs on one thread (see :func:`single_thread`). Its cost is measured against a
plain FP32 forward pass over the same batches in the same call (``stats_cost_vs_fp32_pass``).

Quantization-error attribution (FP32 and quantized model on the same batches) is
:mod:`.error_attribution`; what goes to MLflow is :mod:`.to_mlflow`.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..core import cache, provenance
from ..core.progress import progress
from ..data.tasks import batches
from ..quant.ptq import TokenMask
from ..quant.sites import RESIDUAL_KINDS, Site, tap
from .accumulators import SiteAccumulator, TokenInfo, _Workspace, single_thread
from .histogram import MEDIAN_RESOLUTION
from .results import STATS_VERSION, ActivationStats


def stat_sites(sites: list[Site]) -> list[Site]:
    """Token-wise sites: those with a channel dimension (not attention scores/probs, not logits)."""
    return [s for s in sites if s.channels is not None]


def sample_items(items: list[dict], n: int | None, seed: int = 0) -> list[dict]:
    """A fixed random subset of ``n`` items (all of them if n is None or >= len(items))."""
    if n is None or n >= len(items):
        return list(items)
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


def _model_inputs(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def fp32_statistics(model: nn.Module, sites: list[Site], items: list[dict], pad_id: int, device,
                    batch_size: int = 32, top_k: int = 3, reservoir: int = 200_000,
                    measure_cost: bool = True, seed: int = 0, special_ids: Iterable[int] | None = None
                    ) -> ActivationStats:
    """Statistics of every token-wise site of ``model`` over ``items`` (non-pad tokens only).

    ``sites`` must come from ``find_sites(model)``. With ``measure_cost`` each batch is also run
    once through the plain model (order alternating per batch) so the stats pass is timed
    against a plain FP32 forward pass over the same batches: meta ``stats_seconds``,
    ``fp32_pass_seconds`` and their ratio ``stats_cost_vs_fp32_pass``. A reservoir sample of
    ``reservoir`` raw values is kept for each residual sum; only the one of the site with the
    highest kurtosis (the "worst layer") is retained in the result. ``special_ids`` (e.g.
    ``tokenizer.all_special_ids``) adds the kurtosis over non-special tokens, which tells a
    few rare tokens ([CLS], [SEP]) from a heavy tail over ordinary tokens.
    """
    model.eval()
    chosen = stat_sites(sites)
    if not items:
        raise ValueError("fp32_statistics: no items")
    ws = _Workspace()
    accs = {s.name: SiteAccumulator(s.channels, device, ws, reservoir if s.kind in RESIDUAL_KINDS else 0,
                                    seed=seed + i)
            for i, s in enumerate(chosen)}
    token_mask = TokenMask()

    token_info: list[TokenInfo] = []

    def record(site: Site, x: torch.Tensor) -> torch.Tensor:
        with single_thread():
            accs[site.name].update(x, token_info[0])
        return x

    batch_list = list(batches(items, batch_size, pad_id, by_length=True))
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batch_list)
    plain = stats = 0.0
    if measure_cost:  # warm-up, untimed (thread pools, allocator)
        model(**_model_inputs(batch_list[0], device))
    for i, batch in enumerate(progress(batch_list, "statistics")):
        inputs = _model_inputs(batch, device)
        order = (False, True) if i % 2 == 0 else (True, False)
        for with_stats in order:
            if not with_stats and not measure_cost:
                continue
            _sync(device)
            t0 = time.perf_counter()
            if with_stats:
                token_mask.mask = inputs["attention_mask"].bool()
                token_info[:] = [TokenInfo.of(inputs["input_ids"], token_mask.mask, special_ids)]
                with tap(chosen, record):
                    model(**inputs)
            else:
                model(**inputs)
            _sync(device)
            if with_stats:
                stats += time.perf_counter() - t0
            else:
                plain += time.perf_counter() - t0
    t0 = time.perf_counter()
    results = [accs[s.name].result(s.name, s.kind, s.layer, top_k) for s in chosen]
    if not special_ids:  # nothing was split off: "non-special" would silently equal "all"
        for r in results:
            r.special_tokens, r.kurtosis_non_special = None, float("nan")
    out = ActivationStats(results)
    res_sites = [r for r in results if r.sample is not None]
    if res_sites:
        worst = out.worst_site()
        for r in res_sites:
            if r is not worst:
                r.sample = r.sample_channels = None
    stats += time.perf_counter() - t0
    out.meta = {"examples": len(items), "tokens": n_tokens, "special_ids": sorted(special_ids or []),
                "batch_size": batch_size, "top_k": top_k, "reservoir": reservoir,
                "median_resolution": MEDIAN_RESOLUTION, "stats_seconds": stats,
                "fp32_pass_seconds": plain if measure_cost else None,
                "stats_cost_vs_fp32_pass": stats / plain if measure_cost and plain > 0 else None,
                "torch_threads": torch.get_num_threads()}
    return out


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()




def stats_cache_path(cache_dir: str | Path, checkpoint: str | dict, fingerprint: str, num_examples: int | None,
                     seed: int = 0, top_k: int = 3, reservoir: int = 200_000, max_length: int | None = None,
                     special_ids: Iterable[int] | None = None) -> Path:
    """Where the statistics of one FP32 checkpoint (its path, or any JSON-able identity) on one
    validation sample (split fingerprint, sample size and seed, max_length) are cached, by the
    code and libraries that compute them."""
    key = cache.key_of({"checkpoint": checkpoint, "validation": fingerprint, "num_examples": num_examples,
                        "seed": seed, "top_k": top_k, "reservoir": reservoir, "max_length": max_length,
                        "special_ids": sorted(special_ids or []), "version": STATS_VERSION,
                        "code": provenance.fingerprint(provenance.STATS_MODULES)})
    return Path(cache_dir) / "stats" / f"{key}.json"


def cached_fp32_statistics(path: str | Path, model: nn.Module, sites: list[Site], items: list[dict], pad_id: int,
                           device, batch_size: int = 32, top_k: int = 3, reservoir: int = 200_000,
                           special_ids: Iterable[int] | None = None) -> tuple[ActivationStats, bool]:
    """:func:`fp32_statistics` computed once per cache path (locked, atomic); (stats, was_cached).

    Call it on the FP32 model, before weights are quantized in place. ``path`` comes from
    :func:`stats_cache_path`; ``items`` should be :func:`sample_items` of the encoded
    validation split."""
    value, hit = cache.cached_json(Path(path), lambda: fp32_statistics(
        model, sites, items, pad_id, device, batch_size, top_k=top_k, reservoir=reservoir,
        special_ids=special_ids).to_json())
    return ActivationStats.from_json(value), hit
