"""Function-preserving rewrites of the FP32 model applied before PTQ (``quant.transform``).

Each transform picks, per norm its family's adapter lists (:class:`~transquant.models.adapters.base.Readers`),
a per-channel ``scale`` s and optionally a ``shift`` δ, and rewrites the norm output y into

    z = (y - δ) / s      (the norm's affine: γ' = γ / s, β' = (β - δ) / s)

while every linear reading it absorbs the inverse (W' = W diag(s), b' = b + W δ; GPT-2's Conv1D
weights are [in, out], so their rows are scaled), so the readers compute exactly what they did.

Pre-LN families: the norm output feeds only its linears, so that is all. Post-LN families: the
norm output is also the stream, added as the residual of the next sum, which must get y back. A
:class:`ResidualRestore` module (``residual_restore``, a child of the module where the residual
enters the add, with non-persistent buffers) computes ``z * s + δ`` there, from forward pre-hooks
that run before any site tap (``prepend``): BERT/ELECTRA/MPNet-FFN multiply the residual argument
of ``attention.output`` / ``output``; DistilBERT and MPNet's attention add inline, so the hook
adds ``z * (s - 1) + δ`` to the sum norm's input, z being captured at the block's (or FFN's)
input. The hooks run inside ``forward``, so the ONNX export (TorchScript tracer) carries them as a
Mul (+ Add) per restored norm; the quantized site is z, i.e. the tensor the readers really see.

Transforms (registry :data:`TRANSFORMS`):

- ``smoothquant`` (Xiao et al. 2023): s_j = max|y_j|^α / max|W_{:,j}|^(1-α) over calibration
  tokens (non-pad) and over all readers' weights; no shift.
- ``outlier_suppression`` (Wei et al. 2022, gamma migration): s = γ, so the norm becomes
  non-scaling (γ' = 1, β' = β/γ) and γ moves into the readers. Pair it with the ``token_clip``
  range estimator (:class:`TokenClip`, registered here).
- ``os_plus`` (Wei et al. 2023): δ_j = (max_j + min_j) / 2, s_j = max(1, max|y_j - δ_j| / t), t
  from a grid over fractions of the largest channel range, minimising the readers' output MSE when
  z is quantized per tensor (min-max, ``act_bits`` or 8 bits; float weights) on sampled tokens.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.errors import TransquantError
from ..core.registry import Registry
from .ptq import TokenMask, token_values
from .quantizers import asymmetric_grid, fake_quantize
from .ranges import ESTIMATORS, RangeEstimator
from .sites import find_sites, tap, use_tappable_attention

TRANSFORMS: Registry[Callable] = Registry("quant.transform")
NONE = "none"
DEFAULT_ALPHA = 0.5
MIN_SCALE = 1e-5
SAMPLE_ROWS = 4096  # tokens kept per norm for the os_plus search
OS_PLUS_GRID = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01)
TOKEN_CLIP_QUANTILES = (1.0, 0.9999, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9)
TOKEN_CLIP_SAMPLE = 1 << 16  # values kept per site for the token_clip MSE


def transform_name(q) -> str:
    return q.get("transform", NONE) if hasattr(q, "get") else NONE


def validate_transform(q) -> None:
    """Raise a one-line :class:`TransquantError` for a bad ``quant.transform`` / ``quant.alpha``."""
    name = transform_name(q)
    if name != NONE and name not in TRANSFORMS:
        raise TransquantError(f"quant.transform={name}: allowed {', '.join([NONE, *TRANSFORMS])}")
    alpha = q.get("alpha", DEFAULT_ALPHA)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise TransquantError(f"quant.alpha={alpha}: must be a number in [0, 1] (SmoothQuant's migration strength)")


# --- the state of a transform ------------------------------------------------------------------

@dataclass(frozen=True)
class NormParams:
    scale: torch.Tensor
    shift: torch.Tensor | None = None


@dataclass
class TransformState:
    """Which transform ran and its parameters per norm (qualified module name), in forward order."""

    name: str
    norms: dict[str, NormParams]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for norm, p in self.norms.items():
            out[f"transform/{norm}/scale"] = p.scale.detach().cpu().contiguous().clone()
            if p.shift is not None:
                out[f"transform/{norm}/shift"] = p.shift.detach().cpu().contiguous().clone()
        return out

    def meta(self) -> dict:
        return {"name": self.name, "norms": {n: {"shift": p.shift is not None} for n, p in self.norms.items()}}

    @classmethod
    def from_file(cls, meta: dict, get: Callable[[str], torch.Tensor]) -> TransformState:
        return cls(meta["name"], {n: NormParams(get(f"transform/{n}/scale"),
                                                get(f"transform/{n}/shift") if d["shift"] else None)
                                  for n, d in meta["norms"].items()})


# --- residual restore ----------------------------------------------------------------------------

class ResidualRestore(nn.Module):
    """Gives a post-LN residual branch the norm output back: y = z * scale + shift."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor | None, arg: int, inline: bool) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone(), persistent=False)
        self.register_buffer("shift", (torch.zeros_like(scale) if shift is None else shift.detach().clone()),
                             persistent=False)
        self.arg = arg
        self.inline = inline
        self._residual: torch.Tensor | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale + self.shift

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, {'inline add' if self.inline else f'argument {self.arg}'}"

    # hooks (bound methods, so a deep copy of the model hooks its own copy)
    def scale_argument(self, module, args, kwargs):
        if len(args) <= self.arg:
            raise TransquantError(f"residual restore: {type(module).__name__} got its residual by keyword, "
                                  f"expected it as argument {self.arg}")
        return (*args[:self.arg], self(args[self.arg]), *args[self.arg + 1:]), kwargs

    def capture(self, module, args, kwargs):
        self._residual = args[0] if args else kwargs["hidden_states"]

    def add_back(self, module, args, kwargs):
        z, self._residual = self._residual, None
        if z is None:
            raise TransquantError(f"residual restore: {type(module).__name__} ran before its residual was captured")
        return (args[0] + (z * (self.scale - 1) + self.shift), *args[1:]), kwargs


