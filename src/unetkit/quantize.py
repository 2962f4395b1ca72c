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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import unetkit
from unetkit.errors import UnetkitError
from unetkit.formats.atomic import atomic_output, check_output
from unetkit.formats.base import TensorEntry, read_range
from unetkit.formats.gguf import ORIG_SHAPE_KEY, GGUFOut, write_gguf
from unetkit.formats.hashing import FileHasher
from unetkit.quant.policy import Decision, Recipe, plan
from unetkit.convert import SHA_PLACEHOLDER
from unetkit.resolve import METADATA_CONFIG_KEY, open_unet

LDM_PREFIX = "model.diffusion_model."
GGUF_METHOD = "gguf:"


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
) -> QuantizeResult:
    """Quantize ``src`` (any input unetkit reads) to the GGUF file ``out``.

    ``method``: ``gguf:<recipe>`` with recipe F16, BF16, Q8_0, Q6_K, Q5_0, Q5_1, Q4_0, Q4_1, Q5_K_M, Q5_K_S,
    Q4_K_M, Q4_K_S, Q3_K_M or Q2_K. ``flavor``: comfy (default), sdcpp or diffusers (see ``quant.policy``).
    ``keep``: globs kept at high precision; ``override``: 'GLOB=QTYPE' strings. ``workers``: encoder processes
    (default: one per core when there are more than ``PARALLEL_MIN_BYTES`` to encode, else none).
    """
    t0 = time.perf_counter()
    if not method.lower().startswith(GGUF_METHOD):
        raise UnetkitError(f"unknown method {method!r}; GGUF methods are gguf:<recipe>, e.g. gguf:Q4_K_M")
    recipe = Recipe.parse(method[len(GGUF_METHOD) :], flavor, keep, override)
    src, out = Path(src), Path(out)
    check_output(out, force, inputs=(src,))
    source = open_unet(src, ema=ema, config=config)
    ldm_names = {d: source.ldm_name(d) for d in source.tensors}
    decisions = plan([(ldm_names[d], e.shape) for d, e in source.tensors.items()], recipe)
    prefix = "" if recipe.flavor == "comfy" else LDM_PREFIX
    tensors, kv = [], {}
    pool = _EncoderPool.for_plan(list(source.tensors.values()), decisions, workers)
    for i, ((d, entry), dec) in enumerate(zip(source.tensors.items(), decisions)):
        written = prefix + dec.name
        produce = pool.producer(i) if pool and pool.handles(i) else _producer(entry, dec, written)
        tensors.append(GGUFOut(written, dec.qtype, dec.stored_shape, produce))
        if dec.stored_shape != dec.shape:
            kv[ORIG_SHAPE_KEY + written] = list(dec.shape)
    hasher = FileHasher(source.checkpoint.files)
    meta = {
        "unetkit.version": unetkit.__version__,
        "unetkit.method": f"gguf:{recipe.name}",
        "unetkit.flavor": recipe.flavor,
        "unetkit.variant": source.spec.variant,
        "unetkit.source_name": source.path.name,
        METADATA_CONFIG_KEY: json.dumps(source.spec.config, sort_keys=True),
        "unetkit.decisions": json.dumps({d.name: [d.qtype, d.reason] for d in decisions}),
    }
    if source.spec.time_cond_proj_dim:
        meta["unetkit.time_cond_proj_dim"] = int(source.spec.time_cond_proj_dim)
    total = sum(t.nbytes for t in tensors)
    if on_start:
        on_start(total)
    # the header is written first; the source hash, computed meanwhile on the other core, is patched in at the end
    meta["unetkit.source_sha256"] = SHA_PLACEHOLDER
    with (pool or contextlib.nullcontext()), atomic_output(out, force=force) as tmp:
        hasher.start()  # after the encoder processes are forked
        write_gguf(tmp, tensors, {**meta, **kv}, arch="sd1", progress=progress,
                   final_kv=lambda: {"unetkit.source_sha256": hasher.result()})
    return summarize(out, recipe, source.spec.variant, decisions, tensors, hasher.result(),
                     time.perf_counter() - t0)


PARALLEL_MIN_BYTES = 256 << 20  # below this, starting encoder processes (about 2 s each: torch import) does not pay


class _EncoderPool:
    """Encoder processes for the tensors that are quantized to a block type and whose bytes sit in a file.

    The block encoders are many small torch ops: split over cores inside one op they scale poorly, and two threads
    of one process contend for the GIL (measured on SD1.5 Q4_K_M: 80 s with 2 intra-op threads, 116 s with two
    1-thread encoder threads). Separate processes, one torch thread each, scale with the cores. Each job names a
    byte range of the source; the worker reads it itself and returns the encoded bytes. Jobs are submitted a few
    tensors ahead of the writer, which takes the results in file order, so memory stays bounded."""

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
            if dec.qtype not in ("F32", "F16", "BF16") and e.qtype is None and e.file is not None \
                    and e.offset is not None and e.dtype in (torch.float32, torch.float16, torch.bfloat16):
                jobs[i] = (str(e.file), e.offset, str(e.dtype).removeprefix("torch."), tuple(e.shape),
                           tuple(dec.stored_shape), dec.qtype, e.name)
        if workers is None:
            n_bytes = sum(int(np.prod(j[3])) * 4 for j in jobs.values())
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
        self.executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_encoder_init)
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
            while self.next < len(self.order) and (self.order[self.next] <= i or len(self.futures) < 2 * self.workers):
                j = self.order[self.next]
                self.futures[j] = self.executor.submit(_encode_job, *self.jobs[j])
                self.next += 1
            data = self.futures.pop(i).result()
            return np.frombuffer(data, dtype=np.uint8)

        return produce


