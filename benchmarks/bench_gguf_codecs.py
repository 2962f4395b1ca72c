#!/usr/bin/env python
"""GGUF codecs: throughput of unetkit's GGML codecs against gguf-py's numpy codecs.

For every qtype, in a fresh worker process of its own (benchmarks/common.py's protocol): encode and decode a random
N(0, 0.02) float32 tensor of ``--mb`` megabytes (rows of 4096), one full-size warm-up run, then the median of
``--repeats`` runs; gguf-py's encoder and decoder on the same tensor in the same process. Throughput is MB/s of
float32 *input* (encode) or float32 *output* (decode), 1 MB = 10**6 bytes. gguf-py encodes only
F16/BF16/Q8_0/Q5_0/Q5_1/Q4_0/Q4_1; K-quants are reported as "n/a". Prints a markdown table; ``--json FILE`` also
writes the numbers.

    python benchmarks/bench_gguf_codecs.py                 # 64 MB, torch's default thread count
    python benchmarks/bench_gguf_codecs.py --mb 16 --threads 1 --types Q4_K Q8_0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_worker, worker_or_args

SCRIPT = Path(__file__).resolve()
ROW = 4096
NA_KQUANT = "n/a (gguf-py cannot encode K-quants)"
NA_F32 = "n/a (a no-op view in gguf-py)"


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _time(fn, repeats: int, device=None, skip_first: bool = False) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls (the first one dropped when ``skip_first``: the warm-up)."""
    times = []
    out = None
    for _ in range(repeats):
        if device is not None:
            _sync(device)
        t0 = time.perf_counter()
        out = fn()
        if device is not None:
            _sync(device)
        times.append(time.perf_counter() - t0)
    if skip_first and len(times) > 1:
        times = times[1:]
    return statistics.median(times), out


