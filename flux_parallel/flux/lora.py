"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the
transformer's and CLIP's linear layers.

One seam, as the parallel strategies have theirs: every adapted linear is swapped for a `LoRALinear`
that runs the original module and adds each adapter's low-rank product to its output rows,
    out[..., rows] += (x @ down^T @ up^T + bias) * (alpha / rank) * adapter scale,
several adapters summed. A factor covers a row range of the output, so diffusers' separate q, k and
v factors stay three exact factors on our fused qkv (no block-diagonal product). Blocks keep their
`attention_fn` seam, so Ulysses, ring and PipeFusion compose with this unchanged; every rank loads
the same adapters. Adapter scales are 0-dim tensors shared by all modules and changed in place, so a
compiled block does not recompile when they change.

Fused: the products are merged into the weights in float32 and cast back; the weights a fuse touches
are first copied to the host, and unfusing or unloading copies them back, bit for bit.
"""

import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux_parallel.flux.layers import linear_rows
from flux_parallel.flux.lora_formats import LoRAFactor, LoRAFile, parse_lora, read_lora
from flux_parallel.flux.quantize import _set_submodule
from flux_parallel.parallel import comm
from flux_parallel.parallel.tensor import GatheredLinear, RowParallelLinear
from flux_parallel.weights import CheckpointError


class LoRALinear(nn.Module):
    """A linear layer (nn.Linear or FP8Linear) plus low-rank updates of its output rows. The factors are
    plain tensors on the base's device and dtype, not parameters: move the model before loading adapters."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.factors: dict[str, list[LoRAFactor]] = {}  # adapter name -> its factors on this module
        self.scales: dict[str, Tensor] = {}  # adapter name -> its 0-dim scale, shared with every module
        self.fused = False  # the products are in base's weight: forward adds nothing

    @property
    def weight(self) -> Tensor:  # model code reads img_in.weight's dtype and device
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def out_features(self) -> int:
        """The rows this module outputs: the base's own (a gathered tensor-parallel linear's, all of them)."""
        shard = getattr(self.base, "tensor_shard", None)
        return shard.full[0] if shard is not None and shard.kind == "gathered" else local_shape(self.base)[0]

    def forward(self, x: Tensor) -> Tensor:
        return self._add_factors(x, self.base(x), 0, self.out_features)

    def forward_rows(self, x: Tensor, rows: slice) -> Tensor:
        """self(x)[..., rows] from those rows of the weight only (flux.layers.linear_rows)."""
        start, stop, _ = rows.indices(self.out_features)
        return self._add_factors(x, linear_rows(self.base, x, rows), start, stop)

    def _add_factors(self, x: Tensor, out: Tensor, start: int, stop: int) -> Tensor:
        """out: the base's output rows [start, stop); each factor adds to the rows it shares with them.
        A row-parallel tensor-parallel base sees this rank's input columns only: its factors' products are
        partial sums, added up over the tensor group (one more all-reduce) before they join `out`."""
        if self.fused:
            return out
        row_parallel = isinstance(self.base, RowParallelLinear)
        if row_parallel:
            out, whole = torch.zeros_like(out), out
        for name, factors in self.factors.items():
            for f in factors:
                lo, hi = max(f.rows[0], start), min(f.rows[1], stop)
                if lo >= hi:
                    continue
                up = f.up[lo - f.rows[0] : hi - f.rows[0]]
                bias = None if f.bias is None else f.bias[lo - f.rows[0] : hi - f.rows[0]]
                delta = F.linear(F.linear(x, f.down), up, bias)  # [..., hi - lo], through rank dims only
                out[..., lo - start : hi - start] += delta * (self.scales[name] * f.scale)
        return whole + comm.all_reduce(out, self.base.group) if row_parallel else out

    def merge(self) -> None:
        """Add every factor's product to the base's weight (and bias), in float32, cast back once."""
        weight = self.base.weight
        merged = weight.detach().float()  # a copy: the weight changes once, at the end
        merged_bias = None if self.base.bias is None else self.base.bias.detach().float()
        # a gathered tensor-parallel base holds some rows of the whole output its factors are for
        shard = getattr(self.base, "tensor_shard", None)
        gathered = shard is not None and shard.kind == "gathered"
        target, target_bias = (torch.zeros(shard.full), torch.zeros(shard.full[:1])) if gathered else \
            (merged, merged_bias)
        for name, factors in self.factors.items():
            for f in factors:
                scale = float(self.scales[name]) * f.scale
                target[f.rows[0] : f.rows[1]] += (f.up.float() @ f.down.float()) * scale
                if f.bias is not None:
                    if merged_bias is None:
                        raise ValueError("fuse_lora: a LoRA bias on a linear layer without bias cannot be fused")
                    target_bias[f.rows[0] : f.rows[1]] += f.bias.float() * scale
        if gathered:
            merged += shard.take(target).to(merged.device)
            if merged_bias is not None:
                merged_bias += shard.take(target_bias).to(merged_bias.device)
        with torch.no_grad():
            weight.copy_(merged.to(weight.dtype))
            if merged_bias is not None:
                self.base.bias.copy_(merged_bias.to(self.base.bias.dtype))
        self.fused = True


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the whole linear a LoRA is for: an nn.Linear, an FP8Linear (flux/quantize.py), a
    LoRALinear, or a tensor-parallel rank's part of one (its whole shape)."""
    if isinstance(module, LoRALinear):
        return linear_shape(module.base)
    shard = getattr(module, "tensor_shard", None)
    return tuple(shard.full) if shard is not None else local_shape(module)


