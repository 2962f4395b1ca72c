"""Benchmark results as records: one ``BenchRecord`` per variant, and the environment they were measured in."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from unetkit._version import __version__

#: fields that only a CUDA run fills (None on CPU)
CUDA_ONLY = ("cuda_mem_mb",)


@dataclass
class BenchRecord:
    """One variant's numbers. Sizes in MiB (2**20 bytes) where the name ends in ``_mb``, times in seconds.

    ``load_s``: from the path to a ready model (``load_unet``, then the runtime quantization if any);
    ``quantize_s`` is the part of it spent quantizing (0 without a runtime method).
    ``rss_mb``: resident memory the process gained from loading (RSS of the ready model minus RSS before; weights
    that stay memory-mapped count only once touched). ``rss_run_mb``: the same after the timed runs, which have
    touched every weight and allocated activations: compare these two for memory-mapped inputs. ``weight_mb``: the
    model's parameters and buffers as held (quantized tensors counted as stored). ``cuda_mem_mb``: CUDA only, the
    peak of ``torch.cuda.max_memory_allocated`` over loading and running (None on CPU).
    Latencies: ``runs`` timed forwards after ``warmup`` untimed ones; median, min, max and interquartile range.
    """

    variant: str  # as given: PATH or PATH@METHOD
    path: str
    method: str  # "as-stored", "on-the-fly", "load", "torchao:...", "quanto:..."
    file_bytes: int
    load_s: float
    quantize_s: float
    rss_mb: float
    rss_run_mb: float
    weight_mb: float
    cuda_mem_mb: float | None
    latency_median_s: float
    latency_min_s: float
    latency_max_s: float
    latency_iqr_s: float
    latencies_s: list[float]
    runs: int
    warmup: int
    device: str
    dtype: str
    size: int
    batch: int
    seed: int
    isolated: bool  # measured in a fresh process of its own

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchRecord:
        names = {f.name for f in fields(cls)}
        missing = names - d.keys()
        if missing:
            raise ValueError(f"benchmark record lacks {sorted(missing)}")
        return cls(**{k: d[k] for k in names})


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """Where the numbers were measured: library versions, Python, OS, CPU threads and, on CUDA, the GPU."""
    env: dict[str, Any] = {
        "unetkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for pkg in ("diffusers", "torchao", "optimum-quanto"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(dev)
    env["executable"] = sys.executable
    return env


def results_dict(
    records: list[BenchRecord], settings: dict[str, Any] | None = None, device: str | torch.device | None = None
) -> dict[str, Any]:
    """The JSON document of a benchmark: the unetkit and torch versions once at the top, the environment, the
    settings and one record per variant."""
    env = environment(device if device is not None else (records[0].device if records else None))
    return {
        "unetkit": env["unetkit"],
        "torch": env["torch"],
        "environment": env,
        "settings": dict(settings or {}),
        "records": [r.to_dict() for r in records],
    }
