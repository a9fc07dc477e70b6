"""Quantization sites: the named places where an activation is observed or quantized.

Which module holds which tensor depends on the transformer family; the adapters in
:mod:`transquant.models.adapters` map each family's module tree to the same site names and
kinds (``layer.3.ffn.residual``, ``embeddings.sum`` …), so configs and metrics read the same for
every model. Sites are reached with forward hooks, so no model code is copied or patched.

Some tensors sit at a different site in each family: the FFN's input is the attention
sublayer's norm in a post-LN model (BERT) but the FFN's own norm in a pre-LN one (GPT-2). A
*role* names such a tensor the same way everywhere (:data:`ROLES`), and a site pattern may name
a role (``*.ffn.input``) as well as sites.

Attention scores and probabilities are not module outputs; they are reached through a
registered attention implementation (``transquant_eager``) — the eager kernel with two taps.
Scores are tapped after scaling and before the additive mask (the mask holds dtype-min values
that would swamp any range), probabilities after softmax. The kernel also computes the attention
variants a fine-tuned model may record (clipped softmax, gated heads: :mod:`transquant.train.attention`).
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
from transformers.utils import ModelOutput

from ..train.attention import attention_probs, gate_output

ATTN_IMPLEMENTATION = "transquant_eager"

# Site name suffix inside a layer, e.g. layer.3.ffn.residual. ``qkv`` is a fused projection
# (GPT-2's c_attn: query, key and value side by side in one tensor).
LAYER_SITE_NAMES = {
    "attn_norm": "attn.norm", "query": "attn.query", "key": "attn.key", "value": "attn.value",
    "qkv": "attn.qkv", "attn_scores": "attn.scores", "attn_probs": "attn.probs", "context": "attn.context",
    "attn_output": "attn.output", "attn_residual": "attn.residual", "ffn_norm": "ffn.norm",
    "ffn_intermediate": "ffn.intermediate", "ffn_output": "ffn.output", "ffn_residual": "ffn.residual",
}
# Names of the sites outside the layers.
OUTER_SITE_NAMES = {"embedding_sum": "embeddings.sum", "embedding_norm": "embeddings.norm",
                    "final_norm": "final.norm", "pooler": "pooler", "logits": "logits"}
SITE_KINDS = (*LAYER_SITE_NAMES, *OUTER_SITE_NAMES)
RESIDUAL_KINDS = ("embedding_sum", "attn_residual", "ffn_residual")
ATTENTION_KINDS = ("attn_scores", "attn_probs")

# Roles: layer tensors that mean the same in every family, held by the site of a different kind
# depending on the family's norm placement (``post``: each sublayer's sum is normalised, BERT;
# ``pre``: each sublayer reads a normalised copy, GPT-2). Role suffix -> {placement: site kind}.
# ``ffn.input``: what the FFN reads — post-LN: the LayerNorm after attention (``attn.norm``);
# pre-LN: the norm before the FFN (``ffn.norm``). Only the tensors the paper's presets name are
# roles: a role is worth its indirection only where a site name would mean different things.
ROLES = {"ffn.input": {"post": "attn_norm", "pre": "ffn_norm"}}
assert not set(ROLES) & set(LAYER_SITE_NAMES.values()), "a role must not shadow a site name"
assert all(k in LAYER_SITE_NAMES for by in ROLES.values() for k in by.values())


class ArchitectureError(ValueError):
    """No registered adapter maps the model's module tree to sites."""


@dataclass
class Site:
    """One tap point. ``channels`` is the width of the last dimension, from the site's own
    module (or, for one without a width such as a whole block, from a module beside it), for
    token-wise tensors ([batch, tokens, channels]) and the pooler; None for attention
    scores/probabilities and the logits.

    ``causal``: attention scores/probabilities of causal attention (query i never attends to
    key j > i). ``tokens_from``: the module whose first input is [batch, tokens, ...] when this
    site's tensor arrives flattened to [batch * tokens, channels] (OPT's FFN); taps see it as
    [batch, tokens, channels] like every other token-wise site.

    ``roles``: the role suffixes (:data:`ROLES`) this site holds in its family, e.g.
    ``("ffn.input",)`` for ``layer.3.attn.norm`` of a post-LN model."""

    name: str
    kind: str
    layer: int | None
    module: nn.Module = field(repr=False)
    side: str
    channels: int | None
    causal: bool = False
    tokens_from: nn.Module | None = field(default=None, repr=False)
    roles: tuple[str, ...] = ()

    @property
    def role_names(self) -> list[str]:
        """The roles as full names (``layer.3.ffn.input``)."""
        return [f"layer.{self.layer}.{r}" for r in self.roles]


def find_sites(model: nn.Module) -> list[Site]:
    """All sites of a sequence classifier, in forward order, from its family's adapter.

    Raises :class:`ArchitectureError` naming what no registered adapter could map."""
    from ..models.adapters import adapter_for  # the adapters build Sites: imported here, not in a cycle

    return adapter_for(model).sites(model)


