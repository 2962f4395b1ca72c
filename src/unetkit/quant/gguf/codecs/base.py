"""What every GGML block codec shares: the codec interface, shape checks and the bit-exact arithmetic helpers.

A codec is a pure pair of functions on *blocks* (see :mod:`unetkit.quant.gguf.qtypes` for the vocabulary)::

    quantize_blocks(x: (n, block_size) float32, out=None)  -> (n, type_size) uint8
    dequantize_blocks(b: (n, type_size) uint8)   -> (n, block_size) float32

Both are vectorised in torch across blocks and run on the device of their input (CPU or CUDA). Reproducing ggml's
reference encoders byte for byte needs the C code's float32 semantics, which torch does not give by default:

* every float32 sum must run strictly left to right (``((0 + t0) + t1) + ...``): torch reductions sum pairwise or in
  float64, so :func:`seq_sum` accumulates explicitly, vectorised across blocks and sequential over the elements;
* ``nearest_int`` is ggml's magic-number rounding (round half to even, garbage outside +-2**22): :func:`nearest_int`
  reproduces it bit for bit, garbage included; ``roundf`` (Q8_0) rounds half away from zero: :func:`roundf`;
* products keep the C evaluation order (``w*l*x`` is ``(w*l)*x``) and are written out one op at a time; no fused
  multiply-adds (torch's binary ops do not fuse across ops);
* ``sqrtf`` must be correctly rounded, and torch's float32 ``sqrt`` is not always (torch 2.13 on an AVX-512 CPU
  misrounds about 1 input in 5), so :func:`sqrt_f32` goes through float64 (exact after rounding back);
* division by a constant is done by a tensor, never a Python number (CUDA turns ``t / 3.0`` into ``t * (1/3.0)``);
* signed zeros matter where they reach the output (``-0.0`` stored as fp16 is byte 0x80), so maxima that C computes
  as ``if (v > m) m = v`` starting from ``0`` use :func:`pos_max`, and first-occurrence scans keep their first
  element (:func:`first_absmax`, :func:`col_absmax`).

Speed notes (CPU): torch's ``where``, comparisons and ``argmax`` are slow next to arithmetic, so selections go
through :func:`select_` (integer bit ops) and maxima through ``amax``/``amin``; int32 ops get tensor operands
rather than Python ints; chunk-sized temporaries live in :func:`scratch` buffers (fresh multi-MB allocations cost
page faults).
"""

from __future__ import annotations

import functools
import threading
from typing import ClassVar

import torch

from unetkit.errors import QuantError
from unetkit.quant.gguf.qtypes import QType
from unetkit.shapes import numel

__all__ = [
    "Codec",
    "check_blocks",
    "check_packed",
    "MAGIC",
    "nearest_int",
    "roundf",
    "seq_sum",
    "select_",
    "sqrt_f32",
    "fconst",
    "fp16_bytes",
    "fp16_round",
    "fp16_from_bytes",
    "first_absmax",
    "col_absmax",
    "pos_max",
    "scratch",
]

MAGIC = 12582912.0
"""1.5 * 2**23: ggml's ``nearest_int`` adds it so that the float's mantissa holds the rounded integer."""


class Codec:
    """One GGML block type: a pure ``quantize_blocks`` / ``dequantize_blocks`` pair plus what it matches.

    Subclasses set ``qtype``, ``reference`` (the ggml function(s) the encoder reproduces), ``bit_exact`` and
    ``chunk_blocks`` (how many blocks the public API hands over at once: big enough to amortise torch's per-op
    overhead, small enough to stay in cache and bound the temporaries).
    """

    qtype: ClassVar[QType]
    reference: ClassVar[str]
    bit_exact: ClassVar[bool] = True
    chunk_blocks: ClassVar[int] = 16384

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        """``(n, block_size)`` float32 -> ``(n, type_size)`` uint8 (written into ``out`` when given)."""
        raise NotImplementedError

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """``(n, type_size)`` uint8 -> ``(n, block_size)`` float32."""
        raise NotImplementedError

    @classmethod
    def dequantize_into(cls, b: torch.Tensor, out: torch.Tensor) -> None:
        """:meth:`dequantize_blocks` written into ``out`` ((n, block_size), any float dtype: the float32 values
        are cast once). Codecs whose decode is one product override it to skip the temporaries."""
        out.copy_(cls.dequantize_blocks(b))

    @classmethod
    def encode(cls, x: torch.Tensor) -> torch.Tensor:
        """Checked :meth:`quantize_blocks`: ``x`` must be ``(n, block_size)`` float32."""
        check_blocks(x, cls.qtype)
        return cls.quantize_blocks(x)

    @classmethod
    def decode(cls, b: torch.Tensor) -> torch.Tensor:
        """Checked :meth:`dequantize_blocks`: ``b`` must be ``(n, type_size)`` uint8."""
        check_packed(b, cls.qtype)
        return cls.dequantize_blocks(b)


