"""A run's method named from its logged ``quant.*`` params alone, and the canonical table order.

:func:`method_label`: the knobs of ``conf/quant/<method>.yaml`` are the defaults, and every knob
that differs is spelled out (``PEG K=4 sorted``, ``percentile p=99.9``, ``W8A8 excl
*.ffn.residual``, ``mixed W8A6``, ``W8A8 w/channel +bias-corr``); the 2021 authors' exact presets
(``conf/quant/*_paper.yaml``) say so: ``W8A8 (paper)``, ``mixed W8A{8,16} (paper)``, ``PEG K=6 sorted (paper)``.
"""
from __future__ import annotations

import ast
import functools
import re

from ..core.paths import CONF_PATH as CONF_DIR
from ..train.knobs import KNOB_DEFAULTS

# Display order of method families in every table (unknown families sort after, by name).
FAMILY_ORDER = ("fp32", "w8a32", "w32a8", "w8a8", "mixed", "peg", "percentile", "mse", "dynamic", "smoothquant",
                "outlier_suppression", "os_plus")
GROUPING_ORDER = ("contiguous", "sorted", "gap")
NAIVE = ("fp32", "w8a8", "w8a32", "w32a8")  # families named by their bit widths alone
QUANT_KEYS = ("method", "weight_bits", "weight_estimator", "weight_granularity", "bias_correction", "transform", "alpha",
              "act_bits", "estimator", "percentile", "act_sites", "act_exclude", "high_bits", "high_bits_sites", "k", "permute",
              "grouping", "peg_sites", "share_groups")
PAPER_SUFFIX = "_paper"  # conf/quant/<family>_paper.yaml: the 2021 authors' exact preset of a family
FAMILY_NAMES = {"peg": "PEG", "mixed": "mixed", "percentile": "percentile", "mixed_paper": "mixed W8A{8,16}",
                "mse": "MSE", "dynamic": "dynamic", "smoothquant": "SmoothQuant", "outlier_suppression": "OS",
                "os_plus": "OS+"}
# Site kinds in forward order, for ordering leave-one-out rows.
SITE_ORDER = ("embeddings.sum", "embeddings.norm", "attn.query", "attn.key", "attn.value", "attn.qkv",
              "attn.scores", "attn.probs", "attn.context", "attn.output", "attn.residual", "attn.norm", "ffn.input",
              "ffn.intermediate", "ffn.output", "ffn.residual", "ffn.norm", "pooler", "logits")


# --- params -------------------------------------------------------------------------------------

def parse_param(value):
    """An MLflow param string (``str()`` of the resolved config value) back to a Python value."""
    if not isinstance(value, str):
        return value
    s = value.strip()
    if s in ("None", "null", ""):
        return None
    if s in ("True", "true"):
        return True
    if s in ("False", "false"):
        return False
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s


def quant_params(params: dict[str, str]) -> dict:
    """The ``quant.*`` knobs of a run, parsed; missing knobs are absent."""
    return {k: parse_param(params[f"quant.{k}"]) for k in QUANT_KEYS if f"quant.{k}" in params}


