"""Why PTQ fails: FP32 activation statistics, the outlier map and quantization-error attribution.

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

Quantization-error attribution runs the FP32 model and the quantized model on the same batches
and compares each site's tensors: SQNR in dB (end-to-end, i.e. including every upstream
quantization error) and which channels hold the error.
"""
from __future__ import annotations

import base64
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import cache, provenance
from .quant.quantizers import fake_quantize
from .quant.ptq import TokenMask, token_values
from .quant.sites import RESIDUAL_KINDS, Site, find_sites, tap, use_tappable_attention
from .tasks import batches

STATS_VERSION = 2  # bump when what is measured changes: it is part of the cache key

HIST_SUBBITS = 7  # 2**7 bins per power of two of the histogrammed value (x**2)
HIST_SHIFT = 23 - HIST_SUBBITS  # float32 mantissa bits dropped
HIST_BINS = 1 << (31 - HIST_SHIFT)  # every non-negative float32 bit pattern >> HIST_SHIFT
HIST_RESOLUTION = 2.0 ** -HIST_SUBBITS  # max bin width relative to the bin's lower edge
# The histogram is of x**2 (monotone in |x|, and computed anyway), so for |x| a bin spans at
# most sqrt(1 + 2**-7) - 1 = 0.39 % of its lower edge.
MEDIAN_RESOLUTION = math.sqrt(1.0 + HIST_RESOLUTION) - 1.0
TOP_FRACTION = 0.01  # "top 1 % of channels"

STAT_COLUMNS = ["site", "kind", "layer", "channels", "variance", "kurtosis", "top1pct_channel_energy",
                "max_abs", "max_over_median", "top_channels"]
HEADLINE_KIND = "ffn_residual"  # the un-prefixed per-layer metrics
HEADLINE_STATS = ("kurtosis", "variance", "top1pct_channel_energy", "max_abs")


def top_count(channels: int) -> int:
    """How many channels are "the top 1 %": ceil(1 % of channels), at least 1."""
    return max(1, math.ceil(TOP_FRACTION * channels))


# --- log-spaced histogram ------------------------------------------------------------------------------

def hist_edges() -> np.ndarray:
    """Edges of the histogram of non-negative float32 values, as float64: bin i holds
    [edges[i], edges[i + 1]), the values whose bit pattern >> HIST_SHIFT is i."""
    bits = (np.arange(HIST_BINS + 1, dtype=np.int64) << HIST_SHIFT)
    bits = np.minimum(bits, 0x7F800000)  # edges at and above +inf (the NaN patterns) are +inf
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


_EDGES: np.ndarray | None = None


def hist_quantile(counts: np.ndarray, rank: int) -> float:
    """The 0-based ``rank``-th smallest histogrammed value, interpolated inside its bin."""
    global _EDGES
    if _EDGES is None:
        _EDGES = hist_edges()
    cum = np.cumsum(counts)
    if rank < 0 or rank >= cum[-1]:
        raise ValueError(f"rank {rank} outside [0, {cum[-1]})")
    b = int(np.searchsorted(cum, rank, side="right"))
    before = cum[b] - counts[b]
    lo, hi = _EDGES[b], _EDGES[b + 1]
    if b == 0 or not math.isfinite(hi):  # bin 0: zeros and values below 9.2e-41, reported as 0
        return float(lo)
    return float(lo + (hi - lo) * (rank - before + 0.5) / counts[b])