RESTORE_NAME = "residual_restore"


# --- folding ----------------------------------------------------------------------------------

def _groups(model: nn.Module):
    # the adapters import quant.sites: imported here, not at module import
    from ..models.adapters import adapter_for

    return adapter_for(model).reader_groups(model)


def _in_major(mod: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a view: Conv1D stores [in, out])."""
    return mod.weight.t() if isinstance(mod, Conv1D) else mod.weight


def fold_(model: nn.Module, state: TransformState) -> nn.Module:
    """Rewrite ``model`` (FP32, untransformed) with ``state``'s per-norm parameters, in place."""
    modules = dict(model.named_modules())
    groups = {g.norm: g for g in _groups(model)}
    missing = [n for n in state.norms if n not in groups]
    if missing:
        raise TransquantError(f"transform {state.name}: the model has no rewritable norm {missing[0]}")
    with torch.no_grad():
        for name, p in state.norms.items():
            g, norm = groups[name], modules[name]
            s = p.scale.to(norm.weight.device, norm.weight.dtype)
            d = None if p.shift is None else p.shift.to(s.device, s.dtype)
            if norm.weight.shape != s.shape:
                raise TransquantError(f"transform {state.name}: {name} is {norm.weight.numel()} wide, "
                                      f"its scale {s.numel()}")
            if norm.bias is None:
                norm.bias = nn.Parameter(torch.zeros_like(norm.weight))
            norm.weight.div_(s)
            norm.bias.copy_((norm.bias - d) / s if d is not None else norm.bias / s)
            for lin_name in g.linears:
                lin = modules[lin_name]
                w = _in_major(lin)
                if d is not None:
                    if lin.bias is None:
                        lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
                    lin.bias.add_(w @ d)
                w.mul_(s)  # in place through the view
            # An identity restore computes nothing, and its exported output would equal the norm's
            # output exactly: the engine, which finds sites by value, could take one for the other.
            identity = bool((s == 1).all()) and (d is None or not d.any())
            if g.restore is not None and not identity:
                r = g.restore
                restore = ResidualRestore(s, d, r.arg, r.operand is not None)
                target = modules[r.module]
                if hasattr(target, RESTORE_NAME):
                    raise TransquantError(f"transform {state.name}: {r.module} is already restored")
                target.add_module(RESTORE_NAME, restore)
                if r.operand is None:
                    target.register_forward_pre_hook(restore.scale_argument, with_kwargs=True, prepend=True)
                else:
                    modules[r.operand].register_forward_pre_hook(restore.capture, with_kwargs=True, prepend=True)
                    target.register_forward_pre_hook(restore.add_back, with_kwargs=True, prepend=True)
    return model


