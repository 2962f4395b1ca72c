"""Quantize a UNet file into a GGUF file for ComfyUI-GGUF, stable-diffusion.cpp or diffusers, streamed.

Every tensor gets a decision from the pure policy (``quant.policy``); one tensor at a time is read, encoded and
written; the decisions ride along in the file's metadata and in the returned summary."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetkit.dtypes import BY_CODE
from unetkit.errors import UnetkitError
from unetkit.families import Family
from unetkit.formats.atomic import atomic_output, check_output
from unetkit.formats.base import TensorEntry, read_range
from unetkit.formats.gguf import ORIG_SHAPE_KEY, GGUFOut, check_string_kv, file_bytes, write_gguf
from unetkit.formats.hashing import FileHasher
from unetkit.provenance import DECISIONS, FLAVOR, LDM_PREFIX, METHOD, SOURCE_SHA256, metadata_for
from unetkit.quant.gguf.policy import AUTO, GGUF_METHOD, Decision, Recipe, plan
from unetkit.resolve import UNetSource, open_unet
from unetkit.shapes import numel


@dataclass
class QuantizeResult:
    output: str
    method: str
    flavor: str
    variant: str
    tensors: int
    parameters: int
    file_bytes: int
    bits_per_weight: float
    by_qtype: dict[str, dict[str, int]]
    decisions: list[dict[str, Any]] = field(default_factory=list)
    source_sha256: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantize_file(
    src: str | Path,
    out: str | Path,
    method: str = "gguf:Q8_0",
    *,
    flavor: str = "comfy",
    keep: Sequence[str] = (),
    override: Sequence[str] = (),
    force: bool = False,
    ema: bool = False,
    config: Mapping[str, Any] | str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    workers: int | None = None,
    chosen: Mapping[str, tuple[str, str]] | None = None,
) -> QuantizeResult:
    """Quantize ``src`` (any input unetkit reads) to the GGUF file ``out``.

    ``method``: ``gguf:<recipe>`` with recipe F16, BF16, Q8_0, Q6_K, Q5_0, Q5_1, Q4_0, Q4_1, Q5_K_M, Q5_K_S,
    Q4_K_M, Q4_K_S, Q3_K_M or Q2_K. ``flavor``: comfy (default), sdcpp or diffusers (see ``quant.policy``).
    ``keep``: globs kept at high precision; ``override``: 'GLOB=QTYPE' strings. ``workers``: encoder processes
    (default: one per core when there are more than ``PARALLEL_MIN_BYTES`` to encode, else none). ``chosen``:
    for ``gguf:auto`` only, each tensor's (qtype, reason) by LDM name (what :mod:`unetkit.sensitivity` chooses).
    """
    t0 = time.perf_counter()
    recipe = _recipe(method, flavor, keep, override, chosen)
    src, out = Path(src), Path(out)
    check_output(out, force, inputs=(src,))
    source = open_unet(src, ema=ema, config=config)
    family = source.spec.model_family
    decisions = plan_source(source, recipe)
    meta, kv = header_kv(source, recipe, decisions)
    prefix = _prefix(recipe)
    tensors = []
    pool = _EncoderPool.for_plan(list(source.tensors.values()), decisions, workers)
    for i, (entry, dec) in enumerate(zip(source.tensors.values(), decisions)):
        written = prefix + dec.name
        produce = pool.producer(i) if pool and pool.handles(i) else _producer(entry, dec, written)
        tensors.append(GGUFOut(written, dec.qtype, dec.stored_shape, produce))
    hasher = FileHasher(source.checkpoint.files)
    total = sum(t.nbytes for t in tensors)
    if on_start:
        on_start(total)
    # the header is written first; the source hash, computed meanwhile on the other core, is patched in at the end
    with pool or contextlib.nullcontext(), atomic_output(out, force=force) as tmp:
        hasher.start()  # after the encoder processes are forked
        write_gguf(
            tmp,
            tensors,
            {**meta, **kv},
            arch=family.gguf_architecture,
            progress=progress,
            final_kv=lambda: {SOURCE_SHA256: hasher.result()},
        )
    return summarize(out, recipe, source.spec.variant, decisions, tensors, hasher.result(), time.perf_counter() - t0)


def _recipe(
    method: str,
    flavor: str,
    keep: Sequence[str],
    override: Sequence[str],
    chosen: Mapping[str, tuple[str, str]] | None = None,
) -> Recipe:
    if not method.lower().startswith(GGUF_METHOD):
        raise UnetkitError(f"unknown method {method!r}; GGUF methods are gguf:<recipe>, e.g. gguf:Q4_K_M")
    recipe = Recipe.parse(method[len(GGUF_METHOD) :], flavor, keep, override)
    if recipe.name == AUTO:
        if chosen is None:
            raise UnetkitError(
                "gguf:auto chooses each tensor's qtype for a target: give one "
                "(`unetkit quantize IN OUT --method gguf:auto --target-size 600MiB`, or --target-bpw / "
                "--target-sqnr; in Python unetkit.sensitivity.quantize_to_target)"
            )
        recipe = replace(recipe, chosen=dict(chosen))
    elif chosen is not None:
        raise UnetkitError(f"per-tensor choices are for gguf:auto, not {method}")
    return recipe


def _prefix(recipe: Recipe) -> str:
    return "" if recipe.flavor == "comfy" else LDM_PREFIX


def plan_source(source: UNetSource, recipe: Recipe) -> list[Decision]:
    """The decision for every tensor of an opened source, in its order."""
    return plan_tensors(
        {d: (source.ldm_name(d), tuple(e.shape)) for d, e in source.tensors.items()}, source.spec.model_family, recipe
    )


def header_kv(source: UNetSource, recipe: Recipe, decisions: list[Decision]) -> tuple[dict[str, str], dict[str, Any]]:
    """The key/values a GGUF of ``source`` holds besides the writer's own: (unetkit's and the source's metadata,
    the comfy reshapes' real shapes). The source hash is a placeholder of its final length."""
    prefix = _prefix(recipe)
    kv: dict[str, Any] = {}
    for dec in decisions:
        if dec.stored_shape != dec.shape:
            kv[ORIG_SHAPE_KEY + prefix + dec.name] = list(dec.shape)
    meta = metadata_for(
        source.spec,
        source.path,
        layout="ldm",
        extra={
            METHOD: f"gguf:{recipe.name}",
            FLAVOR: recipe.flavor,
            DECISIONS: json.dumps({d.name: [d.qtype, d.reason] for d in decisions}),
        },
        # the source's own metadata rides along as string KVs, the prediction type and its marker bytes too (GGUF
        # holds no marker tensors); no safetensors "format" key: GGUF has general.* keys
        carried=source.source_metadata,
        prediction=source.prediction,
        markers_in_metadata=True,
        container="gguf",
    )
    for key, value in meta.items():  # before any work: a value GGUF cannot hold is an error, never dropped
        check_string_kv(key, value, source.path)
    return meta, kv


