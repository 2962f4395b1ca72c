"""K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-element super-blocks of 16- or 32-element sub-blocks).

The encoders reproduce ggml's reference encoders (``quantize_row_q{2,3,4,5,6}_K_ref`` in ggml-quants.c, i.e.
``ggml_quantize_chunk`` without an importance matrix) byte for byte. Those run an iterative search per sub-block
(``make_qkx2_quants``, ``make_qx_quants``, ``make_q3_quants``) whose float32 sums decide which candidate wins, so
the port keeps the C arithmetic exactly (see :mod:`.base`): sums strictly left to right (:func:`.base.seq_sum`),
products in C order, ``nearest_int`` semantics, the search loop's use of the *updated* minimum, uint8/int8 stores.

Vectorisation: the sub-blocks of a chunk are laid out as columns of an ``(n, S)`` matrix (``n`` = 16 or 32
elements, ``S`` = sub-blocks), so every elementwise step is one torch op over all sub-blocks, and the only Python
loops run over the search steps (<= 21), over the ``n`` element positions (index_add_ in C++ on CPU), and, for
Q3_K's coordinate descent, over the 16 positions of a sub-block. No loop runs over blocks.

The final quants of each sub-block are recomputed from the rounded super-block scales (as ggml does); the search's
own quants are only kept for sub-blocks whose rounded scale is zero, so instead of carrying them through the search
the code remembers which ``(iscale, min)`` produced the winner and recomputes them once at the end.
"""

from __future__ import annotations

import numpy as np
import torch

from unetkit.quant.gguf.codecs import fused
from unetkit.quant.gguf.codecs.base import (
    Codec,
    col_absmax,
    fconst,
    first_absmax,
    fp16_bytes,
    fp16_from_bytes,
    nearest_int,
    pos_max,
    scratch,
    select_,
    seq_sum,
    seq_sum_into,
    sqrt_f32,
)
from unetkit.quant.gguf.qtypes import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K

__all__ = [
    "Q2_KCodec",
    "Q3_KCodec",
    "Q4_KCodec",
    "Q5_KCodec",
    "Q6_KCodec",
    "make_qkx2_quants",
    "make_qx_quants",
    "make_q3_quants",
]

GROUP_MAX_EPS = 1e-15
_ROUND_SAFE = 2.0**21  # |v| below this: nearest_int(v) == round-half-even(v), done in float


def _f32(v: float) -> float:
    """Round to float32 (one C float operation = one double operation on float32 inputs, then this)."""
    return float(np.float32(v))


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device)


def _sub_blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """(nb, 256) super-blocks -> (n, S) matrix whose column s is sub-block s (S = nb * 256 / n)."""
    xs = x.reshape(-1, n)
    out = scratch("kq.xT", (n, xs.shape[0]), torch.float32, x.device)
    return out.copy_(xs.t())


def _int8(v: torch.Tensor) -> torch.Tensor:
    """Store an int32 into ``int8_t`` (two's complement wrap)."""
    return ((v & 0xFF) ^ 0x80) - 0x80


# --------------------------------------------------------------------------------------------------------------------
# the per-sub-block searches
#
# Each returns the scale (and min) per column and a *recipe* for the column's quants: ggml recomputes the final
# quants from the rounded super-block scales, and keeps the search's quants only where a rounded sub-block scale is
# zero. The recipe recomputes them for just those columns (:meth:`SearchQuants.take`).


class SearchQuants:
    """The quants a search ended with, recomputed on demand for selected columns.

    ``L = clamp(nearest_int(iscale * (x - min)), lo, hi) + offset`` per column, or 0 where ``zero`` is set.
    """

    def __init__(
        self,
        x: torch.Tensor,
        iscale: torch.Tensor,
        minimum: torch.Tensor | None,
        lo: int,
        hi: int,
        offset: int,
        zero: torch.Tensor,
    ):
        self.x, self.iscale, self.minimum = x, iscale, minimum
        self.lo, self.hi, self.offset, self.zero = lo, hi, offset, zero

    def take(self, cols: torch.Tensor) -> torch.Tensor:
        """Quants of the columns ``cols`` (1-D long), as an int32 ``(len(cols), n)`` tensor."""
        x = self.x[:, cols]
        v = x - self.minimum[cols] if self.minimum is not None else x
        L = nearest_int(self.iscale[cols] * v).clamp_(self.lo, self.hi) + self.offset
        return torch.where(self.zero[cols], 0, L).t()