def check_blocks(x: torch.Tensor, qtype: QType) -> None:
    """Raise :class:`QuantError` unless ``x`` is a 2-D float32 tensor of ``qtype`` blocks."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != qtype.block_size:
        what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise QuantError(
            f"{qtype.name} quantize_blocks expects a float32 tensor of shape (n, {qtype.block_size}), got a {what}"
        )


def check_packed(b: torch.Tensor, qtype: QType) -> None:
    """Raise :class:`QuantError` unless ``b`` is a 2-D uint8 tensor of ``qtype`` blocks."""
    if not isinstance(b, torch.Tensor) or b.dtype != torch.uint8 or b.dim() != 2 or b.shape[1] != qtype.type_size:
        what = f"{b.dtype} tensor of shape {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
        raise QuantError(
            f"{qtype.name} dequantize_blocks expects a uint8 tensor of shape (n, {qtype.type_size}), got a {what}"
        )


# --------------------------------------------------------------------------------------------------------------------
# scratch memory

_tls = threading.local()


def scratch(key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable, uninitialised buffer of ``shape``: one per (thread, key, dtype, device), grown on demand.

    Chunk-sized temporaries allocated afresh for every chunk come from newly mapped pages (glibc maps big blocks
    and trims the heap when they are freed), and the page faults cost more than the arithmetic; codecs therefore
    write their large intermediates into these. A caller must not hold two live views of the same key.
    """
    cache = getattr(_tls, "cache", None)
    if cache is None:
        cache = _tls.cache = {}
    k = (key, dtype, torch.device(device))
    n = numel(shape)
    buf = cache.get(k)
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, 1), dtype=dtype, device=device)
        cache[k] = buf
    return buf[:n].view(shape)


# --------------------------------------------------------------------------------------------------------------------
# rounding