def _encoder_init() -> None:
    torch.set_num_threads(1)


def _encoder_ready() -> int:
    return os.getpid()


def _encode_job(file: str, offset: int, dtype: str, shape: tuple[int, ...], stored_shape: tuple[int, ...],
                qtype: str, name: str) -> bytes:
    """In an encoder process: read one tensor's bytes from ``file`` and encode them as ``qtype``."""
    from unetkit.quant.gguf import quantize

    t = read_range(file, offset, shape, getattr(torch, dtype), name)
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


def summarize(out: Path, recipe: Recipe, variant: str, decisions: list[Decision], tensors: list[GGUFOut],
              sha: str, seconds: float) -> QuantizeResult:
    by_qtype: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    params = 0
    for dec, t in zip(decisions, tensors):
        n = int(np.prod(dec.shape))
        row = by_qtype[dec.qtype]
        row["tensors"] += 1
        row["parameters"] += n
        row["bytes"] += t.nbytes
        params += n
    data_bytes = sum(t.nbytes for t in tensors)
    return QuantizeResult(
        output=str(out), method=f"gguf:{recipe.name}", flavor=recipe.flavor, variant=variant, tensors=len(tensors),
        parameters=params, file_bytes=out.stat().st_size, bits_per_weight=8 * data_bytes / max(params, 1),
        by_qtype=dict(sorted(by_qtype.items(), key=lambda kv: -kv[1]["parameters"])),
        decisions=[d.to_dict() for d in decisions], source_sha256=sha, seconds=seconds,
    )


# ------------------------------------------------------------------------------------- runtime (torchao, quanto)


def quantize(unet, method: str, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None):
    """Quantize a live diffusers UNet in place with a runtime backend; returns ``(unet, QuantReport)``.

    ``method``: torchao:int8-weight-only, torchao:int8-dynamic, torchao:float8-weight-only,
    torchao:int4-weight-only (CUDA only), quanto:qint8, quanto:qint4, quanto:qint2, quanto:qfloat8.
    ``include``/``exclude``: globs on diffusers module names. Precedence: ``exclude`` keeps a module; else
    ``include`` quantizes it, even one of the default exclusions (conv_in, conv_out, time_embedding incl. LCM's
    cond_proj, norms); else, when ``include`` was given, the module is kept; else the default exclusions apply.
    Every Linear and Conv2d (1x1 and 3x3) is a candidate; the report lists each module's decision and reason and
    the coverage per module kind. A method that cannot run here raises ``BackendUnavailable`` saying why and what
    would work; an unknown one raises ``QuantError`` listing the known ones. Save the result with
    :func:`save_quantized`; ``unetkit.load_unet(folder)`` reloads it without re-quantizing.
    GGUF methods (``gguf:<recipe>``) write files: use :func:`quantize_file`.
    """
    from unetkit.quant.runtime.base import QuantReport, parse_method, plan_modules
    from unetkit.quant.runtime.quantized_dir import library_versions

    if method.lower().startswith(GGUF_METHOD):
        raise UnetkitError(f"{method}: GGUF methods write a file; use unetkit.quantize.quantize_file(src, out, "
                           f"method={method!r}) or `unetkit quantize IN OUT.gguf --method {method}`")
    if getattr(unet, "unetkit_quant_report", None) is not None:
        raise UnetkitError(f"this UNet is quantized already ({unet.unetkit_quant_report.method}); "
                           "quantize a float UNet")
    be, scheme = parse_method(method)
    be.check_available(scheme, unet)
    include = [include] if isinstance(include, str) else (list(include) if include is not None else None)
    exclude = [exclude] if isinstance(exclude, str) else (list(exclude) if exclude is not None else None)
    candidates = plan_modules(unet, include, exclude)
    with torch.no_grad():
        decisions = be.apply(unet, scheme, candidates)
    report = QuantReport(method=f"{be.name}:{scheme}", backend=be.name, versions={**library_versions(),
                         **be.versions()}, decisions=decisions, include=include, exclude=exclude)
    unet.unetkit_quant_report = report
    return unet, report


def save_quantized(unet, out: str | Path, report=None, *, force: bool = False) -> Path:
    """Write a UNet quantized by :func:`quantize` to the folder ``out`` (config.json, unetkit_quant.safetensors,
    unetkit_quant.json); ``unetkit.load_unet(out)`` reloads it."""
    from unetkit.quant.runtime.quantized_dir import save_quantized as save

    report = report if report is not None else getattr(unet, "unetkit_quant_report", None)
    if report is None:
        raise UnetkitError("this UNet was not quantized by unetkit.quantize: nothing to save as a quantized folder")
    return save(unet, report, out, force=force)


def quantize_to_dir(src: str | Path, out: str | Path, method: str, *, include: Sequence[str] | None = None,
                    exclude: Sequence[str] | None = None, force: bool = False, ema: bool = False,
                    config: Mapping[str, Any] | str | Path | None = None):
    """``unetkit quantize IN OUT --method torchao:...|quanto:...``: load ``src`` (any input unetkit reads),
    quantize it, write the folder ``out``. Returns the QuantReport."""
    from unetkit.load import load_unet
    from unetkit.quant.runtime.base import parse_method

    src, out = Path(src), Path(out)
    check_output(out, force, inputs=(src,))
    be, scheme = parse_method(method)
    be.check_available(scheme)  # before the (slow) load
    unet = load_unet(src, ema=ema, config=config)
    unet, report = quantize(unet, method, include=include, exclude=exclude)
    save_quantized(unet, out, report, force=force)
    return report
