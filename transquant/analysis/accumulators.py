"""Streaming accumulation of one site's statistics over batches, in memory that does not grow
with the number of examples (see :mod:`transquant.analysis.statistics` for what is measured)."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from .histogram import HIST_BINS, HIST_SHIFT, hist_median
from .results import SiteStats


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


