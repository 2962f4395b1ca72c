"""``bench``: load each variant, measure it, return one record per variant.

Each variant is measured the same way, in-process or in a fresh process of its own (``isolate=True``):

  1. imports that loading would otherwise pay the first time (diffusers, the backend package) and, on CUDA, the
     CUDA context are made ready first, so ``load_s`` and ``rss_mb`` measure the model, not the libraries;
  2. load (and runtime-quantize), timed; RSS and, on CUDA, the allocator's peak read;
  3. ``warmup`` untimed forwards, then ``runs`` timed ones under ``torch.inference_mode``;
  4. RSS again, the file size, the weight size; the model is dropped.

Why isolate: a process keeps (and reuses) memory it freed, so in one process the second variant's RSS gain hides
behind the first variant's freed pages. A fresh process per variant costs a Python start and the imports, and
gives each variant the same clean start.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import unetkit.errors as errors
from unetkit.benchmarking.measure import MIB, file_bytes, rss_bytes, synchronize, time_calls
from unetkit.benchmarking.record import BenchRecord
from unetkit.benchmarking.variants import Variant, parse_variant
from unetkit.dtypes import compute_dtype
from unetkit.errors import BackendUnavailable, UnetkitError

log = logging.getLogger(__name__)

#: progress(index, total, variant text, record): called with record None when a variant starts, then with its
#: record when it is done
Progress = Callable[[int, int, str, "BenchRecord | None"], None]

#: how much of a failed worker's stderr goes into the error message
STDERR_TAIL_LINES = 15


@dataclass(frozen=True)
class Settings:
    """How every variant is measured (the same for all of them)."""

    runs: int = 5
    warmup: int = 1
    size: int = 64  # latent height and width (64: SD1.5's 512 px)
    batch: int = 1
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None  # None: each file's own floating dtype

    def check(self) -> None:
        if self.runs < 1:
            raise UnetkitError(f"runs={self.runs}: at least one timed run is needed")
        if self.warmup < 0:
            raise UnetkitError(f"warmup={self.warmup}: cannot be negative")
        if self.size < 8 or self.size % 8:
            raise UnetkitError(
                f"size={self.size}: the latent size must be a positive multiple of 8 (the UNet downsamples three times)"
            )
        if self.batch < 1:
            raise UnetkitError(f"batch={self.batch}: must be at least 1")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA when present, else CPU; 'cuda' without a CUDA device is an error that says so."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UnetkitError(f"unknown device {device!r}; use cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"device {device!r}: this machine has no usable CUDA device (torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}); use --device cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise UnetkitError(f"unknown device {device!r} for a benchmark; use cpu or cuda")
    return dev


def bench(
    variants: Sequence[str | Path],
    *,
    runs: int = 5,
    warmup: int = 1,
    size: int = 64,
    batch: int = 1,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    isolate: bool = True,
    progress: Progress | None = None,
) -> list[BenchRecord]:
    """Benchmark each variant (``PATH`` or ``PATH@METHOD``, see ``unetkit.benchmarking.variants``): load time, resident
    memory, file size, weight size and forward latency (``warmup`` untimed runs, then ``runs`` timed ones:
    median, min, max, IQR) at latent ``size`` x ``size``, ``batch`` samples, inputs seeded by ``seed``.

    ``device``: None measures on CUDA when present, else on CPU. ``dtype``: None keeps each file's floating dtype;
    'fp32', 'fp16', 'bf16' converts. ``isolate``: measure each variant in a fresh Python process (default; its
    memory numbers are not blurred by the variants before it); False measures in this process (faster).
    Every variant is checked before the first is measured. Returns the records in the order given; a variant
    that fails raises ``UnetkitError`` naming it.
    """
    if isinstance(variants, (str, Path)):
        variants = [variants]  # one variant, not its characters
    if not variants:
        raise UnetkitError("no variant to benchmark; give at least one PATH or PATH@METHOD")
    from unetkit.dtypes import parse_dtype, short

    dev = resolve_device(device)
    target = parse_dtype(dtype)  # an unknown dtype fails now, not in the first worker; 'keep' -> None
    settings = Settings(
        runs=runs,
        warmup=warmup,
        size=size,
        batch=batch,
        seed=seed,
        device=str(dev),
        dtype=short(target) if target is not None else None,
    )
    settings.check()
    parsed = [parse_variant(v) for v in variants]
    records = []
    for i, variant in enumerate(parsed):
        if progress is not None:
            progress(i, len(parsed), variant.text, None)
        record = run_isolated(variant, settings) if isolate else measure_variant(variant, settings)
        log.info(
            "%s: load %.2f s, RSS +%.0f MiB, median %.4f s over %d runs",
            variant.text,
            record.load_s,
            record.rss_mb,
            record.latency_median_s,
            record.runs,
        )
        records.append(record)
        if progress is not None:
            progress(i + 1, len(parsed), variant.text, record)
    return records


# ---------------------------------------------------------------------------------------------------- in-process


def _prepare(variant: Variant, device: torch.device) -> None:
    """Pay the one-time costs outside the measurement: imports, the CUDA context."""
    import diffusers  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401

    if variant.is_gguf:
        from unetkit.quant.runtime.base import backend

        backend("gguf")  # imports the on-the-fly modules
    if variant.runtime_method is not None:
        from unetkit.quant.runtime.base import parse_method

        be, scheme = parse_method(variant.runtime_method)
        be.check_available(scheme)  # imports torchao / optimum.quanto
    if device.type == "cuda":
        torch.empty(1, device=device)
        synchronize(device)


def _load(variant: Variant, settings: Settings, device: torch.device) -> torch.nn.Module:
    """The variant's UNet, ready to run. On the CPU, weights held in fp16/bf16 are computed in float32: torch's
    half-precision CPU convolutions are hundreds of times slower (a 640-channel 3x3 convolution on a 64x64 map:
    208 s in fp16, 0.27 s in fp32 on a 2-core AVX2 VM), so a bench of an fp16 SDXL file would measure that
    and little else. As stored, the weights stay in their dtype and each layer's are cast for its forward
    (``loading.cast_in_forward``: resident memory stays that of the stored weights); under a runtime method
    without ``dtype``, the UNet is loaded in float32 first (quantized from fp32 weights, it computes in fp32).
    GGUF files decode to float32 unless ``dtype`` says otherwise; on CUDA every file computes as held."""
    from unetkit.dtypes import parse_dtype
    from unetkit.formats.quantized_dir import is_quantized_dir
    from unetkit.loading import default_dtype, load_unet
    from unetkit.resolve import open_unet

    if device.type != "cpu" or is_quantized_dir(variant.path):
        return load_unet(variant.path, dtype=settings.dtype, device=device, dequantize=variant.dequantize)
    source = open_unet(variant.path)
    held = parse_dtype(settings.dtype) or default_dtype(source)
    if held not in (torch.float16, torch.bfloat16):
        return load_unet(source, dtype=settings.dtype, device=device, dequantize=variant.dequantize)
    if variant.runtime_method is not None:
        return load_unet(source, dtype=settings.dtype or "fp32", device=device)
    return load_unet(source, dtype=settings.dtype, device=device, dequantize="on-the-fly", compute_dtype="fp32")


def _to(inputs: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Inputs (tensors, possibly in dicts: SDXL's ``added_cond_kwargs``) in the compute dtype, on the device."""
    if isinstance(inputs, dict):
        return {k: _to(v, dtype, device) for k, v in inputs.items()}
    return (inputs.to(dtype) if inputs.is_floating_point() else inputs).to(device)