def planned_file_bytes(source: UNetSource, recipe: Recipe, decisions: list[Decision]) -> int:
    """The exact size of the file :func:`quantize_file` writes for these decisions, before anything is encoded."""
    meta, kv = header_kv(source, recipe, decisions)
    prefix = _prefix(recipe)
    writer_kv = {"general.architecture": source.spec.model_family.gguf_architecture, "general.quantization_version": 2}
    return file_bytes([(prefix + d.name, d.qtype, d.stored_shape) for d in decisions], {**writer_kv, **meta, **kv})


def plan_tensors(tensors: Mapping[str, tuple[str, tuple[int, ...]]], family: Family, recipe: Recipe) -> list[Decision]:
    """The decision for every tensor, in order: ``tensors`` maps diffusers names to (LDM name, shape); the family
    says which modules stay high-precision (``Family.sensitive``)."""
    return plan(list(tensors.values()), recipe, sensitive=sensitive_tensors(tensors, family))


def sensitive_tensors(tensors: Mapping[str, tuple[str, tuple[int, ...]]], family: Family) -> dict[str, str]:
    """LDM name -> why, for the weights of the modules the family keeps at high precision."""
    return {
        ldm: why
        for d, (ldm, shape) in tensors.items()
        if len(shape) > 1 and (why := family.sensitive_reason(d.rsplit(".", 1)[0]))
    }


