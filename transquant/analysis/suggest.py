"""Which quantization method to use at a bit budget, read off the FP32 statistics of one model.

The rule (:func:`suggest`, written out for a person by :func:`rule_lines`) looks at every
token-wise site with three measured numbers and the activation bits A:

* **coarse** — on a per-tensor min-max A-bit grid a value of the site's median |x| spans fewer
  than :data:`MIN_BULK_STEPS` steps (:func:`bulk_steps`): the extremes stretch the range until the
  bulk of the tensor rounds to a handful of levels;
* **concentrated** — the top 1 % of channels hold at least :data:`CONCENTRATED_ENERGY` of the
  site's energy Σx²: the extremes live in a few channels, which per-channel groups can fence off;
* **outlier channels** — the channels whose max |x| is at least :data:`OUTLIER_CHANNEL_RATIO`
  times the median channel's: the ones PEG must isolate.

No coarse site: per-tensor ranges suffice. Below :data:`STATIC_MIN_ACT_BITS` activation bits:
per-token dynamic ranges. Weights below :data:`PRESET_BITS` bits: per-output-channel weight grids. Otherwise coarse *and* concentrated sites get PEG with gap grouping
and one group per outlier channel (up to :data:`PEG_MAX_GROUPS` groups), or 16 bits where they
have more outlier channels than that; coarse but spread sites alone get MSE (clipping) ranges.
The measurements behind each branch are :data:`MEASURED` (MiniLM-L6, docs/RESULTS.md
"Mitigations").
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..quant.sites import LAYER_SITE_NAMES
from .results import ActivationStats, SiteStats

# A median-size value must span this many steps of the per-tensor grid; below it its rounding
# noise exceeds 14 % of a typical value (step / sqrt(12) / median).
MIN_BULK_STEPS = 2.0
# Half of Σx² in 1 % of the channels (50x an equal share) = the outliers live in a few channels;
# pretrained MiniLM-L6: FFN outputs and FFN residual sums 0.56-0.96, every other site <= 0.40.
CONCENTRATED_ENERGY = 0.5
# A channel 10x the typical channel's max |x| takes > 3 bits of resolution from every channel on
# its grid (log2 10 = 3.3): it needs a PEG group of its own.
OUTLIER_CHANNEL_RATIO = 10.0
# Gap-grouped PEG stayed within about a point of FP32 at K = 2..6 on MiniLM (3 seeds); every group
# is one more MatMul in the onnxruntime engine. More outlier channels than K - 1: 16-bit sites.
PEG_MAX_GROUPS = 6
# At W8A6 every static-range method lost 5.9-31 points on MiniLM, per-token dynamic ranges 0.4.
STATIC_MIN_ACT_BITS = 8
PRESET_BITS = 8  # the weight and activation bits of every preset the rule suggests
# With 6- or 4-bit weights on a per-tensor grid every method was at chance on MiniLM; per output
# channel, dynamic W6A6 kept 81.1 and mixed W4A8 76.9 (FP32 80.9).
CHANNEL_WEIGHTS_BELOW = PRESET_BITS
MEASURED_BUDGETS = ((8, 8), (8, 6), (6, 6), (4, 8))  # (weight bits, activation bits) behind the rule

# Accuracy (%) of the fine-tuned MiniLM-L6 on qnli-squad, seed 1000: (method, W8A8 and W8A6 with
# per-tensor weights, W6A6 and W4A8 with per-channel weights). Source: docs/RESULTS.md "Mitigations".
MEASURED_COLUMNS = ("W8A8 tensor", "W8A6 tensor", "W6A6 channel", "W4A8 channel")
MEASURED = (
    ("FP32", 80.91, 80.91, 80.91, 80.91),
    ("w8a8 (min-max)", 64.84, 51.38, 49.72, 50.00),
    ("mse", 81.23, 75.04, 50.00, 65.90),
    ("dynamic (per token)", 80.81, 80.52, 81.06, 50.46),
    ("mixed_paper (16-bit FFN input, output, residual sum)", 81.73, 71.42, 69.41, 76.91),
    ("peg_paper (K=6 sorted)", 81.55, 68.70, 56.16, 76.03),
    ("peg K=2 gap", 80.17, 60.52, 54.11, 51.03),
    ("smoothquant", 64.94, 50.28, 50.25, 49.96),
    ("outlier_suppression", 71.28, 50.00, 50.00, 50.04),
    ("os_plus", 58.71, 50.00, 50.67, 50.00),
)

# Which profile.engine runs each suggested method (conf/profile/default.yaml).
ENGINES = {
    "w8a8": "static ranges: the onnxruntime INT8 engine (profile.engine=onnxruntime, the default), torch or none",
    "mse": "static ranges: the onnxruntime INT8 engine (the default), torch or none",
    "peg": "static per-group ranges: the onnxruntime INT8 engine (MatMuls split per group), torch or none",
    "mixed": "static ranges: the onnxruntime engine (uint16 QDQ at the 16-bit sites), torch or none",
    "dynamic": "fake quantization only: the onnxruntime engine holds static ranges and refuses per-token ones; "
               "profile.engine=torch (8-bit per-batch dynamic INT8) or profile.engine=none",
}


def bulk_steps(site: SiteStats, bits: int) -> float:
    """Steps of the per-tensor min-max ``bits`` grid (widened to hold 0, as the quantizer does)
    that a value of the site's median |x| spans."""
    span = max(float(site.hi.max()), 0.0) - min(float(site.lo.min()), 0.0)
    return (2 ** bits - 1) * site.median_abs / span if span > 0 else float("inf")


