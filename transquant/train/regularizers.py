"""Fine-tuning regularisers on the residual-sum activations (the sites of kinds
:data:`~transquant.quant.sites.RESIDUAL_KINDS`: the embedding sum and each layer's two residual
sums — where the 2021 paper finds the outliers that break per-tensor 8-bit quantization).

Each is computed per batch over the *non-pad* tokens' values of each site (a pad position's
activation is never used, so it must not be shaped), then averaged over the sites, and added to
the task loss with weight ``train.reg_weight`` (λ):

- ``kurtosis``: ``relu(kurt(x) - κ)²`` with ``kurt(x) = E[(x-μ)⁴] / E[(x-μ)²]²`` over all the
  site's values (every token and channel together: a per-tensor quantizer sees them together).
  Chmiel et al. (2020, "Robust quantization: one model to rule them all") penalise
  ``(kurt - κ)²`` of *weights* toward a uniform distribution (κ = 1.8). Here it is one-sided
  (``relu``): the goal is to remove heavy tails (outliers), not to give every activation a set
  shape — a two-sided penalty would also push light-tailed sites toward heavier tails, and a
  squared hinge has a gradient that fades to zero at the target rather than jumping like
  ``|kurt - κ|``. ``train.kurtosis_target`` (κ) defaults to 3, a Gaussian's: tails no heavier
  than a Gaussian's need a per-tensor range of ~4.5σ for 10⁵ values, which 8 bits resolve well;
  forcing a uniform shape (1.8, Chmiel's weights) would fight what LayerNorm and GELU make of
  activations, and a larger κ leaves more of the outliers in place.
- ``quanttune`` (QuantTune, 2024): ``mean(relu(|x| - m)²)``, the squared excess of each value
  beyond the margin ``m`` (``train.margin``): values inside ±m cost nothing; an outlier costs in
  proportion to its squared excess. The 2021 authors' code has the options ``--gamma``
  ("Activation regularization strength") and ``--margin`` ("Activation regularization margin")
  (Qualcomm-AI-research/transformer-quantization, utils/transformer_click_options.py), but its
  ``main.py`` builds a stock Hugging Face ``Trainer`` that never reads them, and no loss term using
  them was found in the parts of the released code read for this (main.py, the click options):
  this regulariser follows the QuantTune description, not that code.

λ has no scale-free default, so ``train.reg_weight`` (and ``train.margin``, whose scale is the
model's activation scale) must be set with the regulariser. For scale: the pretrained MiniLM-L6
(model=minilm-l6) on three sentence pairs has residual-sum kurtoses of 10-18 after attention and
145-5600 after the FFN (|x| up to 190, std 0.7-2.4), so its kurtosis penalty starts near 10⁶-10⁷
(λ ~ 1e-7 to weigh like the task loss) while the range penalty with margin 10 is O(1-10).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..core.errors import TransquantError
from ..quant.sites import RESIDUAL_KINDS, Site, find_sites, tap
from .attention import KINDS as ATTENTION_KINDS
from .knobs import KNOB_DEFAULTS, KNOBS_OF, SETTINGS

REGULARIZERS = ("none", "kurtosis", "quanttune")
AUTOCASTS = ("none", "bf16")


def kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Kurtosis ``E[(x-μ)⁴] / E[(x-μ)²]²`` of all of ``x``'s values (3 for a Gaussian)."""
    d = x.reshape(-1) - x.mean()
    m2 = (d * d).mean()
    return (d * d * d * d).mean() / (m2 * m2).clamp_min(torch.finfo(x.dtype).tiny)


def kurtosis_penalty(values: list[torch.Tensor], target: float) -> torch.Tensor:
    """Mean over the sites of ``relu(kurt(x) - target)²``."""
    return torch.stack([torch.relu(kurtosis(v) - target) ** 2 for v in values]).mean()


def range_penalty(values: list[torch.Tensor], margin: float) -> torch.Tensor:
    """Mean over the sites of ``mean(relu(|x| - margin)²)`` (QuantTune)."""
    return torch.stack([(torch.relu(v.abs() - margin) ** 2).mean() for v in values]).mean()


