"""Quantization-error attribution: where the quantized model departs from the FP32 one, per site
(SQNR end to end and of the site's own quantizer) and which channels hold the error."""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data.tasks import batches
from ..quant.ptq import TokenMask, token_values
from ..quant.quantizers import fake_quantize
from ..quant.sites import RESIDUAL_KINDS, Site, find_sites, tap, use_tappable_attention
from .results import top_count
from .statistics import _model_inputs, stat_sites


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
        return x.double().square_().sum(0)  # square_ on the float64 copy: x ** 2 to the bit, one copy

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
