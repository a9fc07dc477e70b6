"""Quantization sites: the named places where an activation is observed or quantized.

Sites are found from the module tree of any BERT-family encoder (BERT, RoBERTa, ELECTRA,
MiniLM … — every model whose layers are ``attention.self.{query,key,value}``,
``attention.output.{dense,LayerNorm}``, ``intermediate``, ``output.{dense,LayerNorm}``).
The residual sums are taken as the *inputs* of each LayerNorm, which is exactly the tensor a
post-LN encoder adds up and normalises, so no model code is copied or patched.

Attention scores and probabilities are not module outputs; they are reached through a
registered attention implementation (``transquant_eager``) — the eager kernel with two taps.
Scores are tapped after scaling and before the additive mask (the mask holds dtype-min values
that would swamp any range), probabilities after softmax.
"""
from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

ATTN_IMPLEMENTATION = "transquant_eager"

# kind -> (path inside a layer or the model, hook side). "input" taps a module's first input.
LAYER_SITES = {
    "query": ("attention.self.query", "output"),
    "key": ("attention.self.key", "output"),
    "value": ("attention.self.value", "output"),
    "attn_scores": ("attention.self", "scores"),
    "attn_probs": ("attention.self", "probs"),
    "context": ("attention.output.dense", "input"),
    "attn_output": ("attention.output.dense", "output"),
    "attn_residual": ("attention.output.LayerNorm", "input"),
    "attn_norm": ("attention.output.LayerNorm", "output"),
    "ffn_intermediate": ("intermediate", "output"),
    "ffn_output": ("output.dense", "output"),
    "ffn_residual": ("output.LayerNorm", "input"),
    "ffn_norm": ("output.LayerNorm", "output"),
}
# Site name suffix inside a layer, e.g. layer.3.ffn.residual.
LAYER_SITE_NAMES = {
    "query": "attn.query", "key": "attn.key", "value": "attn.value",
    "attn_scores": "attn.scores", "attn_probs": "attn.probs", "context": "attn.context",
    "attn_output": "attn.output", "attn_residual": "attn.residual", "attn_norm": "attn.norm",
    "ffn_intermediate": "ffn.intermediate", "ffn_output": "ffn.output",
    "ffn_residual": "ffn.residual", "ffn_norm": "ffn.norm",
}
SITE_KINDS = ("embedding_sum", "embedding_norm", *LAYER_SITES, "pooler", "logits")
RESIDUAL_KINDS = ("embedding_sum", "attn_residual", "ffn_residual")


class ArchitectureError(ValueError):
    """The model's module tree does not look like a BERT-family encoder."""


@dataclass
class Site:
    """One tap point. ``channels`` is the width of the last dimension, from the site's own
    module, for token-wise tensors ([batch, tokens, channels]) and the pooler; None for
    attention scores/probabilities and the logits."""

    name: str
    kind: str
    layer: int | None
    module: nn.Module = field(repr=False)
    side: str
    channels: int | None


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _find_encoder(model: nn.Module) -> tuple[str, nn.Module, nn.ModuleList]:
    """The base model (the one with ``embeddings``) and its list of transformer layers."""
    for name, mod in model.named_modules():
        layers = _get(mod, "encoder.layer")
        if hasattr(mod, "embeddings") and isinstance(layers, nn.ModuleList):
            return name, mod, layers
    raise ArchitectureError(
        f"{type(model).__name__}: no BERT-family encoder found (need a submodule with "
        "'embeddings' and 'encoder.layer' as a ModuleList)")