def _forward_fn(unet: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
    def forward() -> object:
        return unet(**inputs, return_dict=False)

    return forward


def measure_variant(variant: Variant | str | Path, settings: Settings, *, isolated: bool = False) -> BenchRecord:
    """Measure one variant in this process (see the module docstring for the steps)."""
    from unetkit.dtypes import short
    from unetkit.metrics import weight_bytes
    from unetkit.sample import example_inputs

    if not isinstance(variant, Variant):
        variant = parse_variant(variant)
    device = torch.device(settings.device)
    try:
        _prepare(variant, device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        unet = _load(variant, settings, device)
        synchronize(device)
        t1 = time.perf_counter()
        if variant.runtime_method is not None:
            from unetkit.quantization import quantize

            quantize(unet, variant.runtime_method)
            synchronize(device)
        t2 = time.perf_counter()
        rss1 = rss_bytes()
        weights = weight_bytes(unet)
        dtype = compute_dtype(unet)
        inputs = _to(example_inputs(unet, size=settings.size, batch=settings.batch, seed=settings.seed), dtype, device)
        with torch.inference_mode():
            latency = time_calls(_forward_fn(unet, inputs), settings.runs, settings.warmup, device)
        rss2 = rss_bytes()
        cuda_mem = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
        del unet, inputs
        gc.collect()
        size_on_disk = file_bytes(variant.path)
    except UnetkitError as e:
        raise type(e)(f"variant {variant.text!r}: {e}") from e
    except Exception as e:  # not ours: a bug or a backend failure; keep the traceback, say which variant
        if hasattr(e, "add_note"):  # Python 3.11+
            e.add_note(f"while benchmarking variant {variant.text!r}")
        raise
    return BenchRecord(
        variant=variant.text,
        path=str(variant.path),
        method=variant.method,
        file_bytes=size_on_disk,
        load_s=t2 - t0,
        quantize_s=t2 - t1 if variant.runtime_method is not None else 0.0,
        rss_mb=(rss1 - rss0) / MIB,
        rss_run_mb=(rss2 - rss0) / MIB,
        weight_mb=weights / MIB,
        cuda_mem_mb=cuda_mem,
        latency_median_s=latency.median_s,
        latency_min_s=latency.min_s,
        latency_max_s=latency.max_s,
        latency_iqr_s=latency.iqr_s,
        latencies_s=list(latency.times_s),
        runs=settings.runs,
        warmup=settings.warmup,
        device=str(device),
        dtype=short(dtype),
        size=settings.size,
        batch=settings.batch,
        seed=settings.seed,
        isolated=isolated,
    )


# --------------------------------------------------------------------------------------------------- isolated


def _worker_env() -> dict[str, str]:
    """This environment, with unetkit's own source folder first on PYTHONPATH: the worker imports the same
    unetkit as this process, installed or not."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the unetkit package
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept) if kept else "(no output)"


def run_isolated(variant: Variant, settings: Settings) -> BenchRecord:
    """Measure one variant in a fresh ``python -m unetkit.benchmarking.worker`` (request as JSON on stdin, the record as
    JSON on the last line of stdout). A failure raises ``UnetkitError`` naming the variant, with the worker's
    stderr tail."""
    request = json.dumps(
        {
            "variant": variant.to_dict(),
            "settings": asdict(settings),
            "log_level": logging.getLogger().getEffectiveLevel(),
        }
    )
    cmd = [sys.executable, "-m", "unetkit.benchmarking.worker"]
    log.debug("running %s for %s", " ".join(cmd), variant.text)
    try:
        proc = subprocess.run(cmd, input=request, capture_output=True, text=True, env=_worker_env(), check=False)
    except OSError as e:
        raise UnetkitError(f"variant {variant.text!r}: cannot start the benchmark process {cmd}: {e}") from e
    if proc.stderr.strip():
        log.debug("worker stderr for %s:\n%s", variant.text, proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        reply = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        reply = None
    if isinstance(reply, dict) and "error" in reply:
        cls = getattr(errors, str(reply.get("error_type")), UnetkitError)
        if not (isinstance(cls, type) and issubclass(cls, UnetkitError)):
            cls = UnetkitError
        message = str(reply["error"])
        named = message.startswith(f"variant {variant.text!r}")
        raise cls(message if named else f"variant {variant.text!r}: {message}")
    if proc.returncode != 0 or not isinstance(reply, dict):
        raise UnetkitError(
            f"variant {variant.text!r}: the benchmark process failed (exit code {proc.returncode}); "
            f"its stderr ends: {_tail(proc.stderr)}"
        )
    try:
        return BenchRecord.from_dict(reply)
    except (TypeError, ValueError) as e:
        raise UnetkitError(
            f"variant {variant.text!r}: the benchmark process answered an unreadable record ({e})"
        ) from e
