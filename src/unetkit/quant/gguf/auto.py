"""Choose a qtype per tensor to meet a size or a quality target: ``gguf:auto``. Pure: no torch, no I/O.

Input: for every tensor the optimiser may decide, its options, each a qtype with the bytes it stores and the output
noise it is predicted to add (``noise``: the squared error it adds to the UNet's output, summed over the
calibration set; :mod:`unetkit.sensitivity` measures it). Noise of different tensors adds up: quantization errors
of different layers are independent, so their cross terms vanish in expectation, and the output's predicted SQNR
is ``10 log10(signal / (fixed noise + sum of the chosen options' noise))``.

The problem is a multiple-choice knapsack: one option per tensor, least total noise within a byte budget (size and
bits-per-weight targets), or fewest bytes within a noise budget (SQNR targets). The method (documented, and the
one of the knapsack literature for this shape of problem):

1. Per tensor, drop the dominated options (more bytes and no less noise) and keep the lower convex hull of
   (bytes, noise): along it, each step up buys less noise reduction per byte than the one before.
2. Start every tensor at its smallest option. Take hull steps in order of noise removed per byte, best first,
   while they fit the budget (a step that does not fit is passed over; a smaller step of another tensor may
   still fit). For a noise budget, take steps until the total noise is within it. This is the exact optimum of
   the problem's LP relaxation up to the last, partial step.
3. Polish: with what budget is left, apply the single option change (hull or not) that lowers the noise most and
   still fits, until none does (size targets); or drop, one at a time, the option change that saves the most
   bytes and keeps the noise within its budget (SQNR targets).

Ties break by tensor order, so the result is deterministic. ``QuantError`` when a target cannot be met by any
choice (a byte budget below the smallest options), naming the smallest reachable value.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from unetkit.errors import QuantError
from unetkit.quant.gguf.policy import AUTO, Recipe, fit, settled

#: the qtypes auto chooses from, smallest first (K-quants where the block fits; Q8_0 and F16 at the top). Legacy
#: types join only where a tensor fits no K-quant (the sdcpp and diffusers flavors' exact shapes)
LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16")
LEGACY = ("Q4_0", "Q5_0")


def candidates(
    tensors: Sequence[tuple[str, Sequence[int]]],
    flavor: str,
    keep: Sequence[str] = (),
    override: Sequence[str] = (),
    linear_names: set[str] | None = None,
    sensitive: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """The tensors ``gguf:auto`` decides, each with the qtypes the flavor can store it as (smallest first): the
    tensors no earlier rule of the policy settles (``--override``, ``--keep``, 1-D, the family's sensitive modules,
    the diffusers flavor's Linear-only rule), and of :data:`LADDER` the types whose block fits the tensor as the
    flavor stores it (:func:`.policy.fit`); where no K-quant fits, the legacy types that do."""
    recipe = Recipe.parse(AUTO, flavor, keep, override)
    sensitive = sensitive or {}
    out: dict[str, list[str]] = {}
    for name, shape in tensors:
        shape = tuple(int(d) for d in shape)
        is_linear = None if linear_names is None else name in linear_names
        if settled(name, shape, recipe, is_linear, sensitive.get(name)) is not None:
            continue
        fits = [q for q in LADDER if fit(name, shape, q, "", flavor).qtype == q]
        if not any(q.endswith("_K") for q in fits):
            fits = [q for q in LEGACY if fit(name, shape, q, "", flavor).qtype == q] + fits
        out[name] = fits
    return out


@dataclass(frozen=True)
class Option:
    qtype: str
    nbytes: int  # the tensor's data bytes when stored as qtype
    noise: float  # predicted squared error it adds to the output (calibration set total); 0 for lossless


@dataclass(frozen=True)
class Choice:
    """The option chosen for one tensor, with the hull neighbours it was weighed against (for the reason)."""

    name: str
    option: Option
    smaller: Option | None  # the next cheaper option on the tensor's hull, or None
    larger: Option | None  # the next larger option on the hull, or None

    def reason(self, total_noise: float) -> str:
        o = self.option
        text = f"auto: {o.nbytes} B, costs {_db_cost(total_noise, o.noise):.3g} dB of predicted SQNR"
        if self.larger is not None:
            d_b = self.larger.nbytes - o.nbytes
            text += f"; {self.larger.qtype}: +{d_b} B for {_db_cost(total_noise, o.noise - self.larger.noise):.3g} dB"
        return text


def _db_cost(total: float, part: float) -> float:
    """The SQNR (dB) that ``part`` of a total noise ``total`` costs: what removing it would gain."""
    if total <= 0 or part <= 0:
        return 0.0
    return 10 * math.log10(total / max(total - part, total * 1e-12))


@dataclass
class Solution:
    choices: dict[str, Choice]
    nbytes: int  # data bytes of the chosen options
    noise: float  # predicted noise of the chosen options
    met: bool  # the target was reached (a noise budget may be out of reach)
    steps: int  # hull steps and polish moves taken


def hull(options: Sequence[Option]) -> list[Option]:
    """The lower convex hull of ``options`` in (bytes, noise), smallest first, dominated options dropped."""
    pts: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.noise)):
        if pts and o.noise >= pts[-1].noise:
            continue  # dominated: more bytes, no less noise
        if pts and o.nbytes == pts[-1].nbytes:
            pts.pop()
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b is above the segment a-o: noise removed per byte rises from a-b to b-o, so b is not on the hull
            if (a.noise - b.noise) * (o.nbytes - b.nbytes) <= (b.noise - o.noise) * (b.nbytes - a.nbytes):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def choose(
    options: Mapping[str, Sequence[Option]], *, max_bytes: int | None = None, max_noise: float | None = None
) -> Solution:
    """One option per tensor: least noise within ``max_bytes``, or fewest bytes within ``max_noise`` (exactly one
    of the two). See the module's docstring for the method."""
    if (max_bytes is None) == (max_noise is None):
        raise QuantError("auto: give exactly one target (a byte budget or a noise budget)")
    names = list(options)
    for name in names:
        if not options[name]:
            raise QuantError(f"auto: tensor {name!r} has no option to choose from")
    hulls = {n: hull(options[n]) for n in names}
    at = dict.fromkeys(names, 0)  # index on the hull
    nbytes = sum(hulls[n][0].nbytes for n in names)
    noise = sum(hulls[n][0].noise for n in names)
    if max_bytes is not None and nbytes > max_bytes:
        raise QuantError(
            f"auto: the target leaves {max_bytes} bytes for the quantized tensors, but their smallest options "
            f"take {nbytes}; ask for a larger size (or fewer --keep globs)"
        )
    steps = 0

    def efficiency(n: str) -> float:
        h, i = hulls[n], at[n]
        return (h[i].noise - h[i + 1].noise) / max(h[i + 1].nbytes - h[i].nbytes, 1)

    heap = [(-efficiency(n), k, n) for k, n in enumerate(names) if len(hulls[n]) > 1]
    heapq.heapify(heap)
    while heap:
        if max_noise is not None and noise <= max_noise:
            break
        _, k, n = heapq.heappop(heap)
        h, i = hulls[n], at[n]
        d_bytes = h[i + 1].nbytes - h[i].nbytes
        if max_bytes is not None and nbytes + d_bytes > max_bytes:
            continue  # this tensor's further steps are larger still
        at[n] = i + 1
        nbytes += d_bytes
        noise += h[i + 1].noise - h[i].noise
        steps += 1
        if at[n] + 1 < len(h):
            heapq.heappush(heap, (-efficiency(n), k, n))
    chosen = {n: hulls[n][at[n]] for n in names}
    nbytes, noise, moved = _polish(options, chosen, names, nbytes, noise, max_bytes=max_bytes, max_noise=max_noise)
    steps += moved
    met = max_noise is None or noise <= max_noise
    choices = {}
    for n in names:
        h = hulls[n]
        o = chosen[n]
        smaller = max((x for x in h if x.nbytes < o.nbytes), key=lambda x: x.nbytes, default=None)
        larger = min((x for x in h if x.nbytes > o.nbytes), key=lambda x: x.nbytes, default=None)
        choices[n] = Choice(n, o, smaller, larger)
    return Solution(choices, nbytes, noise, met, steps)


def _polish(options, chosen, names, nbytes, noise, *, max_bytes=None, max_noise=None):
    """One option change at a time, until none helps. With ``max_bytes``: the change that lowers the noise most and
    still fits (spending what the greedy left of the budget). With ``max_noise``: the change that saves the most
    bytes and keeps the noise within it (giving back bytes the budget does not need)."""
    if max_noise is not None and noise > max_noise:
        return nbytes, noise, 0
    moved = 0
    while True:
        best = None
        for k, n in enumerate(names):
            cur = chosen[n]
            for o in options[n]:
                if max_bytes is not None:
                    ok = o.noise < cur.noise and nbytes - cur.nbytes + o.nbytes <= max_bytes
                    key = (cur.noise - o.noise, -o.nbytes, -k)
                else:
                    ok = o.nbytes < cur.nbytes and noise - cur.noise + o.noise <= max_noise
                    key = (cur.nbytes - o.nbytes, -o.noise, -k)
                if ok and (best is None or key > best[0]):
                    best = (key, n, o)
        if best is None:
            return nbytes, noise, moved
        _, n, o = best
        nbytes += o.nbytes - chosen[n].nbytes
        noise += o.noise - chosen[n].noise
        chosen[n] = o
        moved += 1