def hist_median(counts: np.ndarray) -> float:
    """The lower median, as ``torch.median`` defines it: rank (n - 1) // 2."""
    n = int(counts.sum())
    return hist_quantile(counts, (n - 1) // 2)


# --- streaming accumulation -------------------------------------------------------------------

class _Workspace:
    """Growing buffers shared by every site's accumulator (sites are processed one at a time).
    Reusing them matters: a fresh multi-megabyte tensor per site and batch costs page faults."""

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None  # float32 [2, rows, cols]: x, x**2
        self.bins: torch.Tensor | None = None  # int32 histogram bin of each value
        self.ones: torch.Tensor | None = None

    def get(self, rows: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """([2, rows, cols] float32, [rows * cols] int32, ones[rows]) — uninitialised but ones."""
        device = torch.device(device)
        if self.values is None or self.values.numel() < 2 * rows * cols or self.values.device != device:
            self.values = torch.empty(max(2 * rows * cols, 1), dtype=torch.float32, device=device)
            self.bins = torch.empty(max(rows * cols, 1), dtype=torch.int32, device=device)
        if self.ones is None or self.ones.numel() < rows or self.ones.device != device:
            self.ones = torch.ones(max(rows, 1), dtype=torch.float32, device=device)
        return self.values[: 2 * rows * cols].view(2, rows, cols), self.bins[: rows * cols], self.ones[:rows]


@contextmanager
def single_thread():
    """Run the per-site accumulation on one thread. Its tensors are small (tokens x channels of
    one batch), memory-bound, and OpenMP fork/join on every one of them costs more than it
    saves, badly so when another process holds a core (then each op waits for a time slice)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Reservoir:
    """Uniform sample without replacement of whole rows (tokens: all their channels) from a
    stream, holding about ``size`` values (``size // channels`` rows, at least one) in O(size)
    memory. Each block of m new rows contributes a hypergeometric number of them, so the sample
    is exactly uniform over every row seen; sampling rows rather than single values keeps each
    token's channel vector (for per-channel grouping) at the same marginal distribution."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seen = 0
        self.rng = np.random.default_rng(seed)
        self.rows: np.ndarray | None = None  # [kept rows, channels]

    @property
    def values(self) -> np.ndarray:
        return np.empty(0, np.float32) if self.rows is None else self.rows.reshape(-1)

    @property
    def channels(self) -> np.ndarray:
        if self.rows is None:
            return np.empty(0, np.int32)
        return np.tile(np.arange(self.rows.shape[1], dtype=np.int32), self.rows.shape[0])

    def add(self, x2d: torch.Tensor) -> None:
        m, c = x2d.shape
        if m == 0 or self.size <= 0:
            return
        cap = max(1, self.size // c)
        have = 0 if self.rows is None else self.rows.shape[0]
        if self.seen + m <= cap:  # still filling: take everything
            take, keep = np.arange(m), np.arange(have)
        else:
            # How many of the new rows a uniform sample of ``cap`` rows from seen + m contains.
            k = int(self.rng.hypergeometric(m, self.seen, cap))
            take = np.sort(self.rng.choice(m, size=k, replace=False, shuffle=False))
            if have == cap:  # full: overwrite a uniform choice of k old rows
                pos = self.rng.choice(cap, size=k, replace=False, shuffle=False)
                self.rows[pos] = self._gather(x2d, take)
                self.seen += m
                return
            keep = np.sort(self.rng.choice(have, size=cap - k, replace=False, shuffle=False))
        new = self._gather(x2d, take)
        self.rows = new if self.rows is None else np.concatenate([self.rows[keep], new])
        self.seen += m

    @staticmethod
    def _gather(x2d: torch.Tensor, idx: np.ndarray) -> np.ndarray:
        return x2d.index_select(0, torch.from_numpy(idx).to(x2d.device)).cpu().numpy().astype(np.float32)


@dataclass
class TokenInfo:
    """The current batch's non-pad tokens, in the row order of ``token_values``: where they are
    in the padded [batch * tokens] layout, their input ids and positions, and which rows are
    special tokens ([CLS], [SEP], ...; ``special_rows`` is None when no special ids were given)."""

    rows: torch.Tensor  # flat indices of the non-pad tokens in [batch * tokens]
    shape: tuple[int, int]  # (batch, tokens)
    ids: torch.Tensor
    positions: torch.Tensor
    special_rows: torch.Tensor | None

    @classmethod
    def of(cls, input_ids: torch.Tensor, mask: torch.Tensor, special_ids: Iterable[int] | None) -> "TokenInfo":
        mask = mask.bool()
        rows = mask.reshape(-1).nonzero().squeeze(1)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        ids = input_ids.reshape(-1)[rows]
        special = None
        if special_ids:
            special = torch.isin(ids, torch.tensor(sorted(special_ids), device=ids.device)).nonzero().squeeze(1)
        return cls(rows, tuple(mask.shape), ids, pos.reshape(-1)[rows], special)

    @property
    def n_special(self) -> int:
        return 0 if self.special_rows is None else self.special_rows.numel()


def pooled_kurtosis(totals: np.ndarray, count: int) -> tuple[float, float, float]:
    """(Pearson kurtosis, mean, variance) of ``count`` values from their power sums
    ``totals = [sum x, sum x**2, sum x**3, sum x**4]``: central moments about the mean m,
    m4 = E[x^4] - 4 m E[x^3] + 6 m^2 E[x^2] - 3 m^4 and m2 = E[x^2] - m^2."""
    if count <= 0:
        return float("nan"), float("nan"), float("nan")
    e1, e2, e3, e4 = (float(t) / count for t in totals)
    m2 = e2 - e1 ** 2
    m4 = e4 - 4 * e1 * e3 + 6 * e1 ** 2 * e2 - 3 * e1 ** 4
    kurt = m4 / m2 ** 2 if m2 > 0 else float("nan")
    return kurt, e1, m2


class SiteAccumulator:
    """Running statistics of one site over [tokens, channels] blocks (see module docstring)."""

    def __init__(self, channels: int, device, workspace: _Workspace | None = None,
                 reservoir: int = 0, seed: int = 0) -> None:
        self.c = channels
        self.device = torch.device(device)
        self.ws = workspace or _Workspace()
        self.n = 0  # tokens (rows) seen
        self.n_special = 0
        f64 = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)
        self.s1, self.s2 = f64(channels), f64(channels)  # per channel: sum x, sum x**2
        self.totals = f64(4)  # all values: sum x, x**2, x**3, x**4
        self.ordinary = f64(4)  # the same over non-special tokens
        self.lo = torch.full((channels,), math.inf, device=self.device)
        self.hi = torch.full((channels,), -math.inf, device=self.device)
        self.hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=self.device)  # of x**2
        self.reservoir = Reservoir(reservoir, seed) if reservoir else None
        self.max_abs = -math.inf
        self.max_token: tuple[int, int] | None = None  # (input id, position) holding max |x|
        self.tracked = True  # False once a block came without matching token info (pooler)

    def update(self, x: torch.Tensor, tokens: TokenInfo | None = None) -> None:
        """Add a block of values: the site's [batch, tokens, channels] tensor with ``tokens``
        (its non-pad tokens are taken, exactly the rows of ``token_values``), or rows of values
        [rows, channels] (any leading shape is flattened). Blocks whose rows are not the batch's
        tokens (e.g. the pooler's one row per sequence) are taken whole and not split by token.

        Only sums of x and x**2 are needed per channel; x**3 and x**4 only pooled, which BLAS
        dot products give without materialising them (float32, relative error ~1e-5 at worst
        when a few huge values swamp the partial sums). The non-special sums are taken with
        the special rows of x**2 zeroed, and the special rows summed apart (not subtracted
        afterwards, which would lose the others' fourth powers next to a [CLS] value of 200)."""
        x = x.detach()
        c = self.c
        if tokens is not None and x.dim() == 3 and tuple(x.shape[:2]) == tokens.shape:
            rows = tokens.rows  # the batch's non-pad tokens, gathered straight into the workspace
        else:
            rows = None
            x = x.reshape(-1, c)
            if tokens is None or tokens.ids.numel() != x.shape[0]:
                self.tracked = False
        n = x.shape[0] if rows is None else rows.numel()
        if n == 0:
            return
        work, bins, ones = self.ws.get(n, c, x.device)
        flat = x.reshape(-1, c)
        if flat.dtype != torch.float32:
            flat = flat.float()
        if rows is None:
            work[0].copy_(flat)
        else:
            torch.index_select(flat, 0, rows, out=work[0])
        x, x2 = work[0], work[1]
        torch.mul(x, x, out=x2)
        flat, flat2 = x.view(-1), x2.view(-1)
        sums = torch.matmul(ones, work)  # [2, channels]: float32 partial sums of one block
        s1, s2 = sums[0], sums[1]
        self.s1 += s1
        self.s2 += s2
        batch_lo, batch_hi = x.amin(0), x.amax(0)
        torch.minimum(self.lo, batch_lo, out=self.lo)
        torch.maximum(self.hi, batch_hi, out=self.hi)
        # |x| histogram as a histogram of x**2 (same order, already computed): bits >> shift.
        torch.bitwise_right_shift(x2.view(torch.int32).view(-1), HIST_SHIFT, out=bins)
        self.hist += torch.bincount(bins, minlength=HIST_BINS)
        if self.reservoir is not None:
            self.reservoir.add(x)
        # Pooled sums: ordinary rows by dot products over x and x**2 with the special rows of
        # x**2 zeroed, special rows apart (few), so no x**2..x**4 sum is a difference of large
        # numbers (the plain sum of x, linear, is taken by difference).
        special = tokens.special_rows if self.tracked and tokens.n_special else None
        if special is not None:
            xs = x.index_select(0, special)
            xs2 = xs * xs
            sp = torch.stack([xs.sum(), xs2.sum(), torch.dot(xs.view(-1), xs2.view(-1)),
                              torch.dot(xs2.view(-1), xs2.view(-1))]).double()
            x2.index_fill_(0, special, 0.0)
            t1 = s1.double().sum() - sp[0]
            t2 = x2.sum().double()
        else:
            sp = None
            t1, t2 = s1.sum().double(), s2.sum().double()
        ordinary = torch.stack([t1, t2, torch.dot(flat, flat2).double(), torch.dot(flat2, flat2).double()])
        self.totals += ordinary if sp is None else ordinary + sp
        if self.tracked:
            self.ordinary += ordinary
            self.n_special += tokens.n_special
            per_channel = torch.maximum(batch_hi, -batch_lo)
            ch = int(per_channel.argmax())
            top = float(per_channel[ch])
            if top > self.max_abs:
                row = int(x[:, ch].abs().argmax())
                self.max_abs = top
                self.max_token = (int(tokens.ids[row]), int(tokens.positions[row]))
        self.n += n

    def result(self, name: str, kind: str, layer: int | None, top_k: int) -> "SiteStats":
        if self.n == 0:
            raise RuntimeError(f"site {name}: no non-pad token was observed")
        n = self.n
        s1, s2 = self.s1.cpu().numpy(), self.s2.cpu().numpy()
        mean = s1 / n
        var = np.maximum(s2 / n - mean ** 2, 0.0)
        kurt, m, v = pooled_kurtosis(self.totals.cpu().numpy(), n * self.c)
        if self.tracked:
            kurt_ord = pooled_kurtosis(self.ordinary.cpu().numpy(), (n - self.n_special) * self.c)[0]
        else:
            kurt_ord = float("nan")
        lo, hi = self.lo.cpu().numpy().astype(np.float64), self.hi.cpu().numpy().astype(np.float64)
        res = self.reservoir
        tok = self.max_token if self.tracked else None
        return SiteStats(
            name=name, kind=kind, layer=layer, channels=self.c, tokens=n, mean=mean, var=var,
            energy=s2.copy(), lo=lo, hi=hi, kurtosis=kurt, median_abs=math.sqrt(hist_median(self.hist.cpu().numpy())),
            global_mean=m, global_var=v, top_k=top_k, special_tokens=self.n_special if self.tracked else None,
            kurtosis_non_special=kurt_ord, max_token_id=None if tok is None else tok[0],
            max_token_position=None if tok is None else tok[1],
            sample=None if res is None else res.values, sample_channels=None if res is None else res.channels)


# --- results ----------------------------------------------------------------------------------

@dataclass
class SiteStats:
    """Statistics of one site. Per-channel arrays have one entry per channel."""

    name: str
    kind: str
    layer: int | None
    channels: int
    tokens: int
    mean: np.ndarray
    var: np.ndarray
    energy: np.ndarray  # sum over tokens of x**2
    lo: np.ndarray  # per-channel min
    hi: np.ndarray  # per-channel max
    kurtosis: float
    median_abs: float
    global_mean: float
    global_var: float
    top_k: int = 3
    special_tokens: int | None = None  # how many of the tokens were special ([CLS], [SEP], ...)
    kurtosis_non_special: float = float("nan")  # kurtosis over the non-special tokens only
    max_token_id: int | None = None  # input id of the token holding the site's max |x|
    max_token_position: int | None = None  # its position in the sequence
    sample: np.ndarray | None = field(default=None, repr=False)  # reservoir of raw values
    sample_channels: np.ndarray | None = field(default=None, repr=False)

    @property
    def max_abs_per_channel(self) -> np.ndarray:
        return np.maximum(np.abs(self.lo), np.abs(self.hi))

    @property
    def max_abs(self) -> float:
        return float(self.max_abs_per_channel.max())

    @property
    def variance(self) -> float:
        return float(self.var.mean())

    @property
    def top1pct_channel_energy(self) -> float:
        total = self.energy.sum()
        if total <= 0:
            return float("nan")
        return float(np.sort(self.energy)[::-1][:top_count(self.channels)].sum() / total)

    @property
    def max_over_median(self) -> float:
        return self.max_abs / self.median_abs if self.median_abs > 0 else float("inf")

    @property
    def top_channels(self) -> list[int]:
        order = np.argsort(-self.max_abs_per_channel, kind="stable")
        return [int(i) for i in order[: self.top_k]]

    @property
    def step(self) -> int:
        """MLflow step: the layer index; 0 for sites outside the layers (embeddings, pooler)."""
        return 0 if self.layer is None else self.layer

    def row(self) -> dict:
        return {"site": self.name, "kind": self.kind, "layer": self.layer, "channels": self.channels,
                "variance": self.variance, "kurtosis": self.kurtosis,
                "top1pct_channel_energy": self.top1pct_channel_energy, "max_abs": self.max_abs,
                "max_over_median": self.max_over_median, "top_channels": self.top_channels,
                "median_abs": self.median_abs, "mean": self.global_mean, "tokens": self.tokens,
                "special_tokens": self.special_tokens, "kurtosis_non_special": self.kurtosis_non_special,
                "max_token_id": self.max_token_id, "max_token_position": self.max_token_position}

    _ARRAYS = ("mean", "var", "energy", "lo", "hi")
    _SCALARS = ("name", "kind", "layer", "channels", "tokens", "kurtosis", "median_abs", "global_mean",
                "global_var", "top_k", "special_tokens", "kurtosis_non_special", "max_token_id",
                "max_token_position")

    def to_json(self) -> dict:
        out = {k: _json_float(getattr(self, k)) for k in self._SCALARS}
        out.update({k: [float(v) for v in getattr(self, k)] for k in self._ARRAYS})
        if self.sample is not None:
            out["sample"] = _b64(self.sample.astype(np.float32))
            out["sample_channels"] = _b64(self.sample_channels.astype(np.int32))
        return out

    @classmethod
    def from_json(cls, d: dict) -> "SiteStats":
        kw = {k: _from_json_float(d[k]) for k in cls._SCALARS}
        kw.update({k: np.asarray(d[k], dtype=np.float64) for k in cls._ARRAYS})
        if "sample" in d:
            kw["sample"] = _unb64(d["sample"], np.float32)
            kw["sample_channels"] = _unb64(d["sample_channels"], np.int32)
        return cls(**kw)


def _json_float(v):
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def _from_json_float(v):
    return float(v) if isinstance(v, str) and v in ("inf", "-inf", "nan") else v


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _unb64(s: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).copy()


class ActivationStats:
    """FP32 statistics of every token-wise site, in forward order."""

    def __init__(self, sites: list[SiteStats], meta: dict | None = None) -> None:
        self.sites = sites
        self.meta = dict(meta or {})
        self.by_name = {s.name: s for s in sites}

    def __getitem__(self, name: str) -> SiteStats:
        return self.by_name[name]

    def of_kind(self, kind: str) -> list[SiteStats]:
        return sorted((s for s in self.sites if s.kind == kind), key=lambda s: s.step)

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(s.kind for s in self.sites))

    @property
    def top_k(self) -> int:
        return self.sites[0].top_k if self.sites else 3

    def table(self) -> pd.DataFrame:
        """One row per site; the first columns are :data:`STAT_COLUMNS`."""
        df = pd.DataFrame([s.row() for s in self.sites])
        if df.empty:
            return pd.DataFrame(columns=STAT_COLUMNS)
        for col in ("layer", "special_tokens", "max_token_id", "max_token_position"):
            df[col] = df[col].astype("Int64")
        return df[STAT_COLUMNS + [c for c in df.columns if c not in STAT_COLUMNS]]

    def residual_sites(self) -> list[SiteStats]:
        """The residual sums (LayerNorm inputs) in forward order: the rows of the outlier map."""
        return [s for s in self.sites if s.kind in RESIDUAL_KINDS]

    def max_abs_map(self, kinds: Iterable[str] = RESIDUAL_KINDS) -> tuple[list[str], np.ndarray]:
        """(site names, [sites, channels] per-channel max |x|) for same-width site kinds."""
        rows = [s for s in self.sites if s.kind in tuple(kinds)]
        return [s.name for s in rows], np.stack([s.max_abs_per_channel for s in rows]) if rows else np.zeros((0, 0))

    def worst_site(self, kinds: Iterable[str] = RESIDUAL_KINDS) -> SiteStats:
        """Highest kurtosis among the given kinds (default: the residual sums)."""
        cands = [s for s in self.sites if s.kind in tuple(kinds) and math.isfinite(s.kurtosis)]
        if not cands:
            raise ValueError(f"no site of kinds {tuple(kinds)} with a finite kurtosis")
        return max(cands, key=lambda s: s.kurtosis)

    def sampled_site(self) -> SiteStats | None:
        """The site whose reservoir sample was kept (the worst residual sum)."""
        return next((s for s in self.sites if s.sample is not None), None)

    def outliers(self) -> dict:
        """Top-k channel ids by max |x| per layer for each site kind, and each id's persistence
        (fraction of that kind's layers in which it is among the top-k). ``residual_stream``
        pools every residual sum (embedding sum, attn.residual, ffn.residual of all layers)."""
        def summarise(group: list[SiteStats], key) -> dict:
            per = {key(s): s.top_channels for s in group}
            counts: dict[int, int] = {}
            for ids in per.values():
                for i in ids:
                    counts[i] = counts.get(i, 0) + 1
            persistence = {str(i): c / len(group) for i, c in sorted(counts.items(), key=lambda t: (-t[1], t[0]))}
            return {"top_channels": per, "persistence": persistence,
                    "max_abs": {key(s): round(s.max_abs, 4) for s in group}}

        out = {"top_k": self.top_k, "ranked_by": "per-channel max |x| over non-pad tokens", "kinds": {}}
        for kind in self.kinds:
            out["kinds"][kind] = summarise(self.of_kind(kind), lambda s: str(s.step))
        res = self.residual_sites()
        if res:
            out["residual_stream"] = summarise(res, lambda s: s.name)
        return out

    def to_json(self) -> dict:
        return {"version": STATS_VERSION, "meta": self.meta, "sites": [s.to_json() for s in self.sites]}

    @classmethod
    def from_json(cls, d: dict) -> "ActivationStats":
        if d.get("version") != STATS_VERSION:
            raise ValueError(f"activation statistics version {d.get('version')} != {STATS_VERSION}")
        return cls([SiteStats.from_json(s) for s in d["sites"]], d.get("meta"))


# --- the FP32 pass ----------------------------------------------------------------------------

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
    for i, batch in enumerate(batch_list):
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


# --- logging ----------------------------------------------------------------------------------

def _finite(v) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def log_statistics(run, stats: ActivationStats) -> list[str]:
    """Per-layer metrics (step = layer index) and the artifacts; returns the artifact names.

    Metrics: ``kurtosis``, ``variance``, ``top1pct_channel_energy``, ``max_abs`` for the FFN
    residual sum (``ffn.residual``); every kind (that one included) as ``stats.<kind>.<stat>``
    with also ``max_over_median``; sites outside the layers (embeddings, pooler) at step 0.
    Scalars: ``stats_seconds``, ``stats_cost_vs_fp32_pass``, ``stats_examples``, ``stats_tokens``.
    """
    stat_names = HEADLINE_STATS + ("max_over_median",)
    per_step: dict[int, dict[str, float]] = {}
    for s in stats.sites:
        row = per_step.setdefault(s.step, {})
        values = {k: getattr(s, k) for k in stat_names}
        for k, v in values.items():
            row[f"stats.{s.kind}.{k}"] = _finite(v)
        if s.kind == HEADLINE_KIND:
            for k in HEADLINE_STATS:
                row[k] = _finite(values[k])
    for step, values in sorted(per_step.items()):
        run.metrics(values, step=step)
    meta = stats.meta
    run.metrics({"stats_seconds": meta.get("stats_seconds"),
                 "stats_cost_vs_fp32_pass": meta.get("stats_cost_vs_fp32_pass"),
                 "stats_fp32_pass_seconds": meta.get("fp32_pass_seconds"), "stats_examples": meta.get("examples"),
                 "stats_tokens": meta.get("tokens")})
    run.table(stats.table(), "activation_stats.csv")
    _log_json(run, stats.outliers(), "outlier_channels.json")
    return ["activation_stats.csv", "outlier_channels.json"]


def _log_json(run, payload, name: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / name
        f.write_text(json.dumps(payload, indent=1))
        run.artifact_file(f)


# --- quantization-error attribution -----------------------------------------------------------

class _ErrorAccumulator:
    """Per-channel float64 sums of x_fp**2, (x_q - x_fp)**2, and the local error of this site's
    own quantizer in the quantized model, (fq(x) - x)**2 with its signal x**2."""

    def __init__(self, channels: int, device) -> None:
        z = lambda: torch.zeros(channels, dtype=torch.float64, device=device)
        self.c = channels
        self.signal, self.error, self.local_signal, self.local_error = z(), z(), z(), z()
        self.tokens = 0

    @staticmethod
    def _colsq(x: torch.Tensor) -> torch.Tensor:
        return (x.double() ** 2).sum(0)

    def add_local(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.reshape(-1, self.c), y.reshape(-1, self.c)
        self.local_signal += self._colsq(x)
        self.local_error += self._colsq(y - x)

    def add(self, x_fp: torch.Tensor, x_q: torch.Tensor) -> None:
        x_fp, x_q = x_fp.reshape(-1, self.c), x_q.reshape(-1, self.c)
        self.signal += self._colsq(x_fp)
        self.error += self._colsq(x_q - x_fp)
        self.tokens += x_fp.shape[0]


def sqnr_db(signal: float, error: float) -> float:
    """10 log10(signal / error); +inf for a zero error."""
    if error <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / error)


def top_error_share(signal: np.ndarray, error: np.ndarray) -> float:
    """Share of the squared error in the top-1 % channels ranked by FP32 energy."""
    total = error.sum()
    if total <= 0:
        return float("nan")
    top = np.argsort(-signal, kind="stable")[: top_count(signal.size)]
    return float(error[top].sum() / total)


@torch.no_grad()
def quantization_error(fp32_model: nn.Module, quant_model: nn.Module, qa, sites: list[Site], items: list[dict],
                       pad_id: int, device, batch_size: int = 32) -> pd.DataFrame:
    """Where the quantized model departs from the FP32 one, per token-wise site (non-pad tokens).

    Both models see the same batches. The quantized model's sites are fake-quantized with
    ``qa.grids`` inside the recording tap (its weights are expected to be quantized already).
    Columns: ``sqnr_db`` = 10 log10(sum x_fp**2 / sum (x_q - x_fp)**2) over all batches, the
    end-to-end error at that site; ``local_sqnr_db`` the same for this site's own quantizer only
    (fq(x) vs x inside the quantized model; inf where the site is not quantized);
    ``top1pct_error_share`` the share of the squared error in the top-1 % channels ranked by
    FP32 energy; ``signal`` and ``error`` the sums, for pooling.
    """
    names = {s.name for s in stat_sites(sites)}
    fp_sites = [s for s in find_sites(fp32_model) if s.name in names]
    q_all = find_sites(quant_model)
    q_sites = [s for s in q_all if s.name in names or s.name in qa.grids]
    use_tappable_attention(fp32_model)
    use_tappable_attention(quant_model)
    fp32_model.eval()
    quant_model.eval()
    accs = {s.name: _ErrorAccumulator(s.channels, device) for s in fp_sites}
    token_mask = TokenMask()
    reference: dict[str, torch.Tensor] = {}

    def record_fp(site: Site, x: torch.Tensor) -> torch.Tensor:
        v = token_values(x, token_mask.mask).detach().float()
        reference[site.name] = v.clone() if v.data_ptr() == x.data_ptr() else v  # own copy, not a view
        return x

    def record_q(site: Site, x: torch.Tensor) -> torch.Tensor:
        grid = qa.grids.get(site.name)
        y = fake_quantize(x, grid) if grid is not None else x
        acc = accs.get(site.name)
        if acc is not None:
            xv, yv = token_values(x, token_mask.mask).float(), token_values(y, token_mask.mask).float()
            if grid is not None:
                acc.add_local(xv, yv)
            acc.add(reference.pop(site.name), yv)
        return y

    for batch in batches(items, batch_size, pad_id, by_length=True):
        inputs = _model_inputs(batch, device)
        token_mask.mask = inputs["attention_mask"].bool()
        with tap(fp_sites, record_fp):
            fp32_model(**inputs)
        with tap(q_sites, record_q):
            quant_model(**inputs)
        reference.clear()
    rows = []
    for s in fp_sites:
        a = accs[s.name]
        sig, err = a.signal.cpu().numpy(), a.error.cpu().numpy()
        lsig, lerr = a.local_signal.cpu().numpy(), a.local_error.cpu().numpy()
        top = np.argsort(-sig, kind="stable")[: top_count(s.channels)]
        rows.append({"site": s.name, "kind": s.kind, "layer": s.layer, "channels": s.channels,
                     "quantized": s.name in qa.grids, "sqnr_db": sqnr_db(sig.sum(), err.sum()),
                     "local_sqnr_db": sqnr_db(lsig.sum(), lerr.sum()),
                     "top1pct_error_share": top_error_share(sig, err), "signal": float(sig.sum()),
                     "error": float(err.sum()), "top1pct_error": float(err[top].sum()), "tokens": a.tokens})
    df = pd.DataFrame(rows)
    if not df.empty:
        df["layer"] = df["layer"].astype("Int64")
    return df


def outlier_error_share(df: pd.DataFrame, kinds: Iterable[str] = RESIDUAL_KINDS) -> float:
    """Share of the total squared error of the residual sums that sits in their top-1 % channels."""
    sub = df[df["kind"].isin(tuple(kinds))]
    total = sub["error"].sum()
    return float(sub["top1pct_error"].sum() / total) if total > 0 else float("nan")


def log_quantization_error(run, df: pd.DataFrame) -> list[str]:
    """Step metrics ``sqnr_db`` (ffn.residual, step = layer), ``stats.<kind>.sqnr_db``,
    ``stats.<kind>.local_sqnr_db`` and ``stats.<kind>.top1pct_error_share`` per kind; the
    aggregate ``outlier_error_share`` (share of the residual sums' total squared error that
    sits in their top-1 % channels; ``outlier_error_share.ffn_residual`` for the FFN ones
    only) and ``quantization_error.csv``. Infinite SQNRs (no error) are not logged as metrics.

    Note what the share measures: where the error *lands*. Outliers also cause error in the
    other channels, by stretching a per-tensor range; that shows in ``local_sqnr_db`` and
    in comparing methods (per-tensor vs PEG), not in this share."""
    per_step: dict[int, dict[str, float]] = {}
    for r in df.itertuples(index=False):
        step = 0 if pd.isna(r.layer) else int(r.layer)
        row = per_step.setdefault(step, {})
        row[f"stats.{r.kind}.sqnr_db"] = _finite(r.sqnr_db)
        row[f"stats.{r.kind}.local_sqnr_db"] = _finite(r.local_sqnr_db)
        row[f"stats.{r.kind}.top1pct_error_share"] = _finite(r.top1pct_error_share)
        if r.kind == HEADLINE_KIND:
            row["sqnr_db"] = _finite(r.sqnr_db)
    for step, values in sorted(per_step.items()):
        run.metrics(values, step=step)
    run.metrics({"outlier_error_share": _finite(outlier_error_share(df)),
                 "outlier_error_share.ffn_residual": _finite(outlier_error_share(df, (HEADLINE_KIND,)))})
    run.table(df, "quantization_error.csv")
    return ["quantization_error.csv"]
