"""GGUF quantize: a full-size SD1.5 UNet (fp32 LDM safetensors, 3.44 GB, seeded random weights) through GGUF.

    python benchmarks/bench_gguf_quantize.py [--recipes Q8_0 Q4_K_M ...] [--only quantize sizes latency sqnr]

Sections (each row in a fresh worker process of benchmarks/common.py, diffusers imported before any clock starts):
- quantize: `unetkit quantize` per recipe (wall, peak RSS, file size, bits/weight), side by side with what a
  ComfyUI-GGUF user runs today for the types gguf-py can encode: a gguf-py numpy quantizer following
  ComfyUI-GGUF's documented rules (`comfy_gguf_py` below; K-quants are impossible there). Q4_K_M is run
  --repeats times (target: <= 60 s wall on 2 cores).
- sizes: our file size per recipe next to the sizes ComfyUI-GGUF's rules give (FACTS.md).
- latency: batch 1, 64x64 latent, on-the-fly Q8_0 against fp32 and against diffusers' own GGUF path
  (`from_single_file(..., quantization_config=GGUFQuantizationConfig(compute_dtype=float32))` on our diffusers
  flavor); median of --forwards runs after one warm-up; resident memory after load (RSS minus the RSS after
  imports) against the file size.
- sqnr: output SQNR / cosine / max abs vs the fp32 output per recipe (same inputs, one forward).
Results merge into --json, so sections can be run one at a time; `--table` prints the markdown from the JSON."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    load_results,
    local_config,
    machine,
    make_sd15_source,
    markdown,
    peak_rss_mb,
    remove,
    rss_now_mb,
    run_worker,
    save_results,
    settle,
    warm,
    worker_or_args,
)

SCRIPT = Path(__file__).resolve()
RECIPES = [
    "F16",
    "BF16",
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_K_S",
    "Q5_1",
    "Q5_0",
    "Q4_K_M",
    "Q4_K_S",
    "Q4_1",
    "Q4_0",
    "Q3_K_M",
    "Q2_K",
]
GGUF_PY_TYPES = ["F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]  # what gguf-py can encode (BF16 too; rarely used)
COMFY_SIZES_MIB = {"F16": 1639, "Q8_0": 873, "Q4_K_M": 482, "Q4_0": 468}  # FACTS.md
MiB = 1 << 20


def comfy_gguf_py(src: str, out: str, qtype: str) -> None:
    """What a ComfyUI-GGUF user runs: gguf-py's numpy quantizer with ComfyUI-GGUF's rules (LDM names without the
    prefix; 1-D and <= 1024-element tensors F32; time_embed, conv_in, conv_out F16; rows of 256 with
    comfy.gguf.orig_shape for tensors whose last dim does not fit). Like its convert script, every tensor is added
    to the writer first and the file written at the end."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import quantize
    from safetensors import safe_open

    qt = GGMLQuantizationType[qtype]
    block = GGML_QUANT_SIZES[qt][0]
    w = GGUFWriter(out, "sd1")
    w.add_quantization_version(2)
    with safe_open(src, "np") as f:
        for key in f.keys():
            name = key.removeprefix("model.diffusion_model.")
            data = f.get_tensor(key).astype(np.float32)
            n = data.size
            if data.ndim == 1 or n <= 1024:
                w.add_tensor(name, data)
                continue
            target = qt
            if name.startswith("time_embed.") or name in ("input_blocks.0.0.weight", "out.2.weight"):
                target = GGMLQuantizationType.F16
            shape = data.shape
            if target != GGMLQuantizationType.F16 and shape[-1] % block:
                if n % 256 == 0:
                    w.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
                    data = data.reshape(-1, 256)
                else:
                    target = GGMLQuantizationType.F16
            q = quantize(data, target)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=target)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _inputs(unet):
    from unetkit.sample import example_inputs

    return example_inputs(unet, size=64, batch=1)


def _time_forwards(unet, n: int) -> dict:
    import torch

    args = _inputs(unet)
    with torch.inference_mode():
        unet(**args)  # warm-up
        times = []
        for _ in range(n):
            t = time.perf_counter()
            out = unet(**args).sample
            times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": n, "out": out}