# --- calibration statistics at the norm outputs -----------------------------------------------------

@dataclass
class NormStats:
    lo: torch.Tensor  # per-channel min over real tokens
    hi: torch.Tensor  # per-channel max
    sample: torch.Tensor  # up to SAMPLE_ROWS token rows [n, channels]

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.hi.abs(), self.lo.abs())


def norm_stats(model: nn.Module, norms: list[str], batches: list[dict], device: torch.device) -> dict[str, NormStats]:
    """Per-channel min/max (and a sample of token rows) of each norm's output over the real
    tokens of ``batches``, through the norm's output site (so OPT's flat FFN norm is per token)."""
    modules = dict(model.named_modules())
    wanted = {id(modules[n]): n for n in norms}
    sites = [s for s in find_sites(model) if s.side == "output" and id(s.module) in wanted]
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in norms}
    kept = dict.fromkeys(norms, 0)
    mask = TokenMask()

    def observe(site, x):
        name = wanted[id(site.module)]
        v = token_values(x, mask.mask).reshape(-1, x.shape[-1]).detach().float()
        if v.numel():
            lo[name] = torch.minimum(lo[name], v.min(0).values) if name in lo else v.min(0).values
            hi[name] = torch.maximum(hi[name], v.max(0).values) if name in hi else v.max(0).values
            take = min(SAMPLE_ROWS - kept[name], v.shape[0])
            if take > 0:
                rows[name].append(v[:take].cpu())
                kept[name] += take
        return x

    use_tappable_attention(model)
    model.eval()
    with torch.no_grad(), tap(sites, observe):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            mask.mask = batch["attention_mask"].bool()
            model(**batch)
    absent = [n for n in norms if n not in lo]
    if absent:
        raise TransquantError(f"transform: no calibration token reached {absent[0]}")
    return {n: NormStats(lo[n].cpu(), hi[n].cpu(), torch.cat(rows[n])) for n in norms}


def _safe(s: torch.Tensor) -> torch.Tensor:
    """Scales usable as divisors: non-finite or tiny ones become 1."""
    ok = torch.isfinite(s) & (s.abs() >= MIN_SCALE)
    return torch.where(ok, s, torch.ones_like(s))


def _reader_weights(model, group) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    modules = dict(model.named_modules())
    return [(_in_major(modules[n]).detach().float().cpu(),
             None if modules[n].bias is None else modules[n].bias.detach().float().cpu()) for n in group.linears]


@TRANSFORMS.register("smoothquant")
def smoothquant(model, groups, stats, q) -> dict[str, NormParams]:
    alpha = float(q.get("alpha", DEFAULT_ALPHA))
    out = {}
    for g in groups:
        w = torch.stack([wt.abs().amax(0) for wt, _ in _reader_weights(model, g)]).amax(0)
        a = stats[g.norm].absmax
        s = a.clamp(min=MIN_SCALE).pow(alpha) / w.clamp(min=MIN_SCALE).pow(1 - alpha)
        out[g.norm] = NormParams(_safe(torch.where((a > 0) & (w > 0), s, torch.ones_like(s))))
    return out


@TRANSFORMS.register("outlier_suppression")
def outlier_suppression(model, groups, stats, q) -> dict[str, NormParams]:
    modules = dict(model.named_modules())
    return {g.norm: NormParams(_safe(modules[g.norm].weight.detach().float().cpu().clone())) for g in groups}


