"""Per-layer blame: which modules make the candidate's output differ, and where the error grows.

One UNet call is recorded in both models with forward hooks on every leaf module (a module without children:
Linear, Conv2d, norms, activations, and the swapped-in quantized layers), in execution order, the two passes in
lockstep (:func:`run_blame`: no activation is stored):

* ``local``: the candidate's module run on the *reference's* inputs to that module, against the reference's output.
  Only the module's own weights or code can make this differ, so a perturbed, zeroed, missing or badly quantized
  layer is named directly, whatever happens around it.
* ``propagated``: the module's output in the candidate's own forward pass against the reference's: the error as
  it flows through the network (plotted per layer).
* ``input_sqnr_db`` and ``growth_db``: the error of the module's first input in the candidate's pass, and how many
  dB the module loses (input SQNR minus output SQNR): where the error grows.

The ranking sorts by local error (lowest SQNR first; execution order breaks ties, so among equals the earliest
module leads): the first entry is the layer to blame.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unetkit.dtypes import compute_dtype
from unetkit.metrics import ErrorStats, compare

log = logging.getLogger(__name__)


@dataclass
class ModuleBlame:
    module: str
    type: str
    block: str  # the top-level part it belongs to: time_embedding, down_blocks.1, mid_block, ...
    order: int  # execution order of the call
    call: int  # 0 for the first call of this module in the pass, 1 for the second (shared activations) ...
    local: ErrorStats
    propagated: ErrorStats | None
    input_sqnr_db: float | None

    @property
    def growth_db(self) -> float | None:
        if self.propagated is None or self.input_sqnr_db is None:
            return None
        out = self.propagated.sqnr_db
        if math.isinf(self.input_sqnr_db) and math.isinf(out):
            return 0.0
        return self.input_sqnr_db - out

    def to_dict(self) -> dict[str, Any]:
        growth = self.growth_db
        return {
            "module": self.module,
            "type": self.type,
            "block": self.block,
            "order": self.order,
            "call": self.call,
            "local": self.local.to_dict(),
            "propagated": self.propagated.to_dict() if self.propagated is not None else None,
            "input_sqnr_db": _finite(self.input_sqnr_db),
            "growth_db": _finite(growth),
        }


@dataclass
class BlameResult:
    timestep: int
    entries: list[ModuleBlame] = field(default_factory=list)  # execution order

    @property
    def ranking(self) -> list[ModuleBlame]:
        """Modules whose own output differs, worst local SQNR first."""
        bad = [e for e in self.entries if not e.local.identical]
        return sorted(bad, key=lambda e: (e.local.sqnr_db, e.order))

    @property
    def first_divergence(self) -> ModuleBlame | None:
        """The first module in execution order whose output in the candidate's pass differs."""
        return next((e for e in self.entries if e.propagated is not None and not e.propagated.identical), None)

    def blocks(self) -> list[dict[str, Any]]:
        """Per top-level block: its worst local SQNR and the module that has it, in network order."""
        out: dict[str, dict[str, Any]] = {}
        for e in self.entries:
            b = out.setdefault(
                e.block,
                {"block": e.block, "worst_local_sqnr_db": math.inf, "module": None, "modules": 0, "differing": 0},
            )
            b["modules"] += 1
            if not e.local.identical:
                b["differing"] += 1
                if e.local.sqnr_db < b["worst_local_sqnr_db"] or b["module"] is None:
                    b["worst_local_sqnr_db"], b["module"] = e.local.sqnr_db, e.module
        for b in out.values():
            b["worst_local_sqnr_db"] = _finite(b["worst_local_sqnr_db"])
        return list(out.values())

    def to_dict(self, top: int = 20) -> dict[str, Any]:
        first = self.first_divergence
        ranking = self.ranking
        return {
            "timestep": self.timestep,
            "modules": len(self.entries),
            "differing": len(ranking),
            "blamed": ranking[0].module if ranking else None,
            "blamed_block": ranking[0].block if ranking else None,
            "first_divergence": first.module if first else None,
            "ranking": [e.to_dict() for e in ranking[:top]],
            "blocks": self.blocks(),
            "layers": [
                {
                    "module": e.module,
                    "order": e.order,
                    "local_sqnr_db": _finite(e.local.sqnr_db),
                    "propagated_sqnr_db": _finite(e.propagated.sqnr_db) if e.propagated else None,
                }
                for e in self.entries
            ],
        }


