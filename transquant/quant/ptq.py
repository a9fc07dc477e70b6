"""Post-training quantization of a model: plan per site, calibrate, fake-quantize.

A method is only configuration (``conf/quant/*.yaml``); :func:`plan_sites` turns it into a
:class:`SitePlan` per site, so new methods are new YAML, not new code paths.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.errors import TransquantError
from ..core.progress import progress
from .quantizers import Grid, fake_quantize, symmetric_grid
from .ranges import ESTIMATORS, WEIGHT_ESTIMATORS, RangeEstimator, make_groups
from .sites import Site, select, tap, use_tappable_attention

# PEG groups: each site its own, or one grouping per layer chosen from that layer's FFN output
# ranges (the authors' --per-groups-permute-shared-h: the shared ranges are those of the
# quantizer whose module name contains 'dense', i.e. the FFN output 'h').
SHARE_GROUPS = ("none", "layer")
SHARED_GROUP_SOURCE = "ffn.output"
# Modules whose weight is quantized (Conv1D: GPT-2's Linear, weight stored transposed).
WEIGHT_MODULES = (nn.Linear, Conv1D, nn.Embedding)


@dataclass(frozen=True)
class SitePlan:
    """How one site is quantized: bit width and how its range is estimated."""

    bits: int
    estimator: str  # a name in ranges.ESTIMATORS (peg: per-embedding-group)
    percentile: float | None = None
    k: int = 1
    grouping: str = "sorted"
    group_source: str | None = None  # PEG: the site whose ranges choose the groups (None: its own)

    def make_estimator(self) -> RangeEstimator:
        return ESTIMATORS[self.estimator].from_plan(self)


def peg_grouping(q) -> str:
    """Effective PEG grouping: ``permute=false`` means contiguous blocks."""
    return q.grouping if q.permute else "contiguous"


def plan_sites(sites: list[Site], q) -> dict[str, SitePlan]:
    """Which sites are quantized and how, from a ``quant`` config. Unlisted sites stay float.

    Order of precedence: ``act_exclude`` > ``high_bits_sites`` (mixed precision) >
    ``peg_sites`` (per-embedding-group ranges) > the method's default estimator. With
    ``share_groups=layer`` every PEG site of layer i takes its groups from ``layer.i.ffn.output``,
    which must then be a PEG site of the same width; sites outside the layers keep their own.
    """
    if q.act_bits is None:
        return {}
    chosen = {s.name for s in select(sites, list(q.act_sites))} - {s.name for s in select(sites, list(q.act_exclude))}
    high = {s.name for s in select(sites, list(q.high_bits_sites))}
    peg = {s.name for s in select(sites, list(q.peg_sites)) if s.channels is not None}
    plans = {}
    for site in sites:
        if site.name not in chosen:
            continue
        bits = q.high_bits if site.name in high else q.act_bits
        if site.name in peg and site.name not in high:
            source = (f"layer.{site.layer}.{SHARED_GROUP_SOURCE}"
                      if q.share_groups == "layer" and site.layer is not None else None)
            plans[site.name] = SitePlan(bits, "peg", k=q.k, grouping=peg_grouping(q), group_source=source)
        else:
            plans[site.name] = SitePlan(bits, q.estimator, percentile=q.percentile)
    _check_group_sources(sites, plans)
    return plans


def _check_group_sources(sites: list[Site], plans: dict[str, SitePlan]) -> None:
    width = {s.name: s.channels for s in sites}
    for name, plan in plans.items():
        src = plan.group_source
        if src is None:
            continue
        if src not in plans or plans[src].estimator != "peg":
            raise TransquantError(
                f"quant.share_groups=layer: {name} takes its PEG groups from {src}, which is not a PEG site "
                f"(it is {'float' if src not in plans else f'{plans[src].bits}-bit ' + plans[src].estimator}); "
                "add it to quant.peg_sites or use quant.share_groups=none")
        if width[src] != width[name]:
            raise TransquantError(f"quant.share_groups=layer: {name} (width {width[name]}) cannot share the "
                                  f"groups of {src} (width {width[src]}); use quant.share_groups=none")


WEIGHT_GRANULARITIES = ("tensor", "channel")


def output_axis(mod: nn.Module) -> int | None:
    """The output-channel axis of a weight: 0 for Linear ([out, in]), 1 for Conv1D ([in, out]);
    None for Embedding tables, which stay per tensor (a per-row scale would be one per token,
    gathered with the row, which the int8 engine's Gather path does not do)."""
    if isinstance(mod, nn.Linear):
        return 0
    return 1 if isinstance(mod, Conv1D) else None


def quantize_weights_(model: nn.Module, bits: int | None, estimator: str = "minmax", granularity: str = "tensor",
                      input_means: dict[str, torch.Tensor] | None = None) -> dict[str, Grid]:
    """Symmetric fake quantization of every Linear, Conv1D (GPT-2's transposed Linear) and
    Embedding weight, in place.

    The range comes from the registered weight estimator: max |w| (``minmax``) or the
    MSE-optimal range (``mse``, :func:`~transquant.quant.ranges.mse_absmax`), one per tensor or,
    with ``granularity="channel"``, one per output channel of Linear and Conv1D weights (a scale
    vector, shaped to broadcast: [out, 1] or [1, out]). Biases stay float (they become int32
    accumulators on integer hardware); with ``input_means`` (module -> mean input, see
    :func:`input_means`) each bias absorbs the expected output error of its quantized weight
    (:func:`correct_bias_`). Returns qualified module name -> the grid its weight was put on
    (empty for float weights), so an integer engine can reuse exactly those grids.
    """
    weight_range = WEIGHT_ESTIMATORS[estimator]
    grids: dict[str, Grid] = {}
    if bits is None:
        return grids
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, WEIGHT_MODULES):
                w = mod.weight
                axis = output_axis(mod) if granularity == "channel" else None
                r = weight_range(w, bits) if axis is None else weight_range(w, bits, axis)
                grids[name] = symmetric_grid(r, bits)
                fq = fake_quantize(w, grids[name])
                if input_means is not None and name in input_means:
                    correct_bias_(mod, w - fq, input_means[name])
                w.copy_(fq)
    return grids


