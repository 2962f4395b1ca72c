"""``gguf:auto``: quantize to a size, bits-per-weight or SQNR target.

The flow:
1. Measure the sensitivity of the source (:mod:`.measure`; cached).
2. The policy settles what it always settles (``--override``, ``--keep``, 1-D tensors, the family's sensitive
   modules, the flavor's rules); every other tensor gets its options, the qtypes the flavor can store it as.
3. :func:`unetkit.quant.gguf.auto.choose` picks one option per tensor.
4. The file is written by the one GGUF writer.
5. For every target, the written file is run on the calibration set and its measured SQNR is reported beside the
   prediction. For an SQNR target, the result says plainly whether the measured SQNR met it.

A size target is met exactly, never exceeded: the file's size is computed exactly before anything is encoded
(:func:`unetkit.gguf_export.planned_file_bytes`, header and padding included) and checked after writing.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unetkit.errors import UnetkitError
from unetkit.quant.gguf.auto import Option, Solution, candidates, choose
from unetkit.quant.gguf.policy import AUTO, RECIPES, Recipe, fit
from unetkit.quant.gguf.qtypes import n_bytes
from unetkit.sensitivity.measure import Progress, Sensitivity, Settings, analyze

ALIGNMENT = 32  # GGUF's default: every tensor's data is padded to it
#: an SQNR target is planned this far above the target. On full-size SD1.5 (BENCHMARKS.md, gguf:auto) the measured
#: SQNR of a mix was within 0.13 dB below and 0.43 dB above the prediction, from 9 dB to 39 dB
SQNR_MARGIN_DB = 0.25
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3}
_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30})


def parse_size(text: str | int) -> int:
    """``600MiB``, ``1.5GB``, ``700M`` (M, G: decimal), or a number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise UnetkitError(f"--target-size {text!r}: expected a size such as 600MiB, 1.5GB or 700000000")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class AutoResult:
    output: str
    target: dict[str, Any]  # kind (size, bpw, sqnr), value, and the text given
    met: bool | None  # the target was met (size, bpw: by construction; sqnr: as measured; None: not measured)
    file_bytes: int
    bits_per_weight: float
    predicted_sqnr_db: float
    predicted_per_timestep_db: list[float]
    measured_sqnr_db: float | None
    measured_per_timestep_db: list[float] | None
    mix: dict[str, dict[str, int]]  # block -> qtype -> parameters
    by_qtype: dict[str, dict[str, int]]
    front: dict[str, list[dict[str, Any]]]  # predicted size/SQNR points: auto at several sizes, each fixed recipe
    decisions: list[dict[str, Any]]
    sensitivity: dict[str, Any]  # cached, seconds, check agreement
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("predicted_sqnr_db", "measured_sqnr_db"):  # JSON has no inf: None says lossless
            d[k] = _finite(d[k]) if d[k] is not None else None
        for k in ("predicted_per_timestep_db", "measured_per_timestep_db"):
            d[k] = None if d[k] is None else [_finite(v) for v in d[k]]
        return d


