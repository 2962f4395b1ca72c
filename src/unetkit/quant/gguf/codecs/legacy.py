"""The 32-element block types: Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 (ggml ``quantize_row_q*_ref``).

All five encoders reproduce ggml's reference bytes exactly (and so gguf-py's ``gguf.quants.quantize``). Each is a
handful of vectorised passes: the per-block maximum/minimum does not depend on summation order, so no sequential
loops are needed here.

C conversion semantics kept:

* ``(int8_t)(float)`` truncates toward zero; ``uint8_t`` stores wrap;
* ``roundf`` (Q8_0) rounds half away from zero;
* ``d ? 1.0f/d : 0.0f``: a zero scale encodes every quant as the offset.

Inputs are assumed finite (the public :func:`unetkit.quant.gguf.quantize` rejects NaN/inf before calling a codec).
A block whose scale is so tiny (subnormal) that ``1/d`` overflows to inf takes a slow path that reproduces what the
x86-64 build of ggml stores for the resulting inf/NaN conversions (0 after truncation to 8 bits).
"""

from __future__ import annotations

import sys

import torch

from unetkit.quant.gguf.codecs.base import (
    Codec,
    fconst,
    first_absmax,
    fp16_bytes,
    fp16_from_bytes,
    roundf,
    scratch,
    select_,
)
from unetkit.quant.gguf.qtypes import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

__all__ = ["Q8_0Codec", "Q4_0Codec", "Q4_1Codec", "Q5_0Codec", "Q5_1Codec"]

assert sys.byteorder == "little", "the GGML codecs read multi-byte words in little-endian order"

_INT_MIN = -2147483648.0
_HALF_DOWN = 0.5 - 2.0**-25  # the largest float32 below 0.5