def correct_bias_(mod: nn.Module, delta: torch.Tensor, mean: torch.Tensor) -> None:
    """Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", sec. 4.2): the
    quantized weight changes the expected output by -(W - W_q) E[x]; adding (W - W_q) E[x] to the
    bias cancels it. ``delta`` = W - W_q in the module's layout. A module without a bias is left
    as it is (there is nothing to absorb the shift)."""
    if getattr(mod, "bias", None) is None:
        return
    mean = mean.to(delta.device, delta.dtype)
    mod.bias.add_(delta @ mean if isinstance(mod, nn.Linear) else mean @ delta)


def input_means(model: nn.Module, batches: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-input-channel mean of every Linear and Conv1D input, over the real (non-pad) tokens of
    ``batches``, computed on ``model`` as it is (call it before its weights are quantized: the
    FP32 statistics bias correction needs). Rows are tokens of [batch, tokens, in] inputs and of
    flat [batch * tokens, in] ones (OPT's FFN); other inputs (pooler, head: one row per sequence)
    count whole."""
    token_mask = TokenMask()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def pre(_mod, args):
            x, mask = args[0], token_mask.mask
            if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask]
            elif x.dim() == 2 and x.shape[0] == mask.numel() != mask.shape[0]:
                x = x[mask.reshape(-1)]
            rows = x.detach().reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + rows.sum(0)
            counts[name] = counts.get(name, 0) + rows.shape[0]
        return pre

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in model.named_modules()
               if isinstance(mod, (nn.Linear, Conv1D))]
    model.eval()
    try:
        with torch.no_grad():
            for batch in progress(batches, "bias correction: input means"):
                batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                token_mask.mask = batch["attention_mask"].bool()
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {name: (sums[name] / max(counts[name], 1)).float() for name in sums}


def token_values(x: torch.Tensor, mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
    """Values at real tokens only.

    [batch, tokens, channels] tensors give ``x[mask]``; attention scores and probabilities
    ([batch, heads, queries, keys]) give the entries whose query *and* key are real tokens (a
    pad key has probability ~0 and a pad query attends anyway: neither may set a range), and
    with ``causal`` only keys up to the query (a later key is masked out, never attended); other
    tensors (pooler, logits: one row per sequence) are returned whole.
    """
    if mask is None:
        return x
    batch, tokens = mask.shape
    if x.dim() == 4 and x.shape[0] == batch and tuple(x.shape[2:]) == (tokens, tokens):
        keep = mask[:, None, :, None] & mask[:, None, None, :]
        if causal:
            keep = keep & _causal_mask(tokens, mask.device)
        return x[keep.expand_as(x)]
    if x.dim() == 3 and tuple(x.shape[:2]) == (batch, tokens):
        return x[mask]
    return x


@lru_cache(maxsize=64)
def _causal_mask(tokens: int, device: torch.device) -> torch.Tensor:
    """[tokens, tokens], True where the key is not after the query; one per shape and device (at
    batch size 1, building it anew was ~9 % of :func:`token_values` per attention site). Read only."""
    return torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()


class TokenMask:
    """The current batch's attention mask, shared with taps that need to drop pad tokens."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


@dataclass
class QuantizedActivations:
    """Calibrated activation grids of a model, applied with :meth:`active`."""

    sites: list[Site]
    plans: dict[str, SitePlan]
    estimators: dict[str, RangeEstimator]
    grids: dict[str, Grid]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Fake-quantize every planned site while the context is open."""
        quantized = [s for s in self.sites if s.name in self.grids]
        with tap(quantized, lambda site, x: fake_quantize(x, self.grids[site.name])):
            yield


def calibrate(model: nn.Module, sites: list[Site], plans: dict[str, SitePlan],
              batches: list[dict], device: torch.device) -> QuantizedActivations:
    """Observe every planned site on calibration batches (non-pad tokens only) and fix the grids.

    Estimators that need two passes (exact percentiles, MSE histograms) see the batches twice;
    with only per-token (dynamic) sites no batch is run."""
    use_tappable_attention(model)
    estimators = {name: plan.make_estimator() for name, plan in plans.items()}
    token_mask = TokenMask()

    def observe(site: Site, x: torch.Tensor) -> torch.Tensor:
        est = estimators.get(site.name)
        if est is not None:
            est.observe(token_values(x, token_mask.mask, site.causal))
        return x

    model.eval()
    planned = [s for s in sites if s.name in plans]
    passes = max((e.passes for e in estimators.values()), default=1)
    with torch.no_grad(), tap(planned, observe):
        for i in range(passes):
            for batch in progress(batches, f"calibrate (pass {i + 1}/{passes})"):
                batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                token_mask.mask = batch["attention_mask"].bool()
                model(**batch)
            for est in estimators.values():
                if i + 1 < est.passes:
                    est.next_pass()
    for name, plan in plans.items():  # shared PEG groups, chosen from the source site's ranges
        if plan.group_source is not None:
            estimators[name].groups = make_groups(*estimators[plan.group_source].channel_ranges(),
                                                  plan.k, plan.grouping)
    grids = {name: est.grid(plans[name].bits) for name, est in estimators.items()}
    return QuantizedActivations(sites, plans, estimators, grids)
