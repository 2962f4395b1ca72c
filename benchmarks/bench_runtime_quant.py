"""Runtime quantization (torchao, optimum-quanto) of a full-size SD1.5 UNet on this CPU, side by side with fp32
and with diffusers' own path (`from_pretrained(..., quantization_config=TorchAoConfig/QuantoConfig)`, which
quantizes nn.Linear only), in one run.

    python benchmarks/bench_runtime_quant.py [--methods torchao:int8-weight-only quanto:qint8 ...] [--forwards 2]

Per row, in a fresh worker process of benchmarks/common.py (diffusers imported before any clock starts): quantize
time (the model already loaded in fp32), resident weight bytes (every parameter and buffer, quantized tensors
counted by their stored parts), forward latency (batch 1, 64x64 latent; one warm-up, then the median of
--forwards), output SQNR / cosine vs the fp32 output on the same inputs, and parameter coverage (share of the
UNet's parameters held quantized).
Results merge into --json; `--table` prints the markdown from it."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    load_results,
    machine,
    make_sd15_source,
    markdown,
    peak_rss_mb,
    rss_now_mb,
    run_worker,
    save_results,
    warm,
    worker_or_args,
)

SCRIPT = Path(__file__).resolve()
METHODS = [
    "torchao:int8-weight-only",
    "torchao:int8-dynamic",
    "torchao:float8-weight-only",
    "quanto:qint8",
    "quanto:qfloat8",
    "quanto:qint4",
]
DIFFUSERS = ["diffusers:torchao-int8-weight-only", "diffusers:quanto-int8"]


def quantized_params(model) -> int:
    import torch

    n = 0
    for p in list(model.parameters()) + list(model.buffers()):
        if type(p) not in (torch.Tensor, torch.nn.Parameter) and hasattr(p, "__tensor_flatten__"):
            n += p.numel()
    return n


def worker(task: str, src: str, ref_path: str, diffusers_dir: str, forwards: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from unetkit import load_unet
    from unetkit.metrics import compare, weight_bytes
    from unetkit.sample import example_inputs

    base = rss_now_mb()
    t = time.perf_counter()
    coverage = None
    if task.startswith("diffusers:"):
        what = task.split(":", 1)[1]
        if what == "torchao-int8-weight-only":
            from diffusers import TorchAoConfig
            from torchao.quantization import Int8WeightOnlyConfig

            qc = TorchAoConfig(Int8WeightOnlyConfig())  # diffusers 0.42 wants a torchao config object
        else:
            from diffusers import QuantoConfig

            qc = QuantoConfig(weights_dtype="int8")
        unet = UNet2DConditionModel.from_pretrained(diffusers_dir, quantization_config=qc, torch_dtype=torch.float32)
        quant_s = time.perf_counter() - t  # load + quantize: diffusers does both in from_pretrained
        load_s = None
    else:
        unet = load_unet(src)
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        if task != "fp32":
            from unetkit import quantize

            unet, report = quantize(unet, task)
            coverage = report.params_quantized / report.params_total
        quant_s = time.perf_counter() - t if task != "fp32" else 0.0
    total_params = sum(p.numel() for p in unet.parameters())
    if coverage is None:
        coverage = quantized_params(unet) / total_params
    wbytes = weight_bytes(unet)
    rss_loaded = rss_now_mb()
    args = example_inputs(unet, size=64, batch=1)
    times = []
    with torch.no_grad():  # not inference_mode: quanto qint4 fails under it (FACTS.md)
        y = unet(**args).sample  # warm-up
        for _ in range(int(forwards)):
            s = time.perf_counter()
            y = unet(**args).sample
            times.append(time.perf_counter() - s)
    rec = {
        "seconds": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
        "quantize_s": quant_s,
        "load_s": load_s,
        "weight_bytes": wbytes,
        "coverage": coverage,
        "rss_above_imports_mb": rss_loaded - base,
        "peak_rss_mb": peak_rss_mb(),
    }
    if task == "fp32":
        torch.save(y, ref_path)
    else:
        rec.update(compare(torch.load(ref_path), y).to_dict())
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="bench_out/sd15_fp32.safetensors")
    ap.add_argument("--methods", nargs="*", default=METHODS + DIFFUSERS)
    ap.add_argument("--forwards", type=int, default=2)
    ap.add_argument("--json", default="bench_out/runtime_quant.json")
    ap.add_argument("--table", action="store_true")
    args = worker_or_args(ap, worker)  # in a worker process (run_worker) this runs the task and exits
    jpath = Path(args.json)
    r: dict = load_results(jpath)
    if not args.table:
        src = make_sd15_source(Path(args.src))
        ddir = Path("bench_out/sd15_diffusers")
        if not ddir.exists():
            from unetkit import convert

            convert(src, ddir, to="diffusers")
        warm(src)
        ref = Path("bench_out/runtime_quant_ref.pt")
        print(f"source: {src}; {machine()}", flush=True)
        for task in ["fp32", *args.methods] if "fp32" not in r or not ref.exists() else args.methods:
            print(f"  {task} ...", end=" ", flush=True)
            r[task] = run_worker(SCRIPT, task, str(src), str(ref), str(ddir), str(args.forwards))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in r[task].items()}, flush=True)
            save_results(jpath, r)
    print(table(r))


def table(r: dict) -> str:
    fp = r.get("fp32", {})
    rows = []
    for k, v in r.items():
        if "error" in v:
            rows.append([k, "failed: " + v["error"][:100], "", "", "", "", ""])
            continue
        wb = v["weight_bytes"] / fp["weight_bytes"] if fp.get("weight_bytes") else float("nan")
        lat = f"{v['seconds']:.1f} s ({v['min_s']:.1f}-{v['max_s']:.1f})"
        sq = (
            "reference"
            if k == "fp32"
            else ("bit-identical" if v.get("identical") else f"{v['sqnr_db']:.1f} dB / {v['cosine']:.5f}")
        )
        rows.append(
            [
                k,
                f"{v['quantize_s']:.1f} s" + (" (load + quantize)" if k.startswith("diffusers:") else ""),
                f"{v['weight_bytes'] / 2**20:.0f} MiB ({wb:.2f}x)",
                lat,
                f"{v['seconds'] / fp['seconds']:.2f}x" if fp.get("seconds") else "-",
                sq,
                f"{100 * v['coverage']:.1f} %",
            ]
        )
    return markdown(
        rows,
        [
            "method",
            "quantize time",
            "resident weight bytes (vs fp32)",
            "forward, batch 1, 64x64 (median)",
            "vs fp32",
            "output SQNR / cosine vs fp32",
            "parameters quantized",
        ],
    )


if __name__ == "__main__":
    main()