def worker(task: str, src: str, out: str, arg: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel  # imported before any clock starts, for every tool

    rec: dict = {}
    if task == "unetkit_quantize":
        from unetkit.gguf_export import quantize_file

        os.environ["UNETKIT_HASH_CACHE"] = "0"  # a first run: the source is hashed too
        t = time.perf_counter()
        r = quantize_file(src, out, f"gguf:{arg}", force=True)
        rec = {
            "seconds": time.perf_counter() - t,
            "file_bytes": r.file_bytes,
            "bits_per_weight": r.bits_per_weight,
            "by_qtype": r.by_qtype,
        }
    elif task == "gguf_py_quantize":
        t = time.perf_counter()
        comfy_gguf_py(src, out, arg)
        rec = {"seconds": time.perf_counter() - t, "file_bytes": Path(out).stat().st_size}
    elif task in ("latency_fp32", "latency_onthefly", "latency_diffusers_gguf"):
        base = rss_now_mb()
        t = time.perf_counter()
        if task == "latency_fp32":
            from unetkit import load_unet

            unet = load_unet(src)
        elif task == "latency_onthefly":
            from unetkit import load_unet

            unet = load_unet(out, dequantize="on-the-fly", compute_dtype="fp32")
        else:
            from diffusers import GGUFQuantizationConfig

            unet = UNet2DConditionModel.from_single_file(
                out,
                config=arg,
                torch_dtype=torch.float32,
                quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
            )
        load_s = time.perf_counter() - t
        loaded = rss_now_mb()
        fw = _time_forwards(unet, int(os.environ.get("BENCH_FORWARDS", "3")))
        y = fw.pop("out")
        torch.save(y, Path(out).with_suffix(f".{task}.pt"))
        after = rss_now_mb()
        # what stays resident once the forwards' freed activations go back to the OS (glibc keeps freed heap
        # pages until trimmed): the weights (memory-mapped file pages included, now touched) and small caches
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        settled = rss_now_mb()
        rec = {
            **fw,
            "seconds": fw["median_s"],
            "load_s": load_s,
            "rss_base_mb": base,
            "rss_loaded_mb": loaded,
            "weights_resident_mb": settled - base,
            "rss_after_forward_mb": after,
            "rss_settled_mb": settled,
        }
    elif task == "sqnr":
        from unetkit import load_unet

        ref = torch.load(arg)
        with torch.inference_mode():
            unet = load_unet(out, dtype="fp32")  # dequantize="load": bit-identical to on-the-fly (tested)
            y = unet(**_inputs(unet)).sample
        err = (y - ref).double()
        rec = {
            "seconds": 0.0,
            "sqnr_db": float(10 * torch.log10(ref.double().pow(2).sum() / err.pow(2).sum())),
            "cosine": float(torch.nn.functional.cosine_similarity(y.flatten().double(), ref.flatten().double(), dim=0)),
            "max_abs": float(err.abs().max()),
        }
    elif task == "reference_output":
        from unetkit import load_unet

        with torch.inference_mode():
            unet = load_unet(src)
            torch.save(unet(**_inputs(unet)).sample, out)
        rec = {"seconds": 0.0}
    else:
        raise ValueError(f"unknown task {task}")
    rec["peak_rss_mb"] = peak_rss_mb()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="bench_out/sd15_fp32.safetensors")
    ap.add_argument("--workdir", default="bench_out/gguf")
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the Q4_K_M whole-UNet quantize")
    ap.add_argument("--forwards", type=int, default=3, help="timed forwards per latency row (after a warm-up)")
    ap.add_argument("--only", nargs="*", default=["quantize", "sizes", "latency", "sqnr"])
    ap.add_argument("--json", default="bench_out/gguf_quantize.json")
    ap.add_argument("--table", action="store_true", help="print the markdown tables from --json and exit")
    args = worker_or_args(ap, worker)  # in a worker process (run_worker) this runs the task and exits
    jpath = Path(args.json)
    r: dict = load_results(jpath)
    if not args.table:
        run(args, r)
        save_results(jpath, r)
    print(tables(r))


def run(args, r: dict) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = make_sd15_source(Path(args.src))
    warm(src)
    print(f"source: {src} ({src.stat().st_size / 1e9:.2f} GB); {machine()}", flush=True)
    os.environ["BENCH_FORWARDS"] = str(args.forwards)

    def once(name: str, *rest: str) -> dict:
        settle()
        print(f"  {name} {' '.join(Path(x).name for x in rest[1:])} ...", end=" ", flush=True)
        rec = run_worker(SCRIPT, name, *rest)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items() if k != "by_qtype"}, flush=True)
        return rec

    def gguf_path(recipe: str, flavor: str = "comfy") -> Path:
        return work / f"sd15_{recipe}_{flavor}.gguf"

    if "quantize" in args.only or "sizes" in args.only:
        q = r.setdefault("quantize", {})
        for recipe in args.recipes:
            runs = [
                once("unetkit_quantize", str(src), str(gguf_path(recipe)), recipe)
                for _ in range(args.repeats if recipe == "Q4_K_M" else 1)
            ]
            q[recipe] = {
                **runs[-1],
                "all_s": [x.get("seconds") for x in runs],
                "median_s": statistics.median(x.get("seconds", float("nan")) for x in runs),
            }
        g = r.setdefault("gguf_py", {})
        for qtype in GGUF_PY_TYPES:
            if qtype in args.recipes:
                out = work / f"sd15_{qtype}_gguf_py.gguf"
                g[qtype] = once("gguf_py_quantize", str(src), str(out), qtype)
                remove(out)
    if "latency" in args.only:
        lat = r.setdefault("latency", {})
        q8 = gguf_path("Q8_0")
        if not q8.exists():
            once("unetkit_quantize", str(src), str(q8), "Q8_0")
        q8d = gguf_path("Q8_0", "diffusers")
        if not q8d.exists():
            from unetkit.gguf_export import quantize_file

            quantize_file(src, q8d, "gguf:Q8_0", flavor="diffusers")
        config_dir = local_config(src, Path("bench_out/sd15_config"))
        warm(q8)
        warm(q8d)
        lat["fp32"] = once("latency_fp32", str(src), str(work / "fp32"), "")
        lat["fp32"]["file_bytes"] = src.stat().st_size
        lat["unetkit_q8_0_on_the_fly"] = once("latency_onthefly", str(src), str(q8), "")
        lat["unetkit_q8_0_on_the_fly"]["file_bytes"] = q8.stat().st_size
        lat["diffusers_gguf_q8_0"] = once("latency_diffusers_gguf", str(src), str(q8d), str(config_dir))
        lat["diffusers_gguf_q8_0"]["file_bytes"] = q8d.stat().st_size
    if "sqnr" in args.only:
        ref = work / "reference_output.pt"
        if not ref.exists():
            once("reference_output", str(src), str(ref), "")
        s = r.setdefault("sqnr", {})
        for recipe in args.recipes:
            path = gguf_path(recipe)
            if not path.exists():
                once("unetkit_quantize", str(src), str(path), recipe)
            s[recipe] = once("sqnr", str(src), str(path), str(ref))


