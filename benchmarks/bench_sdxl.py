"""SDXL: the issue's four figures on a full-size SDXL base UNet (seeded random weights, fp16 LDM single file, 5.1 GB).

    python benchmarks/bench_sdxl.py                                    # all four sections, full size (see below)
    python benchmarks/bench_sdxl.py --only convert,quantize            # some of them (merged into --json)
    python benchmarks/bench_sdxl.py --size tiny                        # smoke run on a tiny SDXL (seconds; CI)
    python benchmarks/bench_sdxl.py --size medium --only verify        # SDXL topology at 0.3 width (0.6 GB fp16)
    python benchmarks/bench_sdxl.py --table                            # the markdown from --json

Sections (every row a fresh process: a worker of benchmarks/common.py, or the whole command under GNU time):

- convert: LDM -> diffusers folder. `cp` of the file (reference), unetkit's `convert` (library call, first run:
  the source sha256 computed too; and the whole `unetkit convert` CLI process), and diffusers'
  `UNet2DConditionModel.from_single_file(path, config=<local folder with config.json>, torch_dtype=float16)` +
  `save_pretrained` (fp16 kept, as unetkit keeps it), in the same run. Goal: unetkit's peak RSS <= 0.5 GB.
- quantize: `unetkit quantize --method gguf:Q8_0` and `gguf:Q4_K_M`, comfy flavor: wall, peak RSS, file size next to
  the sizes published for SDXL fine-tunes (nuupy/WAI-illustrious-SDXL-GGUF, UNet only: F16 5.14 GB, Q8_0 2.74 GB,
  Q4_K_M 1.63 GB). Goal: Q4_K_M <= 150 s on 2 cores.
- forward: batch 1, 128x128 latent (SDXL's native 1024 px): the fp32 UNet (`load_unet(src, dtype="fp32")`)
  against the Q8_0 file on the fly (`dequantize="on-the-fly"`, fp32 compute): latency (median of --forwards after
  one warm-up) and the resident memory the weights take after the forwards (RSS minus the RSS after imports, heap
  trimmed) against the file size. Goals: <= 1.25x fp32 latency, resident <= 1.2x the file.
- verify: `unetkit verify SRC Q8_0.gguf --quick` (fp16 reference held as stored and computed in fp32; GGUF on the
  fly; blame's passes in lockstep) at --verify-size (default 64, verify's default; 128 is SDXL's native): wall and
  peak RSS, beside `unetkit.verification.estimate_memory`'s estimate. Goal: peak RSS <= 20 GB.

Memory and file sizes are in GB of 10**9 bytes throughout (the published sizes' unit). Full size, expected on the
2-core VM with nothing else running (estimates; the run prints its own): writing the source about 1-2 min (once),
convert 3-5 min (diffusers' rows write 5.1 GB each), quantize 3-5 min, forward 10-20 min (a 128x128 SDXL forward is
about 6.8 TFLOP), verify --quick 5-10 min at 64x64; about 25-40 minutes in all. Disk: about 15 GB under --workdir.
Needs about 12 GB of free memory (the fp32 forward row holds 10.3 GB of weights).

Medium (measured 2026-11-30 on the 2-core VM, other jobs running): verify --quick of the 0.61 GB fp16 medium against
its Q8_0, peak RSS 1.63 GB at 64x64 (estimate 1.69 GB, 5.1 min) and 2.31 GB at 128x128 (estimate 2.19 GB, 8.0 min).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PY,
    fmt_s,
    load_results,
    local_config,
    machine,
    markdown,
    peak_rss_mb,
    remove,
    repeat,
    rss_now_mb,
    run_command,
    run_worker,
    settle,
    warm,
    worker_or_args,
    write_random_ldm,
)

SCRIPT = Path(__file__).resolve()
SECTIONS = ["convert", "quantize", "forward", "verify"]
RECIPES = ["Q8_0", "Q4_K_M"]
#: published UNet-only SDXL GGUF sizes (nuupy/WAI-illustrious-SDXL-GGUF), bytes
PUBLISHED = {"F16": 5.14e9, "Q8_0": 2.74e9, "Q4_K_M": 1.63e9}
#: per size: latent of the forward rows, forwards timed, convert repeats
SIZES = {
    "full": {"latent": 128, "forwards": 3, "repeats": 3},  # convert: one warm-up run first (full size only)
    "medium": {"latent": 64, "forwards": 3, "repeats": 1},
    "tiny": {"latent": 16, "forwards": 2, "repeats": 1},
}
MEDIUM_WIDTH = 0.3  # SDXL's topology (depths 0/2/10, context 2048, add embedding 2816) at 0.3 of its widths
GB = 1e9


def make_source(path: Path, size: str, seed: int = 0) -> Path:
    """The fp16 LDM single file: unetkit.sample's full-size or tiny SDXL base, or the medium one (here)."""
    if path.exists():
        return path
    from unetkit.sample import write_ldm_checkpoint

    if size != "medium":
        return write_ldm_checkpoint(path, "sdxl", size, seed=seed, dtype="fp16")
    return write_medium(path, seed)


