"""GGML/GGUF tensor quantization in torch, byte-exact with ggml's reference encoders.

::

    from unetkit.quant.gguf import quantize, dequantize
    packed = quantize(weight, "Q4_K", name="input_blocks.1.1.proj_in.weight")   # uint8 (*lead, row_bytes)
    weight2 = dequantize(packed, "Q4_K", weight.shape)                          # float32, weight.shape

Types: F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (see :mod:`.qtypes`). Every encoder
produces exactly the bytes of ggml's ``quantize_row_*_ref`` (what ``ggml_quantize_chunk`` writes without an
importance matrix) and every decoder exactly ggml's ``dequantize_row_*`` values; both run on the input's device (CPU
or CUDA) and process big tensors in chunks of blocks so that temporaries stay small.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from unetkit.errors import QuantError
from unetkit.quant.gguf.codecs import CODECS, Codec, get_codec
from unetkit.quant.gguf.qtypes import (
    QTYPES,
    QType,
    as_qtype,
    n_bytes,
    qtype_by_id,
    qtype_by_name,
    row_bytes,
)

__all__ = [
    "quantize",
    "dequantize",
    "QType",
    "QTYPES",
    "qtype_by_name",
    "qtype_by_id",
    "as_qtype",
    "row_bytes",
    "n_bytes",
    "get_codec",
    "CODECS",
    "Codec",
]


def _chunk(codec: type[Codec], device: torch.device) -> int:
    """Blocks per chunk: the codec's CPU-tuned size; GPUs want bigger launches (memory stays bounded)."""
    return max(1, codec.chunk_blocks * (16 if device.type != "cpu" else 1))


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _label(name: str | None) -> str:
    return f"tensor {name!r}" if name else "tensor"


def _non_finite_error(t: torch.Tensor, qtype: QType, name: str | None) -> QuantError:
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    n_nan = int(torch.isnan(t).sum())
    flat = int(bad.reshape(-1).to(torch.uint8).argmax())
    index = tuple(int(i) for i in np.unravel_index(flat, tuple(t.shape))) if t.dim() else ()
    value = float(t.reshape(-1)[flat])
    return QuantError(
        f"cannot quantize {_label(name)} of shape {tuple(t.shape)} to {qtype.name}: it holds {count} non-finite "
        f"value(s) ({n_nan} NaN, {count - n_nan} inf); the first is {value} at index {index}. GGUF quantization "
        f"needs finite weights: the checkpoint is damaged or was saved after a diverged step"
    )


@torch.no_grad()
def quantize(
    tensor: torch.Tensor, qtype: QType | str | int, *, name: str | None = None, threads: int | None = None
) -> torch.Tensor:
    """Encode ``tensor`` as ``qtype``, row by row along its last dim, exactly as ggml does.

    Returns a ``torch.uint8`` tensor of shape ``(*tensor.shape[:-1], row_bytes(qtype, tensor.shape[-1]))`` on the
    tensor's device. Floating inputs of any dtype are converted to float32 first (ggml quantizes from float32).
    ``name`` only serves error messages. ``threads`` sets torch's intra-op thread count for the duration of the call
    (a process-wide setting); on a CPU shared with other busy processes, ``threads=1`` avoids OpenMP
    oversubscription, which slows the many small ops of the K-quant encoders by an order of magnitude.
    Raises :class:`~unetkit.errors.QuantError` for an unknown qtype, a last dim that is not a multiple of the block
    size, or NaN/inf values.
    """
    with _torch_threads(threads):
        return _quantize(tensor, qtype, name)