def local_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the weight this process holds."""
    return tuple((module.weight_fp8 if hasattr(module, "weight_fp8") else module.weight).shape)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoRALinear)) or hasattr(module, "weight_fp8") or \
        hasattr(module, "tensor_shard")


def _device_and_dtype(linear: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a linear computes and in which dtype: an FP8Linear returns its original dtype."""
    if hasattr(linear, "weight_fp8"):
        return linear.weight_fp8.device, linear.out_dtype
    return linear.weight.device, linear.weight.dtype


def tensor_parallel_part(factor: LoRAFactor, shard) -> list[LoRAFactor]:
    """A factor for a whole linear -> the factors of this tensor-parallel rank's part of it (shard: the
    part's parallel/tensor.py Shard; None: no split). Column-parallel: the up factor's rows this rank
    holds, at their local positions; row-parallel: the down factor's columns of this rank's inputs (the
    products are partial sums: LoRALinear adds them up); gathered: the whole factor (it adds to the
    gathered output)."""
    if shard is None or shard.kind == "gathered":
        return [factor]
    if shard.kind == "row":
        down = torch.cat([factor.down[:, a:b] for a, b in shard.ranges], dim=1)
        return [replace(factor, down=down)]
    parts, offset = [], 0
    for a, b in shard.ranges:  # this rank's rows, concatenated in this order
        lo, hi = max(a, factor.rows[0]), min(b, factor.rows[1])
        if lo < hi:
            take = slice(lo - factor.rows[0], hi - factor.rows[0])
            parts.append(replace(factor, rows=(offset + lo - a, offset + hi - a), up=factor.up[take],
                                             bias=None if factor.bias is None else factor.bias[take]))
        offset += b - a
    return parts