def make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, SearchQuants]:
    """ggml ``make_qkx2_quants`` on every column of ``x`` (n, S) with weights ``w`` (n, S).

    Returns ``(scale, the_min, quants)``: (S,), (S,) float32 and the recipe of the (n, S) quants in ``[0, nmax]``.
    """
    steps = [_f32(_f32(_f32(rmin) + _f32(_f32(rdelta) * s)) + nmax) for s in range(nstep + 1)]
    search = fused.qkx2_search if fused.available(x) else qkx2_search_torch
    state, degenerate = search(x, w, nmax, steps, use_mad)
    best, scale, mn, win_iscale, win_min = state
    scale = select_(scale, degenerate, _zero(x).expand_as(scale))
    return scale, -mn, SearchQuants(x, win_iscale, win_min, 0, nmax, 0, degenerate)


def qkx2_search_torch(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: list[float], use_mad: bool):
    """The search of ``make_qkx2_quants`` in torch ops (any device); :func:`.fused.qkx2_search` is the same
    arithmetic fused into one CPU kernel. ``steps[s]`` is the float32 ``rmin + rdelta*s + nmax``.

    Returns ``(state, degenerate)``: rows best error, scale, min, and the iscale and min that produced the winning
    quants, (5, S) float32; and the (S,) mask of constant columns (whose state the caller discards).
    """
    n, S = x.shape
    dev = x.device
    zero = _zero(x)
    xmin = x.amin(0)
    mx = x.amax(0)
    # sum_w = weights[0]; sum_x = sum_w * x[0]; then += over i = 1..n-1
    P = scratch("kq.P", (n, 3, S), torch.float32, dev)
    wl, wll, wlx = P[:, 0], P[:, 1], P[:, 2]
    torch.mul(w, x, out=wl)
    sum_w = seq_sum(w[1:], init=w[0])
    sum_x = seq_sum(wl[1:], init=wl[0])
    mn = torch.where(xmin > 0, zero, xmin)
    degenerate = mx == mn  # C returns early: L = 0, the_min = -min, scale = 0

    iscale = fconst(float(nmax), x) / (mx - mn)
    scale = fconst(1.0, x) / iscale
    E = torch.sub(x, mn, out=scratch("kq.v", (n, S), torch.float32, dev))
    L0 = nearest_int(E.mul_(iscale)).clamp_(0, nmax).to(torch.float32)
    torch.mul(L0, scale, out=E)  # diff = scale * L[i] + min - x[i]
    E += mn
    E -= x
    E.abs_() if use_mad else E.mul_(E)
    E.mul_(w)
    best = seq_sum(E)

    # A constant column (degenerate) gets max = 1 for the loop so that its (discarded) arithmetic stays finite; its
    # sums give D = 0, so it never takes a candidate.
    mx_loop = torch.where(degenerate, fconst(1.0, x), mx)
    drange = mx_loop - xmin
    cs = [torch.tensor(c, dtype=torch.float32, device=dev) for c in steps]
    fixed = torch.stack([sum_w, sum_w, sum_x])
    pick_a = torch.tensor([1, 2, 1], device=dev)
    # state rows: best error, scale, min, the iscale and min that produced the winning quants; `cand` holds the
    # same rows for the current step, each op writing straight into its row
    state = torch.stack([best, scale, mn, iscale, mn])
    cand = scratch("kq.cand", (5, S), torch.float32, dev)
    cur, this_scale, this_min, isc, cmn = cand
    s = scratch("kq.sums", (3, S), torch.float32, dev)  # sum_l, sum_l2, sum_xl
    v = E  # the same scratch buffer
    # nearest_int(v) equals float round-half-even while |v| < 2**22. Every min of the search is <= 0, so with
    # max > 0 the range max - min >= max and |v| <= c * max(1, |xmin| / max): columns with a positive max not tiny
    # next to |xmin| are safe for the whole search. Other columns are checked at every step, where rounding's
    # monotonicity bounds every |v| of a column by isc * (max - xmin) when isc > 0.
    always_safe = bool(((mx_loop > 1e-30) & (xmin.abs() < mx_loop * 1e5)).all())
    for step in range(len(steps)):
        cmn.copy_(state[2])
        torch.div(cs[step], torch.sub(mx_loop, cmn, out=isc), out=isc)  # (rmin + rdelta*is + nmax)/(max - min)
        torch.sub(x, cmn, out=v)
        v.mul_(isc)  # iscale*(x[i] - min)
        if always_safe or bool(((isc * drange).amax() < _ROUND_SAFE) & (isc.amin() > 0)):
            lv = v.clamp_(0, nmax).round_()
        else:
            lv = nearest_int(v).clamp_(0, nmax).to(torch.float32)
        torch.mul(w, lv, out=wl)  # w*l
        torch.mul(wl, lv, out=wll)  # w*l*l
        torch.mul(wl, x, out=wlx)  # w*l*x[i]
        seq_sum_into(s, P)  # sum_l, sum_l2, sum_xl
        # [sum_w*sum_l2, sum_w*sum_xl, sum_x*sum_l2] - [sum_l*sum_l, sum_l*sum_x, sum_l*sum_xl] = [D, n_scale, n_min]
        terms = fixed * s.index_select(0, pick_a)
        terms -= s[0] * torch.stack([s[0], sum_x, s[2]])
        D = terms[0]
        torch.div(terms[1:], D, out=cand[1:3])  # this_scale, this_min
        select_(this_scale, this_min > 0, s[2] / s[1])  # if (this_min > 0) { this_min = 0; this_scale = sum_xl/sum_l2 }
        this_min.clamp_(max=0.0)  # (sign of a zero min never reaches the output)
        torch.mul(lv, this_scale, out=v)  # diff = this_scale * Laux[i] + this_min - x[i]
        v += this_min
        v -= x
        v.abs_() if use_mad else v.mul_(v)
        v.mul_(w)
        seq_sum_into(cand[:1], v.unsqueeze(1))  # cur_error
        take = (D > 0) & (cur < state[0])
        select_(state, take, cand)

    return state, degenerate


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, SearchQuants]:
    """ggml ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`` on every column of ``x`` (n, S).

    Returns ``(scale, quants)``: (S,) float32 and the recipe of the (n, S) quants in ``[0, 2*nmax)``.
    """
    cs = [-_f32(_f32(nmax) + _f32(_f32(0.1) * _f32(s))) for s in range(-9, 10) if s != 0]  # -(nmax + 0.1f*is)
    search = fused.qx_search if fused.available(x) else qx_search_torch
    state, allzero = search(x, nmax, cs)
    scale = torch.where(allzero, _zero(x), state[0])
    return scale, SearchQuants(x, state[2], None, -nmax, nmax - 1, nmax, allzero)