def plan_config(
    config: Mapping[str, Any],
    method: str = "gguf:Q8_0",
    *,
    flavor: str = "comfy",
    keep: Sequence[str] = (),
    override: Sequence[str] = (),
) -> list[Decision]:
    """The decisions ``quantize_file`` makes for a UNet with this (complete diffusers) config, from the config
    alone: no file, no weights, no torch. Sizes follow from them (``Decision.stored_shape`` and ``qtype``;
    ``formats.gguf.file_bytes``). Tensors come in the model's parameter order, with LDM names."""
    from unetkit.families import for_config
    from unetkit.keymap import KeyMap, Topology
    from unetkit.spec import expected_shapes

    recipe = _recipe(method, flavor, keep, override)
    keymap = KeyMap.for_topology(Topology.from_config(config))
    tensors = {}
    for name, shape in expected_shapes(config).items():
        ldm = keymap.to_ldm(name)
        if ldm is None:
            raise UnetkitError(f"no LDM name for {name!r}")
        tensors[name] = (ldm, shape)
    return plan_tensors(tensors, for_config(config), recipe)


PARALLEL_MIN_BYTES = 256 << 20  # below this, starting encoder processes (about 2 s each: torch import) does not pay


class _EncoderPool:
    """Encoder processes for the tensors that are quantized to a block type and whose bytes sit in a file.

    The block encoders are many small torch ops: split over cores inside one op they scale poorly, and two threads
    of one process contend for the GIL (measured on SD1.5 Q4_K_M: 80 s with 2 intra-op threads, 116 s with two
    1-thread encoder threads). Separate processes, one torch thread each, scale with the cores. Each job names a
    byte range of the source; the worker reads it itself and returns the encoded bytes. Jobs are submitted a few
    tensors ahead of the writer, which takes the results in file order; the jobs not yet written are bounded in
    bytes (``AHEAD_BYTES``), so memory stays bounded while every worker stays busy."""

    AHEAD_BYTES = 256 << 20  # jobs submitted and not yet written: at most this many bytes of float32 input

    def __init__(self, jobs: dict[int, tuple], workers: int):
        self.jobs, self.workers = jobs, workers
        self.order = sorted(jobs)
        self.futures: dict[int, Any] = {}
        self.next = 0
        self.executor: Any = None

    @classmethod
    def for_plan(cls, entries: list[TensorEntry], decisions: list[Decision], workers: int | None):
        jobs = {}
        for i, (e, dec) in enumerate(zip(entries, decisions)):
            if (
                dec.qtype not in ("F32", "F16", "BF16")
                and e.qtype is None
                and e.file is not None
                and e.offset is not None
                and e.code in ("F32", "F16", "BF16")
            ):
                jobs[i] = (str(e.file), e.offset, e.code, tuple(e.shape), tuple(dec.stored_shape), dec.qtype, e.name)
        if workers is None:
            n_bytes = sum(numel(j[3]) * 4 for j in jobs.values())
            workers = (os.cpu_count() or 1) if n_bytes >= PARALLEL_MIN_BYTES else 0
        return cls(jobs, workers) if workers > 1 and jobs else None

    def handles(self, i: int) -> bool:
        return i in self.jobs

    def __enter__(self) -> _EncoderPool:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from unetkit.quant.gguf.codecs import fused

        fused.warm()  # compiled once here; the forked workers inherit it

        # fork, not spawn: spawn re-imports the caller's __main__ script, which breaks scripts without an
        # `if __name__ == "__main__"` guard. The workers are forked (and warmed up) before the hashing thread starts;
        # they run torch with one thread, as DataLoader workers do.
        self.executor = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("fork"), initializer=_encoder_init
        )
        for f in [self.executor.submit(_encoder_ready) for _ in range(self.workers)]:
            f.result()
        # the cores belong to the workers now: this process's own ops (F16 casts) run on one thread, or torch's
        # spinning OpenMP threads would steal the workers' time
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)
        self.executor.shutdown(wait=True, cancel_futures=True)

    def producer(self, i: int) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            from concurrent.futures import FIRST_COMPLETED, wait

            # keep every worker busy while the writer waits for tensor i: a big tensor must not leave the other
            # workers idle once the few small ones submitted behind it are done (full SDXL Q4_K_M on 2 cores: 166%
            # CPU with a fixed window of four results, 183% with this)
            self._top_up(i)
            fut = self.futures[i]
            while not fut.done():
                wait([f for f in self.futures.values() if not f.done()], return_when=FIRST_COMPLETED)
                self._top_up(i)
            return np.frombuffer(self.futures.pop(i).result(), dtype=np.uint8)

        return produce

    def _top_up(self, i: int) -> None:
        """Submit jobs in file order: always up to ``i``, then while fewer than two per worker are running and the
        jobs not yet written stay under ``AHEAD_BYTES`` of input (the bound on memory)."""
        while self.next < len(self.order):
            j = self.order[self.next]
            running = sum(not f.done() for f in self.futures.values())
            held = sum(self._bytes(k) for k in self.futures)
            if j > i and (running >= 2 * self.workers or held + self._bytes(j) > self.AHEAD_BYTES):
                break
            self.futures[j] = self.executor.submit(_encode_job, *self.jobs[j])
            self.next += 1

    def _bytes(self, j: int) -> int:
        return numel(self.jobs[j][3]) * 4