@functools.lru_cache(maxsize=64)
def _i32(value: int, device: torch.device) -> torch.Tensor:
    # a one-element int32 operand: torch's int32 kernels are several times slower with a Python int operand
    return torch.full((1,), value, dtype=torch.int32, device=device)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` bit for bit: ``(bits(v + 1.5*2**23) & 0x7fffff) - 0x400000`` as int32.

    Round half to even for ``|v| < 2**22``; outside that range (and for inf/NaN) it returns the same garbage in
    ``[-2**22, 2**22)`` that the C code returns (with assertions off, as in release builds).
    """
    i = (v + MAGIC).view(torch.int32)
    i = i & _i32(0x7FFFFF, v.device)
    i -= _i32(0x400000, v.device)
    return i


def roundf(q: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero) for ``|q| < 2**23``, as float32.

    ``trunc(q + copysign(0.5 - 2**-25, q))``: adding the largest float below one half never carries a value whose
    fraction is below 0.5 over the next integer, and always carries one whose fraction is 0.5 or more.
    """
    h = torch.copysign(fconst(0.5 - 2.0**-25, q), q)
    h.add_(q)
    return h.trunc_()


# --------------------------------------------------------------------------------------------------------------------
# arithmetic


@functools.lru_cache(maxsize=64)
def _zero_index(n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long, device=device)


def _seq_sum_loop(terms: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    for j in range(terms.shape[0]):
        acc += terms[j]
    return acc


def _seq_sum_index_add(terms: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    # index_add_ with an all-zero index accumulates source slices into one slice in index order, in the source
    # dtype (on CPU: a sequence of float32 adds reusing one TensorIterator), i.e. exactly the C loop.
    acc = acc.unsqueeze(0)
    acc.index_add_(0, _zero_index(terms.shape[0], terms.device), terms)
    return acc[0]


@functools.lru_cache(maxsize=1)
def _index_add_is_sequential() -> bool:
    """Check once that this torch's CPU ``index_add_`` sums in order in float32 (it is the fast path of seq_sum)."""
    g = torch.Generator().manual_seed(1234)
    for shape in ((32, 3, 2048), (16, 40000)):
        t = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 4)
        ref = _seq_sum_loop(t, torch.zeros(shape[1:]))
        got = _seq_sum_index_add(t, torch.zeros(shape[1:]))
        if not torch.equal(ref.view(torch.int32), got.view(torch.int32)):
            return False
    return True


def seq_sum(terms: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
    """Sum ``terms`` over dim 0 strictly left to right in float32: ``((init + t[0]) + t[1]) + ...``.

    ``init`` defaults to +0.0, like ``float sum = 0; for (...) sum += t;`` in C. Vectorised over the other dims.
    """
    return seq_sum_into(torch.empty(terms.shape[1:], dtype=terms.dtype, device=terms.device), terms, init)


def seq_sum_into(acc: torch.Tensor, terms: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`seq_sum` of ``terms`` (n, *shape) written into the preallocated ``acc`` (*shape); returns ``acc``."""
    acc.zero_() if init is None else acc.copy_(init)
    if terms.shape[0] == 0:
        return acc
    if terms.device.type == "cpu" and _index_add_is_sequential():
        _seq_sum_index_add(terms, acc)
        return acc
    return _seq_sum_loop(terms, acc)


def select_(dst: torch.Tensor, cond: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst = where(cond, src, dst)`` in place, bit for bit (float32), ``cond`` broadcasting over leading dims.

    Done with integer xor/and on the bit patterns: torch's CPU ``where`` is several times slower.
    """
    mask = cond.to(torch.int32).neg_()  # all ones where cond
    d = dst.view(torch.int32)
    flip = src.view(torch.int32) ^ d
    flip &= mask
    d ^= flip
    return dst


def sqrt_f32(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C ``sqrtf``), via float64."""
    return torch.sqrt(v.double()).float()


def fconst(value: float, like: torch.Tensor) -> torch.Tensor:
    """A one-element float32 tensor on ``like``'s device (divide by this, not by a Python float)."""
    return torch.full((1,), value, dtype=torch.float32, device=like.device)


def first_absmax(x: torch.Tensor, nan_safe: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(amax, max)`` per row as ggml scans it: ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` from 0.

    ``max`` is the signed value of the first element of largest magnitude (+0.0 if the row is all zeros). With
    ``nan_safe`` NaNs are skipped as the C comparison skips them (torch's argmax would pick them); inputs known to be
    NaN-free can leave it off. For big NaN-free inputs prefer :func:`col_absmax` (no argmax).
    """
    a = x.abs()
    if nan_safe:
        a = torch.nan_to_num(a, nan=0.0, posinf=float("inf"))
    i = a.argmax(dim=-1, keepdim=True)  # first occurrence
    amax = a.gather(-1, i).squeeze(-1)
    mx = x.gather(-1, i).squeeze(-1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return amax, torch.where(amax > 0, mx, zero)


def col_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`first_absmax` over the columns of a NaN-free ``(n, S)`` matrix, from two fast reductions.

    The signed value of largest magnitude is the max or the min unless a column holds both ``+a`` and ``-a``; only
    those columns (rare) need the first occurrence, found by argmax.
    """
    mx = x.amax(0)
    mn = x.amin(0)
    nmn = mn.neg()
    amax = torch.maximum(mx, nmn).add_(0.0)  # +0.0 for an all-zero column
    signed = torch.where(nmn > mx, mn, mx)
    tie = (nmn == mx) & (mx > 0)
    if bool(tie.any()):
        cols = tie.nonzero().squeeze(1)
        signed[cols] = first_absmax(x[:, cols].t())[1]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return amax, torch.where(amax > 0, signed, zero)


def pos_max(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``m = 0; for (...) if (v > m) m = v;``: the largest positive value (NaNs skipped), else +0.0 (never -0.0)."""
    m = torch.nan_to_num(v, nan=0.0, posinf=float("inf"), neginf=float("-inf")).amax(dim=dim)
    return torch.where(m > 0, m, torch.zeros((), dtype=v.dtype, device=v.device))


# --------------------------------------------------------------------------------------------------------------------
# byte packing (little-endian, as GGUF)


def fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 ``(n,)`` -> ggml_fp16_t bytes ``(n, 2)`` (round to nearest even, overflow to inf)."""
    return v.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def fp16_round(v: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``."""
    return v.to(torch.float16).to(torch.float32)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``(n, 2)`` -> float32 ``(n,)``."""
    return b.contiguous().view(torch.float16).view(-1).to(torch.float32)
