"""Uniform affine fake quantization: pure functions on tensors.

Everything here is stateless so the arithmetic can be tested against closed forms. A *grid* is
(scale, zero_point, qmin, qmax); scale and zero_point broadcast against the tensor, so the same
code serves per-tensor, per-channel and per-group (PEG) ranges. A *per-token* grid
(:func:`per_token_grid`, ``quant=dynamic``) has no calibrated range: its scale is NaN and
:func:`fake_quantize` takes each token's min and max at run time, so a state file, a loaded
state and every caller of ``fake_quantize`` handle it as any other grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    """Integer grid x ≈ (q - zero_point) * scale with q in [qmin, qmax]."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int

    @property
    def bins(self) -> int:
        return self.qmax - self.qmin + 1

    @property
    def per_token(self) -> bool:
        """A dynamic grid: the range is each token's own, taken when the tensor is seen."""
        return self.scale.numel() == 1 and bool(torch.isnan(self.scale).all())


def asymmetric_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> Grid:
    """Unsigned grid covering [lo, hi]; the range is widened to contain 0 so zero is exact.

    Zero must be representable because padding, ReLU/GELU zeros and attention masks rely on it.
    """
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0.0)
    qmax = 2**bits - 1
    scale = torch.clamp((hi - lo) / qmax, min=torch.finfo(torch.float32).tiny)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return Grid(scale, zero_point, 0, qmax)


def symmetric_grid(absmax: torch.Tensor, bits: int) -> Grid:
    """Signed grid [-2^(b-1), 2^(b-1)-1] * scale with scale = absmax / (2^(b-1)-1)."""
    absmax = torch.as_tensor(absmax, dtype=torch.float32)
    half = 2 ** (bits - 1) - 1
    scale = torch.clamp(absmax / half, min=torch.finfo(torch.float32).tiny)
    return Grid(scale, torch.zeros_like(scale), -(half + 1), half)


def per_token_grid(bits: int) -> Grid:
    """The unsigned ``bits`` grid whose range is each token's [min, max] (last dimension: the
    channels of a token, the keys of an attention row), widened to contain 0, at run time."""
    return Grid(torch.tensor(float("nan")), torch.tensor(0.0), 0, 2**bits - 1)


def resolve(x: torch.Tensor, grid: Grid) -> Grid:
    """``grid`` itself, or for a per-token grid the asymmetric grid of each of x's tokens."""
    if not grid.per_token:
        return grid
    bits = (grid.qmax + 1).bit_length() - 1
    return asymmetric_grid(x.detach().amin(-1, keepdim=True).float(), x.detach().amax(-1, keepdim=True).float(), bits)


def _codes(x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) of x on the resolved grid. The codes tensor is x / s, then rounded,
    shifted and clamped in place: the same floats as the out-of-place formula, one allocation
    instead of four (fake quantization was about a fifth of a study job's time)."""
    grid = resolve(x, grid)
    scale = grid.scale.to(x.device, x.dtype)
    zero = grid.zero_point.to(x.device, x.dtype)
    return torch.div(x, scale).round_().add_(zero).clamp_(grid.qmin, grid.qmax), scale, zero


def quantize(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes (as float tensor) of x on the grid: clamp(round(x/s) + z)."""
    return _codes(x, grid)[0]


def fake_quantize(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Quantize then dequantize: what an integer kernel would see, in float."""
    q, scale, zero = _codes(x, grid)
    return q.sub_(zero).mul_(scale)
