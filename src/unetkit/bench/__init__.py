"""Benchmarks of UNet variants: load time, resident memory, file and weight size, forward latency, as records.

  variants.py   PATH or PATH@METHOD -> a checked Variant (GGUF dequantize mode or torchao:/quanto: method)
  measure.py    timers and memory: RSS, file sizes, warm-up + timed runs, median / min / max / IQR
  record.py     BenchRecord (one per variant) and the environment, as JSON
  runner.py     bench(): each variant in-process or in a fresh process (worker.py)

Library code logs and never prints; ``unetkit bench`` (cli/bench_cmd.py) draws the table.
"""

from __future__ import annotations

from unetkit.bench.record import BenchRecord, environment, results_dict
from unetkit.bench.runner import Settings, bench, measure_variant
from unetkit.bench.variants import Variant, parse_variant, valid_methods

__all__ = [
    "BenchRecord",
    "Settings",
    "Variant",
    "bench",
    "environment",
    "measure_variant",
    "parse_variant",
    "results_dict",
    "valid_methods",
]
