"""One verb and its result: :func:`quantize_` quantizes a model and returns a :class:`QuantState`.

The state is the quantized model as data: per activation site its plan and calibrated grid, per
weight its grid and integer codes. It saves to one file and applies to a fresh copy of the FP32
model, which then computes exactly what the calibrated model computed.

File format: one safetensors file. Its tensors are ``act/<site>/scale``,
``act/<site>/zero_point``, ``act/<site>/groups`` (PEG sites: the group id of each channel;
sorting channels by it gives the permutation), ``weight/<module>/scale``,
``weight/<module>/zero_point`` (per-channel weights: one per output channel, shaped to
broadcast against the weight), ``weight/<module>/codes`` (int8, int16 or int32, the smallest
that holds the grid) and, with bias correction, ``weight/<module>/bias`` (the corrected bias).
The header's metadata key ``transquant`` holds the JSON description: format version, the quant
config, and in forward order per site its kind, layer, plan, integer range and granularity, and
per weight its integer range and whether it has a corrected bias.

A function-preserving transform (``quant.transform``, :mod:`.transforms`) adds
``transform/<norm>/scale`` (and ``.../shift``) per rewritten norm and a ``transform`` entry (its
name, and per norm whether it has a shift) to the JSON; :meth:`QuantState.apply` re-applies it to
the fresh FP32 model before loading the weight codes (which were taken from the transformed
weights). A file without the entry was made with no transform.
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.errors import TransquantError
from .ptq import QuantizedActivations, SitePlan, calibrate, input_means, plan_sites, quantize_weights_
from .quantizers import Grid, quantize
from .sites import ATTN_IMPLEMENTATION, find_sites, tappable_attention, use_tappable_attention
from .transforms import TransformState, fold_, transform_

STATE_FILE = "quant_state.safetensors"
FORMAT_VERSION = 1
_META_KEY = "transquant"


@dataclass(frozen=True)
class SiteState:
    """One quantized activation site: its plan and the grid calibration fixed."""

    kind: str
    layer: int | None
    plan: SitePlan
    grid: Grid
    groups: torch.Tensor | None = None  # PEG: group id per channel

    @property
    def granularity(self) -> str:
        return "per_tensor" if self.grid.scale.numel() == 1 else "per_channel"


@dataclass(frozen=True)
class WeightState:
    """One quantized weight: its grid and its integer codes, weight = (codes - zero_point) * scale."""

    grid: Grid
    codes: torch.Tensor
    bias: torch.Tensor | None = None  # quant.bias_correction: the corrected float bias

    def dequantize(self, like: torch.Tensor) -> torch.Tensor:
        """The weight in ``like``'s dtype and device, computed as the fake quantizer computes it
        (so bit for bit the calibrated model's weight)."""
        scale = self.grid.scale.to(like.device, like.dtype)
        zero = self.grid.zero_point.to(like.device, like.dtype)
        return (self.codes.to(like.device, like.dtype) - zero) * scale


@dataclass
class QuantState:
    """Everything a quantized model is beyond its FP32 weights, in forward order.

    ``activations`` is the activation grids on the sites of the model this state was made on or
    last applied to (what the profiler and the engine read); None after :meth:`load` and when no
    activation is quantized. ``seconds`` is the wall time of each step of :func:`quantize_` (not
    saved)."""

    config: dict
    sites: dict[str, SiteState]
    weights: dict[str, WeightState]
    activations: QuantizedActivations | None = field(default=None, repr=False, compare=False)
    transform: TransformState | None = None
    seconds: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def plans(self) -> dict[str, SitePlan]:
        return {name: s.plan for name, s in self.sites.items()}

    @property
    def grids(self) -> dict[str, Grid]:
        """Site name -> activation grid."""
        return {name: s.grid for name, s in self.sites.items()}

    @property
    def weight_grids(self) -> dict[str, Grid]:
        """Module name -> weight grid (what ``quantize_weights_`` returns)."""
        return {name: w.grid for name, w in self.weights.items()}

    # --- applying ------------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> nn.Module:
        """Quantize a fresh copy of the FP32 model the state was made from, in place: weights
        from the stored codes, and the tappable attention when activations are quantized. Use
        :meth:`active` to fake-quantize its activations. Returns ``model``."""
        if self.transform is not None:
            fold_(model, self.transform)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, w in self.weights.items():
                weight = getattr(modules.get(name), "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.shape != w.codes.shape:
                    found = "no such module" if name not in modules else f"weight {getattr(weight, 'shape', None)}"
                    raise TransquantError(f"quant state: weight of {name} has shape {tuple(w.codes.shape)}, "
                                          f"the model has {found}")
                weight.copy_(w.dequantize(weight))
                if w.bias is not None:
                    modules[name].bias.copy_(w.bias)
        if self.sites:
            use_tappable_attention(model)
            model.eval()
        self.activations = self.activations_for(model)
        return model

    def activations_for(self, model: nn.Module) -> QuantizedActivations | None:
        """The activation grids on ``model``'s sites (None when no activation is quantized)."""
        if not self.sites:
            return None
        sites = find_sites(model)
        width = {s.name: s.channels for s in sites}
        for name, s in self.sites.items():
            if name not in width:
                raise TransquantError(f"quant state: the model has no site {name}")
            if s.granularity == "per_channel" and s.grid.scale.numel() != width[name]:
                raise TransquantError(f"quant state: site {name} has {s.grid.scale.numel()} channel scales, "
                                      f"the model's site is {width[name]} wide")
        return QuantizedActivations(sites, self.plans, {}, self.grids)

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        """Fake-quantize ``model``'s activations while open. ``model`` must be the one
        :func:`quantize_` quantized or one :meth:`apply` prepared (checked: its weights are on the
        stored codes and its attention is tappable), else the result would silently differ."""
        modules = dict(model.named_modules())
        for name, w in self.weights.items():
            weight = getattr(modules.get(name), "weight", None)
            if not isinstance(weight, torch.Tensor) or not torch.equal(weight, w.dequantize(weight)):
                raise TransquantError(f"quant state: the weight of {name} is not the state's; "
                                      "call state.apply(model) first")
        if self.sites and tappable_attention(model) and model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise TransquantError("quant state: the model's attention cannot be tapped; call state.apply(model) first")
        acts = self.activations_for(model)
        with acts.active() if acts is not None else nullcontext():
            yield

    # --- the file ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the state to one safetensors file (see the module docstring); returns its path."""
        tensors: dict[str, torch.Tensor] = {}
        sites = {}
        for name, s in self.sites.items():
            tensors.update(_grid_tensors(f"act/{name}", s.grid))
            if s.groups is not None:
                tensors[f"act/{name}/groups"] = _own(s.groups)
            sites[name] = {"kind": s.kind, "layer": s.layer, "plan": dataclasses.asdict(s.plan),
                           "qmin": s.grid.qmin, "qmax": s.grid.qmax, "granularity": s.granularity,
                           "groups": s.groups is not None}
        weights = {}
        for name, w in self.weights.items():
            tensors.update(_grid_tensors(f"weight/{name}", w.grid))
            tensors[f"weight/{name}/codes"] = _own(w.codes)
            if w.bias is not None:
                tensors[f"weight/{name}/bias"] = _own(w.bias)
            weights[name] = {"qmin": w.grid.qmin, "qmax": w.grid.qmax, "bias": w.bias is not None}
        meta = {"version": FORMAT_VERSION, "config": self.config, "sites": sites, "weights": weights}
        if self.transform is not None:
            tensors.update(self.transform.tensors())
            meta["transform"] = self.transform.meta()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QuantState":
        """Read a state written by :meth:`save`."""
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(_META_KEY)
            if header is None:
                raise TransquantError(f"{path}: not a transquant quant state (no '{_META_KEY}' metadata)")
            meta = json.loads(header)
            if meta.get("version") != FORMAT_VERSION:
                raise TransquantError(f"{path}: quant state version {meta.get('version')}, "
                                      f"this transquant reads version {FORMAT_VERSION}")

            def grid(prefix: str, d: dict) -> Grid:
                return Grid(f.get_tensor(f"{prefix}/scale"), f.get_tensor(f"{prefix}/zero_point"), d["qmin"], d["qmax"])

            sites = {name: SiteState(d["kind"], d["layer"], SitePlan(**d["plan"]), grid(f"act/{name}", d),
                                     f.get_tensor(f"act/{name}/groups") if d["groups"] else None)
                     for name, d in meta["sites"].items()}
            weights = {name: WeightState(grid(f"weight/{name}", d), f.get_tensor(f"weight/{name}/codes"),
                                         f.get_tensor(f"weight/{name}/bias") if d.get("bias") else None)
                       for name, d in meta["weights"].items()}
            transform = TransformState.from_file(meta["transform"], f.get_tensor) if "transform" in meta else None
        return cls(meta["config"], sites, weights, transform=transform)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy sharing no memory (safetensors refuses shared storage)."""
    return t.detach().cpu().contiguous().clone()


def _grid_tensors(prefix: str, grid: Grid) -> dict[str, torch.Tensor]:
    return {f"{prefix}/scale": _own(grid.scale), f"{prefix}/zero_point": _own(grid.zero_point)}


def _code_dtype(grid: Grid) -> torch.dtype:
    for dtype in (torch.int8, torch.int16):
        if torch.iinfo(dtype).min <= grid.qmin and grid.qmax <= torch.iinfo(dtype).max:
            return dtype
    return torch.int32


def quantize_(model: nn.Module, quant_config, calibration_batches: Iterable[dict],
              device: torch.device | None = None) -> QuantState:
    """Quantize ``model`` in place as ``quant_config`` (a ``quant`` config node) says and return
    its :class:`QuantState`.

    Plans the sites, puts every Linear and Embedding weight on its grid, then calibrates the
    activation grids on ``calibration_batches`` (padded batches as ``tasks.batches`` yields them,
    read only when an activation is quantized or biases are corrected, so a lazy iterable costs
    nothing otherwise). With ``bias_correction`` the FP32 input means are taken on them before
    the weights are quantized. Activations are fake-quantized only inside ``state.active(model)``."""
    q = quant_config if isinstance(quant_config, DictConfig) else OmegaConf.create(quant_config)
    device = device if device is not None else next(model.parameters()).device
    transform, transform_seconds = None, 0.0
    if q.get("transform", "none") != "none":  # before anything reads the weights or the ranges
        calibration_batches = list(calibration_batches)
        t0 = time.perf_counter()
        transform = transform_(model, q, calibration_batches, device)
        transform_seconds = time.perf_counter() - t0
    sites = find_sites(model)
    plans = plan_sites(sites, q)
    correct = q.bias_correction and q.weight_bits is not None
    calibration_batches = list(calibration_batches) if plans or correct else []
    t0 = time.perf_counter()
    means = input_means(model, calibration_batches, device) if correct else None
    weight_grids = quantize_weights_(model, q.weight_bits, q.weight_estimator, q.weight_granularity, means)
    seconds = {"weights": time.perf_counter() - t0}
    if transform is not None:
        seconds["transform"] = transform_seconds
    modules = dict(model.named_modules())
    weights = {name: WeightState(grid, quantize(modules[name].weight.detach(), grid).to(_code_dtype(grid)).cpu(),
                                 _own(modules[name].bias) if correct and getattr(modules[name], "bias", None)
                                 is not None else None)
               for name, grid in weight_grids.items()}
    state = QuantState(OmegaConf.to_container(q, resolve=True), {}, weights, transform=transform, seconds=seconds)
    if plans:
        t0 = time.perf_counter()
        qa = calibrate(model, sites, plans, calibration_batches, device)
        seconds["calibration"] = time.perf_counter() - t0
        by_name = {s.name: s for s in sites}
        state.sites = {name: SiteState(by_name[name].kind, by_name[name].layer, plan, qa.grids[name],
                                       getattr(qa.estimators[name], "groups", None))
                       for name, plan in plans.items()}
        state.activations = qa
    return state
