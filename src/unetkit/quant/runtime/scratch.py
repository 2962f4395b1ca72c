"""One per-thread scratch pool for weights made in forward: GGUF blocks decoded (``gguf_backend``) and half-precision
weights cast to the compute dtype (``loading.cast_in_forward``). One layer uses it at a time, so one buffer per
(dtype, device), grown to the largest weight seen, serves a whole forward; a forward hook on the model calls
:func:`release` so nothing stays resident between forwards (re-mapping the buffer costs about 1 % of a forward)."""

from __future__ import annotations

import threading

import torch

_tls = threading.local()


def buffer(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's scratch for (dtype, device), at least ``n`` elements."""
    cache = getattr(_tls, "buffers", None)
    if cache is None:
        cache = _tls.buffers = {}
    buf = cache.get((dtype, device))
    if buf is None or buf.numel() < n:
        size = max(n, 2 * buf.numel()) if buf is not None else n  # few regrowths within one forward
        buf = cache[(dtype, device)] = torch.empty(size, dtype=dtype, device=device)
    return buf


def release(*_: object) -> None:
    """Drop this thread's scratch (usable as a forward hook)."""
    getattr(_tls, "buffers", {}).clear()