@functools.lru_cache(maxsize=None)
def _method_defaults(method: str) -> dict:
    """The knobs of conf/quant/<method>.yaml over conf/quant/fp32.yaml (fp32's if unknown)."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(CONF_DIR / "quant" / "fp32.yaml")
    f = CONF_DIR / "quant" / f"{method}.yaml"
    if f.is_file():
        own = OmegaConf.load(f)
        own.pop("defaults", None)
        base = OmegaConf.merge(base, own)
    return OmegaConf.to_container(base)


def method_defaults(method: str) -> dict:
    return dict(_method_defaults(method))


def effective_grouping(q: dict) -> str:
    """PEG grouping as executed: permute=false means contiguous blocks (quant/ptq.peg_grouping)."""
    return q.get("grouping", "sorted") if q.get("permute", True) else "contiguous"


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _bits(wb, ab) -> str:
    return f"W{wb or 32}A{ab or 32}"


def join_patterns(v) -> str:
    return ",".join(v) if isinstance(v, (list, tuple)) else str(v)


def family_of(method: str) -> str:
    """The method family: ``peg_paper`` (the exact preset) belongs to ``peg``."""
    return method.removesuffix(PAPER_SUFFIX)


def method_label(q: dict, with_bits: bool = True, with_exclude: bool = True) -> str:
    """Human-readable, unique name of a quantization configuration (see module docstring).

    ``with_bits=False`` leaves out the weight/activation widths of non-naive methods (the bit-width
    ablation's family); ``with_exclude=False`` leaves out ``act_exclude`` (leave-one-out's base)."""
    method = q.get("method", "?")
    family = family_of(method)
    d = method_defaults(method)
    get = lambda key: q.get(key, d.get(key))  # noqa: E731
    wb, ab = get("weight_bits"), get("act_bits")
    parts: list[str] = []
    if family in NAIVE:
        if wb is None and ab is None:
            parts.append("FP32")
        else:
            parts.append(_bits(wb, ab) if with_bits else f"W{wb or 32}A*")
    else:
        parts.append(FAMILY_NAMES.get(method, FAMILY_NAMES.get(family, family)))
        if family == "peg":
            parts.append(f"K={get('k')} {effective_grouping({**d, **q})}")
    if method != family:
        parts.append("(paper)")
    if family not in NAIVE and with_bits and (wb, ab) != (d.get("weight_bits"), d.get("act_bits")):
        parts.append(_bits(wb, ab))
    if get("weight_estimator") != d.get("weight_estimator"):
        parts.append(f"w={get('weight_estimator')}")
    if get("weight_granularity") != d.get("weight_granularity"):
        parts.append(f"w/{get('weight_granularity')}")
    if get("bias_correction") != d.get("bias_correction"):
        parts.append("+bias-corr" if get("bias_correction") else "-bias-corr")
    if get("transform") != d.get("transform"):
        parts.append(f"+{get('transform')}")
    if get("transform") == "smoothquant" and get("alpha") != d.get("alpha"):
        parts.append(f"alpha={_num(get('alpha'))}")
    if get("estimator") == "percentile":
        parts.append(f"p={_num(get('percentile'))}")
    elif get("estimator") != d.get("estimator"):
        parts.append(f"est={get('estimator')}")
    if family != "peg" and get("k") not in (None, d.get("k")) and get("peg_sites"):
        parts.append(f"K={get('k')} {effective_grouping({**d, **q})}")
    if list(get("peg_sites") or []) != list(d.get("peg_sites") or []):
        parts.append(f"PEG@[{join_patterns(get('peg_sites'))}]")
    if list(get("high_bits_sites") or []) != list(d.get("high_bits_sites") or []):
        parts.append(f"{get('high_bits')}-bit@[{join_patterns(get('high_bits_sites'))}]")
    elif get("high_bits_sites") and get("high_bits") != d.get("high_bits"):
        parts.append(f"high={get('high_bits')}")
    if get("share_groups") != d.get("share_groups"):
        parts.append(f"share={get('share_groups')}")
    if list(get("act_sites") or []) != list(d.get("act_sites") or []):
        parts.append(f"sites=[{join_patterns(get('act_sites'))}]")
    if with_exclude and get("act_exclude"):
        parts.append(f"excl {join_patterns(get('act_exclude'))}")
    return " ".join(parts)


def finetune_label(params: dict[str, str]) -> str:
    """The fine-tune variant of a run from its ``train.*`` params, named by its live knobs
    (``kurtosis reg lambda=1e-07 (target 3)``, ``clipped softmax gamma=-0.03``, ``bf16 autocast``, joined
    with ``, ``); ``""`` for the default variant, which is also what a run without these params ran."""
    def get(k):
        v = params.get(f"train.{k}")
        return KNOB_DEFAULTS[k] if v is None else parse_param(v)

    def changed(k) -> bool:
        return get(k) != KNOB_DEFAULTS[k]

    reg, att, ac = get("regularizer"), get("attention"), get("autocast")
    parts = []
    if reg == "kurtosis":
        parts.append(f"kurtosis reg lambda={_num(get('reg_weight'))} (target {_num(get('kurtosis_target'))})")
    elif reg == "quanttune":
        parts.append(f"QuantTune reg lambda={_num(get('reg_weight'))} margin {_num(get('margin'))}")
    elif reg != KNOB_DEFAULTS["regularizer"]:
        parts.append(f"{reg} reg lambda={_num(get('reg_weight'))}")
    if att == "clipped_softmax":
        parts.append(f"clipped softmax gamma={_num(get('clip_gamma'))}" + (f" zeta={_num(get('clip_zeta'))}"
                                                                          if changed("clip_zeta") else ""))
    elif att == "gated":
        parts.append("gated attention" + (f" (gate bias {_num(get('gate_bias_init'))})"
                                          if changed("gate_bias_init") else ""))
    elif att != KNOB_DEFAULTS["attention"]:
        parts.append(f"{att} attention")
    if ac != KNOB_DEFAULTS["autocast"]:
        parts.append(f"{ac} autocast")
    return ", ".join(parts)


def finetune_suffix(finetune: str) -> str:
    """What a method's name gets for a non-default fine-tune variant: `` [ft: <variant>]``."""
    return f" [ft: {finetune}]" if finetune else ""


