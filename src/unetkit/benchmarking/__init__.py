"""Benchmarks of UNet variants: load time, resident memory, file and weight size, forward latency, as records.

  variants.py   PATH or PATH@METHOD -> a checked Variant (GGUF dequantize mode or torchao:/quanto: method)
  measure.py    timers and memory: RSS, file sizes, warm-up + timed runs, median / min / max / IQR
  record.py     BenchRecord (one per variant) and the environment, as JSON
  runner.py     bench(): each variant in-process or in a fresh process (worker.py)

Library code logs and never prints; ``unetkit bench`` (cli/bench_cmd.py) draws the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unetkit._lazy import lazy_attributes

_LAZY = {
    **{n: ".record" for n in ("BenchRecord", "environment", "results_dict")},
    **{n: ".runner" for n in ("Settings", "bench", "measure_variant")},
    **{n: ".variants" for n in ("Variant", "parse_variant", "valid_methods", "GGUF_MODES")},
}

if TYPE_CHECKING:
    from unetkit.benchmarking.record import BenchRecord, environment, results_dict
    from unetkit.benchmarking.runner import Settings, bench, measure_variant
    from unetkit.benchmarking.variants import GGUF_MODES, Variant, parse_variant, valid_methods

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
__all__ = list(_LAZY)