def _inv_scale(d: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``d ? 1.0f/d : 0.0f`` and whether every result is finite (false only for subnormal ``d``)."""
    inv = fconst(1.0, d) / d
    if bool(torch.isfinite(inv).logical_or_(d == 0).all()):
        return inv.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), True  # only d == 0 gave 1/d = +-inf
    inv = torch.where(d != 0, inv, torch.zeros((), dtype=d.dtype, device=d.device))
    return inv, False


def _c_int8(v: torch.Tensor) -> torch.Tensor:
    """``(int8_t)v`` for a float32 as x86-64 code does it: truncate to int32 (INT_MIN when out of range or NaN),
    keep the low byte, read it signed. Returns int32."""
    ok = v.abs() < 2147483648.0
    i = torch.where(ok, v, torch.full((), _INT_MIN, device=v.device)).to(torch.int32)
    return ((i & 0xFF) ^ 0x80) - 0x80


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The ``max`` of ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` (from 0) for each row of ``x``.

    Two reductions decide it except in rows holding both ``+a`` and ``-a`` as largest magnitude, where the first one
    wins: those rows (rare) go through an argmax.
    """
    mx = x.amax(1)
    mn = x.amin(1)
    nmn = mn.neg()
    out = select_(mx.clone(), nmn > mx, mn)
    tie = (nmn == mx) & (mx > 0)
    if bool(tie.any()):
        rows = tie.nonzero().squeeze(1)
        out[rows] = first_absmax(x[rows])[1]
    return out.add_(0.0)  # an all-zero row gives +0.0 (never -0.0)


def _first_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``min``/``max`` of the C scans ``if (v < min) min = v`` / ``if (v > max) max = v``.

    The values are the reductions' except for the sign of a zero extreme, which is the sign of the *first* zero in
    the row: rows whose min or max is zero go through argmin/argmax (first occurrence).
    """
    mn = x.amin(1)
    mx = x.amax(1)
    z = (mn == 0) | (mx == 0)
    if bool(z.any()):
        rows = z.nonzero().squeeze(1)
        sub = x[rows]
        mn[rows] = sub.gather(1, sub.argmin(1, keepdim=True)).squeeze(1)
        mx[rows] = sub.gather(1, sub.argmax(1, keepdim=True)).squeeze(1)
    return mn, mx


def _quants(
    x: torch.Tensor, mn: torch.Tensor | None, inv: torch.Tensor, offset: float, qmax: int | None, fast: bool
) -> torch.Tensor:
    """``MIN(qmax, (int8_t)((x - mn)*inv + offset))`` (``qmax=None``: no MIN) stored as bytes: (n, 32) int8.

    On the fast path every value lies in [0, qmax + 1.5), so float->int8 conversion is the C truncation.
    """
    q = scratch("legacy.q", tuple(x.shape), torch.float32, x.device)
    if mn is None:
        torch.mul(x, inv[:, None], out=q)  # x[j]*id
    else:
        torch.sub(x, mn[:, None], out=q)  # (x[j] - min)*id
        q *= inv[:, None]
    q += offset
    if fast:
        qi = scratch("legacy.qi", tuple(x.shape), torch.int8, x.device)
        qi.copy_(q)
        if qmax is not None:
            qi.clamp_(max=qmax)
        return qi
    qi = _c_int8(q)
    if qmax is not None:
        qi = qi.clamp(max=qmax)
    return qi.to(torch.int8)


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F
_PACK_BITS = 0x0102040810204080  # (bytes of 0/1) * this >> 56: byte b becomes bit b


def _c64(v: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v - (1 << 64) if v >= 1 << 63 else v, dtype=torch.int64, device=like.device)


def _nibbles(q: torch.Tensor, mask: bool, fast: bool) -> torch.Tensor:
    """32 quants (n, 32) int8 -> 16 bytes: element j in the low nibble of byte j, element j+16 in its high nibble.

    Q4_0/Q4_1 store ``q[j] | q[j+16] << 4`` unmasked (their quants are <= 15), Q5_0/Q5_1 mask both with 0x0F.
    Works on 8 bytes at a time (int64 views); shifting by 4 inside a byte never carries when the value is < 16.
    """
    if not mask and not fast:  # garbage bytes of the subnormal-scale path may exceed 15: byte-wise, as C
        qu = q.view(torch.uint8)
        return qu[:, :16] | (qu[:, 16:] << 4)
    q64 = q.contiguous().view(torch.int64)  # (n, 4): elements 0-7, 8-15, 16-23, 24-31
    lo, hi = q64[:, :2], q64[:, 2:]
    if mask:
        m = _c64(_LOW_NIBBLES, q)
        lo, hi = lo & m, hi & m
    return (lo | (hi << 4)).view(torch.uint8)


def _fifth_bits(q: torch.Tensor, fast: bool) -> torch.Tensor:
    """Bit 4 of each of the 32 quants -> little-endian uint32 ``qh`` (element j at bit j), as 4 bytes.

    Eight 0/1 bytes read as one int64, times 0x0102040810204080, hold the 8 bits in their top byte (the partial
    products never collide, and the wrapped-off part is discarded).
    """
    bits = q.view(torch.uint8) >> 4  # 0/1 on the fast path (quants <= 31)
    if not fast:
        bits &= 1
    packed = bits.view(torch.int64) * _c64(_PACK_BITS, q)
    return packed.view(torch.uint8).view(-1, 4, 8)[:, :, 7]  # the top byte of each little-endian int64


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values (uint8), inverse of :func:`_nibbles`."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _unpack_fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes ``qh`` -> the 32 fifth bits, already shifted to 0x10 (uint8)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return (((qh.unsqueeze(-1) >> shifts) & 1) << 4).reshape(-1, 32)


def _output(x: torch.Tensor, out: torch.Tensor | None, type_size: int) -> torch.Tensor:
    if out is None:
        return torch.empty((x.shape[0], type_size), dtype=torch.uint8, device=x.device)
    return out


def _halfwords(out: torch.Tensor) -> torch.Tensor | None:
    """``out`` (n, type_size) uint8 seen as 16-bit words, when its layout allows (fewer, wider strided copies)."""
    try:
        return out.view(torch.int16)
    except RuntimeError:
        return None


def _put_fp16(out: torch.Tensor, words: torch.Tensor | None, byte: int, v: torch.Tensor) -> None:
    """Store float32 ``v`` (n,) as fp16 at byte offset ``byte`` (even) of each row."""
    if words is not None:
        words.view(torch.float16)[:, byte // 2].copy_(v)
    else:
        out[:, byte : byte + 2] = fp16_bytes(v)


def _put_bytes(out: torch.Tensor, words: torch.Tensor | None, byte: int, b: torch.Tensor) -> None:
    """Store bytes ``b`` (n, k) at byte offset ``byte`` (even, k even) of each row."""
    if words is not None:
        words[:, byte // 2 : (byte + b.shape[1]) // 2].copy_(b.contiguous().view(torch.int16))
    else:
        out[:, byte : byte + b.shape[1]] = b


class Q8_0Codec(Codec):
    """Q8_0: 32 int8 quants and one fp16 scale ``d = max|x| / 127``; ``q = roundf(x * (1/d))``. Bit-exact.

    Matches ``quantize_row_q8_0_ref`` / ``dequantize_row_q8_0`` (ggml-quants.c). 34 bytes per 32 elements::

        byte  0      2                                         34
             +------+-----------------------------------------+
             |  d   | qs[0] qs[1] ...                  qs[31] |
             +------+-----------------------------------------+
              fp16    int8 quants, element j = qs[j] * d
    """

    qtype = Q8_0
    reference = "quantize_row_q8_0_ref / dequantize_row_q8_0"
    chunk_blocks = 32768

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = _output(x, out, 34)
        amax = torch.maximum(x.amax(1), x.amin(1).neg_()).add_(0.0)  # MAX(amax, fabsf(v)) from +0
        d = amax / fconst(127.0, x)
        inv, fast = _inv_scale(d)
        words = _halfwords(out)
        _put_fp16(out, words, 0, d)
        q = torch.mul(x, inv[:, None], out=scratch("legacy.q", tuple(x.shape), torch.float32, x.device))
        if fast:  # roundf: add 0.5 - 2**-25 with the sign of q, then truncate (the int8 conversion)
            h = torch.sign(q, out=scratch("legacy.h", tuple(x.shape), torch.float32, x.device))
            h *= _HALF_DOWN
            q += h
            out[:, 2:].view(torch.int8).copy_(q)
        else:  # inf/NaN quants: (int8_t) of a non-finite float is 0 on x86-64
            out[:, 2:] = (_c_int8(roundf(q)) & 0xFF).to(torch.uint8)
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        d = fp16_from_bytes(b[:, :2])
        q = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
        return q * d[:, None]

    @classmethod
    def dequantize_into(cls, b: torch.Tensor, out: torch.Tensor) -> None:
        # one pass: int8 * float32 promotes per element to float32 (exact int8 -> float32, then the same product as
        # dequantize_blocks), stored once; the on-the-fly layers decode every weight on every forward through here
        if out.dtype != torch.float32:
            return super().dequantize_into(b, out)
        torch.mul(b[:, 2:].view(torch.int8), fp16_from_bytes(b[:, :2])[:, None], out=out)


class Q4_0Codec(Codec):
    """Q4_0: 32 4-bit quants, fp16 scale ``d = max / -8`` (``max``: the signed value of largest magnitude).

    ``q = MIN(15, (int8_t)(x*id + 8.5))`` with ``id = 1/d``, element = ``(q - 8) * d``. Bit-exact; matches
    ``quantize_row_q4_0_ref`` / ``dequantize_row_q4_0``. 18 bytes per 32 elements::

        byte  0      2                                     18
             +------+-------------------------------------+
             |  d   | qs[0] ... qs[15]                    |
             +------+-------------------------------------+
              fp16   qs[j] = q[j] | q[j+16] << 4  (low nibble: first half of the block)
    """

    qtype = Q4_0
    reference = "quantize_row_q4_0_ref / dequantize_row_q4_0"
    chunk_blocks = 32768

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = _output(x, out, 18)
        d = _signed_absmax(x) / fconst(-8.0, x)
        inv, fast = _inv_scale(d)
        q = _quants(x, None, inv, 8.5, 15, fast)
        words = _halfwords(out)
        _put_fp16(out, words, 0, d)
        _put_bytes(out, words, 2, _nibbles(q, False, fast))
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        d = fp16_from_bytes(b[:, :2])
        q = _unpack_nibbles(b[:, 2:]).to(torch.float32) - 8.0
        return q * d[:, None]


class Q4_1Codec(Codec):
    """Q4_1: 32 4-bit quants with fp16 scale ``d = (max - min) / 15`` and fp16 offset ``m = min``.

    ``q = MIN(15, (int8_t)((x - min)*id + 0.5))`` with ``id = 1/d``, element = ``q * d + m``. Bit-exact; matches
    ``quantize_row_q4_1_ref`` / ``dequantize_row_q4_1``. 20 bytes per 32 elements::

        byte  0      2      4                               20
             +------+------+-------------------------------+
             |  d   |  m   | qs[0] ... qs[15]              |
             +------+------+-------------------------------+
              fp16   fp16   qs[j] = q[j] | q[j+16] << 4
    """

    qtype = Q4_1
    reference = "quantize_row_q4_1_ref / dequantize_row_q4_1"
    chunk_blocks = 32768

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = _output(x, out, 20)
        mn, mx = _first_min_max(x)
        d = (mx - mn) / fconst(15.0, x)
        inv, fast = _inv_scale(d)
        q = _quants(x, mn, inv, 0.5, 15, fast)
        words = _halfwords(out)
        _put_fp16(out, words, 0, d)
        _put_fp16(out, words, 2, mn)
        _put_bytes(out, words, 4, _nibbles(q, False, fast))
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        d = fp16_from_bytes(b[:, :2])
        m = fp16_from_bytes(b[:, 2:4])
        q = _unpack_nibbles(b[:, 4:]).to(torch.float32)
        return q * d[:, None] + m[:, None]


class Q5_0Codec(Codec):
    """Q5_0: 32 5-bit quants, fp16 scale ``d = max / -16``; ``q = MIN(31, (int8_t)(x*id + 16.5))``, ``id = 1/d``.

    Element = ``(q - 16) * d``. Bit-exact; matches ``quantize_row_q5_0_ref`` / ``dequantize_row_q5_0``.
    22 bytes per 32 elements::

        byte  0      2             6                              22
             +------+-------------+------------------------------+
             |  d   |     qh      | qs[0] ... qs[15]             |
             +------+-------------+------------------------------+
              fp16   uint32 LE:    qs[j] = (q[j] & 15) | (q[j+16] & 15) << 4
                     bit j = bit 4 of q[j]
    """

    qtype = Q5_0
    reference = "quantize_row_q5_0_ref / dequantize_row_q5_0"
    chunk_blocks = 32768

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = _output(x, out, 22)
        d = _signed_absmax(x) / fconst(-16.0, x)
        inv, fast = _inv_scale(d)
        q = _quants(x, None, inv, 16.5, 31, fast)
        words = _halfwords(out)
        _put_fp16(out, words, 0, d)
        _put_bytes(out, words, 2, _fifth_bits(q, fast))
        _put_bytes(out, words, 6, _nibbles(q, True, fast))
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        d = fp16_from_bytes(b[:, :2])
        q = (_unpack_nibbles(b[:, 6:]) | _unpack_fifth_bits(b[:, 2:6])).to(torch.float32) - 16.0
        return q * d[:, None]


class Q5_1Codec(Codec):
    """Q5_1: 32 5-bit quants, fp16 ``d = (max - min)/31``, fp16 ``m = min``; ``q = (uint8_t)((x - min)*id + 0.5)``.

    Element = ``q * d + m``. Bit-exact; matches ``quantize_row_q5_1_ref`` / ``dequantize_row_q5_1``.
    24 bytes per 32 elements::

        byte  0      2      4             8                              24
             +------+------+-------------+------------------------------+
             |  d   |  m   |     qh      | qs[0] ... qs[15]             |
             +------+------+-------------+------------------------------+
              fp16   fp16   uint32 LE:    qs[j] = (q[j] & 15) | (q[j+16] & 15) << 4
                            bit j = bit 4 of q[j]
    """

    qtype = Q5_1
    reference = "quantize_row_q5_1_ref / dequantize_row_q5_1"
    chunk_blocks = 32768

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = _output(x, out, 24)
        mn, mx = _first_min_max(x)
        d = (mx - mn) / fconst(31.0, x)
        inv, fast = _inv_scale(d)
        q = _quants(x, mn, inv, 0.5, None, fast)
        words = _halfwords(out)
        _put_fp16(out, words, 0, d)
        _put_fp16(out, words, 2, mn)
        _put_bytes(out, words, 4, _fifth_bits(q, fast))
        _put_bytes(out, words, 8, _nibbles(q, True, fast))
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        d = fp16_from_bytes(b[:, :2])
        m = fp16_from_bytes(b[:, 2:4])
        q = (_unpack_nibbles(b[:, 8:]) | _unpack_fifth_bits(b[:, 4:8])).to(torch.float32)
        return q * d[:, None] + m[:, None]