def quantize_to_target(
    src: str | Path,
    out: str | Path,
    *,
    target_size: str | int | None = None,
    target_bpw: float | None = None,
    target_sqnr: float | None = None,
    flavor: str = "comfy",
    keep: Sequence[str] = (),
    override: Sequence[str] = (),
    force: bool = False,
    settings: Settings | None = None,
    measure: bool = True,
    cache: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
    sqnr_margin_db: float = SQNR_MARGIN_DB,
) -> AutoResult:
    """Write ``out``, a GGUF of ``src`` whose per-tensor qtypes meet exactly one target: ``target_size`` (bytes, or
    a text such as ``600MiB``; the file is never larger), ``target_bpw`` (bits per weight over all tensors), or
    ``target_sqnr`` (dB: the output's SQNR over the calibration set, predicted, then measured). See the module's
    docstring. An SQNR target is planned ``sqnr_margin_db`` above the target, so that the measured SQNR, which
    the prediction misses by a little either way, lands on the target's side."""
    import time

    from unetkit.formats.atomic import check_output
    from unetkit.gguf_export import planned_file_bytes, quantize_file

    t0 = time.perf_counter()
    given = [(k, v) for k, v in (("size", target_size), ("bpw", target_bpw), ("sqnr", target_sqnr)) if v is not None]
    if len(given) != 1:
        raise UnetkitError("gguf:auto needs exactly one target: --target-size, --target-bpw or --target-sqnr")
    kind, raw = given[0]
    value = float(parse_size(raw)) if kind == "size" else float(raw)  # type: ignore[arg-type]
    if not math.isfinite(value) or (kind != "sqnr" and value <= 0):
        raise UnetkitError(f"--target-{kind} {raw!r}: expected a finite number above 0")
    src, out = Path(src), Path(out)
    check_output(out, force, inputs=(src,))  # before minutes of measuring
    Recipe.parse(AUTO, flavor, keep, override)  # bad flavor or override: said now
    sens = analyze(src, settings, cache=cache, workers=workers, progress=progress)
    plan = AutoPlan.build(src, sens, flavor, keep, override)
    notes = list(plan.notes)
    if kind == "sqnr":
        sol = plan.solve_sqnr(value + sqnr_margin_db)
    elif kind == "bpw":
        sol = plan.solve_bytes(int(value * plan.parameters / 8) - plan.fixed_bytes, padded=False)
    else:
        sol = plan.solve_size(int(value), planned_file_bytes)
    chosen = plan.chosen(sol)
    r = quantize_file(
        src, out, "gguf:auto", flavor=flavor, keep=keep, override=override, force=force, workers=workers, chosen=chosen
    )
    if kind == "size" and r.file_bytes > value:
        raise UnetkitError(f"internal error: {out} has {r.file_bytes} bytes, over the target {int(value)}")
    noise = plan.fixed_noise_t
    per_t = list(noise)
    for name, c in sol.choices.items():
        per_t = [a + b for a, b in zip(per_t, _per_t(sens, name, c.option.qtype))]
    predicted = sens.sqnr_db(sum(per_t))
    predicted_t = [_db(s, n) for s, n in zip(sens.signal, per_t)]
    measured, measured_t = (None, None)
    if measure:
        measured, measured_t = measure_file(src, out, sens)
    met: bool | None = True
    if kind == "sqnr":
        met = None if measured is None else measured >= value
        if not sol.met:
            notes.append(
                f"the predicted SQNR {predicted:.2f} dB stays below the target {value} dB even with every tensor at "
                "its most precise option"
            )
        if met is False:
            notes.append(f"target missed: measured {measured:.2f} dB < {value} dB (predicted {predicted:.2f} dB)")
    return AutoResult(
        output=str(out),
        target={"kind": kind, "value": value, "given": str(raw)},
        met=met,
        file_bytes=r.file_bytes,
        bits_per_weight=r.bits_per_weight,
        predicted_sqnr_db=predicted,
        predicted_per_timestep_db=predicted_t,
        measured_sqnr_db=measured,
        measured_per_timestep_db=measured_t,
        mix=mix_by_block(r.decisions),
        by_qtype=r.by_qtype,
        front=plan.front(planned_file_bytes),
        decisions=r.decisions,
        sensitivity={"cached": sens.cached, "seconds": sens.seconds, "check": _summary(sens.check)},
        notes=notes,
        seconds=time.perf_counter() - t0,
    )


def _db(signal: float, noise: float) -> float:
    return math.inf if noise <= 0 else 10 * math.log10(signal / noise)


def _per_t(sens: Sensitivity, name: str, qtype: str) -> list[float]:
    t = sens.by_name().get(name)
    if t is None or qtype not in t.noise:
        return [0.0] * len(sens.signal)
    return t.noise[qtype]


def _summary(check: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in check.items() if k != "pairs"}


