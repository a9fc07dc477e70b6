"""Per-site-group precision: ``precision: {ffn_input: 16, ffn_residual: peg, ...}`` as the site
lists the quant knobs already have (``high_bits_sites``, ``act_exclude``, ``peg_sites``).

A search chooses one precision per group (Optuna's choices must be scalars, so a list of site
patterns cannot be one); ``conf/search/latency_pareto.yaml`` turns the choices into the quant
lists with the OmegaConf resolver ``precision_sites``, registered when :mod:`transquant` is
imported. Everything downstream (planning, the engine, labels, job keys) sees ordinary quant
knobs.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from ..core.errors import TransquantError

# Site groups and their patterns (site names or roles, see quant/sites.py); they are disjoint, so
# no two choices fight over a site. ``attn_residual`` is the other LayerNorm inputs.
GROUPS: dict[str, tuple[str, ...]] = {
    "ffn_input": ("*.ffn.input",),
    "ffn_output": ("*.ffn.output",),
    "ffn_residual": ("*.ffn.residual",),
    "attn_residual": ("embeddings.sum", "*.attn.residual"),
    "attention": ("*.attn.scores", "*.attn.probs"),
}
# A precision and the quant list its sites join: 8 = quant.act_bits (none), 16 = quant.high_bits,
# float = act_exclude, peg = per-embedding-group ranges with quant.k groups.
LISTS = {"8": None, "16": "high_bits_sites", "float": "act_exclude", "peg": "peg_sites"}
NO_PEG = ("attention",)  # scores / probabilities have no channel axis to group


def check_precision(precision, quant=None) -> dict[str, str]:
    """``precision`` as {group: precision}, or :class:`TransquantError` naming the bad key or value.
    With ``quant``: 8 and 16 must be its ``act_bits`` and ``high_bits`` (the labels would lie)."""
    p = OmegaConf.to_container(precision) if OmegaConf.is_config(precision) else dict(precision or {})
    for group, value in p.items():
        if group not in GROUPS:
            raise TransquantError(f"precision.{group}: unknown site group; allowed {', '.join(GROUPS)}")
        allowed = [v for v in LISTS if not (v == "peg" and group in NO_PEG)]
        if str(value) not in allowed:
            raise TransquantError(f"precision.{group}={value}: allowed {', '.join(allowed)}")
    if quant is not None and p:
        for value, key in (("8", "act_bits"), ("16", "high_bits")):
            if value in map(str, p.values()) and str(quant[key]) != value:
                raise TransquantError(f"precision {value} means quant.{key}={value}, but quant.{key}={quant[key]}")
    return {g: str(v) for g, v in p.items()}


def precision_sites(precision, level) -> list[str]:
    """The site patterns of the groups at ``level`` (8, 16, float or peg), in :data:`GROUPS` order."""
    p = check_precision(precision)
    if str(level) not in LISTS:
        raise TransquantError(f"precision_sites: level {level}; allowed {', '.join(LISTS)}")
    return [pat for group, pats in GROUPS.items() if p.get(group) == str(level) for pat in pats]


def register_resolver() -> None:
    """``${precision_sites:${precision},16}`` in the conf/ tree."""
    OmegaConf.register_resolver("precision_sites", precision_sites, replace=True)
