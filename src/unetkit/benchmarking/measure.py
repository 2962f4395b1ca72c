"""Timers and memory: resident set size, file sizes, forward latency with warm-up and robust statistics."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MIB = 1 << 20


def rss_bytes() -> int:
    """The resident set size of this process now (not its peak), from ``/proc/self/statm``; elsewhere, where there
    is no /proc, the peak from ``getrusage`` (the closest portable number)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def input_files(path: Path) -> list[Path]:
    """The files whose bytes make up an input: the file itself, or a folder's weight files (every shard; the
    weights of a runtime-quantized folder), without config.json and the like."""
    path = Path(path)
    if path.is_file():
        return [path]
    from unetkit.formats.quantized_dir import WEIGHTS, is_quantized_dir

    if is_quantized_dir(path):
        return [path / WEIGHTS]
    from unetkit.formats import read  # lazy: safetensors and GGUF headers only

    return list(read(path).files)


def file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in input_files(path))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Latency:
    """Forward latencies of the timed runs (warm-up runs excluded), seconds."""

    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def max_s(self) -> float:
        return max(self.times_s)

    @property
    def iqr_s(self) -> float:
        """Interquartile range (Q3 - Q1, inclusive quartiles); 0 for a single run. Robust where a standard
        deviation is pulled by one slow run (a page fault, a frequency change)."""
        if len(self.times_s) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q3 - q1


def time_calls(fn: Callable[[], object], runs: int, warmup: int, device: torch.device) -> Latency:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times, each timed alone with ``time.perf_counter`` (the
    device synchronized before and after, so a CUDA time is the kernels' time, not the launch's)."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0; got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return Latency(tuple(times))
