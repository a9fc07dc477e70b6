"""What every family adapter is: a :class:`Layout` of attribute paths, and the registry.

A layout says where a family keeps each site's tensor. The *base model* is the first submodule
holding the list of blocks (``blocks``); embedding and final sites are found under it, block
sites under each block, head sites under the whole classifier. The path ``""`` is the module
itself: a block's own output is the residual stream after its last add, and the classifier's own
output carries the logits (decoders pool the last real token inside ``forward``).

Norm placement: ``post`` (BERT: each sublayer's residual sum is normalised, so the sum is the
LayerNorm's input and the norm's output is the stream) or ``pre`` (GPT-2: each sublayer reads a
normalised copy, and the stream carries the sums un-normalised to a final norm). It decides which
site holds each role (:data:`~transquant.quant.sites.ROLES`): the FFN input is ``attn.norm`` in a
post-LN family and ``ffn.norm`` in a pre-LN one.

Segments: whether the family has segment (token type) embeddings, which mark a pair's first and
second sentence. Only those families are given ``token_type_ids``: DistilBERT and OPT have no such
table, and GPT-2 would look token type ids up in its *word* embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from ...core.registry import Registry
from ...quant.sites import ATTENTION_KINDS, LAYER_SITE_NAMES, OUTER_SITE_NAMES, ROLES, ArchitectureError, Site

NORM_PLACEMENTS = ("post", "pre")
assert all(set(by) == set(NORM_PLACEMENTS) for by in ROLES.values()), "every role needs a site per norm placement"
SEGMENT_INPUT = "token_type_ids"
SIDES = ("output", "input", "scores", "probs")
MAX_LISTED = 4  # missing paths named per adapter in an error


@dataclass(frozen=True)
class Tap:
    """Where one tensor is: ``side`` of the module at ``path``.

    ``width_from``: a module (same root) whose output width this tensor has, for modules
    without one of their own (a block, a dropout). ``flat``: the tensor arrives as
    [batch * tokens, channels] (see :attr:`Site.tokens_from`; the block gives the shape)."""

    path: str
    side: str = "output"
    width_from: str | None = None
    flat: bool = False


@dataclass(frozen=True)
class Layout:
    """One family's sites, each dict in forward order (kind -> :class:`Tap`); ``norm`` and
    ``segments`` as the module docstring says."""

    family: str
    blocks: str
    norm: str
    causal: bool
    segments: bool
    embeddings: dict[str, Tap]
    block: dict[str, Tap]
    final: dict[str, Tap] = field(default_factory=dict)
    head: dict[str, Tap] = field(default_factory=dict)
    optional: tuple[str, ...] = ()  # kinds a model of the family may lack (the pooler)

    def __post_init__(self) -> None:
        bad = [f"{k}: {t.side}" for k, t in self._all_taps() if t.side not in SIDES]
        bad += [k for k in self.block if k not in LAYER_SITE_NAMES]
        bad += [k for part in (self.embeddings, self.final, self.head) for k in part if k not in OUTER_SITE_NAMES]
        if self.norm not in NORM_PLACEMENTS:
            bad.append(f"norm={self.norm} (allowed {', '.join(NORM_PLACEMENTS)})")
        if bad:
            raise ValueError(f"layout {self.family}: bad kinds or sides {bad}; kinds are "
                             f"{', '.join([*LAYER_SITE_NAMES, *OUTER_SITE_NAMES])}, sides {', '.join(SIDES)}")

    def _all_taps(self):
        for part in (self.embeddings, self.block, self.final, self.head):
            yield from part.items()


def get(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted attribute path ("" is ``root``); None where any step is missing."""
    mod = root
    for part in filter(None, path.split(".")):
        mod = getattr(mod, part, None)
        if not isinstance(mod, nn.Module):
            return None
    return mod


def width(mod: nn.Module, side: str) -> int | None:
    """Last-dimension width of a module's input or output, where the module says it."""
    if isinstance(mod, nn.LayerNorm):
        return mod.normalized_shape[-1]
    if isinstance(mod, nn.Linear):
        return mod.out_features if side == "output" else mod.in_features
    if isinstance(mod, Conv1D):  # GPT-2's transposed Linear
        return mod.nf if side == "output" else mod.nx
    dense = getattr(mod, "dense", None)  # BertIntermediate, BertPooler, RoBERTa-PreLN's output adds
    return dense.out_features if side == "output" and isinstance(dense, nn.Linear) else None