@dataclass
class AutoPlan:
    """The tensors auto decides, their options, and what the policy settles around them."""

    source: Any
    sens: Sensitivity
    recipe: Recipe
    tensors: list[tuple[str, tuple[int, ...]]]  # (LDM name, shape), in the source's order
    options: dict[str, list[Option]]  # padded bytes
    options_raw: dict[str, list[Option]]  # unpadded bytes (bits per weight)
    fixed_bytes: int  # unpadded data bytes of the tensors the policy settles
    fixed_noise_t: list[float]  # their predicted noise per timestep
    parameters: int
    notes: list[str]

    @staticmethod
    def build(src: Path, sens: Sensitivity, flavor: str, keep: Sequence[str], override: Sequence[str]) -> AutoPlan:
        from unetkit.gguf_export import plan_source, sensitive_tensors
        from unetkit.resolve import open_unet

        source = open_unet(src)
        named = {d: (source.ldm_name(d), tuple(e.shape)) for d, e in source.tensors.items()}
        tensors = list(named.values())
        cands = candidates(
            tensors, flavor, keep, override, sensitive=sensitive_tensors(named, source.spec.model_family)
        )
        by_name = sens.by_name()
        notes: list[str] = []
        options: dict[str, list[Option]] = {}
        options_raw: dict[str, list[Option]] = {}
        for name, shape in tensors:
            if name not in cands:
                continue
            measured = by_name.get(name)
            opts, raw = [], []
            for q in cands[name]:
                if measured is None or q not in measured.noise:
                    continue
                d = fit(name, shape, q, "", flavor)
                nb = n_bytes(q, d.stored_shape)
                noise = measured.total(q) or 0.0
                opts.append(Option(q, nb + (-nb % ALIGNMENT), noise))
                raw.append(Option(q, nb, noise))
            if not opts:
                raise UnetkitError(f"gguf:auto: no measured option for {name} (its sensitivity is missing)")
            options[name], options_raw[name] = opts, raw
        # what the policy settles: planned with every decided tensor at its smallest option
        recipe = Recipe.parse(AUTO, flavor, keep, override)
        smallest = {n: (_smallest(o).qtype, "") for n, o in options.items()}
        probe = Recipe(AUTO, flavor, recipe.keep, recipe.override, smallest)
        fixed_bytes, fixed_noise, params = 0, [0.0] * len(sens.signal), 0
        for dec in plan_source(source, probe):
            params += math.prod(dec.shape)
            if dec.name in options:
                continue
            fixed_bytes += n_bytes(dec.qtype, dec.stored_shape)
            measured = by_name.get(dec.name)
            if dec.qtype == "F32" or (measured is None and len(dec.shape) < 2):
                continue
            if measured is None or dec.qtype not in measured.noise:
                notes.append(f"{dec.name} is stored as {dec.qtype} ({dec.reason}); its noise is not predicted")
                continue
            fixed_noise = [a + b for a, b in zip(fixed_noise, measured.noise[dec.qtype])]
        return AutoPlan(source, sens, recipe, tensors, options, options_raw, fixed_bytes, fixed_noise, params, notes)

    def solve_bytes(self, budget: int, padded: bool = True) -> Solution:
        return choose(self.options if padded else self.options_raw, max_bytes=budget)

    def solve_sqnr(self, db: float) -> Solution:
        max_noise = sum(self.sens.signal) / 10 ** (db / 10) - sum(self.fixed_noise_t)
        if max_noise <= 0:  # the settled tensors alone are noisier: every option at its most precise
            return choose(self.options, max_noise=0.0)
        return choose(self.options, max_noise=max_noise)

    def solve_size(self, target: int, planned_file_bytes: Any) -> Solution:
        """Least noise in a file of at most ``target`` bytes: the byte budget is the target less the header and
        the settled tensors (exact, from the planned file; the header holds every decision's reason, so it is
        planned again after each choice until the file fits)."""
        lo = sum(_smallest(o).nbytes for o in self.options.values())
        at_floor = self.chosen(self.solve_bytes(lo))  # every decided tensor at its smallest option, with reasons
        floor = planned_file_bytes(self.source, self._recipe(at_floor), self._decisions(at_floor))
        if floor > target:
            raise UnetkitError(
                f"--target-size {target} bytes: the smallest file gguf:auto can write here is {floor} bytes (every "
                f"tensor it decides at its smallest qtype, the others as --keep/--override, the family and the "
                f"{self.recipe.flavor} flavor settle them)"
            )
        # the header and the settled tensors, as planned for the floor; the reasons of another choice differ in
        # length by a few bytes each, which `slack` takes up if the planned file comes out over the target
        around = floor - sum(self._option(n, q).nbytes for n, (q, _) in at_floor.items())
        slack = 0
        for _ in range(8):
            budget = target - around - slack
            if budget < lo:
                return self.solve_bytes(lo)
            sol = self.solve_bytes(budget)
            final = planned_file_bytes(self.source, self._recipe(self.chosen(sol)), self._decisions(self.chosen(sol)))
            if final <= target:
                return sol
            slack += final - target
        raise UnetkitError(f"gguf:auto could not fit the file into {target} bytes")

    def _option(self, name: str, qtype: str) -> Option:
        return next(o for o in self.options[name] if o.qtype == qtype)

    def _recipe(self, chosen: dict[str, tuple[str, str]]) -> Recipe:
        return Recipe(AUTO, self.recipe.flavor, self.recipe.keep, self.recipe.override, chosen)

    def _decisions(self, chosen: dict[str, tuple[str, str]]) -> list:
        from unetkit.gguf_export import plan_source

        return plan_source(self.source, self._recipe(chosen))

    def chosen(self, sol: Solution) -> dict[str, tuple[str, str]]:
        total = sum(self.fixed_noise_t) + sol.noise
        return {n: (c.option.qtype, c.reason(total)) for n, c in sol.choices.items()}

    def front(self, planned_file_bytes: Any, points: int = 8) -> dict[str, list[dict[str, Any]]]:
        """Predicted (file bytes, SQNR) of auto at ``points`` sizes from the smallest to the largest options, and of
        every fixed recipe whose qtypes were all measured."""
        from unetkit.gguf_export import plan_source

        lo = sum(min(o.nbytes for o in opts) for opts in self.options.values())
        hi = sum(max(o.nbytes for o in opts) for opts in self.options.values())
        auto = []
        for k in range(points):
            budget = lo + (hi - lo) * k // max(points - 1, 1)
            sol = self.solve_bytes(budget)
            size = planned_file_bytes(self.source, self._recipe(self.chosen(sol)), self._decisions(self.chosen(sol)))
            noise = sum(self.fixed_noise_t) + sol.noise
            auto.append({"file_bytes": size, "predicted_sqnr_db": _finite(self.sens.sqnr_db(noise))})
        recipes = []
        by_name = self.sens.by_name()
        for name in RECIPES:
            if RECIPES[name][0] in ("F32", "BF16"):
                continue
            overrides = [f"{g}={q}" for g, q in self.recipe.override]
            recipe = Recipe.parse(name, self.recipe.flavor, self.recipe.keep, overrides)
            decisions = plan_source(self.source, recipe)
            noise, known = 0.0, True
            for d in decisions:
                if d.qtype == "F32":
                    continue
                t = by_name.get(d.name)
                if t is None or d.qtype not in t.noise:
                    known = len(d.shape) < 2
                    if not known:
                        break
                    continue
                noise += t.total(d.qtype) or 0.0
            if known:
                size = planned_file_bytes(self.source, recipe, decisions)
                recipes.append(
                    {"recipe": name, "file_bytes": size, "predicted_sqnr_db": _finite(self.sens.sqnr_db(noise))}
                )
        return {"auto": auto, "recipes": recipes}


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x


