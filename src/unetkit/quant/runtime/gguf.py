"""GGUF on the fly: Linear and Conv2d layers that keep their weight in GGUF blocks and decode it in forward.

Resident memory stays close to the file size (the packed bytes are memory-mapped from the file). Decoding goes
through the same ``dequantize`` as ``dequantize="load"`` and then casts to the compute dtype, so both modes give
the same output bit for bit."""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from unetkit.quant.gguf import dequantize


_tls = threading.local()


def _buffer(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's decode buffer for (dtype, device), grown to the largest weight seen."""
    cache = getattr(_tls, "buffers", None)
    if cache is None:
        cache = _tls.buffers = {}
    buf = cache.get((dtype, device))
    if buf is None or buf.numel() < n:
        size = max(n, 2 * buf.numel()) if buf is not None else n  # few regrowths within one forward
        buf = cache[(dtype, device)] = torch.empty(size, dtype=dtype, device=device)
    return buf


def release_buffers(*_: object) -> None:
    """Drop this thread's decode buffers: a forward hook on the whole UNet calls it, so no decoded weight stays
    resident between forwards (re-mapping the buffer costs about 1 % of a forward)."""
    getattr(_tls, "buffers", {}).clear()


class GGUFWeight(nn.Module):
    """Shared part: the packed bytes, the qtype and the shapes."""

    def __init__(self, packed: torch.Tensor, qtype: str, shape: tuple[int, ...], stored_shape: tuple[int, ...],
                 bias: torch.Tensor | None):
        super().__init__()
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
        n = math.prod(self.stored_shape)
        buf = _buffer(n, dtype, self.packed.device)
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


def swap_module(model: nn.Module, module_name: str, packed: torch.Tensor, qtype: str, shape, stored_shape,
                bias: torch.Tensor | None) -> nn.Module:
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