def _encoder_init() -> None:
    torch.set_num_threads(1)


def _encoder_ready() -> int:
    return os.getpid()


def _encode_job(
    file: str, offset: int, code: str, shape: tuple[int, ...], stored_shape: tuple[int, ...], qtype: str, name: str
) -> bytes:
    """In an encoder process: read one tensor's bytes from ``file`` and encode them as ``qtype``."""
    from unetkit.quant.gguf import quantize

    t = read_range(file, offset, shape, BY_CODE[code].torch, name)
    return quantize(t.to(torch.float32).reshape(stored_shape), qtype, name=name).numpy().tobytes()


def _producer(entry: TensorEntry, dec: Decision, written: str) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        from unetkit.quant.gguf import quantize

        t = entry.read() if entry.offset is not None else entry.load()
        if dec.qtype == "F32":
            return t.to(torch.float32).contiguous().numpy()
        if dec.qtype == "F16":
            return t.to(torch.float16).contiguous().numpy()
        return quantize(t.to(torch.float32).reshape(dec.stored_shape), dec.qtype, name=written).numpy()

    return produce


def summarize(
    out: Path, recipe: Recipe, variant: str, decisions: list[Decision], tensors: list[GGUFOut], sha: str, seconds: float
) -> QuantizeResult:
    by_qtype: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    params = 0
    for dec, t in zip(decisions, tensors):
        n = numel(dec.shape)
        row = by_qtype[dec.qtype]
        row["tensors"] += 1
        row["parameters"] += n
        row["bytes"] += t.nbytes
        params += n
    data_bytes = sum(t.nbytes for t in tensors)
    return QuantizeResult(
        output=str(out),
        method=f"gguf:{recipe.name}",
        flavor=recipe.flavor,
        variant=variant,
        tensors=len(tensors),
        parameters=params,
        file_bytes=out.stat().st_size,
        bits_per_weight=8 * data_bytes / max(params, 1),
        by_qtype=dict(sorted(by_qtype.items(), key=lambda kv: -kv[1]["parameters"])),
        decisions=[d.to_dict() for d in decisions],
        source_sha256=sha,
        seconds=seconds,
    )