def _finite(v: float | None) -> float | None:
    """JSON has no inf: identical (infinite SQNR) is written as null, the ``identical`` flags say so."""
    return None if v is None or math.isinf(v) or math.isnan(v) else v


def block_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        for o in obj.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    if hasattr(obj, "sample") and isinstance(obj.sample, torch.Tensor):
        return obj.sample
    return None


@torch.no_grad()
def run_blame(reference: nn.Module, candidate: nn.Module, run_reference, run_candidate, timestep: int) -> BlameResult:
    """Record one call of each model (``run_*()`` performs it) and compare module by module.

    Memory, by design independent of the network's depth: the two passes run in lockstep, leaf by leaf. The
    reference's pass runs in this thread and the candidate's in a helper thread, and they take turns at every leaf
    module (never computing at the same time): at each leaf the reference's hook runs the candidate's module on
    the same inputs (the local error) and hands its output and first input over; the candidate's pass then runs up
    to its own call of that leaf, compares (the propagated error) and hands the turn back. So one leaf's
    activations are alive at a time, not every leaf's: keeping a float32 copy of each leaf's output and first
    input for the candidate's pass, as this did before, costs 5.9 GB per sample for a full-size SDXL at 64x64
    latents and 23 GB at 128x128 (1,333 leaf calls), and nothing now (:mod:`unetkit.verification.memory`). When
    the candidate calls other leaves than the reference (a different module tree), it runs to its end alone and
    propagated errors are not compared from there on; local errors are unaffected."""
    cand_dtype = compute_dtype(candidate)
    result = BlameResult(timestep)
    seen: dict[str, int] = {}
    step = _Lockstep()

    main = threading.get_ident()
    busy = [False]  # the local error runs a candidate module: hooks must not fire for that call

    def ref_hook(name: str):
        def hook(module, args, kwargs, output):
            if busy[0] or threading.get_ident() != main:
                return
            out = _first_tensor(output)
            call = seen.get(name, 0)
            seen[name] = call + 1
            busy[0] = True
            try:
                local = _local_error(candidate, name, args, kwargs, out, cand_dtype)
            finally:
                busy[0] = False
            index = len(result.entries)
            result.entries.append(
                ModuleBlame(name, type(module).__name__, block_of(name), index, call, local, None, None)
            )
            # handed over as they are, no copy: this pass waits until the candidate's has compared them
            step.ref_posts(index, name, out, _first_tensor(args))

        return hook

    def cand_hook(name: str):
        def hook(module, args, kwargs, output):
            if threading.get_ident() == main:  # a local error, run from the reference's hook
                return
            got = step.cand_takes(name)
            if got is None:
                return
            i, ref_out, ref_in = got
            out, first = _first_tensor(output), _first_tensor(args)
            entry = result.entries[i]
            if out is not None and ref_out is not None and out.shape == ref_out.shape:
                entry.propagated = compare(ref_out.float(), out.float())
            if first is not None and ref_in is not None and first.shape == ref_in.shape:
                entry.input_sqnr_db = compare(ref_in.float(), first.float()).sqnr_db
            step.cand_done()

        return hook

    threads = torch.get_num_threads()

    def candidate_pass() -> None:
        torch.set_num_threads(threads)  # a new thread starts with torch's default count, not this one's
        try:
            step.wait("cand")
            if not step.aborted:
                with torch.no_grad():  # grad mode is per thread
                    _run_hooked(candidate, cand_hook, run_candidate)
        except BaseException as e:  # raised in this thread after the join
            step.error = e
        finally:
            step.finish("cand")

    helper = threading.Thread(target=candidate_pass, name="unetkit-blame-candidate", daemon=True)
    helper.start()
    try:
        _run_hooked(reference, ref_hook, run_reference)
    except BaseException:
        step.abort()
        raise
    finally:
        step.finish("ref")
        helper.join()
        _release_thread_buffers()  # the candidate's layers run here too (local errors): their scratch goes
    if step.error is not None and not isinstance(step.error, _Aborted):
        raise step.error
    return result


