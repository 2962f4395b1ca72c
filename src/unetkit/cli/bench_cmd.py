"""unetkit bench VARIANT... [--runs N] [--json FILE]: load time, memory, sizes and forward latency, one table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from unetkit.benchmarking.variants import GGUF_MODES
from unetkit.cli.common import emit_json, human_bytes, table
from unetkit.formats.atomic import atomic_output, check_output, check_writable

if TYPE_CHECKING:
    from unetkit.benchmarking.record import BenchRecord

HELP = "benchmark UNet files and methods: load time, resident memory, sizes, forward latency"
DESCRIPTION = f"""Benchmark one or more UNet variants and print one table. A VARIANT is PATH or PATH@METHOD; PATH is
anything unetkit reads (safetensors, .ckpt, a diffusers folder, .gguf, a folder written by unetkit quantize).
METHOD is how the weights run:
  {", ".join(GGUF_MODES)}  GGUF dequantize mode (a .gguf without a method runs on-the-fly: weights stay packed)
  torchao:<scheme>, quanto:<qtype>  runtime quantization applied after loading, e.g. quanto:qint8
Each variant is loaded, given --warmup untimed forward passes and --runs timed ones on seeded example inputs
(latents --size x --size, --batch samples, 77 text tokens). By default every variant runs in a fresh Python
process of its own, so that the memory one variant frees cannot hide the memory the next one takes.

columns:
  file         bytes of the input's weight files (all shards; config files not counted)
  load s       path -> ready model, runtime quantization included
  RSS MiB      resident memory the process gained by loading
  run MiB      the same after the timed runs (memory-mapped weights count once touched; activations too)
  weights MiB  parameters and buffers as held in memory (quantized ones as stored)
  CUDA MiB     on CUDA only: peak allocated GPU memory over loading and running
  latency ms   median of the timed runs +- half their interquartile range
  vs first     median latency relative to the first variant (put the fp32 reference first)
Runs on CUDA when present, else on CPU (--device picks)."""
EPILOG = """examples:
  unetkit bench v1-5.safetensors v1-5-Q8_0.gguf v1-5-Q8_0.gguf@load v1-5.safetensors@quanto:qint8
      fp32 first (the reference of 'vs first'), the GGUF both ways, and quanto int8
  unetkit bench unet/ unet-int8/ --runs 10 --warmup 2 --json bench.json
      10 timed runs each; also write every number and the environment to bench.json
  unetkit bench model.safetensors@torchao:int8-weight-only --device cpu --in-process --json -
      one variant in this process, JSON on stdout instead of the table
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help=HELP, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("variants", nargs="+", metavar="VARIANT", help="PATH or PATH@METHOD (see above)")
    p.add_argument("--runs", type=int, default=5, help="timed forward passes per variant (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward passes first (default 1)")
    p.add_argument("--size", type=int, default=64, help="latent height and width (default 64: 512 px images)")
    p.add_argument("--batch", type=int, default=1, help="samples per forward pass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example inputs (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present, else cpu")
    p.add_argument(
        "--dtype",
        choices=("keep", "fp32", "fp16", "bf16"),
        default="keep",
        help="compute dtype (default: each file's own floating dtype)",
    )
    p.add_argument(
        "--in-process",
        dest="isolate",
        action="store_false",
        help="measure every variant in this process (faster; memory numbers then blur together)",
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        help="also write the records and the environment as JSON to FILE; '-' prints the JSON instead of the table",
    )
    p.add_argument("--force", action="store_true", help="replace the --json FILE if it exists")
    p.set_defaults(run=run)


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="bench", unit="variant", file=sys.stderr)

    def progress(done: int, total: int, variant: str, record: BenchRecord | None) -> None:
        if record is None:
            bar.set_postfix_str(variant)
        else:
            bar.update(1)

    return bar, progress


def render(records: list[BenchRecord]) -> str:
    """The table: one row per record; 'vs first' divides by the first record's median latency."""
    first = records[0].latency_median_s
    rows = []
    for r in records:
        rows.append(
            [
                r.variant,
                r.method,
                human_bytes(r.file_bytes),
                f"{r.load_s:.2f}",
                f"{r.rss_mb:.0f}",
                f"{r.rss_run_mb:.0f}",
                f"{r.weight_mb:.1f}",
                f"{r.latency_median_s * 1e3:.1f} ± {r.latency_iqr_s * 1e3 / 2:.1f}",
                f"{r.latency_median_s / first:.2f}x",
            ]
        )
    header = ["variant", "method", "file", "load s", "RSS MiB", "run MiB", "weights MiB", "latency ms", "vs first"]
    if any(r.cuda_mem_mb is not None for r in records):
        header.insert(7, "CUDA MiB")
        for row, r in zip(rows, records):
            row.insert(7, f"{r.cuda_mem_mb:.0f}" if r.cuda_mem_mb is not None else "-")
    r0 = records[0]
    where = (
        f"{r0.device}, {r0.dtype}, latents {r0.size}x{r0.size}, batch {r0.batch}, {r0.warmup} warm-up + "
        f"{r0.runs} timed runs, {'one process per variant' if r0.isolated else 'in one process'}"
    )
    return table(rows, header) + "\n" + where


def run(args: argparse.Namespace) -> int:
    from unetkit.benchmarking import bench, results_dict

    to_stdout = args.json == "-"
    if args.json and not to_stdout:
        # before the benchmark, not after it; a report never replaces a model
        check_output(Path(args.json), args.force, inputs=[v.split("@", 1)[0] for v in args.variants])
        check_writable(Path(args.json))
    bar, progress = _progress_bar(not args.quiet, len(args.variants))
    try:
        records = bench(
            args.variants,
            runs=args.runs,
            warmup=args.warmup,
            size=args.size,
            batch=args.batch,
            seed=args.seed,
            device=args.device,
            dtype=None if args.dtype == "keep" else args.dtype,
            isolate=args.isolate,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    settings = {
        "runs": args.runs,
        "warmup": args.warmup,
        "size": args.size,
        "batch": args.batch,
        "seed": args.seed,
        "device": records[0].device,
        "dtype": args.dtype,
        "isolate": args.isolate,
    }
    doc = results_dict(records, settings)
    if to_stdout:
        emit_json(doc)
        return 0
    if args.json:
        with atomic_output(Path(args.json), force=args.force) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    print(render(records))
    if args.json:
        print(f"wrote {args.json}")
    return 0