def find_sites(model: nn.Module) -> list[Site]:
    """All sites of a BERT-family sequence classifier, in forward order.

    Each site's width comes from its own module (a LayerNorm's normalized shape, a Linear's
    in/out features): ELECTRA's embeddings are narrower than its layers."""
    _, base, layers = _find_encoder(model)
    emb_norm = _get(base, "embeddings.LayerNorm")
    if emb_norm is None:
        raise ArchitectureError(f"{type(model).__name__}: missing embeddings.LayerNorm")
    sites = [Site("embeddings.sum", "embedding_sum", None, emb_norm, "input", _width(emb_norm, "input")),
             Site("embeddings.norm", "embedding_norm", None, emb_norm, "output", _width(emb_norm, "output"))]
    for i, layer in enumerate(layers):
        missing = [p for p, _ in LAYER_SITES.values() if _get(layer, p) is None]
        if missing:
            raise ArchitectureError(
                f"{type(model).__name__} layer {i}: missing {', '.join(sorted(set(missing)))} "
                f"(expected the BERT layout {', '.join(sorted({p for p, _ in LAYER_SITES.values()}))})")
        for kind, (path, side) in LAYER_SITES.items():
            mod = _get(layer, path)
            sites.append(Site(f"layer.{i}.{LAYER_SITE_NAMES[kind]}", kind, i, mod, side, _width(mod, side)))
    pooler = _get(base, "pooler")
    if pooler is not None:
        sites.append(Site("pooler", "pooler", None, pooler, "output", _width(pooler, "output")))
    head = getattr(model, "classifier", None)
    if head is None:
        raise ArchitectureError(f"{type(model).__name__}: no 'classifier' head (need a sequence classifier)")
    sites.append(Site("logits", "logits", None, head, "output", None))
    return sites


def _width(mod: nn.Module, side: str) -> int | None:
    """Last-dimension width of a module's input or output; None for attention scores/probs."""
    if isinstance(mod, nn.LayerNorm):
        return mod.normalized_shape[-1]
    if isinstance(mod, nn.Linear):
        return mod.out_features if side == "output" else mod.in_features
    dense = getattr(mod, "dense", None)  # BertIntermediate, BertPooler: a Linear then an activation
    return dense.out_features if side == "output" and isinstance(dense, nn.Linear) else None


def select(sites: list[Site], patterns: list[str]) -> list[Site]:
    """Sites whose name matches any glob pattern (``*.ffn.residual``, ``layer.11.*``, ``*``)."""
    return [s for s in sites if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


def unmatched(sites: list[Site], patterns: list[str]) -> list[str]:
    """Patterns that select nothing — almost always a typo worth an error."""
    return [p for p in patterns if not select(sites, [p])]


# --- tapping -----------------------------------------------------------------------------------

TapFn = Callable[[Site, torch.Tensor], torch.Tensor]


def _quantized_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """Eager attention with taps on scores (pre-mask) and probabilities."""
    taps = getattr(module, "_transquant_taps", {})
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if "scores" in taps:
        scores = taps["scores"](scores)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    if "probs" in taps:
        probs = taps["probs"](probs)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


AttentionInterface.register(ATTN_IMPLEMENTATION, _quantized_eager_attention)
# Without a registered mask function transformers passes *no* attention mask to a custom
# attention implementation (pad tokens would be attended to, silently).
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)


def use_tappable_attention(model: nn.Module) -> None:
    """Switch the model to the eager kernel with taps (needed for scores/probs sites)."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


@contextmanager
def tap(sites: list[Site], fn: TapFn) -> Iterator[None]:
    """Route every listed site's tensor through ``fn(site, x)`` (which may replace it).

    A tensor whose last dimension is not the site's width raises: a wrong width would silently
    fold values into the wrong channels of per-channel ranges and statistics."""
    def checked(site: Site, x: torch.Tensor) -> torch.Tensor:
        if site.channels is not None and x.shape[-1] != site.channels:
            raise ArchitectureError(f"site {site.name}: expected width {site.channels} (from its module "
                                    f"{type(site.module).__name__}), got {x.shape[-1]} (tensor {tuple(x.shape)})")
        return fn(site, x)

    handles = []
    attn_modules = []
    for site in sites:
        if site.side == "output":
            handles.append(site.module.register_forward_hook(
                lambda m, a, out, s=site: _replace_output(out, checked(s, _first(out)))))
        elif site.side == "input":
            handles.append(site.module.register_forward_pre_hook(
                lambda m, args, s=site: (checked(s, args[0]), *args[1:])))
        else:
            taps = site.module.__dict__.setdefault("_transquant_taps", {})
            taps[site.side] = lambda x, s=site: checked(s, x)
            attn_modules.append(site.module)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in attn_modules:
            m.__dict__.pop("_transquant_taps", None)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_output(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new