class LoRAAdapters:
    """The adapters loaded into a set of components ({"transformer": Flux, "clip": ClipTextModel}),
    their scales, and whether they are fused. FluxPipeline's load_lora & co. are thin calls into this."""

    def __init__(self, components: dict[str, nn.Module | None]):
        self.components = {name: module for name, module in components.items() if module is not None}
        self.scales: dict[str, dict[torch.device, Tensor]] = {}  # adapter -> its scale on each device used
        self.values: dict[str, float] = {}  # adapter -> its scale as given (the tensors hold it in float32)
        self.replaced: dict[str, tuple[str, Tensor]] = {}  # parameter -> (adapter, original value on the host)
        self.fused_originals: dict[str, tuple[Tensor, Tensor | None]] | None = None  # None: not fused
        self.widened: tuple[str, nn.Module] | None = None  # (adapter, the original img_in) while a control LoRA is in

    @property
    def adapters(self) -> dict[str, float]:
        return dict(self.values)

    def memory(self) -> dict:
        """Bytes each adapter's factors hold on the device (a PipeFusion stage: its own blocks' only; the
        others' are on the meta device) and the host copies a fuse keeps of the weights it touched."""
        device = {name: 0 for name in self.values}
        for wrapper in self.wrappers().values():
            for name, factors in wrapper.factors.items():
                tensors = [t for f in factors for t in (f.down, f.up, f.bias) if t is not None and not t.is_meta]
                device[name] += sum(t.numel() * t.element_size() for t in tensors)
        originals = [t for pair in (self.fused_originals or {}).values() for t in pair if t is not None]
        return {"device_bytes": device, "fused_host_bytes": sum(t.numel() * t.element_size() for t in originals)}

    def linears(self) -> dict[str, nn.Module]:
        """Every linear layer of the components by prefixed name (`transformer.img_in`), LoRALinear or not."""
        found = {}
        for component, root in self.components.items():
            wrapped = {id(m.base) for m in root.modules() if isinstance(m, LoRALinear)}
            for name, module in root.named_modules():
                if _is_linear(module) and id(module) not in wrapped:
                    found[f"{component}.{name}"] = module
        return found

    def parameters(self) -> dict[str, nn.Parameter]:
        return {f"{c}.{k}": p for c, root in self.components.items() for k, p in root.named_parameters()}

    def load(self, source: str | Path, name: str | None, scale: float, params, weight_name: str | None = None) -> str:
        """Read, place and apply one LoRA file; any error leaves the model as it was. Returns its name."""
        name = self._new_name(name)
        _check_scale(name, scale)
        tensors, metadata, path = read_lora(source, weight_name)
        shapes = {key: linear_shape(module) for key, module in self.linears().items()}
        lora = parse_lora(tensors, metadata, params, shapes, path)
        self._check_replacements(lora, path)
        self._check_widening(lora, path)
        fused = self.fused_originals is not None
        if fused:
            self.unfuse()
        self._widen(name, lora)
        self._add(name, lora, scale)
        if fused:
            self.fuse()
        return name

    def _new_name(self, name: str | None) -> str:
        if name is None:
            name = next(f"default_{i}" for i in range(len(self.scales) + 1) if f"default_{i}" not in self.scales)
        if not isinstance(name, str) or not name or name in self.scales:
            raise ValueError(f"adapter_name {name!r} is taken or empty: loaded adapters are {list(self.scales)}")
        return name

    def _check_replacements(self, lora: LoRAFile, source: str) -> None:
        params = self.parameters()
        for key, value in lora.replacements.items():
            if key not in params or params[key].shape != value.shape:
                found = list(params[key].shape) if key in params else "no such parameter"
                raise CheckpointError(f"{source}: {key.split('.', 1)[1]} {list(value.shape)} does not fit this "
                                      f"model ({found})")

    def _check_widening(self, lora: LoRAFile, source: str) -> None:
        features = lora.img_in_features
        widens = features is not None and features != linear_shape(self.components["transformer"].img_in)[1]
        # a second adapter on a widened img_in would outlive the widening when the first is unloaded
        if (widens or self.widened is not None) and features is not None and (
                self.widened is not None or isinstance(self.components["transformer"].img_in, LoRALinear)):
            holder = self.widened[0] if self.widened else ", ".join(self.wrappers()["transformer.img_in"].factors)
            raise CheckpointError(f"{source} adapts img_in ({features} channels), but adapter {holder} already "
                                  "adapts it and one of them is a control LoRA widening it: unload that first")

    def _widen(self, name: str, lora: LoRAFile) -> None:
        """A control LoRA's img_in takes [latents | control latents]: while it is loaded, img_in is a copy
        of the original with zero columns for the control channels (diffusers zero-pads it the same way),
        and the model's params say so; unloading puts the original module back, bit for bit."""
        model, features = self.components["transformer"], lora.img_in_features
        if features is None or features == linear_shape(model.img_in)[1]:
            return
        original = model.img_in
        widened = nn.Linear(features, original.out_features, original.bias is not None,
                            device=original.weight.device, dtype=original.weight.dtype)
        with torch.no_grad():
            widened.weight.zero_()[:, : original.in_features] = original.weight
            if original.bias is not None:
                widened.bias.copy_(original.bias)
        model.img_in, model.params = widened, replace(model.params, in_channels=features)
        self.widened = (name, original)

    def _narrow(self, names: list[str]) -> None:
        if self.widened is None or self.widened[0] not in names:
            return
        model, original = self.components["transformer"], self.widened[1]
        model.img_in, model.params = original, replace(model.params, in_channels=original.in_features)
        self.widened = None

    def _add(self, name: str, lora: LoRAFile, scale: float) -> None:
        self.scales[name], self.values[name] = {}, float(scale)
        linears = self.linears()
        for factor in lora.factors:
            wrapper = self._wrapper(factor.module, linears)
            device, dtype = _device_and_dtype(wrapper.base)
            for part in tensor_parallel_part(factor, getattr(wrapper.base, "tensor_shard", None)):
                wrapper.factors.setdefault(name, []).append(_moved(part, device, dtype))
            wrapper.scales[name] = self._scale(name, device, scale)
        params = self.parameters()
        with torch.no_grad():
            for key, value in lora.replacements.items():  # replacements, not scaled (BFL's QK norms)
                self.replaced.setdefault(key, (name, params[key].detach().to("cpu", copy=True)))
                params[key].copy_(value)

    def _wrapper(self, key: str, linears: dict[str, nn.Module]) -> LoRALinear:
        module = linears[key]
        if not isinstance(module, LoRALinear):
            component, name = key.split(".", 1)
            module = LoRALinear(module)
            _set_submodule(self.components[component], name, module)
            linears[key] = module
        return module

    def _scale(self, name: str, device: torch.device, value: float) -> Tensor:
        by_device = self.scales[name]
        if device not in by_device:
            by_device[device] = torch.tensor(float(value), device=device)
        return by_device[device]

    def set_scales(self, scales: dict[str, float]) -> None:
        unknown = [name for name in scales if name not in self.scales]
        if unknown:
            raise ValueError(f"no LoRA adapter named {', '.join(map(repr, unknown))}: loaded are {list(self.scales)}")
        for name, value in scales.items():
            _check_scale(name, value)
        fused = self.fused_originals is not None
        if fused:
            self.unfuse()
        for name, value in scales.items():
            self.values[name] = float(value)
            for tensor in self.scales[name].values():
                tensor.fill_(float(value))  # in place: modules and compiled graphs hold these tensors
        if fused:
            self.fuse()

    def wrappers(self) -> dict[str, LoRALinear]:
        return {key: m for key, m in self.linears().items() if isinstance(m, LoRALinear)}

    def fuse(self) -> None:
        """Merge every adapter into the weights (originals kept on the host until unfuse or unload)."""
        if self.fused_originals is not None:
            return
        plain = (nn.Linear, RowParallelLinear, GatheredLinear)
        if any(not isinstance(m.base, plain) for m in self.wrappers().values()):
            raise ValueError("fuse_lora needs plain linear layers; FP8 layers run LoRA unfused only")
        wrappers = {key: m for key, m in self.wrappers().items() if not m.weight.is_meta}  # a PipeFusion stage
        self.fused_originals = {}
        for key, wrapper in wrappers.items():
            bias = wrapper.bias
            self.fused_originals[key] = (wrapper.weight.detach().to("cpu", copy=True),
                                         None if bias is None else bias.detach().to("cpu", copy=True))
            wrapper.merge()

    def unfuse(self) -> None:
        """Copy the weights back from the host: the unfused model, bit for bit."""
        if self.fused_originals is None:
            return
        wrappers = self.wrappers()
        with torch.no_grad():
            for key, (weight, bias) in self.fused_originals.items():
                wrappers[key].weight.copy_(weight)
                if bias is not None:
                    wrappers[key].bias.copy_(bias)
                wrappers[key].fused = False
        self.fused_originals = None

    def unload(self, name: str | None = None) -> None:
        """Remove one adapter (all with None); linears left without any become the original modules."""
        if name is not None and name not in self.scales:
            raise ValueError(f"no LoRA adapter named {name!r}: loaded are {list(self.scales)}")
        names = list(self.scales) if name is None else [name]
        fused = self.fused_originals is not None
        self.unfuse()
        for key, wrapper in self.wrappers().items():
            for adapter in names:
                wrapper.factors.pop(adapter, None)
                wrapper.scales.pop(adapter, None)
            if not wrapper.factors:
                component, module = key.split(".", 1)
                _set_submodule(self.components[component], module, wrapper.base)
        self._restore_replaced(names)
        self._narrow(names)
        for adapter in names:
            del self.scales[adapter], self.values[adapter]
        if fused and self.scales:
            self.fuse()

    def _restore_replaced(self, names: list[str]) -> None:
        params = self.parameters()
        with torch.no_grad():
            for key, (adapter, original) in list(self.replaced.items()):
                if adapter in names:
                    params[key].copy_(original)
                    del self.replaced[key]


def _moved(factor: LoRAFactor, device: torch.device, dtype: torch.dtype) -> LoRAFactor:
    def move(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return LoRAFactor(factor.module, factor.rows, move(factor.down), move(factor.up), move(factor.bias), factor.scale)


def _check_scale(name: str, scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"the scale of LoRA adapter {name!r} must be a finite number, got {scale!r}")