def qx_search_torch(x: torch.Tensor, nmax: int, cs: list[float]):
    """The search of ``make_qx_quants`` in torch ops (any device); :func:`.fused.qx_search` is the same arithmetic
    fused into one CPU kernel. ``cs[k]`` is the float32 ``-(nmax + 0.1f*is)`` of the k-th candidate.

    Returns ``(state, allzero)``: rows scale, best, and the iscale that produced the winning quants, (3, S)
    float32; and the (S,) mask of all-zero columns (whose state the caller discards).
    """
    n, S = x.shape
    dev = x.device
    zero = _zero(x)
    amax, mx = col_absmax(x)
    allzero = amax < GROUP_MAX_EPS
    w = x * x  # rmse_type 1: w = x[i]*x[i]
    wx = w * x  # w*x[i]*l == (w*x[i])*l
    P = scratch("kq.P", (n, 2, S), torch.float32, dev)
    t_lx, t_l2 = P[:, 0], P[:, 1]
    v = scratch("kq.v", (n, S), torch.float32, dev)

    def sums_for(isc: torch.Tensor) -> torch.Tensor:
        # |isc * x| <= (nmax + 1) * (1 + eps) because |x| <= |max|: the float round is nearest_int here.
        torch.mul(x, isc, out=v)
        v.clamp_(-nmax, nmax - 1).round_()
        torch.mul(wx, v, out=t_lx)
        torch.mul(w, v, out=t_l2)
        t_l2.mul_(v)
        return seq_sum(P)  # sumlx, suml2

    iscale = fconst(float(-nmax), x) / mx
    sumlx, suml2 = sums_for(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, zero)
    state = torch.stack([scale, scale * sumlx, iscale])  # scale, best, winning iscale
    cs_t = torch.tensor(cs, dtype=torch.float32, device=dev)
    for k in range(len(cs)):
        isc = cs_t[k : k + 1] / mx
        sumlx, suml2 = sums_for(isc)
        take = (suml2 > 0) & (sumlx * sumlx > state[1] * suml2)
        new_scale = sumlx / suml2
        cand = torch.stack([new_scale, new_scale * sumlx, isc.expand(S)])
        select_(state, take, cand)
    return state, allzero


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on every column of ``x`` (n, S).

    Returns ``(scale, L)``: (S,) float32 and (n, S) int32 quants in ``[0, 2*nmax)``.
    """
    n, S = x.shape
    zero = _zero(x)
    amax, mx = col_absmax(x)
    allzero = amax < GROUP_MAX_EPS
    iscale = fconst(float(-nmax), x) / mx
    L = nearest_int(x * iscale).clamp_(-nmax, nmax - 1).to(torch.float32)  # iscale * x[i]
    w = x * x
    wx = w * x
    wl = w * L
    wl *= L
    sums = torch.stack([seq_sum(wx * L), seq_sum(wl)])  # sumlx, suml2
    # Coordinate descent: up to 5 passes over the n positions, a column stopping after a pass that changed nothing
    # (exactly as C's `if (!n_changed) break`). Only the columns that changed in the previous pass take part in the
    # next one (typically 20 %, then 5 %, ...), gathered into a compact matrix and scattered back after the pass.
    active = None  # all columns
    for _ in range(5):
        if active is None:
            xa, wa, wxa, La, sa = x, w, wx, L, sums
        else:
            xa, wa, wxa = x[:, active], w[:, active], wx[:, active]
            La, sa = L[:, active], sums[:, active]
        changed = _q3_pass(xa, wa, wxa, La, sa, nmax)
        if active is not None:
            L[:, active] = La
            sums[:, active] = sa
        idx = changed.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        active = idx if active is None else active[idx]
    sumlx, suml2 = sums[0], sums[1]
    Lq = torch.where(allzero, 0, L.to(torch.int32) + nmax)
    scale = torch.where((suml2 > 0) & ~allzero, sumlx / suml2, zero)
    return scale, Lq


def _q3_pass(
    x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, L: torch.Tensor, sums: torch.Tensor, nmax: int
) -> torch.Tensor:
    """One pass of make_q3_quants's coordinate descent over the n positions; updates ``L`` and ``sums`` in place
    and returns which columns changed."""
    n, S = x.shape
    changed = torch.zeros(S, dtype=torch.bool, device=x.device)
    cand = torch.empty((2, S), dtype=torch.float32, device=x.device)
    for i in range(n):
        xi, wi, wxi, Li = x[i], w[i], wx[i], L[i]
        sumlx, suml2 = sums[0], sums[1]
        slx = sumlx - wxi * Li  # sumlx - w*x[i]*L[i]
        sl2 = suml2 - (wi * Li) * Li  # suml2 - w*L[i]*L[i]
        new_l = nearest_int((xi * sl2) / slx).clamp_(-nmax, nmax - 1).to(torch.float32)
        torch.mul(wxi, new_l, out=cand[0])
        cand[0] += slx  # slx += w*x[i]*new_l
        torch.mul(wi, new_l, out=cand[1])
        cand[1] *= new_l
        cand[1] += sl2  # sl2 += w*new_l*new_l
        lhs = cand[0] * cand[0]
        lhs *= suml2  # slx*slx*suml2
        rhs = sumlx * sumlx
        rhs *= cand[1]  # sumlx*sumlx*sl2
        upd = torch.minimum(slx, cand[1]) > 0  # slx > 0 && sl2 > 0
        upd &= new_l != Li
        upd &= lhs > rhs
        # L[i] += upd * (new_l - L[i]): exact on these small integers, and cheaper than a where
        step_l = new_l - Li
        step_l *= upd
        Li += step_l
        select_(sums, upd, cand)
        changed |= upd
    return changed


# --------------------------------------------------------------------------------------------------------------------
# packing helpers


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """(nb, 256) values in [0, 3] -> 64 bytes: ``qs[32h + l] = L[128h+l] | L[128h+l+32] << 2 | ... << 4 | ... << 6``."""
    q = L.reshape(-1, 2, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(-1, 64).to(torch.uint8)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    """64 bytes -> (nb, 256) values in [0, 3] (int32), inverse of :func:`_pack_2bit`."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=qs.device).view(1, 1, 4, 1)
    return ((qs.to(torch.int32).view(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and eight 6-bit mins (nb, 8) int32 -> the 12 ``scales`` bytes of Q4_K/Q5_K.

    ::

        byte 0..3 : ls[0..3] | (ls[4..7] >> 4) << 6
        byte 4..7 : lm[0..3] | (lm[4..7] >> 4) << 6
        byte 8..11: (ls[4..7] & 15) | (lm[4..7] & 15) << 4
    """
    a = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    c = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return (torch.cat([a, b, c], dim=1) & 0xFF).to(torch.uint8)


def _unpack_scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> (scales, mins), each (nb, 8) int32 (ggml ``get_scale_min_k4`` for j = 0..7)."""
    q = sc.to(torch.int32)
    d, m, md = q[:, 0:4], q[:, 4:8], q[:, 8:12]
    scales = torch.cat([d & 63, (md & 0xF) | ((d >> 6) << 4)], dim=1)
    mins = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], dim=1)
    return scales, mins


def _k4_scales(scales: torch.Tensor, mins: torch.Tensor):
    """Rounded 6-bit scales/mins of Q4_K/Q5_K (the block after the make_qkx2_quants loop in ggml)."""
    max_scale = pos_max(scales)
    max_min = pos_max(mins)
    c63 = fconst(63.0, scales)
    zero = _zero(scales)
    inv_scale = torch.where(max_scale > 0, c63 / max_scale, zero)
    inv_min = torch.where(max_min > 0, c63 / max_min, zero)
    ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)  # uint8_t ls = ...; MIN(63, ls)
    lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    d16 = fp16_bytes(max_scale / c63)
    dmin16 = fp16_bytes(max_min / c63)
    return ls, lm, d16, dmin16


