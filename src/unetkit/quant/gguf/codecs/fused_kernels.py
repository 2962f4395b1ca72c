"""The numba kernels behind :mod:`.fused`, at module level so that numba's on-disk cache (``cache=True``) holds them:
a kernel defined inside a function is a closure, which numba compiles again in every process (9-13 s).

Importing this module imports numba; :mod:`.fused` imports it only when numba is installed and the kernels are
wanted. The bit-exactness rules are :mod:`.fused`'s."""

from __future__ import annotations

import numpy as np
from numba import njit

TILE = 64  # sub-blocks per tile: the per-column state and the tile's quants stay in L1

f32 = np.float32


@njit(inline="always", nogil=True, error_model="numpy", boundscheck=False)
def quant(iscale, x, mn, nmax):  # pragma: no cover - compiled
    """MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))) as float32 (nearest_int: ggml's magic-number trick)."""
    t = np.float32(iscale * (x - mn) + f32(12582912.0))  # + 1.5 * 2**23
    # the int is in [-2**22, 2**22) and exact in float32, so clamping it as a float is the same; float min/max
    # let the compiler vectorise the loop (an int clamp did not: 1.6x slower)
    return min(f32(nmax), max(f32(0.0), f32((t.view(np.int32) & 0x7FFFFF) - 0x400000)))


@njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
def search(x, w, nmax, cs, use_mad, state, degenerate):  # pragma: no cover - compiled
    n, S = x.shape
    zero, one, fnmax = f32(0.0), f32(1.0), f32(nmax)
    T = TILE
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


@njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
def qx_sums(x, c0, m, isc, nmax, slx, sl2):  # pragma: no cover - compiled
    """sumlx += (w*x)*l and suml2 += (w*l)*l with w = x*x, l = clamp(nearest_int(isc*x), -nmax, nmax-1)."""
    zero = f32(0.0)
    for c in range(m):
        slx[c] = zero
        sl2[c] = zero
    for i in range(x.shape[0]):
        for c in range(m):
            xi = x[i, c0 + c]
            t = np.float32(isc[c] * xi + f32(12582912.0))  # nearest_int: + 1.5 * 2**23
            lf = min(f32(nmax - 1), max(f32(-nmax), f32((t.view(np.int32) & 0x7FFFFF) - 0x400000)))
            w = xi * xi
            slx[c] += w * xi * lf
            sl2[c] += w * lf * lf


@njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
def qx_search(x, nmax, cs, state, allzero):  # pragma: no cover - compiled
    n, S = x.shape
    zero, eps, fneg = f32(0.0), f32(1e-15), f32(-nmax)
    T = TILE
    amax, mx, isc, scale = np.empty(T, f32), np.empty(T, f32), np.empty(T, f32), np.empty(T, f32)
    best, wisc, slx, sl2 = np.empty(T, f32), np.empty(T, f32), np.empty(T, f32), np.empty(T, f32)
    for c0 in range(0, S, T):
        m = min(T, S - c0)
        for c in range(m):
            amax[c] = zero
            mx[c] = zero
        for i in range(n):  # the first element of largest magnitude, with its sign
            for c in range(m):
                xi = x[i, c0 + c]
                ax = abs(xi)
                if ax > amax[c]:
                    amax[c] = ax
                    mx[c] = xi
        for c in range(m):
            allzero[c0 + c] = amax[c] < eps  # C returns early: L = 0, scale = 0
            isc[c] = fneg / mx[c]
        qx_sums(x, c0, m, isc, nmax, slx, sl2)
        for c in range(m):
            scale[c] = slx[c] / sl2[c] if sl2[c] != zero else zero
            best[c] = scale[c] * slx[c]
            wisc[c] = isc[c]
        for k in range(cs.shape[0]):
            for c in range(m):
                isc[c] = cs[k] / mx[c]  # -(nmax + 0.1f*is) / max
            qx_sums(x, c0, m, isc, nmax, slx, sl2)
            for c in range(m):
                if sl2[c] > zero and slx[c] * slx[c] > best[c] * sl2[c]:
                    scale[c] = slx[c] / sl2[c]
                    best[c] = scale[c] * slx[c]
                    wisc[c] = isc[c]
        for c in range(m):
            state[0, c0 + c] = scale[c]
            state[1, c0 + c] = best[c]
            state[2, c0 + c] = wisc[c]
