"""Error measures for a lossy step: every one is reported as SQNR dB, cosine, relative L2 and max abs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ErrorStats:
    sqnr_db: float  # 10 log10(|ref|^2 / |x - ref|^2); inf when identical
    cosine: float
    rel_l2: float  # |x - ref| / |ref|
    max_abs: float
    identical: bool  # torch.equal: same values bit for bit

    def to_dict(self) -> dict:
        d = asdict(self)
        if math.isinf(self.sqnr_db):  # JSON has no inf; "identical" says it
            d["sqnr_db"] = None
        return d

    def __str__(self) -> str:
        if self.identical:
            return "bit-identical"
        return (
            f"SQNR {self.sqnr_db:.1f} dB, cosine {self.cosine:.6f}, rel L2 {self.rel_l2:.3g}, "
            f"max abs {self.max_abs:.3g}"
        )


def compare(ref: torch.Tensor, x: torch.Tensor) -> ErrorStats:
    """Error of ``x`` against ``ref`` (same shape), computed in float64."""
    if ref.shape != x.shape:
        raise ValueError(f"shapes differ: reference {tuple(ref.shape)}, candidate {tuple(x.shape)}")
    identical = bool(torch.equal(ref, x))
    r, c = ref.detach().double().flatten(), x.detach().double().flatten()
    err = c - r
    signal, noise = float(r.pow(2).sum()), float(err.pow(2).sum())
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    denom = float(r.norm() * c.norm())
    cosine = float(r @ c) / denom if denom > 0 else (1.0 if noise == 0 else 0.0)
    return ErrorStats(
        sqnr_db=sqnr,
        cosine=cosine,
        rel_l2=math.sqrt(noise / signal) if signal > 0 else math.inf,
        max_abs=float(err.abs().max()) if err.numel() else 0.0,
        identical=identical,
    )


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: a plain tensor its elements, a tensor subclass (torchao, optimum-quanto) the
    sum of its stored parts (``__tensor_flatten__``: int data, scales, zero points)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(stored_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)


def weight_bytes(model: torch.nn.Module) -> int:
    """Resident bytes of a model's parameters and buffers, quantized ones counted as stored (each tensor once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += stored_bytes(t)
    return total
