"""Unquantized element types: F32, F16 and BF16 (block_size 1)."""

from __future__ import annotations

import functools

import torch

from unetkit.quant.gguf.codecs.base import Codec
from unetkit.quant.gguf.qtypes import BF16, F16, F32

__all__ = ["F32Codec", "F16Codec", "BF16Codec"]


def _output(x: torch.Tensor, out: torch.Tensor | None, type_size: int) -> torch.Tensor:
    if out is None:
        return torch.empty((x.shape[0], type_size), dtype=torch.uint8, device=x.device)
    return out


class F32Codec(Codec):
    """F32: the IEEE-754 binary32 bytes, little-endian. Bit-exact (it is a copy).

    ::

        byte   0        1        2        3
             +--------+--------+--------+--------+
             | mant lo| mant   |e|mant hi|s|exp  |   float32, little-endian
             +--------+--------+--------+--------+
    """

    qtype = F32
    reference = "memcpy (ggml stores float32 as is)"
    chunk_blocks = 1 << 20

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = _output(x, out, 4)
        out.view(torch.float32).copy_(x)
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        return b.contiguous().view(torch.float32).view(-1, 1)


class F16Codec(Codec):
    """F16: IEEE-754 binary16, ``GGML_FP32_TO_FP16`` (round to nearest even, overflow to inf). Bit-exact.

    ::

        byte   0        1
             +--------+--------+
             |mant lo |s|exp|mh|   binary16, little-endian: 1 sign, 5 exponent, 10 mantissa bits
             +--------+--------+
    """

    qtype = F16
    reference = "ggml_fp32_to_fp16_row (GGML_FP32_TO_FP16)"
    chunk_blocks = 1 << 20

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = _output(x, out, 2)
        out.view(torch.float16).copy_(x)
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        return b.contiguous().view(torch.float16).to(torch.float32).view(-1, 1)


def _bf16_bits_ggml(x: torch.Tensor) -> torch.Tensor:
    """``ggml_compute_fp32_to_bf16`` on int32 bit patterns; returns int32 holding the 16 bits."""
    u = x.contiguous().view(torch.int32)
    # int32 arithmetic is safe: u + 0x8000 never crosses 2**31 for a non-NaN float32 bit pattern.
    r = u + (((u >> 16) & 1) + 0x7FFF)
    r >>= 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return torch.where(nan, (u >> 16) | 64, r)  # NaN: keep the top bits, force quiet


@functools.lru_cache(maxsize=8)
def _torch_bf16_is_ggml(device: torch.device) -> bool:
    """Does torch's float32->bfloat16 cast round like ggml (RNE, subnormals kept) for every non-NaN value here?"""
    vals = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        1.0 + 2.0**-8,
        1.0 + 3 * 2.0**-8,
        1.0 + 2.0**-8 + 2.0**-20,
        3.3895314e38,
        3.4028235e38,
        float("inf"),
        float("-inf"),
        1e-39,
        -1e-39,
        1.1754942e-38,
        1.17549435e-38,
        1e-45,
        3e-41,
    ]
    g = torch.Generator().manual_seed(5)
    x = torch.cat(
        [
            torch.tensor(vals, dtype=torch.float32),
            torch.randn(4096, generator=g) * torch.exp(torch.randn(4096, generator=g) * 20),
        ]
    ).to(device)
    mine = _bf16_bits_ggml(x).to(torch.int16)
    theirs = x.to(torch.bfloat16).view(torch.int16)
    return torch.equal(mine, theirs)


class BF16Codec(Codec):
    """BF16: the top half of the float32, ``ggml_compute_fp32_to_bf16``. Bit-exact.

    Rounding is to nearest even on the dropped 16 bits (``(u + 0x7fff + ((u >> 16) & 1)) >> 16``); a NaN keeps its
    top bits and is forced quiet (``(u >> 16) | 64``); overflow rounds to inf; subnormals are kept. torch's own cast
    does the same for every non-NaN value on the platforms checked at first use (:func:`_torch_bf16_is_ggml`); it is
    used then, with NaNs patched the ggml way, and the integer formula otherwise.

    ::

        byte   0        1
             +--------+--------+
             |e|mant  |s|exp   |   bfloat16 = bits 16..31 of the float32, little-endian
             +--------+--------+
    """

    qtype = BF16
    reference = "ggml_fp32_to_bf16_row_ref (ggml_compute_fp32_to_bf16)"
    chunk_blocks = 1 << 20

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = _output(x, out, 2)
        o16 = out.view(torch.int16).view(-1)
        if _torch_bf16_is_ggml(x.device) and bool(torch.isfinite(x.sum())):  # finite sum: no NaN anywhere
            out.view(torch.bfloat16).copy_(x)
        else:
            o16.copy_(_bf16_bits_ggml(x).view(-1))
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        hi = b.contiguous().view(torch.int16).to(torch.int32) << 16
        return hi.view(torch.float32).view(-1, 1)
