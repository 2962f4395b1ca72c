"""GGUF on the fly: Linear and Conv2d layers that keep their weight in GGUF blocks and decode it in forward.

Resident memory stays close to the file size (the packed bytes are memory-mapped from the file). Decoding goes
through the same ``dequantize`` as ``dequantize="load"`` and then casts to the compute dtype, so both modes give
the same output bit for bit."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unetkit.quant.gguf import dequantize
from unetkit.quant.runtime import scratch
from unetkit.quant.runtime.base import Candidate, ModuleDecision
from unetkit.shapes import numel


class GGUFWeight(nn.Module):
    """Shared part: the packed bytes, the qtype and the shapes."""

    def __init__(
        self,
        packed: torch.Tensor,
        qtype: str,
        shape: tuple[int, ...],
        stored_shape: tuple[int, ...],
        bias: torch.Tensor | None,
    ):
        super().__init__()
        self.packed: torch.Tensor
        self.register_buffer("packed", packed, persistent=False)
        self.qtype, self.shape, self.stored_shape = qtype, tuple(shape), tuple(stored_shape)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        if torch.is_grad_enabled():  # autograd may keep the weight for backward: a tensor of its own
            w = dequantize(self.packed, self.qtype, self.stored_shape).reshape(self.shape)
            return w if w.dtype == dtype else w.to(dtype)
        # Inference: every layer decodes into one reused buffer. A fresh multi-MB tensor per layer and forward comes
        # from newly mapped pages, and faulting those in cost more than the decode (SD1.5 Q8_0: 1.36x fp32 -> see
        # BENCHMARKS.md). The weight is consumed by the layer's op before the next layer decodes.
        n = numel(self.stored_shape)
        buf = scratch.buffer(n, dtype, self.packed.device)
        w = buf[:n].view(self.stored_shape)
        dequantize(self.packed, self.qtype, self.stored_shape, dtype, out=w)
        return w.view(self.shape)

    def extra_repr(self) -> str:
        return f"qtype={self.qtype}, shape={list(self.shape)}"


class GGUFLinear(GGUFWeight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight_as(x.dtype), bias)


class GGUFConv2d(GGUFWeight):
    def __init__(self, conv: nn.Conv2d, *args):
        super().__init__(*args)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise NotImplementedError("GGUFConv2d supports zero padding only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.conv2d(x, self.weight_as(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups)


def swap_module(
    model: nn.Module, module_name: str, packed: torch.Tensor, qtype: str, shape, stored_shape, bias: torch.Tensor | None
) -> nn.Module:
    """Replace ``model.<module_name>`` (an nn.Linear or nn.Conv2d, possibly on meta) by its GGUF twin."""
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if isinstance(old, nn.Linear):
        new: nn.Module = GGUFLinear(packed, qtype, shape, stored_shape, bias)
    elif isinstance(old, nn.Conv2d):
        new = GGUFConv2d(old, packed, qtype, shape, stored_shape, bias)
    else:
        raise TypeError(f"{module_name} is a {type(old).__name__}, not Linear/Conv2d")
    setattr(parent, child, new)
    return new


class GGUFBackend:
    """GGUF blocks kept packed in memory and decoded in forward, behind the same interface as torchao and quanto.

    ``attach`` is what ``load_unet(gguf, dequantize="on-the-fly")`` uses for the packed bytes of a file; ``apply``
    encodes the weights of a live UNet with unetkit's bit-exact codecs (scheme = a ggml block type); ``export`` and
    ``rebuild`` store the packed bytes as plain uint8 tensors and put them back."""

    name = "gguf"

    @property
    def schemes(self) -> dict[str, str]:
        from unetkit.quant.gguf.qtypes import QTYPES

        return {
            q.name: f"GGUF {q.name} blocks ({q.bits_per_weight:g} bits per weight), decoded in forward"
            for q in QTYPES
            if not q.is_float
        }

    def describe(self) -> str:
        return "gguf on the fly: " + ", ".join(self.schemes)

    def versions(self) -> dict[str, str]:
        return {}  # unetkit's own codecs: the unetkit version recorded beside it says it all

    def check_available(self, scheme: str, unet: nn.Module | None = None) -> None:
        if scheme not in self.schemes:
            from unetkit.errors import QuantError

            raise QuantError(f"unknown GGUF block type {scheme!r}; known: {', '.join(self.schemes)}")

    def attach(
        self,
        model: nn.Module,
        module_name: str,
        packed: torch.Tensor,
        qtype: str,
        shape: tuple[int, ...],
        stored_shape: tuple[int, ...],
        bias: torch.Tensor | None,
    ) -> None:
        """Replace ``model.<module_name>`` (Linear or Conv2d, possibly on meta) by its on-the-fly twin; the first
        attach also hooks the model so that the per-layer decode buffer does not outlive a forward."""
        swap_module(model, module_name, packed, qtype, tuple(shape), tuple(stored_shape), bias)
        if not getattr(model, "_unetkit_gguf_hook", False):
            model.register_forward_hook(scratch.release)
            setattr(model, "_unetkit_gguf_hook", True)  # noqa: B010 (a plain attribute, not a submodule)

    def apply(self, unet: nn.Module, scheme: str, candidates: list[Candidate]) -> list[ModuleDecision]:
        from unetkit.quant.gguf import quantize
        from unetkit.quant.gguf.policy import fit

        self.check_available(scheme)
        decisions = []
        for c in candidates:
            if not c.want:
                decisions.append(c.decision(False, c.reason))
                continue
            module: Any = c.module  # a Linear or a Conv2d
            w = module.weight.detach()
            dec = fit(c.name + ".weight", tuple(w.shape), scheme, f"GGUF {scheme} on the fly")
            if dec.qtype != scheme:
                decisions.append(c.decision(False, dec.reason))
                continue
            packed = quantize(w.float().reshape(dec.stored_shape), scheme, name=c.name + ".weight")
            bias = module.bias.detach() if module.bias is not None else None
            decision = c.decision(True, ((c.reason + "; ") if c.reason else "") + dec.reason)
            self.attach(
                unet, c.name, packed.reshape(-1, packed.shape[-1]), scheme, tuple(w.shape), dec.stored_shape, bias
            )
            decisions.append(decision)
        return decisions

    def export(self, unet: nn.Module, decisions: list[ModuleDecision]) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {k: v.contiguous() for k, v in unet.state_dict().items()}
        state: dict[str, dict] = {}
        for name, module in unet.named_modules():
            if isinstance(module, GGUFWeight):
                tensors[name + ".weight"] = module.packed.contiguous()
                state[name] = {
                    "qtype": module.qtype,
                    "shape": list(module.shape),
                    "stored_shape": list(module.stored_shape),
                }
        expected = {d.name for d in decisions if d.quantized}
        if set(state) != expected:  # a bug, not a user error
            raise RuntimeError(f"GGUF modules {sorted(set(state) ^ expected)[:5]} disagree with the decisions")
        return tensors, {"modules": state}

    def rebuild(
        self,
        model: nn.Module,
        scheme: str,
        decisions: list[ModuleDecision],
        tensors: dict[str, torch.Tensor],
        state: dict,
        where: str,
    ) -> None:
        from unetkit.errors import FormatError, KeyMapError, list_some
        from unetkit.quant.gguf.qtypes import n_bytes

        modules: dict[str, dict] = dict(state.get("modules", {}))
        expected = {d.name for d in decisions if d.quantized}
        if set(modules) != expected:
            raise FormatError(
                f"{where}: backend_state.modules disagrees with the quantized modules: "
                f"{list_some(sorted(set(modules) ^ expected))}"
            )
        tensors = dict(tensors)
        for name, info in modules.items():
            packed = tensors.pop(name + ".weight", None)
            want = n_bytes(info["qtype"], info["stored_shape"])
            if packed is None or packed.dtype != torch.uint8 or packed.numel() != want:
                raise KeyMapError(f"{where}: tensor {name}.weight: expected {want} bytes of {info['qtype']} blocks")
            self.attach(
                model,
                name,
                packed,
                info["qtype"],
                tuple(info["shape"]),
                tuple(info["stored_shape"]),
                tensors.pop(name + ".bias", None),
            )
        result = model.load_state_dict(tensors, strict=False, assign=True)
        attached = {f"{m}.{leaf}" for m in modules for leaf in ("weight", "bias")}
        missing = [k for k in result.missing_keys if k not in attached]
        if missing or result.unexpected_keys:
            raise KeyMapError(
                f"{where}: missing tensors {list_some(missing)}; unexpected tensors {list_some(result.unexpected_keys)}"
            )