def _fmt(v: float | str | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def gguf_py_version() -> str | None:
    try:
        import gguf
    except ImportError:
        return None
    v = getattr(gguf, "__version__", None)
    if v is None:
        from importlib.metadata import version

        v = version("gguf")
    return v


def worker(
    task: str, qtype: str, mb_in: float, repeats: int, threads: int | None, device_name: str, no_gguf: bool
) -> dict:
    """One qtype, in this fresh process: unetkit's encode/decode, then gguf-py's, on the same seeded tensor."""
    if task != "codec":
        raise ValueError(f"unknown task {task}")
    import numpy as np
    import torch

    from unetkit.quant.gguf import dequantize, qtype_by_name, quantize

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    q = qtype_by_name(qtype)
    gq = None
    if not no_gguf:
        try:
            from gguf import quants as gq
        except ImportError:
            gq = None

    rows = max(1, int(mb_in * 1e6 / 4 / ROW))
    gen = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(rows, ROW, generator=gen) * 0.02
    x_np = x_cpu.numpy()
    x = x_cpu.to(device)
    mb = x_cpu.numel() * 4 / 1e6

    # unetkit: one full-size warm-up run (first-use self-checks, allocator state), then the timed runs
    t_enc, packed = _time(lambda: quantize(x, q), repeats + 1, device, skip_first=True)
    t_dec, y = _time(lambda: dequantize(packed, q, x.shape), repeats + 1, device, skip_first=True)
    r = {
        "qtype": q.name,
        "bits_per_weight": q.bits_per_weight,
        "unetkit_encode_mbps": mb / t_enc,
        "unetkit_decode_mbps": mb / t_dec,
        "gguf_encode_mbps": None,
        "gguf_decode_mbps": None,
        "encode_speedup": None,
        "bytes_equal_gguf": None,
        "input_mb": mb,
        "rows": rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if gq is not None:
        from gguf import GGMLQuantizationType

        gt = GGMLQuantizationType[q.name]
        can_encode = q.name in ("F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")
        packed_np = packed.cpu().numpy()
        if q.name == "F32":  # gguf-py's F32 "quantize"/"dequantize" return views: nothing to time
            r["gguf_encode_mbps"] = NA_F32
            r["gguf_decode_mbps"] = NA_F32
            return r
        if can_encode:
            t_genc, g_packed = _time(lambda: gq.quantize(x_np, gt), repeats + 1, skip_first=True)
            r["gguf_encode_mbps"] = mb / t_genc
            r["encode_speedup"] = r["unetkit_encode_mbps"] / r["gguf_encode_mbps"]
            r["bytes_equal_gguf"] = bool(
                np.array_equal(np.ascontiguousarray(g_packed).view(np.uint8), packed_np.view(np.uint8))
            )
        else:
            r["gguf_encode_mbps"] = NA_KQUANT
        t_gdec, g_y = _time(lambda: gq.dequantize(packed_np, gt), repeats + 1, skip_first=True)
        r["gguf_decode_mbps"] = mb / t_gdec
        r["values_equal_gguf"] = bool(
            np.array_equal(np.ascontiguousarray(g_y, dtype=np.float32).view(np.int32), y.cpu().numpy().view(np.int32))
        )
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=64.0, help="size of the float32 input in MB (default 64)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    ap.add_argument("--types", nargs="*", default=None, help="qtypes to run (default: all)")
    ap.add_argument("--device", default="cpu", help="torch device for unetkit (default cpu)")
    ap.add_argument("--no-gguf", action="store_true", help="skip the gguf-py comparison")
    args = worker_or_args(ap, worker)  # in a worker process (run_worker) this runs the task and exits

    from unetkit.quant.gguf.qtypes import QTYPES, qtype_by_name  # the table only: no torch in this process

    qtypes = [qtype_by_name(t).name for t in args.types] if args.types else [q.name for q in QTYPES]
    gguf_version = None if args.no_gguf else gguf_py_version()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"# GGML codec throughput: {args.mb:g} MB float32 input (rows of {ROW}), {args.threads or 'default'} "
        f"thread(s), device {args.device}, {os.cpu_count()} CPU(s), gguf-py {gguf_version}, load average "
        f"{load_before}; one fresh worker process per qtype",
        file=sys.stderr,
    )
    results = []
    for name in qtypes:
        r = run_worker(SCRIPT, "codec", name, args.mb, args.repeats, args.threads, args.device, args.no_gguf)
        if "error" in r:
            print(f"  {name}: failed: {r['error']}", file=sys.stderr, flush=True)
            return 1
        print(
            f"  {name}: encode {r['unetkit_encode_mbps']:.1f} MB/s, decode {r['unetkit_decode_mbps']:.1f} MB/s",
            file=sys.stderr,
            flush=True,
        )
        results.append(r)

    head = (
        "| qtype | bits/weight | unetkit encode MB/s | gguf-py encode MB/s | encode speed-up | "
        "unetkit decode MB/s | gguf-py decode MB/s | same bytes / values as gguf-py |"
    )
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    yes_no = {True: "yes", False: "NO", None: "-"}
    for r in results:
        sp = f"{r['encode_speedup']:.1f}x" if isinstance(r["encode_speedup"], float) else "-"
        same = f"{yes_no[r['bytes_equal_gguf']]} / {yes_no[r.get('values_equal_gguf')]}"
        print(
            f"| {r['qtype']} | {r['bits_per_weight']:g} | {_fmt(r['unetkit_encode_mbps'])} | "
            f"{_fmt(r['gguf_encode_mbps'])} | {sp} | {_fmt(r['unetkit_decode_mbps'])} | "
            f"{_fmt(r['gguf_decode_mbps'])} | {same} |"
        )

    if args.json:
        first = results[0] if results else {}
        meta = {
            "input_mb": first.get("input_mb"),
            "rows": first.get("rows"),
            "row_elements": ROW,
            "repeats": args.repeats,
            "torch": first.get("torch"),
            "threads": first.get("threads"),
            "device": args.device,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "gguf_py": gguf_version,
            "isolation": "one fresh worker process per qtype (benchmarks/common.py run_worker)",
            "load_average_before": load_before,
            "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