class _Aborted(Exception):
    """Stops the candidate's pass when the reference's failed."""


class _Lockstep:
    """Two passes taking turns ('ref' and 'cand') at every leaf call, with one leaf's activations handed over.

    The reference's pass starts and posts leaf i, then waits for its turn; the candidate's pass takes leaf i at its
    own i-th leaf call, compares and hands the turn back. A pass that ends, fails or falls out of step frees the
    other one for good, so nobody waits for a pass that is gone."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.turn = "ref"
        self.finished: set[str] = set()
        self.slot: tuple[int, str, torch.Tensor | None, torch.Tensor | None] | None = None
        self.taken = 0  # leaf calls the candidate has made
        self.aligned = True
        self.aborted = False
        self.error: BaseException | None = None

    def wait(self, side: str) -> None:
        other = "cand" if side == "ref" else "ref"
        with self.cond:
            while self.turn != side and other not in self.finished:
                self.cond.wait()

    def _hand(self, to: str) -> None:
        with self.cond:
            self.turn = to
            self.cond.notify_all()

    def ref_posts(self, index: int, name: str, out: torch.Tensor | None, first: torch.Tensor | None) -> None:
        if "cand" in self.finished:
            return
        self.slot = (index, name, out, first)
        self._hand("cand")
        self.wait("ref")
        self.slot = None

    def cand_takes(self, name: str) -> tuple[int, torch.Tensor | None, torch.Tensor | None] | None:
        """The reference's (index, output, first input) for the candidate's current leaf call, or None when the
        two passes are out of step (then the candidate runs to its end alone)."""
        if self.aborted:
            raise _Aborted
        i = self.taken
        self.taken += 1
        if not self.aligned:
            return None
        slot = self.slot
        if slot is None or slot[0] != i or slot[1] != name:
            log.warning(
                "blame: the candidate calls %s where the reference called %s; propagated errors are not "
                "compared from there on (local errors are unaffected)",
                name,
                slot[1] if slot is not None else "nothing",
            )
            self.aligned = False  # keep the turn until this pass ends: the two never compute at once
            return None
        return slot[0], slot[2], slot[3]

    def cand_done(self) -> None:
        self._hand("ref")
        self.wait("cand")

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()

    def finish(self, side: str) -> None:
        with self.cond:
            self.finished.add(side)
            if side == "ref":
                self.slot = None
            self.cond.notify_all()


def _release_thread_buffers() -> None:
    """Drop this thread's per-layer scratch of weights decoded (GGUF) or cast (``cast_in_forward``) in forward:
    the candidate's layers ran in this thread for their local errors, outside a forward of their own model."""
    from unetkit.quant.runtime import scratch

    scratch.release()


def _run_hooked(model: nn.Module, make_hook, run) -> None:
    """``run()`` with ``make_hook(name)`` as a forward hook (with kwargs) on every leaf module of ``model``."""
    handles = [m.register_forward_hook(make_hook(n), with_kwargs=True) for n, m in _leaves(model)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _local_error(
    candidate: nn.Module, name: str, args: tuple, kwargs: dict, ref_out: torch.Tensor | None, dtype: torch.dtype
) -> ErrorStats:
    """The candidate's module ``name`` on the reference's inputs, against the reference's output."""
    nan = ErrorStats(sqnr_db=-math.inf, cosine=0.0, rel_l2=math.inf, max_abs=math.inf, identical=False)
    try:
        module = candidate.get_submodule(name)
    except AttributeError:
        return nan  # the candidate has no such module at all
    if ref_out is None:
        return ErrorStats(math.inf, 1.0, 0.0, 0.0, True)
    out = _first_tensor(module(*_cast(args, dtype), **_cast(kwargs, dtype)))
    if out is None or out.shape != ref_out.shape:
        return nan
    return compare(
        ref_out.float() if ref_out.dtype != out.dtype else ref_out, out.float() if ref_out.dtype != out.dtype else out
    )