def outlier_channels(site: SiteStats) -> list[int]:
    """Channels with max |x| >= :data:`OUTLIER_CHANNEL_RATIO` x the median channel's, largest first."""
    m = site.max_abs_per_channel
    typical = float(np.median(m))
    order = np.argsort(-m, kind="stable")
    return [int(c) for c in order if m[c] > 0 and m[c] >= OUTLIER_CHANNEL_RATIO * typical]


def site_verdicts(stats: ActivationStats, act_bits: int) -> pd.DataFrame:
    """One row per token-wise site: the rule's three measurements and its verdict
    (``outliers``: coarse and concentrated; ``outliers (fit)``: concentrated, the grid still
    resolves the bulk; ``coarse``: coarse without a few dominant channels; ``ok``)."""
    rows = []
    for s in stats.sites:
        steps = bulk_steps(s, act_bits)
        coarse = steps < MIN_BULK_STEPS
        concentrated = bool(s.top1pct_channel_energy >= CONCENTRATED_ENERGY)
        verdict = ("outliers" if coarse else "outliers (fit)") if concentrated else "coarse" if coarse else "ok"
        rows.append({"site": s.name, "kind": s.kind, "layer": s.layer, "bulk_steps": steps,
                     "top1pct_channel_energy": s.top1pct_channel_energy, "max_abs": s.max_abs,
                     "median_abs": s.median_abs, "outlier_channels": outlier_channels(s),
                     "coarse": coarse, "concentrated": concentrated, "verdict": verdict})
    df = pd.DataFrame(rows)
    if not df.empty:
        df["layer"] = df["layer"].astype("Int64")
    return df


def site_patterns(stats: ActivationStats, names) -> list[str]:
    """Site patterns selecting exactly ``names``: ``*.<kind suffix>`` where every layer's site of a
    kind is named, the site names otherwise."""
    names = set(names)
    out = []
    for kind in stats.kinds:
        of_kind = [s.name for s in stats.of_kind(kind)]
        picked = [n for n in of_kind if n in names]
        if picked and kind in LAYER_SITE_NAMES and len(picked) == len(of_kind):
            out.append(f"*.{LAYER_SITE_NAMES[kind]}")
        else:
            out += picked
    return out


@dataclass(frozen=True)
class Suggestion:
    """What to run at a bit budget and why. ``overrides`` is a command-line fragment for
    ``python -m transquant.run``; ``alternatives`` are (overrides, note) pairs."""

    method: str
    overrides: str
    reason: str
    weight_bits: int
    act_bits: int
    sites: tuple[str, ...] = ()
    channels: dict[str, list[int]] = field(default_factory=dict)
    alternatives: tuple[tuple[str, str], ...] = ()

    @property
    def command(self) -> str:
        return f"python -m transquant.run {self.overrides}"

    @property
    def engines(self) -> str:
        return ENGINES[self.method]