def _requantize_min(x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor, nmax: int) -> torch.Tensor:
    """``L = clamp(nearest_int((x + dm)/d), 0, nmax)`` for (nb, k, n) sub-blocks with scale ``d``, min ``dm``."""
    return nearest_int((x + dm.unsqueeze(-1)) / d.unsqueeze(-1)).clamp_(0, nmax)


def _keep_search_quants(L: torch.Tensor, d: torch.Tensor, quants: SearchQuants | torch.Tensor) -> torch.Tensor:
    """``if (!d) continue;``: sub-blocks whose rounded scale ``d`` is zero keep the quants of their search.

    ``L`` (nb, k, n) int32 is updated in place; ``quants`` is a :class:`SearchQuants` or the (n, S) quants.
    """
    zero_d = (d == 0).reshape(-1)
    if bool(zero_d.any()):
        cols = zero_d.nonzero().squeeze(1)
        found = quants.take(cols) if isinstance(quants, SearchQuants) else quants[:, cols].t()
        L.view(-1, L.shape[-1])[cols] = found.to(L.dtype)
    return L


def _cat(parts: list[torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
    """The block bytes, concatenated into ``out`` when given."""
    if out is None:
        return torch.cat(parts, dim=1)
    return torch.cat(parts, dim=1, out=out)


# --------------------------------------------------------------------------------------------------------------------
# codecs


class Q2_KCodec(Codec):
    """Q2_K: 16 sub-blocks of 16 2-bit quants, 4-bit scales and mins, fp16 super-scale ``d`` and ``dmin``.

    Element = ``d * (scales[s] & 15) * q - dmin * (scales[s] >> 4)`` for sub-block ``s``. Bit-exact; matches
    ``quantize_row_q2_K_ref`` (``make_qkx2_quants(16, 3, weights=|x|, -0.5, 0.1, 15, use_mad=true)``) and
    ``dequantize_row_q2_K``. 84 bytes per 256 elements::

        byte 0          16                                   80     82      84
            +-----------+------------------------------------+------+-------+
            | scales[16]| qs[64]                             |  d   | dmin  |
            +-----------+------------------------------------+------+-------+
             low nibble: scale, high nibble: min of sub-block s
             qs[32h + l] = q[128h+l] | q[128h+l+32] << 2 | q[128h+l+64] << 4 | q[128h+l+96] << 6
    """

    qtype = Q2_K
    reference = "quantize_row_q2_K_ref / dequantize_row_q2_K"
    chunk_blocks = 1024

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        nb = x.shape[0]
        xT = _sub_blocks(x, 16)
        scales, mins, Ls = make_qkx2_quants(xT, xT.abs(), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.view(nb, 16), mins.view(nb, 16)
        max_scale, max_min = pos_max(scales), pos_max(mins)
        zero = _zero(x)
        c15 = fconst(15.0, x)
        # if (max_scale > 0) { scales[j] = nearest_int(15/max_scale*scales[j]); d = max_scale/15 } else 0
        ls = nearest_int((c15 / max_scale)[:, None] * scales) & 0xFF
        ls = torch.where((max_scale > 0)[:, None], ls, 0)
        lm = (nearest_int((c15 / max_min)[:, None] * mins) << 4) & 0xFF
        sb = torch.where((max_min > 0)[:, None], ls | lm, ls)
        d16 = fp16_bytes(torch.where(max_scale > 0, max_scale / c15, zero))
        dmin16 = fp16_bytes(torch.where(max_min > 0, max_min / c15, zero))
        d = fp16_from_bytes(d16)[:, None] * (sb & 0xF).to(torch.float32)
        dm = fp16_from_bytes(dmin16)[:, None] * (sb >> 4).to(torch.float32)
        L = _keep_search_quants(_requantize_min(x.view(nb, 16, 16), d, dm, 3), d, Ls)
        return _cat([sb.to(torch.uint8), _pack_2bit(L.reshape(nb, 256)), d16, dmin16], out)

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        nb = b.shape[0]
        sc = b[:, :16].to(torch.int32)
        d = fp16_from_bytes(b[:, 80:82])
        dmin = fp16_from_bytes(b[:, 82:84])
        dl = d[:, None] * (sc & 0xF).to(torch.float32)
        ml = dmin[:, None] * (sc >> 4).to(torch.float32)
        q = _unpack_2bit(b[:, 16:80]).to(torch.float32).view(nb, 16, 16)
        return (dl.unsqueeze(-1) * q - ml.unsqueeze(-1)).reshape(nb, 256)


class Q3_KCodec(Codec):
    """Q3_K: 16 sub-blocks of 16 3-bit quants (2 low bits + 1 high bit), 6-bit signed scales, fp16 ``d``.

    Element = ``d * (scale[s] - 32) * (q_low + 4*hbit - 4)``. Bit-exact; matches ``quantize_row_q3_K_ref``
    (``make_q3_quants(16, 4, do_rmse=true)``) and ``dequantize_row_q3_K``. 110 bytes per 256 elements::

        byte 0            32                            96            108    110
            +-------------+-----------------------------+-------------+------+
            | hmask[32]   | qs[64]                      | scales[12]  |  d   |
            +-------------+-----------------------------+-------------+------+
             hmask[l] bit k = high bit of element 32k + l
             qs: 2 low bits, packed as in Q2_K
             scales (6 bits each, s = 0..15):
               byte j   (0..7) : s[j] & 15 | (s[j+8] & 15) << 4
               byte 8+k (0..3) : bits 4..5 of s[k], s[k+4], s[k+8], s[k+12] at bit 0, 2, 4, 6
    """

    qtype = Q3_K
    reference = "quantize_row_q3_K_ref / dequantize_row_q3_K"
    chunk_blocks = 4096

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        nb = x.shape[0]
        xT = _sub_blocks(x, 16)
        scales, Ls = make_q3_quants(xT, 4)
        scales = scales.view(nb, 16)
        amax, max_scale = first_absmax(scales, nan_safe=True)
        nz = max_scale != 0
        zero = _zero(x)
        iscale = fconst(-32.0, x) / max_scale
        l = _int8(nearest_int(iscale[:, None] * scales)).clamp_(-32, 31) + 32  # int8_t l; MAX(-32, MIN(31, l)) + 32
        l = torch.where(nz[:, None], l, 0)
        lo = l & 0xF
        hi = l >> 4
        sbytes = torch.cat(
            [lo[:, :8] | (lo[:, 8:] << 4), hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)],
            dim=1,
        ).to(torch.uint8)
        d16 = fp16_bytes(torch.where(nz, fconst(1.0, x) / iscale, zero))
        sc = torch.where(nz[:, None], l - 32, -32)  # decoded from the bytes (all-zero bytes decode to -32)
        d = fp16_from_bytes(d16)[:, None] * sc.to(torch.float32)
        xs = x.view(nb, 16, 16)
        Lr = nearest_int(xs / d.unsqueeze(-1)).clamp_(-4, 3) + 4
        L = _keep_search_quants(Lr, d, Ls).reshape(nb, 256)
        hbit = (L > 3).to(torch.int32).view(nb, 8, 32)
        weights = (1 << torch.arange(8, dtype=torch.int32, device=x.device)).view(1, 8, 1)
        hmask = (hbit * weights).sum(1).to(torch.uint8)
        qs = _pack_2bit(L & 3)
        return _cat([hmask, qs, sbytes, d16], out)

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        nb = b.shape[0]
        hmask = b[:, :32].to(torch.int32)
        s = b[:, 96:108].to(torch.int32)
        d = fp16_from_bytes(b[:, 108:110])
        lo = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=b.device).view(1, 4, 1)
        hi = ((s[:, 8:12].view(nb, 1, 4) >> shifts) & 3).reshape(nb, 16)
        scale = (lo | (hi << 4)) - 32
        dl = d[:, None] * scale.to(torch.float32)
        ql = _unpack_2bit(b[:, 32:96])
        hbits = torch.arange(8, dtype=torch.int32, device=b.device).view(1, 8, 1)
        hb = ((hmask.view(nb, 1, 32) >> hbits) & 1).reshape(nb, 256)
        q = (ql - 4 * (1 - hb)).to(torch.float32).view(nb, 16, 16)
        return (dl.unsqueeze(-1) * q).reshape(nb, 256)


class Q4_KCodec(Codec):
    """Q4_K: 8 sub-blocks of 32 4-bit quants, 6-bit scales and mins, fp16 super-scale ``d`` and ``dmin``.

    Element = ``d * sc[s] * q - dmin * m[s]``. Bit-exact; matches ``quantize_row_q4_K_ref``
    (``make_qkx2_quants(32, 15, weights = sqrt(mean x^2) + |x|, -1, 0.1, 20, use_mad=false)``) and
    ``dequantize_row_q4_K``. 144 bytes per 256 elements::

        byte 0      2      4             16                                         144
            +------+------+-------------+--------------------------------------------+
            |  d   | dmin | scales[12]  | qs[128]                                    |
            +------+------+-------------+--------------------------------------------+
             fp16   fp16   6-bit sc[0..7], m[0..7]:
                           byte 0..3 : sc[0..3] | (sc[4..7] >> 4) << 6
                           byte 4..7 : m[0..3]  | (m[4..7] >> 4) << 6
                           byte 8..11: (sc[4..7] & 15) | (m[4..7] & 15) << 4
                           qs[32g + l] = q[64g + l] | q[64g + 32 + l] << 4   (g = 0..3)
    """

    qtype = Q4_K
    reference = "quantize_row_q4_K_ref / dequantize_row_q4_K"
    chunk_blocks = 2048
    nmax, rmin, rdelta, nstep = 15, -1.0, 0.1, 20

    @classmethod
    def _scales_and_quants(cls, x: torch.Tensor):
        nb = x.shape[0]
        xT = _sub_blocks(x, 32)
        sum_x2 = seq_sum(xT * xT)
        av_x = sqrt_f32(sum_x2 / fconst(32.0, x))  # sqrtf(sum_x2/32)
        w = xT.abs()
        w += av_x  # av_x + fabsf(x)
        scales, mins, Ls = make_qkx2_quants(xT, w, cls.nmax, cls.rmin, cls.rdelta, cls.nstep, False)
        ls, lm, d16, dmin16 = _k4_scales(scales.view(nb, 8), mins.view(nb, 8))
        d = fp16_from_bytes(d16)[:, None] * ls.to(torch.float32)
        dm = fp16_from_bytes(dmin16)[:, None] * lm.to(torch.float32)
        L = _keep_search_quants(_requantize_min(x.view(nb, 8, 32), d, dm, cls.nmax), d, Ls)
        return d16, dmin16, _pack_scale_min_k4(ls, lm), L.reshape(nb, 4, 2, 32)

    @classmethod
    def quantize_blocks(cls, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        d16, dmin16, sbytes, L = cls._scales_and_quants(x)
        qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)
        return _cat([d16, dmin16, sbytes, qs], out)

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        nb = b.shape[0]
        d = fp16_from_bytes(b[:, 0:2])
        dmin = fp16_from_bytes(b[:, 2:4])
        sc, m = _unpack_scale_min_k4(b[:, 4:16])
        dl = (d[:, None] * sc.to(torch.float32)).view(nb, 8, 1)
        ml = (dmin[:, None] * m.to(torch.float32)).view(nb, 8, 1)
        qs = b[:, 16:144].view(nb, 4, 1, 32)
        q = torch.cat([qs & 0xF, qs >> 4], dim=2).to(torch.float32).view(nb, 8, 32)
        return (dl * q - ml).reshape(nb, 256)


class Q5_KCodec(Q4_KCodec):
    """Q5_K: 8 sub-blocks of 32 5-bit quants, 6-bit scales and mins, fp16 ``d`` and ``dmin``.

    Element = ``d * sc[s] * q - dmin * m[s]``. Bit-exact; matches ``quantize_row_q5_K_ref``
    (``make_qkx2_quants(32, 31, weights = sqrt(mean x^2) + |x|, -0.5, 0.1, 15, use_mad=false)``) and
    ``dequantize_row_q5_K``. 176 bytes per 256 elements::

        byte 0      2      4             16            48                               176
            +------+------+-------------+-------------+----------------------------------+
            |  d   | dmin | scales[12]  | qh[32]      | qs[128]                          |
            +------+------+-------------+-------------+----------------------------------+
             as Q4_K        as Q4_K      qh[l] bit 2g+t = bit 4 of q[64g + 32t + l]
                                         qs[32g + l] = (q[64g+l] & 15) | (q[64g+32+l] & 15) << 4
    """

    qtype = Q5_K
    reference = "quantize_row_q5_K_ref / dequantize_row_q5_K"
    chunk_blocks = 2048
    nmax, rmin, rdelta, nstep = 31, -0.5, 0.1, 15

    @classmethod
    def quantize_blocks(cls, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        d16, dmin16, sbytes, L = cls._scales_and_quants(x)
        nb = x.shape[0]
        qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(nb, 128).to(torch.uint8)
        hb = ((L >> 4) & 1).reshape(nb, 8, 32)
        weights = (1 << torch.arange(8, dtype=torch.int32, device=x.device)).view(1, 8, 1)
        qh = (hb * weights).sum(1).to(torch.uint8)
        return _cat([d16, dmin16, sbytes, qh, qs], out)

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        nb = b.shape[0]
        d = fp16_from_bytes(b[:, 0:2])
        dmin = fp16_from_bytes(b[:, 2:4])
        sc, m = _unpack_scale_min_k4(b[:, 4:16])
        dl = (d[:, None] * sc.to(torch.float32)).view(nb, 8, 1)
        ml = (dmin[:, None] * m.to(torch.float32)).view(nb, 8, 1)
        qh = b[:, 16:48].view(nb, 1, 32)
        hbits = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
        hb = ((qh >> hbits) & 1) << 4  # (nb, 8, 32): sub-block 2g+t
        qs = b[:, 48:176].view(nb, 4, 1, 32)
        q = (torch.cat([qs & 0xF, qs >> 4], dim=2).view(nb, 8, 32) | hb).to(torch.float32)
        return (dl * q - ml).reshape(nb, 256)


class Q6_KCodec(Codec):
    """Q6_K: 16 sub-blocks of 16 6-bit quants (4 low + 2 high bits), int8 scales, fp16 ``d``.

    Element = ``d * scales[s] * (q - 32)``. Bit-exact; matches ``quantize_row_q6_K_ref``
    (``make_qx_quants(16, 32, rmse_type=1)``) and ``dequantize_row_q6_K``. 210 bytes per 256 elements::

        byte 0                      128               192           208    210
            +-----------------------+-----------------+-------------+------+
            | ql[128]               | qh[64]          | scales[16]  |  d   |
            +-----------------------+-----------------+-------------+------+
             for half h = 0, 1 (elements 128h ..), l = 0..31:
               ql[64h + l]      = q[128h + l]      & 15 | (q[128h + 64 + l] & 15) << 4
               ql[64h + 32 + l] = q[128h + 32 + l] & 15 | (q[128h + 96 + l] & 15) << 4
               qh[32h + l]      = q[128h + 32k + l] >> 4 at bits 2k..2k+1 (k = 0..3)
             scales: int8, one per 16 elements
    """

    qtype = Q6_K
    reference = "quantize_row_q6_K_ref / dequantize_row_q6_K"
    chunk_blocks = 2048

    @staticmethod
    def quantize_blocks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        nb = x.shape[0]
        xT = _sub_blocks(x, 16)
        scales, Ls = make_qx_quants(xT, 32)
        scales = scales.view(nb, 16)
        max_abs, max_scale = first_absmax(scales, nan_safe=True)
        allzero = max_abs < GROUP_MAX_EPS  # the whole super-block is stored as zeros
        iscale = fconst(-128.0, x) / max_scale
        d16 = fp16_bytes(fconst(1.0, x) / iscale)
        sc = _int8(nearest_int(iscale[:, None] * scales).clamp_(max=127))  # int8_t = MIN(127, nearest_int(..))
        d = fp16_from_bytes(d16)[:, None] * sc.to(torch.float32)
        xs = x.view(nb, 16, 16)
        Lr = nearest_int(xs / d.unsqueeze(-1)).clamp_(-32, 31) + 32
        L = _keep_search_quants(Lr, d, Ls).reshape(nb, 2, 4, 32)
        ql = torch.cat(
            [(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], dim=2
        ).reshape(nb, 128)
        hi = L >> 4
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
        out = _cat([ql.to(torch.uint8), qh.to(torch.uint8), (sc & 0xFF).to(torch.uint8), d16], out)
        if bool(allzero.any()):
            out[allzero] = 0
        return out

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        nb = b.shape[0]
        ql = b[:, :128].view(nb, 2, 2, 32)  # (h, k%2, l)
        qh = b[:, 128:192].view(nb, 2, 1, 32)
        sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        d = fp16_from_bytes(b[:, 208:210])
        low = torch.cat([ql & 0xF, ql >> 4], dim=2)  # (nb, 2, 4, 32): k = 0, 1 low nibbles, then 2, 3 high
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
        high = (qh >> shifts) & 3
        q = ((low | (high << 4)).to(torch.int32) - 32).to(torch.float32).view(nb, 16, 16)
        dl = (d[:, None] * sc).view(nb, 16, 1)
        return (dl * q).reshape(nb, 256)