class Adapter:
    """Maps the models of one family to sites, from its :class:`Layout`."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    @property
    def family(self) -> str:
        return self.layout.family

    @property
    def norm(self) -> str:
        return self.layout.norm

    @property
    def causal(self) -> bool:
        return self.layout.causal

    @property
    def segments(self) -> bool:
        """Whether the family takes ``token_type_ids`` (has segment embeddings)."""
        return self.layout.segments

    def roles(self, kind: str) -> tuple[str, ...]:
        """The roles a layer site of ``kind`` holds in this family."""
        return tuple(role for role, by in ROLES.items() if by[self.norm] == kind)

    def problems(self, model: nn.Module) -> list[str]:
        """What this adapter cannot map in ``model`` (empty: it maps it)."""
        return self._resolve(model)[1]

    def sites(self, model: nn.Module) -> list[Site]:
        """Every site of ``model`` in forward order."""
        sites, missing = self._resolve(model)
        if missing:
            raise ArchitectureError(f"{type(model).__name__}: the {self.family} adapter cannot map {_listed(missing)}")
        return sites

    def _resolve(self, model: nn.Module) -> tuple[list[Site], list[str]]:
        lay = self.layout
        found = next(((n, m) for n, m in model.named_modules() if isinstance(get(m, lay.blocks), nn.ModuleList)), None)
        if found is None:
            return [], [f"no submodule with '{lay.blocks}' (a list of blocks)"]
        base_name, base = found
        prefix = f"{base_name}." if base_name else ""
        sites: list[Site] = []
        missing: list[str] = []
        missing_kinds: set[str] = set()

        def add(name: str, kind: str, layer: int | None, root: nn.Module, where: str, t: Tap,
                block: nn.Module | None = None) -> None:
            mod = get(root, t.path)
            source = get(root, t.width_from) if t.width_from else mod
            if mod is None or source is None:
                if kind not in lay.optional and kind not in missing_kinds:  # once, not once per block
                    missing_kinds.add(kind)
                    missing.append(f"{where}{t.path if mod is None else t.width_from}")
                return
            channels = None if kind in ATTENTION_KINDS or kind == "logits" else width(
                source, "output" if t.width_from else t.side)
            sites.append(Site(name, kind, layer, mod, t.side, channels, causal=lay.causal and kind in ATTENTION_KINDS,
                              tokens_from=block if t.flat else None,
                              roles=self.roles(kind) if layer is not None else ()))

        for kind, t in lay.embeddings.items():
            add(OUTER_SITE_NAMES[kind], kind, None, base, prefix, t)
        for i, block in enumerate(get(base, lay.blocks)):
            for kind, t in lay.block.items():
                add(f"layer.{i}.{LAYER_SITE_NAMES[kind]}", kind, i, block, f"{prefix}{lay.blocks}.{i}.", t, block)
        for kind, t in lay.final.items():
            add(OUTER_SITE_NAMES[kind], kind, None, base, prefix, t)
        for kind, t in lay.head.items():
            add(OUTER_SITE_NAMES[kind], kind, None, model, "", t)
        return sites, missing


ADAPTERS: Registry[Adapter] = Registry("model family", ArchitectureError)


def register(adapter: Adapter) -> Adapter:
    return ADAPTERS.register(adapter.family)(adapter)


def adapter_for(model: nn.Module) -> Adapter:
    """The one registered adapter that maps ``model``; the error names, per adapter, what it
    could not map."""
    problems = {name: ADAPTERS[name].problems(model) for name in ADAPTERS}
    matched = [name for name, p in problems.items() if not p]
    if len(matched) == 1:
        return ADAPTERS[matched[0]]
    cls = type(model).__name__
    if matched:
        raise ArchitectureError(f"{cls}: mapped by several adapters ({', '.join(matched)}); make their layouts exclusive")
    why = "; ".join(f"{name} cannot map {_listed(p)}" for name, p in problems.items())
    raise ArchitectureError(f"{cls}: no registered adapter maps this model ({why}); registered: {', '.join(ADAPTERS)}")


def _listed(paths: list[str]) -> str:
    return ", ".join(paths[:MAX_LISTED]) + (f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else "")