def _line(method: str, weight_bits: int, act_bits: int, **knobs) -> str:
    """``quant=<method>`` with the budget's bits where they differ from the preset's and ``knobs``
    (lists as Hydra lists), each shell-quoted."""
    parts = [f"quant={method}"]
    for key, bits in (("weight_bits", weight_bits), ("act_bits", act_bits)):
        if bits != PRESET_BITS:
            parts.append(f"quant.{key}={bits}")
    if weight_bits < CHANNEL_WEIGHTS_BELOW:
        parts.append("quant.weight_granularity=channel")
    for key, value in knobs.items():
        parts.append(f"quant.{key}=[{','.join(value)}]" if isinstance(value, list) else f"quant.{key}={value}")
    return " ".join(shlex.quote(p) for p in parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _channel_list(channels: dict[str, list[int]], limit: int = 6) -> str:
    """Outlier channel ids, the ones at most sites first, with how many sites each is at."""
    counts: dict[int, int] = {}
    for ids in channels.values():
        for c in ids:
            counts[c] = counts.get(c, 0) + 1
    ranked = sorted(counts.items(), key=lambda t: (-t[1], t[0]))[:limit]
    return ", ".join(f"{c} ({_count(n, 'site')})" for c, n in ranked) or "none above the ratio"


def suggest(stats: ActivationStats, weight_bits: int = 8, act_bits: int = 8) -> Suggestion:
    """The method the rule of this module picks for ``stats`` at W``weight_bits``A``act_bits``."""
    df = site_verdicts(stats, act_bits)
    budget = f"W{weight_bits}A{act_bits}"
    hot = df[df["coarse"] & df["concentrated"]]
    spread = df[df["coarse"] & ~df["concentrated"]]
    measured = ", ".join(f"W{w}A{a}" for w, a in MEASURED_BUDGETS)
    caveat = (f" {budget} is outside the measured budgets ({measured}): the rule extrapolates."
              if (weight_bits, act_bits) not in MEASURED_BUDGETS else "")
    if weight_bits < CHANNEL_WEIGHTS_BELOW:
        caveat = (f" {weight_bits}-bit weights get one grid per output channel: on a per-tensor grid every "
                  f"method fell to chance at W6A6 and W4A8 on MiniLM.") + caveat
    if hot.empty and spread.empty:
        return Suggestion("w8a8", _line("w8a8", weight_bits, act_bits),
                          f"At {budget} no site is coarse: every site's median |x| spans at least "
                          f"{MIN_BULK_STEPS:g} steps of its per-tensor min-max grid, so plain per-tensor ranges "
                          f"suffice." + caveat, weight_bits, act_bits)
    mse = (_line("mse", weight_bits, act_bits), "MSE ranges clip the tail, no per-site setting "
           "(MiniLM: within noise of FP32 at W8A8, -5.9 points at W8A6)")
    dyn = (_line("dynamic", weight_bits, act_bits), "per-token ranges (MiniLM: within noise at W8A8 and W8A6); "
           "no static INT8 engine")
    worst = df.loc[df[df["coarse"]]["bulk_steps"].idxmin()]
    where = (f"{_count(len(hot), 'site')} with channel outliers and {_count(len(spread), 'other site')} are coarse "
             f"(worst: {worst['site']}, a median value spans {worst['bulk_steps']:.2g} steps of the "
             f"per-tensor {act_bits}-bit grid)")
    channels = {r.site: r.outlier_channels for r in hot.itertuples()}
    if act_bits < STATIC_MIN_ACT_BITS:
        named = f" Outlier channels: {_channel_list(channels)}." if channels else ""
        return Suggestion("dynamic", _line("dynamic", weight_bits, act_bits),
                          f"At {budget} {where}. Below {STATIC_MIN_ACT_BITS}-bit activations only per-token "
                          f"dynamic ranges stayed within 2 points of FP32 on MiniLM (W8A6: 80.5 vs 80.9; every "
                          f"static-range method lost 5.9-31 points).{named}" + caveat, weight_bits, act_bits,
                          tuple(hot["site"]) + tuple(spread["site"]), channels, (mse,))
    if hot.empty:
        return Suggestion("mse", mse[0], f"At {budget} {where}. No site holds its extremes in a few channels "
                          f"(top 1 % of channels < {CONCENTRATED_ENERGY:.0%} of Σx²), so channel groups cannot "
                          f"isolate them; MSE ranges clip the tail instead." + caveat,
                          weight_bits, act_bits, tuple(spread["site"]), {}, (dyn,))
    patterns = site_patterns(stats, hot["site"])
    n = max(len(c) for c in channels.values())
    mixed = (_line("mixed", weight_bits, act_bits, high_bits_sites=patterns),
             "16 bits at the same sites (MiniLM: mixed precision within noise of FP32 at W8A8)")
    trigger = (f"At {budget} {where}. At the {_count(len(hot), 'site')} with channel outliers the top 1 % of "
               f"channels hold >= {CONCENTRATED_ENERGY:.0%} of Σx²; outlier channels (max |x| >= "
               f"{OUTLIER_CHANNEL_RATIO:g}x the typical channel's): {_channel_list(channels)}.")
    extra = (f" The {_count(len(spread), 'other coarse site')} keep per-tensor ranges; if accuracy drops, try MSE "
             "ranges." if len(spread) else "")
    if n < PEG_MAX_GROUPS:
        k = max(2, n + 1)
        return Suggestion("peg", _line("peg", weight_bits, act_bits, k=k, grouping="gap", peg_sites=patterns),
                          f"{trigger} At most {n} per site: PEG with gap grouping and K={k} gives the bulk one "
                          f"group and the outlier channels their own, every site stays at {act_bits} bits." + extra
                          + caveat, weight_bits, act_bits, tuple(hot["site"]), channels, (mixed, mse, dyn))
    peg = (_line("peg", weight_bits, act_bits, k=PEG_MAX_GROUPS, grouping="gap", peg_sites=patterns),
           "PEG with the largest measured K: outlier channels of similar size share groups")
    return Suggestion("mixed", mixed[0],
                      f"{trigger} Up to {n} per site, more than K={PEG_MAX_GROUPS} groups can isolate: 16 bits "
                      f"at those sites." + extra + caveat, weight_bits, act_bits, tuple(hot["site"]), channels,
                      (peg, mse, dyn))


def rule_lines() -> list[str]:
    """The rule in plain words, with its thresholds (for the statistics page)."""
    return [
        f"Per token-wise site, at A activation bits: the site is coarse when a value of its median |x| spans "
        f"fewer than {MIN_BULK_STEPS:g} steps of a per-tensor min-max A-bit grid, (2^A - 1) x median |x| / "
        f"(max - min); concentrated when its top 1 % of channels hold at least {CONCENTRATED_ENERGY:.0%} of its "
        f"energy Σx²; its outlier channels are those whose max |x| is at least {OUTLIER_CHANNEL_RATIO:g}x the "
        f"median channel's.",
        "No coarse site: quant=w8a8, per-tensor min-max ranges.",
        f"A below {STATIC_MIN_ACT_BITS} and some coarse site: quant=dynamic, per-token ranges (at W8A6 the only "
        f"method within 2 points of FP32).",
        f"Weights below {CHANNEL_WEIGHTS_BELOW} bits: quant.weight_granularity=channel, one grid per output "
        f"channel, whatever the method.",
        f"Coarse and concentrated sites with at most {PEG_MAX_GROUPS - 1} outlier channels each: quant=peg "
        f"quant.grouping=gap at those sites, K = outlier channels + 1 (at least 2): the bulk one group, each "
        f"outlier channel its own.",
        "More outlier channels than that: 16 bits at those sites, quant=mixed with quant.high_bits_sites.",
        "Only coarse sites that are not concentrated (no few channels to isolate): quant=mse, clipped ranges.",
    ]
