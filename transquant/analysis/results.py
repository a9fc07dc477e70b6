"""The result types of the FP32 statistics: one :class:`SiteStats` per site, and
:class:`ActivationStats` for a model (JSON round trip, the per-site table, the outlier summary)."""
from __future__ import annotations

import base64
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd

from ..quant.sites import RESIDUAL_KINDS

STATS_VERSION = 2  # bump when what is measured changes: it is part of the cache key
TOP_FRACTION = 0.01  # "top 1 % of channels"

STAT_COLUMNS = ["site", "kind", "layer", "channels", "variance", "kurtosis", "top1pct_channel_energy",
                "max_abs", "max_over_median", "top_channels"]


def top_count(channels: int) -> int:
    """How many channels are "the top 1 %": ceil(1 % of channels), at least 1."""
    return max(1, math.ceil(TOP_FRACTION * channels))



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
        """(site names, [sites, channels] per-channel max |x|) of the sites of ``kinds`` that have
        the width most of them have (the residual stream's): a site of another width, such as
        ELECTRA's embedding sum before its projection to the hidden size, is left out."""
        rows = [s for s in self.sites if s.kind in tuple(kinds)]
        if not rows:
            return [], np.zeros((0, 0))
        width = Counter(s.channels for s in rows).most_common(1)[0][0]
        rows = [s for s in rows if s.channels == width]
        return [s.name for s in rows], np.stack([s.max_abs_per_channel for s in rows])

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

