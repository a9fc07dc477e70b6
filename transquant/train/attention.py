"""Attention variants that help heads "do nothing" (Bondarenko, Nagel, Blankevoort, NeurIPS 2023,
"Quantizable Transformers: removing outliers by helping attention heads do nothing").

A head that has nothing to update learns, under plain softmax, to put (almost) all its
probability on a low-information token and to make that token's value tiny; reaching exact
zeros needs ever larger score ranges, and the residual stream carries the outliers that make
them. Two changes let a head do nothing cheaply:

- ``clipped_softmax``: ``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)`` with ``gamma < 0``
  (paper: ``gamma = -0.03`` for BERT, ``zeta = 1``) reaches exact zeros (and ones) at finite
  scores; the gradient is zero where the clip acts, so scores stop growing there.
- ``gated``: each head's output is scaled by ``sigmoid(G_h(x))``, a per-head linear gate of the
  attention input ``x``: a head switches itself off with its gate. Here ``G`` is one
  ``Linear(hidden, heads)`` per attention module (= a ``Linear(hidden, 1)`` per head), its
  weight zero and its bias ``gate_bias_init`` at the start (0 = every gate starts at 0.5, the
  brief's zero-init bias; the gate starts input-independent and draws nothing from the RNG).

Both change the model's function, so the choice is recorded in the model's config
(``config.transquant_attention``, saved in ``config.json``); every kernel reads it from there:
the tapped eager kernel ``transquant_eager`` (:mod:`transquant.quant.sites`) calls
:func:`attention_probs` and :func:`gate_output`, and :func:`install` (called by
:func:`transquant.models.loading.load_finetuned`) switches the model to that kernel and adds the
gates before their weights are loaded. A model with plain softmax carries no such attribute and
is left exactly as it was.

Limits: the variants exist only in ``transquant_eager``; a model run under another kernel
(``sdpa``, ``eager``, an ONNX export through ``eager``) would silently compute plain attention:
:func:`check_kernel` refuses that. MPNet computes its attention itself (no registry kernel):
it cannot take a variant.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CONFIG_ATTR = "transquant_attention"  # the model config attribute that records the variant
KINDS = ("softmax", "clipped_softmax", "gated")
GATE = "transquant_gate"              # the gate submodule's name inside an attention module
_GATE_INPUT = "_transquant_gate_input"


class AttentionVariantError(ValueError):
    """A model cannot take, or was loaded without, its recorded attention variant."""


def clipped_softmax(x: torch.Tensor, gamma: float, zeta: float = 1.0, dim: int = -1) -> torch.Tensor:
    """``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)`` (Bondarenko et al. 2023, eq. 4.1).
    ``gamma = 0, zeta = 1`` is the plain softmax."""
    return torch.clamp((zeta - gamma) * nn.functional.softmax(x, dim=dim) + gamma, 0.0, 1.0)


def spec_of(config) -> dict | None:
    """The recorded variant of a model config (None: plain softmax)."""
    spec = getattr(config, CONFIG_ATTR, None) if config is not None else None
    return dict(spec) if spec else None


def spec_from_train(train_cfg) -> dict | None:
    """The variant a fine-tuning recipe asks for, as it is recorded (None: plain softmax, so a
    default recipe leaves the model config untouched)."""
    kind = train_cfg.get("attention", "softmax")
    if kind == "clipped_softmax":
        return {"kind": kind, "gamma": float(train_cfg.clip_gamma), "zeta": float(train_cfg.get("clip_zeta", 1.0))}
    if kind == "gated":
        return {"kind": kind, "gate_bias_init": float(train_cfg.get("gate_bias_init", 0.0))}
    return None


def _recorded(module: nn.Module):  # per attention call: no copy, no work for a plain model
    return getattr(getattr(module, "config", None), CONFIG_ATTR, None)


def attention_probs(module: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """The probabilities of masked scores under the variant ``module``'s model records."""
    spec = _recorded(module)
    if spec and spec["kind"] == "clipped_softmax":
        return clipped_softmax(scores, spec["gamma"], spec["zeta"], dim=-1)
    return nn.functional.softmax(scores, dim=-1)


