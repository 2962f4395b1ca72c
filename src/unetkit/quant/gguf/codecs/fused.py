"""Fused CPU kernels (numba) for the hot loops of the K-quant encoders: ggml's ``make_qkx2_quants`` search (Q2_K,
Q4_K, Q5_K) and ``make_qx_quants`` search (Q6_K).

The torch code in :mod:`.kquants` is the reference implementation and the CUDA path; it runs each arithmetic step
as one torch op over all sub-blocks, so a Q4_K chunk makes about 16 passes over memory per search step and the
encoder is memory-bound (about 25 MB/s on one core). This kernel does the same float32 arithmetic in one pass per
step, vectorised across a tile of sub-blocks (the inner loops run over columns, so the compiler emits SIMD code
while every column still sums its elements strictly left to right).

Bit-exactness rules, the same as the torch port's (see :mod:`.base`): every value is a ``np.float32`` and every
operation rounds to float32 (numba types float32 op float32 as float32; ints are converted explicitly, since
float32 op int64 would be float64); no fast-math, so no fused multiply-adds and no reassociation; ``nearest_int``
is ggml's magic-number bit trick, garbage outside +-2**22 included. Tests compare this kernel with the torch path
and with ggml's reference bytes.

numba is optional (``pip install numba``): without it, or with ``UNETKIT_FUSED=0``, the torch path runs. The kernels
live in :mod:`.fused_kernels`, at module level, so that numba's on-disk cache (``cache=True``, next to that file)
holds them: only the first use on a machine compiles (about 10 s); later processes load them in well under 1 s.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

__all__ = ["available", "qkx2_search", "qx_search", "warm"]


@functools.lru_cache(maxsize=1)
def _kernels():
    try:
        from unetkit.quant.gguf.codecs import fused_kernels
    except ImportError:  # numba is optional
        return None
    return fused_kernels.search, fused_kernels.qx_search


def available(x: torch.Tensor) -> bool:
    """Whether the fused kernel runs for ``x``: a CPU tensor, numba installed, and ``UNETKIT_FUSED`` not ``0``."""
    return x.device.type == "cpu" and os.environ.get("UNETKIT_FUSED", "1") != "0" and _kernels() is not None


def qkx2_search(x: torch.Tensor, w: torch.Tensor, nmax: int, cs: list[float], use_mad: bool):
    """The search of ``make_qkx2_quants`` over the columns of ``x`` and ``w`` ((n, S) float32, CPU).

    ``cs[s]`` is the float32 value of ``rmin + rdelta*s + nmax``. Returns ``(state, degenerate)``: state rows
    best error, scale, min, and the iscale and min that produced the winning quants, as (5, S) float32; and the
    (S,) bool mask of constant columns.
    """
    xa = x.contiguous().numpy()
    wa = w.contiguous().numpy()
    S = xa.shape[1]
    state = np.empty((5, S), np.float32)
    degenerate = np.empty(S, np.bool_)
    _kernels()[0](xa, wa, nmax, np.asarray(cs, dtype=np.float32), use_mad, state, degenerate)
    return torch.from_numpy(state), torch.from_numpy(degenerate)


def qx_search(x: torch.Tensor, nmax: int, cs: list[float]):
    """The search of ``make_qx_quants`` (``rmse_type=1``, no weights) over the columns of ``x`` ((n, S) float32,
    CPU, NaN-free). ``cs[k]`` is the float32 ``-(nmax + 0.1f*is)`` of the k-th candidate.

    Returns ``(state, allzero)``: rows scale, best, and the iscale that produced the winning quants, as (3, S)
    float32; and the (S,) bool mask of columns whose largest magnitude is below ``GROUP_MAX_EPS``.
    """
    xa = x.contiguous().numpy()
    S = xa.shape[1]
    state = np.empty((3, S), np.float32)
    allzero = np.empty(S, np.bool_)
    _kernels()[1](xa, nmax, np.asarray(cs, dtype=np.float32), state, allzero)
    return torch.from_numpy(state), torch.from_numpy(allzero)


def warm() -> None:
    """Compile (or load from numba's cache) the kernels now, e.g. before forking encoder processes."""
    x = torch.ones(2, 1)
    if available(x):
        qkx2_search(x, x, 1, [1.0], False)
        qx_search(x, 1, [-1.0])