def matches(site: Site, pattern: str) -> bool:
    """Whether a glob pattern selects ``site``: by its name (``*.ffn.residual``, ``layer.11.*``,
    ``*``) or by a role it holds, where the pattern names that role, i.e. ends with it
    (``*.ffn.input``, ``layer.3.ffn.input``). A wildcard never reaches a role, so ``*`` or
    ``*.ffn.*`` select the same sites as they would by site names alone."""
    return fnmatch.fnmatchcase(site.name, pattern) or any(
        pattern.endswith(role) and fnmatch.fnmatchcase(name, pattern)
        for role, name in zip(site.roles, site.role_names))


def select(sites: list[Site], patterns: list[str]) -> list[Site]:
    """Sites that any glob pattern selects (see :func:`matches`), in forward order."""
    return [s for s in sites if any(matches(s, p) for p in patterns)]


def unmatched(sites: list[Site], patterns: list[str]) -> list[str]:
    """Patterns that select nothing — almost always a typo worth an error."""
    return [p for p in patterns if not select(sites, [p])]


def available(sites: list[Site]) -> str:
    """What a pattern can select in a model, on one line: its site names (layers folded into
    ``layer.<0-11>.{...}``) and its roles with the site each is here."""
    layers = sorted({s.layer for s in sites if s.layer is not None})
    span = f"layer.<{layers[0]}-{layers[-1]}>." if len(layers) > 1 else f"layer.{layers[0]}." if layers else ""
    inner = list(dict.fromkeys(LAYER_SITE_NAMES[s.kind] for s in sites if s.layer is not None))
    first = next((i for i, s in enumerate(sites) if s.layer is not None), len(sites))
    names = [s.name for s in sites[:first] if s.layer is None]
    names += [f"{span}{{{', '.join(inner)}}}"] if inner else []
    names += [s.name for s in sites[first:] if s.layer is None]
    roles = {r: LAYER_SITE_NAMES[s.kind] for s in sites for r in s.roles}
    held = ", ".join(f"{span}{r} (here {span}{suffix})" for r, suffix in roles.items())
    return f"sites {', '.join(names)}; roles {held or 'none'}"


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
    probs = attention_probs(module, scores)  # softmax, or the variant the model records
    if "probs" in taps:
        probs = taps["probs"](probs)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = gate_output(module, torch.matmul(probs, value).transpose(1, 2)).contiguous()
    return out, probs


AttentionInterface.register(ATTN_IMPLEMENTATION, _quantized_eager_attention)
# Without a registered mask function transformers passes *no* attention mask to a custom
# attention implementation (pad tokens would be attended to, silently).
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)


def tappable_attention(model: nn.Module) -> bool:
    """Whether the model's attention goes through transformers' attention registry, where the
    scores/probs taps live (MPNet computes its attention itself: it has no such sites)."""
    return bool(getattr(model, "_supports_attention_backend", False))


def use_tappable_attention(model: nn.Module) -> None:
    """Switch the model to the eager kernel with taps (needed for scores/probs sites); a no-op for
    a model whose attention cannot be tapped."""
    if tappable_attention(model):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


@contextmanager
def tap(sites: list[Site], fn: TapFn) -> Iterator[None]:
    """Route every listed site's tensor through ``fn(site, x)`` (which may replace it).

    A tensor whose last dimension is not the site's width raises: a wrong width would silently
    fold values into the wrong channels of per-channel ranges and statistics."""
    handles = []
    token_shapes: dict[nn.Module, torch.Size] = {}  # (batch, tokens) of each tokens_from module's input
    for module in {id(s.tokens_from): s.tokens_from for s in sites if s.tokens_from is not None}.values():
        handles.append(module.register_forward_pre_hook(
            lambda m, args: token_shapes.__setitem__(m, args[0].shape[:2])))

    def checked(site: Site, x: torch.Tensor) -> torch.Tensor:
        if site.channels is not None and x.shape[-1] != site.channels:
            raise ArchitectureError(f"site {site.name}: expected width {site.channels} (from its module "
                                    f"{type(site.module).__name__}), got {x.shape[-1]} (tensor {tuple(x.shape)})")
        if site.tokens_from is None:
            return fn(site, x)
        return fn(site, x.view(*token_shapes[site.tokens_from], x.shape[-1])).reshape(x.shape)

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
    """The tensor a module outputs: a whole model's output gives its logits (decoders pool the
    last real token's logits inside ``forward``, after every module has run)."""
    if isinstance(out, ModelOutput):
        return out.logits
    return out[0] if isinstance(out, tuple) else out


def _replace_output(out, new):
    if isinstance(out, ModelOutput):
        out.logits = new
        return out
    return (new, *out[1:]) if isinstance(out, tuple) else new