def gate_output(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The heads' outputs ``out`` [batch, tokens, heads, head_dim] scaled by their gates (gated
    attention); unchanged for the other variants. A gated model without its gates raises
    rather than computing an ungated model."""
    spec = _recorded(module)
    if not spec or spec["kind"] != "gated":
        return out
    gate = getattr(module, GATE, None)
    x = module.__dict__.pop(_GATE_INPUT, None)  # this forward's input; not kept past it
    if gate is None or x is None:
        raise AttentionVariantError(f"{type(module).__name__}: the model records gated attention but has no gates "
                                    "installed; load it with transquant.models.load_finetuned")
    g = torch.sigmoid(gate(x))  # [batch, tokens, heads]
    if g.shape != out.shape[:3]:
        raise AttentionVariantError(f"{type(module).__name__}: gates {tuple(g.shape)} do not match the heads' "
                                    f"outputs {tuple(out.shape)}")
    return out * g.unsqueeze(-1).to(out.dtype)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose attention goes through the registry kernel (one per layer)."""
    from ..quant.sites import (
        find_sites,  # here, not at the top: quant.sites imports this module
    )

    return list({id(s.module): s.module for s in find_sites(model) if s.kind == "attn_probs"}.values())


def _store_gate_input(module, args, kwargs):
    x = args[0] if args else kwargs.get("hidden_states")
    module.__dict__[_GATE_INPUT] = x


def install(model: nn.Module, spec: dict | None = None) -> nn.Module:
    """Give ``model`` the variant ``spec`` (default: the one its config records): record it in the
    config, switch to the tapped eager kernel and, for gated attention, add the gates (fresh:
    zero weight, bias ``gate_bias_init``; a checkpoint's are loaded over them). A no-op for
    plain softmax. Idempotent."""
    from ..quant.sites import ATTN_IMPLEMENTATION, tappable_attention

    spec = spec if spec is not None else spec_of(model.config)
    if spec is None or spec["kind"] == "softmax":
        return model
    if not tappable_attention(model):
        raise AttentionVariantError(f"{type(model).__name__} computes its attention itself (no attention-registry "
                                    f"kernel): train.attention={spec['kind']} needs one; use train.attention=softmax")
    setattr(model.config, CONFIG_ATTR, dict(spec))
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if spec["kind"] == "gated":
        heads, hidden = int(model.config.num_attention_heads), int(model.config.hidden_size)
        for module in attention_modules(model):
            if getattr(module, GATE, None) is not None:
                continue
            ref = next(module.parameters())
            gate = nn.Linear(hidden, heads, device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                gate.weight.zero_()
                gate.bias.fill_(spec["gate_bias_init"])
            module.add_module(GATE, gate)
            module.register_forward_pre_hook(_store_gate_input, with_kwargs=True)
    return model


def gated_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint directory's config records gated attention."""
    import json

    f = Path(path) / "config.json"
    spec = json.loads(f.read_text()).get(CONFIG_ATTR) if f.is_file() else None
    return bool(spec) and spec.get("kind") == "gated"


def load_gates(model: nn.Module, path: str | Path) -> None:
    """Load a gated checkpoint's gate weights (``from_pretrained`` drops them: the stock model
    classes have no such parameters) into the gates :func:`install` added. Every gate must be
    found in the checkpoint, and every gate tensor of the checkpoint must have a gate."""
    from safetensors.torch import load_file

    wanted = {k for k in model.state_dict() if f".{GATE}." in k}
    found = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        found.update({k: v for k, v in load_file(str(f)).items() if f".{GATE}." in k})
    # save_pretrained may drop the base-model prefix of a head model's keys; match on suffixes
    prefix = getattr(model, "base_model_prefix", "")
    norm = lambda k: k[len(prefix) + 1:] if prefix and k.startswith(prefix + ".") else k
    by_norm = {norm(k): v for k, v in found.items()}
    missing = sorted(k for k in wanted if norm(k) not in by_norm)
    extra = sorted(set(by_norm) - {norm(k) for k in wanted})
    if missing or extra:
        raise AttentionVariantError(f"checkpoint {path}: gate weights do not match the model "
                                    f"(missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict({k: by_norm[norm(k)] for k in wanted}, strict=False)


def check_kernel(model: nn.Module) -> None:
    """Refuse a model whose recorded variant its current attention kernel would not compute."""
    from ..quant.sites import ATTN_IMPLEMENTATION

    spec = spec_of(model.config)
    if spec is not None and model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise AttentionVariantError(f"the model was fine-tuned with {spec['kind']} attention, which only the "
                                    f"{ATTN_IMPLEMENTATION} kernel computes (now: {model.config._attn_implementation})")