def finetune_sort_key(finetune: str) -> tuple:
    """The default variant first, then the others by name."""
    return (finetune != "", finetune)


def slug(label: str) -> str:
    """An MLflow-metric-safe key for a label: ``PEG K=4 sorted`` -> ``peg_k4_sorted``."""
    s = label.lower().replace("*", "x").replace("=", "").replace("@", "_at_")
    s = re.sub(r"[^a-z0-9_.\-/]+", "_", s)
    s = re.sub(r"_+", "_", s).strip("_") or "method"
    if len(s) > 200:  # MLflow metric keys are capped at 250 characters (with the prefix)
        import hashlib

        s = s[:190] + "_" + hashlib.sha1(s.encode()).hexdigest()[:8]
    return s


def method_sort_key(q: dict) -> tuple:
    """Canonical table order: family (its exact paper preset first), then K and grouping,
    percentile, bits, excluded site."""
    method = q.get("method", "")
    family = family_of(method)
    fam = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
    excl = q.get("act_exclude") or []
    excl_key = (len(excl) > 0, *[site_sort_key(p) for p in excl])
    grouping = effective_grouping(q) if family == "peg" else ""
    return (fam, family, method == family, int(q.get("k") or 0) if family == "peg" else 0,
            GROUPING_ORDER.index(grouping) if grouping in GROUPING_ORDER else 9,
            float(q.get("percentile") or 0) if q.get("estimator") == "percentile" else 0.0,
            -(q.get("act_bits") or 99), excl_key, method_label(q))


def site_sort_key(pattern: str) -> tuple:
    """Leave-one-out order: site kinds in forward order (any layer), then single layers."""
    m = re.fullmatch(r"layer\.(\d+)\.(.+)", pattern)
    kind = m.group(2) if m else pattern.removeprefix("*.")
    idx = SITE_ORDER.index(kind) if kind in SITE_ORDER else len(SITE_ORDER)
    return (1 if m else 0, int(m.group(1)) if m else -1, idx, pattern)


@functools.lru_cache(maxsize=None)
def _site_presets() -> dict[tuple[str, str], str]:
    from omegaconf import OmegaConf

    out = {}
    for f in sorted((CONF_DIR / "search" / "sites").glob("*.yaml")):
        c = OmegaConf.to_container(OmegaConf.load(f))
        out[(join_patterns(c.get("peg_sites") or []), join_patterns(c.get("high_bits_sites") or []))] = f.stem
    return out


def site_preset(peg_sites: str, high_bits_sites: str) -> str:
    """Name of the conf/search/sites preset with these (comma-joined) patterns, or ''."""
    return _site_presets().get((peg_sites, high_bits_sites), "")