def medium_config() -> dict:
    from unetkit.sample import variant_overrides

    cfg = variant_overrides("sdxl", "full")
    widths = [int(round(c * MEDIUM_WIDTH / 32)) * 32 for c in cfg["block_out_channels"]]  # GroupNorm: x32
    cfg.update(block_out_channels=widths, attention_head_dim=[max(1, c // 64) for c in widths])
    return cfg


def write_medium(path: Path, seed: int) -> Path:
    """The medium SDXL as an fp16 LDM file (common.write_random_ldm)."""
    return write_random_ldm(path, medium_config(), seed, f"sdxl medium width={MEDIUM_WIDTH} seed={seed}")


# ------------------------------------------------------------------------------------------------------ worker


def worker(task: str, src: str, out: str, arg: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel  # imported before any clock starts, for every tool

    base_mb = rss_now_mb()
    rec: dict = {}
    if task == "unetkit_convert":
        os.environ["UNETKIT_HASH_CACHE"] = "0"  # a first run: the source sha256 is computed too
        from unetkit import convert

        t = time.perf_counter()
        convert(src, out, to="diffusers")
        rec["seconds"] = time.perf_counter() - t
    elif task == "diffusers_convert":
        t = time.perf_counter()
        unet = UNet2DConditionModel.from_single_file(src, config=arg, torch_dtype=torch.float16)
        unet.save_pretrained(out)
        rec["seconds"] = time.perf_counter() - t
    elif task == "quantize":
        os.environ["UNETKIT_HASH_CACHE"] = "0"
        from unetkit.gguf_export import quantize_file

        t = time.perf_counter()
        r = quantize_file(src, out, f"gguf:{arg}", force=True)
        rec = {"seconds": time.perf_counter() - t, "file_bytes": r.file_bytes, "bits_per_weight": r.bits_per_weight}
    elif task in ("forward_fp32", "forward_q8_0"):
        import ctypes
        import gc

        from unetkit import load_unet
        from unetkit.sample import example_inputs

        latent, forwards = (int(x) for x in arg.split(","))
        t = time.perf_counter()
        unet = load_unet(src, dtype="fp32") if task == "forward_fp32" else load_unet(out, dequantize="on-the-fly")
        load_s = time.perf_counter() - t
        loaded = rss_now_mb()
        inputs = example_inputs(unet, size=latent, batch=1)
        times = []
        with torch.inference_mode():
            unet(**inputs)  # warm-up
            for _ in range(forwards):
                t = time.perf_counter()
                unet(**inputs)
                times.append(time.perf_counter() - t)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed activations back to the OS: what stays is the weights
        settled = rss_now_mb()
        rec = {
            "seconds": statistics.median(times),
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "times_s": times,
            "load_s": load_s,
            "rss_loaded_mb": loaded - base_mb,
            "weights_resident_mb": settled - base_mb,
            "file_bytes": Path(src if task == "forward_fp32" else out).stat().st_size,
            "latent": latent,
        }
    elif task == "estimate":
        from unetkit.verification.memory import estimate_memory

        est = estimate_memory(src, out, size=int(arg))
        rec = {"seconds": 0.0, **est.to_dict(), "text": est.text()}
    else:
        raise ValueError(f"unknown task {task}")
    rec["peak_rss_mb"] = peak_rss_mb()
    rec["base_rss_mb"] = base_mb
    return rec


# -------------------------------------------------------------------------------------------------------- runs


def unetkit_cli(*args: str) -> list[str]:
    return [PY, "-m", "unetkit.cli.app", "-q", *args]


def run(args, r: dict) -> None:
    size = SIZES[args.size]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = make_source(Path(args.src or work / f"sdxl_{args.size}_fp16.safetensors"), args.size)
    warm(src)
    print(f"source: {src} ({src.stat().st_size / GB:.2f} GB); {machine()}", flush=True)
    config_dir = local_config(src, work / f"sdxl_{args.size}_config")
    out = work / "bench_output"
    repeats = args.repeats or size["repeats"]
    gguf = {recipe: work / f"sdxl_{args.size}_{recipe}_comfy.gguf" for recipe in RECIPES}

    def once(task: str, *rest: str) -> dict:
        settle()
        print(f"  {task} {' '.join(Path(x).name for x in rest[1:2])} ...", end=" ", flush=True)
        rec = run_worker(SCRIPT, task, *rest)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items() if k != "text"}, flush=True)
        return rec

    def quantized(recipe: str) -> Path:
        if not gguf[recipe].exists():
            r.setdefault("quantize", {})[recipe] = once("quantize", str(src), str(gguf[recipe]), recipe)
        return gguf[recipe]

    if "convert" in args.only:
        c = r.setdefault("convert", {})
        cleanup = lambda: remove(out)
        cli = Path(sys.executable).parent / "unetkit"
        plan = [
            ("cp", lambda: run_command(["cp", str(src), str(out)])),
            ("unetkit_convert", lambda: run_worker(SCRIPT, "unetkit_convert", str(src), str(out), "")),
            (
                "unetkit_cli_convert",
                lambda: run_command(
                    [str(cli), "-q", "convert", str(src), str(out), "--to", "diffusers"],
                    env={"UNETKIT_HASH_CACHE": "0"},
                ),
            ),
            ("diffusers_convert", lambda: run_worker(SCRIPT, "diffusers_convert", str(src), str(out), str(config_dir))),
        ]
        for name, fn in plan:
            print(f"  {name} ...", end=" ", flush=True)
            c[name] = repeat(fn, repeats, cleanup, warmup=args.size == "full")
            print(fmt_s(c[name]), f"peak RSS {c[name].get('peak_rss_mb', 0):.0f} MB", flush=True)
    if "quantize" in args.only:
        q = r.setdefault("quantize", {})
        for recipe in RECIPES:
            q[recipe] = once("quantize", str(src), str(gguf[recipe]), recipe)
    if "forward" in args.only:
        f = r.setdefault("forward", {})
        q8 = quantized("Q8_0")
        warm(q8)
        spec = f"{size['latent']},{args.forwards or size['forwards']}"
        f["fp32"] = once("forward_fp32", str(src), str(q8), spec)
        f["q8_0_on_the_fly"] = once("forward_q8_0", str(src), str(q8), spec)
    if "verify" in args.only:
        v = r.setdefault("verify", {})
        q8 = quantized("Q8_0")
        for vs in args.verify_sizes:
            report = work / f"verify_{args.size}_{vs}.json"
            est = once("estimate", str(src), str(q8), str(vs))
            print(f"  verify --quick --size {vs} ...", end=" ", flush=True)
            cmd = unetkit_cli(
                "verify", str(src), str(q8), "--quick", "--size", str(vs), "--json", str(report), "--force"
            )
            settle()
            rec = run_command(cmd)
            if report.exists():
                data = json.loads(report.read_text())
                rec["summary"] = data["summary"]
                rec["unet_calls"] = data["settings"]["unet_calls"]
                rec["blamed"] = data["blame"]["blamed"] if data.get("blame") else None
                rec["compute_dtype"] = data["settings"].get("compute_dtype")
            rec["estimate"] = {k: est.get(k) for k in ("components", "total", "text", "error")}
            v[str(vs)] = rec
            print({k: w for k, w in rec.items() if k not in ("estimate", "summary")}, flush=True)


# ------------------------------------------------------------------------------------------------------ tables


def _gb(mb: float | None) -> str:
    """Memory (MiB from the workers and GNU time) in GB of 10**9 bytes, the unit of the file sizes and goals."""
    return "-" if mb is None else f"{mb * 2**20 / GB:.2f} GB"


def tables(r: dict, size: str) -> str:
    parts = []
    c = r.get("convert", {})
    if c:
        base = c.get("cp", {}).get("median_s")

        def row(label: str, key: str, goal: str = "") -> list[str]:
            rec = c.get(key, {})
            if not rec or "error" in rec:
                return [label, fmt_s(rec) if rec else "-", "-", "-", goal]
            ratio = f"{rec['median_s'] / base:.2f}x" if base else "-"
            peak = rec.get("peak_rss_mb")
            above = f" ({_gb(peak - rec['base_rss_mb'])} above imports)" if "base_rss_mb" in rec else ""
            return [label, fmt_s(rec), ratio, _gb(peak) + above, goal]

        parts.append(
            markdown(
                [
                    row("`cp` (reference)", "cp"),
                    row("unetkit convert (library, first run: sha256 computed)", "unetkit_convert", "<= 0.5 GB"),
                    row("`unetkit convert` (whole CLI process)", "unetkit_cli_convert", "<= 0.5 GB"),
                    row("diffusers from_single_file(config=local, fp16) + save_pretrained", "diffusers_convert"),
                ],
                [f"convert ({size} SDXL fp16 LDM -> diffusers)", "wall, median (min-max)", "vs cp", "peak RSS", "goal"],
            )
        )
    q = r.get("quantize", {})
    if q:
        rows = []
        for recipe, rec in q.items():
            if "error" in rec:
                rows.append([recipe, "failed: " + rec["error"][:80], "", "", "", ""])
                continue
            pub = PUBLISHED.get(recipe) if size == "full" else None
            rows.append(
                [
                    recipe,
                    f"{rec['seconds']:.1f} s",
                    _gb(rec["peak_rss_mb"]),
                    f"{rec['file_bytes'] / GB:.2f} GB" + (f" (published: {pub / GB:.2f} GB)" if pub else ""),
                    f"{rec['bits_per_weight']:.2f}",
                    "<= 150 s" if recipe == "Q4_K_M" else "",
                ]
            )
        parts.append(markdown(rows, ["recipe (comfy flavor)", "wall", "peak RSS", "file", "bits/weight", "goal"]))
    f = r.get("forward", {})
    if f:
        base = f.get("fp32", {}).get("median_s")
        rows = []
        for key, label in (("fp32", "fp32 (load_unet dtype=fp32)"), ("q8_0_on_the_fly", "Q8_0 on the fly")):
            rec = f.get(key)
            if not rec or "error" in rec:
                rows.append([label, (rec or {}).get("error", "-")[:80], "", "", "", ""])
                continue
            resident = rec["weights_resident_mb"] * 2**20
            rows.append(
                [
                    label,
                    f"{rec['median_s']:.2f} s ({rec['min_s']:.2f}-{rec['max_s']:.2f})",
                    f"{rec['median_s'] / base:.2f}x" if base else "-",
                    f"{rec['file_bytes'] / GB:.2f} GB",
                    f"{resident / GB:.2f} GB ({resident / rec['file_bytes']:.2f}x file)",
                    "<= 1.25x fp32, <= 1.2x file" if key != "fp32" else "",
                ]
            )
        latent = next((x["latent"] for x in f.values() if "latent" in x), "?")
        parts.append(
            markdown(
                rows,
                [
                    f"forward, batch 1, {latent}x{latent} latent",
                    "latency, median (min-max)",
                    "vs fp32",
                    "file",
                    "weights resident after the forwards",
                    "goal",
                ],
            )
        )
    v = r.get("verify", {})
    if v:
        rows = []
        for vs, rec in v.items():
            s = rec.get("summary", {})
            est = (rec.get("estimate") or {}).get("total")
            rows.append(
                [
                    f"verify --quick, {vs}x{vs}",
                    f"{rec['seconds'] / 60:.1f} min" if "seconds" in rec else "-",
                    _gb(rec.get("peak_rss_mb")),
                    "-" if est is None else f"{est / GB:.2f} GB",
                    str(rec.get("unet_calls", "-")),
                    s.get("verdict", rec.get("error", "-")),
                    "-" if s.get("worst_sqnr_db") is None else f"{s['worst_sqnr_db']:.1f} dB",
                    "<= 20 GB",
                ]
            )
        parts.append(
            markdown(
                rows,
                ["fp16 vs Q8_0", "wall", "peak RSS", "estimate", "UNet calls", "verdict", "worst SQNR", "goal"],
            )
        )
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="full", help="full (the figures), medium, tiny (smoke)")
    ap.add_argument("--only", nargs="+", default=SECTIONS, help=f"sections, comma- or space-separated: {SECTIONS}")
    ap.add_argument("--src", help="the fp16 LDM source (default: WORKDIR/sdxl_SIZE_fp16.safetensors, written once)")
    ap.add_argument("--workdir", default="bench_out/sdxl")
    ap.add_argument("--json", help="results, merged (default: bench_out/sdxl.json; bench_out/sdxl_SIZE.json)")
    ap.add_argument("--repeats", type=int, help="convert runs after a warm-up (full: 3, else 1)")
    ap.add_argument("--forwards", type=int, help="timed forwards after a warm-up (full: 3)")
    ap.add_argument("--verify-sizes", nargs="+", type=int, default=[64], help="verify --size values (default 64)")
    ap.add_argument("--table", action="store_true", help="print the markdown tables from --json and exit")
    args = worker_or_args(ap, worker)  # in a worker process (run_worker) this runs the task and exits
    args.only = [s for part in args.only for s in part.split(",") if s]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    jpath = Path(args.json or ("bench_out/sdxl.json" if args.size == "full" else f"bench_out/sdxl_{args.size}.json"))
    r = load_results(jpath)
    if not args.table:
        run(args, r)
        jpath.parent.mkdir(parents=True, exist_ok=True)
        jpath.write_text(json.dumps({"machine": machine(), "size": args.size, "results": r}, indent=2))
    print(tables(r, args.size))


if __name__ == "__main__":
    main()