class ResidualRegularizer:
    """Taps a model's residual sums during the training forward (the tap returns the tensor
    itself, so gradients flow) and turns the non-pad values into the regulariser's penalty."""

    def __init__(self, model: nn.Module, kind: str, target: float | None = None, margin: float | None = None):
        if kind not in REGULARIZERS[1:]:
            raise TransquantError(f"train.regularizer={kind}: allowed {', '.join(REGULARIZERS)}")
        self.kind, self.target, self.margin = kind, target, margin
        self.sites: list[Site] = [s for s in find_sites(model) if s.kind in RESIDUAL_KINDS]
        self._values: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None

    def _record(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:2] != self._mask.shape:
            raise TransquantError(f"site {site.name}: tensor {tuple(x.shape)} is not [batch, tokens, channels] "
                                  f"of the batch's mask {tuple(self._mask.shape)}")
        self._values.append(x[self._mask].float())  # [non-pad tokens, channels], still in the graph; FP32 under autocast
        return x

    @contextmanager
    def watch(self, attention_mask: torch.Tensor) -> Iterator[None]:
        """Record the residual sums of the forward passes run inside (non-pad tokens only)."""
        self._values, self._mask = [], attention_mask.bool()
        with tap(self.sites, self._record):
            yield

    def penalty(self) -> torch.Tensor:
        """The (unweighted) penalty of what :meth:`watch` recorded; clears the record."""
        values, self._values = self._values, []
        if not values:
            raise TransquantError("regulariser: no residual-sum activation was recorded (no sites tapped)")
        if self.kind == "kurtosis":
            return kurtosis_penalty(values, self.target)
        return range_penalty(values, self.margin)


def build(model: nn.Module, train_cfg) -> ResidualRegularizer | None:
    """The regulariser a fine-tuning recipe asks for (None: ``train.regularizer=none``)."""
    kind = train_cfg.get("regularizer", "none")
    if kind == "none":
        return None
    return ResidualRegularizer(model, kind, target=train_cfg.get("kurtosis_target"), margin=train_cfg.get("margin"))


def effective_recipe(train_cfg) -> dict:
    """The recipe as the fine-tune cache key hashes it: every train knob, except the knobs added
    with the regularisers and attention variants where they are inert (at their "as before"
    value, or belonging to a setting not chosen). A default recipe hashes exactly as it did
    before these knobs existed."""
    chosen = {train_cfg.get("regularizer", "none"), train_cfg.get("attention", "softmax")}
    live = {k for setting in chosen for k in KNOBS_OF.get(setting, ())}
    out = {}
    for k in sorted(train_cfg):
        v = train_cfg[k]
        if k in KNOB_DEFAULTS and k not in live and (k not in SETTINGS or v == KNOB_DEFAULTS[k]):
            continue
        out[k] = v
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_train(cfg_train) -> None:
    """Check the regulariser and attention knobs of ``cfg.train``; raises
    :class:`~transquant.core.errors.TransquantError` with a one-line message naming the bad value
    and what is allowed."""
    t = cfg_train

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise TransquantError(msg)

    reg = t.get("regularizer", "none")
    check(reg in REGULARIZERS, f"train.regularizer={reg}: allowed {', '.join(REGULARIZERS)}")
    if reg != "none":
        w = t.get("reg_weight")
        check(_number(w) and w > 0, f"train.reg_weight={w}: must be a number > 0 with train.regularizer={reg} "
                                    "(its scale depends on the regulariser: no default)")
    if reg == "kurtosis":
        k = t.get("kurtosis_target")
        check(_number(k) and k >= 1, f"train.kurtosis_target={k}: must be a number >= 1 "
                                     "(every distribution's kurtosis is >= 1; 3 = Gaussian)")
    if reg == "quanttune":
        m = t.get("margin")
        check(_number(m) and m >= 0, f"train.margin={m}: must be a number >= 0 with train.regularizer=quanttune "
                                     "(the activation magnitude beyond which values are penalised)")
    ac = t.get("autocast", "none")
    check(ac in AUTOCASTS, f"train.autocast={ac}: allowed {', '.join(AUTOCASTS)}")
    att = t.get("attention", "softmax")
    check(att in ATTENTION_KINDS, f"train.attention={att}: allowed {', '.join(ATTENTION_KINDS)}")
    if att == "clipped_softmax":
        g, z = t.get("clip_gamma"), t.get("clip_zeta", 1.0)
        check(_number(g) and g < 0, f"train.clip_gamma={g}: must be a number < 0 (e.g. -0.03; 0 with "
                                    "clip_zeta=1 is the plain softmax: use train.attention=softmax)")
        check(_number(z) and z >= 1, f"train.clip_zeta={z}: must be a number >= 1")
    if att == "gated":
        b = t.get("gate_bias_init", 0.0)
        check(_number(b), f"train.gate_bias_init={b}: must be a finite number (0 = gates start at 0.5)")