@TRANSFORMS.register("os_plus")
def os_plus(model, groups, stats, q) -> dict[str, NormParams]:
    bits = q.get("act_bits", None) or 8
    out = {}
    for g in groups:
        st = stats[g.norm]
        shift = (st.hi + st.lo) / 2
        half = ((st.hi - st.lo) / 2).clamp(min=0)
        y = st.sample
        readers = _reader_weights(model, g)
        ref = [y @ w.t() + (0 if b is None else b) for w, b in readers]
        best = None
        for f in OS_PLUS_GRID:
            t = max(float(half.max()) * f, MIN_SCALE)
            s = torch.clamp(half / t, min=1.0)
            z = (y - shift) / s
            zq = fake_quantize(z, asymmetric_grid(z.min(), z.max(), bits))
            loss = sum(float(((zq @ (w * s).t() + (0 if b is None else b) + w @ shift) - r).pow(2).mean())
                       for (w, b), r in zip(readers, ref))
            if best is None or loss < best[0]:
                best = (loss, s)
        out[g.norm] = NormParams(best[1], shift)
    return out


def transform_(model: nn.Module, q, batches: list[dict], device: torch.device) -> TransformState | None:
    """Run ``quant.transform`` on ``model`` (FP32) in place; None for ``none``."""
    name = transform_name(q)
    if name == NONE:
        return None
    groups = _groups(model)
    stats = norm_stats(model, [g.norm for g in groups], batches, device) if name != "outlier_suppression" else {}
    state = TransformState(name, TRANSFORMS[name](model, groups, stats, q))
    fold_(model, state)
    return state


# --- token-wise clipping (Outlier Suppression) ------------------------------------------------------

@ESTIMATORS.register("token_clip")
class TokenClip(RangeEstimator):
    """Outlier Suppression's token-wise clipping, simplified: the range is [quantile(per-token
    min, 1 - p), quantile(per-token max, p)], so a fraction 1 - p of the *tokens* (those carrying
    the outliers) is clipped; p is picked from :data:`TOKEN_CLIP_QUANTILES` (1.0 = min-max) to
    minimise the site's own quantization MSE on a sample of its values. A token is a row of the
    last dimension (attention scores/probs arrive flattened: each value is a row). Memory: two
    floats per token plus a bounded sample."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tok_max: list[torch.Tensor] = []
        self.tok_min: list[torch.Tensor] = []
        self.sample: list[torch.Tensor] = []
        self.kept = 0

    @classmethod
    def from_plan(cls, plan) -> TokenClip:
        return cls(plan.bits)

    def observe(self, x: torch.Tensor) -> None:
        if not x.numel():
            return
        rows = x.detach().float().reshape(-1, x.shape[-1] if x.dim() > 1 else 1)
        self.tok_max.append(rows.amax(-1).cpu())
        self.tok_min.append(rows.amin(-1).cpu())
        if self.kept < TOKEN_CLIP_SAMPLE:
            flat = rows.reshape(-1)
            stride = max(1, math.ceil(flat.numel() / (TOKEN_CLIP_SAMPLE - self.kept)))
            take = flat[::stride][:TOKEN_CLIP_SAMPLE - self.kept].cpu()
            self.sample.append(take)
            self.kept += take.numel()

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.tok_max:
            raise RuntimeError("range requested before any value was observed")
        tmax, tmin, sample = torch.cat(self.tok_max), torch.cat(self.tok_min), torch.cat(self.sample)
        if tmax.numel() > 1 << 24:  # torch.quantile's limit
            step = math.ceil(tmax.numel() / (1 << 24))
            tmax, tmin = tmax[::step], tmin[::step]
        best = None
        for p in TOKEN_CLIP_QUANTILES:
            hi = tmax.max() if p == 1.0 else torch.quantile(tmax, p)
            lo = tmin.min() if p == 1.0 else torch.quantile(tmin, 1 - p)
            err = float((fake_quantize(sample, asymmetric_grid(lo, hi, self.bits)) - sample).pow(2).mean())
            if best is None or err < best[0]:
                best = (err, lo, hi)
        return best[1].reshape(()), best[2].reshape(())