def _quantize(tensor: torch.Tensor, qtype: QType | str | int, name: str | None) -> torch.Tensor:
    q = as_qtype(qtype)
    codec = get_codec(q)
    if isinstance(tensor, np.ndarray):
        tensor = torch.from_numpy(tensor)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        what = f"{tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise QuantError(f"cannot quantize {_label(name)} to {q.name}: expected a floating-point tensor, got a {what}")
    shape = tuple(tensor.shape)
    if tensor.dim() == 0 or shape[-1] % q.block_size:
        last = shape[-1] if shape else "none"
        raise QuantError(
            f"cannot quantize {_label(name)} of shape {shape} to {q.name}: its last dim ({last}) must be a "
            f"multiple of the {q.name} block size ({q.block_size}); keep it in F16/F32 or reshape it"
        )
    out = torch.empty((*shape[:-1], row_bytes(q, shape[-1])), dtype=torch.uint8, device=tensor.device)
    n_blocks = tensor.numel() // q.block_size
    if n_blocks == 0:
        return out
    src = tensor.reshape(n_blocks, q.block_size)
    dst = out.view(n_blocks, q.type_size)
    step = _chunk(codec, tensor.device)
    for i in range(0, n_blocks, step):
        xb = src[i : i + step]
        if xb.dtype != torch.float32:
            xb = xb.to(torch.float32)
        # a finite sum proves every term finite (inf/NaN never turn back into finite values); only when it is
        # not (NaN/inf present, or an overflowing sum) look closer
        if not bool(torch.isfinite(xb.sum())) and not bool(torch.isfinite(xb).all()):
            raise _non_finite_error(tensor, q, name)
        codec.quantize_blocks(xb.contiguous(), out=dst[i : i + step])
    return out


def _as_byte_tensor(data: Any) -> torch.Tensor:
    if isinstance(data, np.ndarray):
        arr = np.ascontiguousarray(data)
        if not arr.flags.writeable:
            arr = arr.copy()
        return torch.from_numpy(arr.reshape(-1).view(np.uint8))
    if isinstance(data, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if isinstance(data, torch.Tensor):
        if data.dtype == torch.uint8:
            return data
        return data.contiguous().reshape(-1).view(torch.uint8)
    raise QuantError(f"expected packed GGUF tensor data as a uint8 tensor or array, got {type(data).__name__}")


@torch.no_grad()
def dequantize(
    data: torch.Tensor,
    qtype: QType | str | int,
    shape: tuple[int, ...] | list[int] | torch.Size,
    dtype: torch.dtype = torch.float32,
    *,
    name: str | None = None,
    threads: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode packed ``qtype`` data into a tensor of ``shape`` and ``dtype`` (on ``data``'s device).

    ``data`` is a uint8 tensor (any shape, e.g. the ``(*lead, row_bytes)`` that :func:`quantize` returns, or the flat
    bytes read from a GGUF file); numpy arrays and other tensor dtypes are read as raw bytes. The values are ggml's
    ``dequantize_row_*`` results in float32, then cast to ``dtype``. ``threads``: as for :func:`quantize`.
    ``out``: a contiguous tensor of ``shape`` and ``dtype`` to decode into (reused buffers: no fresh pages).
    """
    with _torch_threads(threads):
        return _dequantize(data, qtype, shape, dtype, name, out)


def _dequantize(
    data: Any,
    qtype: QType | str | int,
    shape: Any,
    dtype: torch.dtype,
    name: str | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    q = as_qtype(qtype)
    codec = get_codec(q)
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] % q.block_size:
        last = shape[-1] if shape else "none"
        raise QuantError(
            f"cannot dequantize {_label(name)} to shape {shape} as {q.name}: its last dim ({last}) must be a "
            f"multiple of the {q.name} block size ({q.block_size})"
        )
    raw = _as_byte_tensor(data)
    expected = n_bytes(q, shape)
    if raw.numel() != expected:
        raise QuantError(
            f"cannot dequantize {_label(name)} as {q.name} of shape {shape}: that needs {expected} bytes, the data "
            f"has {raw.numel()} (shape {tuple(raw.shape)}); wrong qtype or shape?"
        )
    n_blocks = expected // q.type_size
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=raw.device)
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() or out.device != raw.device:
        raise QuantError(
            f"dequantize {_label(name)}: out must be a contiguous {dtype} tensor of shape {shape} on "
            f"{raw.device}; got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if n_blocks == 0:
        return out
    src = raw.reshape(n_blocks, q.type_size)
    dst = out.view(n_blocks, q.block_size)
    step = _chunk(codec, raw.device) * 4
    for i in range(0, n_blocks, step):
        codec.dequantize_into(src[i : i + step], dst[i : i + step])
    return out