def mix_by_block(decisions: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Parameters per qtype in each UNet block (``input_blocks.4``, ``middle_block``, ``time_embed``, ...)."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for d in decisions:
        parts = d["name"].split(".")
        block = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        out[block][d["qtype"]] += math.prod(d["shape"])
    return {b: dict(q) for b, q in out.items()}


def measure_file(src: Path, out: Path, sens: Sensitivity) -> tuple[float, list[float]]:
    """The written file's output SQNR on the calibration set (aggregate and per timestep), against the source:
    the reference as analyze ran it (fp32), the GGUF decoded on the fly."""
    from unetkit.loading import load_unet
    from unetkit.sensitivity.measure import calibration

    settings = Settings(**sens.settings)
    ref = load_unet(src, dtype="fp32")
    calib = calibration(ref, settings)
    ref_out = calib.run(ref)
    del ref
    cand = load_unet(out, dequantize="on-the-fly", compute_dtype="fp32")
    cand_out = calib.run(cand)
    sig = [float(r.double().pow(2).sum()) for r in ref_out]
    noise = [float((c - r).double().pow(2).sum()) for c, r in zip(cand_out, ref_out)]
    total = _db(sum(sig), sum(noise))
    return total, [_db(s, n) for s, n in zip(sig, noise)]


def _smallest(options: list[Option]) -> Option:
    return min(options, key=lambda o: (o.nbytes, o.noise))
