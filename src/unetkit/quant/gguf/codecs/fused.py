"""Fused CPU kernels (numba) for the hot loop of the K-quant encoders: ggml's ``make_qkx2_quants`` search.

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

numba is optional (``pip install numba``): without it, or with ``UNETKIT_FUSED=0``, the torch path runs. Compiled
code is cached next to this file by numba (``cache=True``), so only the first use on a machine compiles (~2 s).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

__all__ = ["available", "qkx2_search", "warm"]

_TILE = 64  # sub-blocks per tile: the per-column state and the tile's quants stay in L1


@functools.lru_cache(maxsize=1)
def _kernel():
    try:
        from numba import njit
    except ImportError:
        return None

    f32 = np.float32

    @njit(inline="always", nogil=True, error_model="numpy", boundscheck=False)
    def quant(iscale, x, mn, nmax):  # pragma: no cover - compiled
        """MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))) as float32 (nearest_int: ggml's magic-number trick)."""
        t = np.float32(iscale * (x - mn) + f32(12582912.0))  # + 1.5 * 2**23
        return f32(max(0, min(nmax, (t.view(np.int32) & 0x7FFFFF) - 0x400000)))

    @njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
    def search(x, w, nmax, cs, use_mad, state, degenerate):  # pragma: no cover - compiled
        n, S = x.shape
        zero, one, fnmax = f32(0.0), f32(1.0), f32(nmax)
        T = _TILE
        lo, hi, sw, sx = np.empty(T, f32), np.empty(T, f32), np.empty(T, f32), np.empty(T, f32)
        mn, mxl, isc, best = np.empty(T, f32), np.empty(T, f32), np.empty(T, f32), np.empty(T, f32)
        scale, wisc, wmin = np.empty(T, f32), np.empty(T, f32), np.empty(T, f32)
        sl, sl2, sxl, cur = np.empty(T, f32), np.empty(T, f32), np.empty(T, f32), np.empty(T, f32)
        tsc, tmn = np.empty(T, f32), np.empty(T, f32)
        ok = np.empty(T, np.bool_)
        lbuf = np.empty((n, T), f32)
        for c0 in range(0, S, T):
            m = min(T, S - c0)
            # min, max, sum_w = w[0], sum_x = w[0]*x[0], then += over i = 1..n-1
            for c in range(m):
                x0 = x[0, c0 + c]
                w0 = w[0, c0 + c]
                lo[c] = x0
                hi[c] = x0
                sw[c] = w0
                sx[c] = w0 * x0
            for i in range(1, n):
                for c in range(m):
                    xi = x[i, c0 + c]
                    wi = w[i, c0 + c]
                    if xi < lo[c]:
                        lo[c] = xi
                    if xi > hi[c]:
                        hi[c] = xi
                    sw[c] += wi
                    sx[c] += wi * xi
            for c in range(m):
                v = lo[c]
                if v > zero:  # if (min > 0) min = 0
                    v = zero
                mn[c] = v
                deg = hi[c] == v  # C returns early: L = 0, the_min = -min, scale = 0
                degenerate[c0 + c] = deg
                # a constant column runs the loop with max = 1: finite arithmetic, D = 0, never a candidate
                mxl[c] = one if deg else hi[c]
                isc[c] = fnmax / (mxl[c] - v)
                scale[c] = one / isc[c]
                best[c] = zero
            for i in range(n):
                for c in range(m):
                    xi = x[i, c0 + c]
                    d = scale[c] * quant(isc[c], xi, mn[c], nmax) + mn[c] - xi
                    e = abs(d) if use_mad else d * d
                    best[c] += w[i, c0 + c] * e
            for c in range(m):
                wisc[c] = isc[c]
                wmin[c] = mn[c]
            for step in range(cs.shape[0]):
                csv = cs[step]
                for c in range(m):
                    isc[c] = csv / (mxl[c] - mn[c])  # (rmin + rdelta*is + nmax)/(max - min)
                    sl[c] = zero
                    sl2[c] = zero
                    sxl[c] = zero
                for i in range(n):
                    for c in range(m):
                        xi = x[i, c0 + c]
                        lf = quant(isc[c], xi, mn[c], nmax)
                        lbuf[i, c] = lf
                        wl = w[i, c0 + c] * lf
                        sl[c] += wl
                        sl2[c] += wl * lf
                        sxl[c] += wl * xi
                for c in range(m):
                    D = sw[c] * sl2[c] - sl[c] * sl[c]
                    ok[c] = D > zero
                    a = (sw[c] * sxl[c] - sx[c] * sl[c]) / D
                    b = (sl2[c] * sx[c] - sl[c] * sxl[c]) / D
                    if b > zero:
                        b = zero
                        a = sxl[c] / sl2[c]
                    tsc[c] = a
                    tmn[c] = b
                    cur[c] = zero
                for i in range(n):
                    for c in range(m):
                        d = tsc[c] * lbuf[i, c] + tmn[c] - x[i, c0 + c]
                        e = abs(d) if use_mad else d * d
                        cur[c] += w[i, c0 + c] * e
                for c in range(m):
                    if ok[c] and cur[c] < best[c]:
                        best[c] = cur[c]
                        scale[c] = tsc[c]
                        wisc[c] = isc[c]
                        wmin[c] = mn[c]
                        mn[c] = tmn[c]
            for c in range(m):
                state[0, c0 + c] = best[c]
                state[1, c0 + c] = scale[c]
                state[2, c0 + c] = mn[c]
                state[3, c0 + c] = wisc[c]
                state[4, c0 + c] = wmin[c]

    return search


def available(x: torch.Tensor) -> bool:
    """Whether the fused kernel runs for ``x``: a CPU tensor, numba installed, and ``UNETKIT_FUSED`` not ``0``."""
    return x.device.type == "cpu" and os.environ.get("UNETKIT_FUSED", "1") != "0" and _kernel() is not None


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
    _kernel()(xa, wa, nmax, np.asarray(cs, dtype=np.float32), use_mad, state, degenerate)
    return torch.from_numpy(state), torch.from_numpy(degenerate)


def warm() -> None:
    """Compile (or load from numba's cache) the kernel now, e.g. before forking encoder processes."""
    x = torch.ones(2, 1)
    if available(x):
        qkx2_search(x, x, 1, [1.0], False)