def resident(rec: dict) -> str:
    if "rss_settled_mb" not in rec:
        return "-"
    mb = rec["weights_resident_mb"]
    return f"{mb:.0f} MiB ({mb * MiB / rec['file_bytes']:.2f}x file)"


def tables(r: dict) -> str:
    parts = []
    q, g = r.get("quantize", {}), r.get("gguf_py", {})
    if q:
        rows = []
        for recipe, rec in q.items():
            if "error" in rec:
                rows.append([recipe, "failed: " + rec["error"][:80], "", "", "", "", ""])
                continue
            gp = g.get(recipe)
            gtxt = (
                f"{gp['seconds']:.1f} s, {gp['peak_rss_mb'] / 1024:.2f} GB"
                if gp and "error" not in gp
                else ("n/a (gguf-py cannot encode K-quants)" if "K" in recipe else "-")
            )
            speed = f"{gp['seconds'] / rec['median_s']:.1f}x" if gp and "error" not in gp else "-"
            secs = (
                f"{rec['median_s']:.1f} s ({min(rec['all_s']):.1f}-{max(rec['all_s']):.1f}, {len(rec['all_s'])} runs)"
                if len(rec.get("all_s", [])) > 1
                else f"{rec['median_s']:.1f} s"
            )
            comfy = COMFY_SIZES_MIB.get(recipe)
            rows.append(
                [
                    recipe,
                    secs,
                    f"{rec['peak_rss_mb'] / 1024:.2f} GB",
                    gtxt,
                    speed,
                    f"{rec['file_bytes'] / MiB:.0f} MiB" + (f" (ComfyUI-GGUF: {comfy} MiB)" if comfy else ""),
                    f"{rec['bits_per_weight']:.2f}",
                ]
            )
        parts.append(
            markdown(
                rows,
                [
                    "recipe (comfy flavor)",
                    "unetkit quantize, wall",
                    "peak RSS",
                    "gguf-py + ComfyUI-GGUF rules",
                    "unetkit speed-up",
                    "file size",
                    "bits/weight",
                ],
            )
        )
    lat = r.get("latency", {})
    if lat:
        base = lat.get("fp32", {}).get("median_s")
        rows = []
        names = {
            "fp32": "fp32 safetensors, load_unet",
            "unetkit_q8_0_on_the_fly": "unetkit Q8_0 on-the-fly (comfy file)",
            "diffusers_gguf_q8_0": "diffusers GGUF path, Q8_0 (diffusers flavor)",
        }
        for k, rec in lat.items():
            if "error" in rec:
                rows.append([names.get(k, k), "failed: " + rec["error"][:80], "", "", "", ""])
                continue
            rows.append(
                [
                    names.get(k, k),
                    f"{rec['median_s']:.2f} s ({rec['min_s']:.2f}-{rec['max_s']:.2f})",
                    f"{rec['median_s'] / base:.2f}x" if base else "-",
                    f"{rec['file_bytes'] / MiB:.0f} MiB",
                    resident(rec),
                    f"{rec['rss_after_forward_mb']:.0f} MiB / {rec['peak_rss_mb']:.0f} MiB",
                ]
            )
        parts.append(
            markdown(
                rows,
                [
                    "forward, batch 1, 64x64 latent",
                    "latency, median (min-max)",
                    "vs fp32",
                    "file",
                    "resident after the forwards (RSS - RSS after imports; heap trimmed)",
                    "RSS after forwards / peak",
                ],
            )
        )
    s = r.get("sqnr", {})
    if s:
        rows = [
            [
                k,
                f"{v['sqnr_db']:.1f}",
                f"{v['cosine']:.6f}",
                f"{v['max_abs']:.4f}",
                f"{q[k]['bits_per_weight']:.2f}" if k in q and "bits_per_weight" in q[k] else "-",
            ]
            for k, v in s.items()
            if "error" not in v
        ]
        parts.append(markdown(rows, ["recipe", "output SQNR dB vs fp32", "cosine", "max abs", "bits/weight"]))
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
