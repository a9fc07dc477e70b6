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

Readers (``readers``): which linear layers read each norm's output, and, post-LN, where that
output re-enters the residual stream — what the function-preserving transforms
(:mod:`transquant.quant.transforms`: SmoothQuant, Outlier Suppression, OS+) need to fold a
per-channel scale and shift out of a norm into the layers after it. A family with no entry gets
no transform (the norms stay as they are).
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


SCOPES = ("block", "base")
LINEAR_SCOPES = ("same", "next", "first")


@dataclass(frozen=True)
class Restore:
    """Where a post-LN norm's output re-enters the residual stream, so a transform that rescales
    it (z = (y - shift) / scale) can give the residual branch y back (y = z * scale + shift).

    Without ``operand``: the residual is argument ``arg`` of the module at ``path`` (BERT's
    ``attention.output(h, residual)``), multiplied back there. With ``operand``: the residual is
    added inline, into the first input of the module at ``path`` (the LayerNorm of the sum); it is
    the first input of the module at ``operand`` (``""``: the block), and the sum gets
    ``residual * (scale - 1) + shift`` added. Paths are in the readers' scope."""

    path: str
    arg: int = 1
    operand: str | None = None


@dataclass(frozen=True)
class Readers:
    """The linear layers (``linears``) reading the output of the norm at ``norm``.

    ``at``: where ``norm`` is — ``block`` (in every block) or ``base`` (the base model, once).
    ``linears_at``: where the linears are — ``same`` (the norm's own block, or the base), ``next``
    (block i + 1: the last block's norm feeds the head and is left alone), ``first`` (block 0).
    ``restore``: post-LN only, where the norm's output is also the residual (None: the linears are
    its only readers). A norm is rewritten by the first entry whose modules all exist."""

    norm: str
    linears: tuple[str, ...]
    at: str = "block"
    linears_at: str = "same"
    restore: Restore | None = None


@dataclass(frozen=True)
class ResolvedRestore:
    """A :class:`Restore` in one model: qualified module names."""

    module: str
    arg: int
    operand: str | None


@dataclass(frozen=True)
class ReaderGroup:
    """A :class:`Readers` entry in one model: the norm, its linears and its restore, by
    qualified module name."""

    norm: str
    linears: tuple[str, ...]
    restore: ResolvedRestore | None


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
    readers: tuple[Readers, ...] = ()  # norms -> the linears reading them (transforms)

    def __post_init__(self) -> None:
        bad = [f"{k}: {t.side}" for k, t in self._all_taps() if t.side not in SIDES]
        bad += [k for k in self.block if k not in LAYER_SITE_NAMES]
        bad += [k for part in (self.embeddings, self.final, self.head) for k in part if k not in OUTER_SITE_NAMES]
        bad += [f"readers of {r.norm}: at={r.at}, linears_at={r.linears_at}" for r in self.readers
                if r.at not in SCOPES or r.linears_at not in LINEAR_SCOPES]
        bad += [f"readers of {r.norm}: a pre-LN norm feeds only its linears, no restore" for r in self.readers
                if r.restore is not None and self.norm == "pre"]
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

    def _base(self, model: nn.Module) -> tuple[str, nn.Module] | None:
        """(qualified name, module) of the base model: the first submodule holding the blocks."""
        return next(((n, m) for n, m in model.named_modules() if isinstance(get(m, self.layout.blocks), nn.ModuleList)),
                    None)

    def reader_groups(self, model: nn.Module) -> list[ReaderGroup]:
        """Each norm the layout's :class:`Readers` rewrite in ``model``, with its readers and
        restore as qualified module names, in forward order (first matching entry per norm)."""
        found = self._base(model)
        if found is None:
            raise ArchitectureError(f"{type(model).__name__}: no submodule with '{self.layout.blocks}'")
        base_name, base = found
        join = lambda *parts: ".".join(p for p in parts if p)
        blocks = len(get(base, self.layout.blocks))
        groups: dict[str, ReaderGroup] = {}
        for r in self.layout.readers:
            for i in (range(blocks) if r.at == "block" else [None]):
                norm = join(base_name, *((self.layout.blocks, str(i)) if i is not None else ()), r.norm)
                j = {"same": i, "next": None if i is None else i + 1, "first": 0}[r.linears_at]
                if r.linears_at == "next" and i is None:
                    j = 0
                if j is not None and j >= blocks:
                    continue  # the last block's norm feeds the head
                scope = join(base_name, *((self.layout.blocks, str(j)) if j is not None else ()))
                paths = [norm, *(join(scope, p) for p in r.linears)]
                if r.restore is not None:
                    paths += [join(scope, r.restore.path)] + (
                        [join(scope, r.restore.operand)] if r.restore.operand is not None else [])
                if norm in groups or any(get(model, p) is None for p in paths):
                    continue
                restore = None if r.restore is None else ResolvedRestore(
                    join(scope, r.restore.path), r.restore.arg,
                    None if r.restore.operand is None else join(scope, r.restore.operand))
                groups[norm] = ReaderGroup(norm, tuple(join(scope, p) for p in r.linears), restore)
        order = {n: k for k, (n, _) in enumerate(model.named_modules())}
        return sorted(groups.values(), key=lambda g: order[g.norm])

    def _resolve(self, model: nn.Module) -> tuple[list[Site], list[str]]:
        lay = self.layout
        found = self._base(model)
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
