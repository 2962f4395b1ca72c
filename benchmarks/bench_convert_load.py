"""Convert and load: a full-size SD1.5 UNet (fp32 LDM safetensors, 3.44 GB), side by side with
`cp` and diffusers (`from_single_file` with a local config + `save_pretrained`) in the same run.

    python benchmarks/bench_convert_load.py [--repeats 3] [--json bench_out/convert_load.json]

Page cache: warm (every input is read once first, so all tools start equal). Each figure is the median of
--repeats runs after one warm-up run, each in a fresh process (a worker of benchmarks/common.py, or the command
itself); `process` adds interpreter start and imports."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    fmt_s,
    load_results,
    local_config,
    machine,
    make_sd15_source,
    markdown,
    peak_rss_mb,
    remove,
    repeat,
    rss_now_mb,
    run_command,
    run_worker,
    warm,
    worker_or_args,
)

SCRIPT = Path(__file__).resolve()


def worker(task: str, src: str, out: str, config_dir: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel  # imported before any clock starts, for every tool

    base_mb = rss_now_mb()  # the interpreter, torch and diffusers: the same for every tool

    if task in ("unetkit_convert_diffusers", "unetkit_convert_cached"):
        import os

        from unetkit import convert

        if task == "unetkit_convert_diffusers":  # a first run: the source sha256 is computed
            os.environ["UNETKIT_HASH_CACHE"] = "0"
        else:  # a later run on the same unchanged file: the sha256 remembered by the warm-up run is used
            os.environ["UNETKIT_CACHE_DIR"] = str(Path(out).parent / "hash_cache")
        t = time.perf_counter()
        res = convert(src, out, to="diffusers")
        cached = res.source_sha256_cached  # the warm-up run of the cached row computes and remembers it
    elif task == "unetkit_convert_fp16":
        from unetkit import convert

        t = time.perf_counter()
        convert(src, out, to="diffusers", dtype="fp16")
    elif task == "diffusers_convert":
        from diffusers import UNet2DConditionModel

        t = time.perf_counter()
        unet = UNet2DConditionModel.from_single_file(src, config=config_dir)
        unet.save_pretrained(out)
    elif task == "load_file":
        from safetensors.torch import load_file

        t = time.perf_counter()
        load_file(src)
    elif task == "load_file_touch":
        from safetensors.torch import load_file

        t = time.perf_counter()
        sd = load_file(src)
        for v in sd.values():  # fault every page in: the weights are then really in memory
            v.view(-1)[::1024].sum()
    elif task == "load_unet":
        from unetkit import load_unet

        t = time.perf_counter()
        load_unet(src)
    elif task == "load_unet_noalign":
        from unetkit import load_unet

        t = time.perf_counter()
        load_unet(src, align=False)
    elif task == "load_unet_own_file":  # a file unetkit wrote (64-byte aligned): zero-copy
        from unetkit import load_unet

        t = time.perf_counter()
        load_unet(out)
    elif task == "from_single_file":
        from diffusers import UNet2DConditionModel

        t = time.perf_counter()
        UNet2DConditionModel.from_single_file(src, config=config_dir)
    else:
        raise ValueError(f"unknown task {task}")
    rec = {
        "seconds": time.perf_counter() - t,
        "peak_rss_mb": peak_rss_mb(),
        "base_rss_mb": base_mb,
        "torch": torch.__version__,
    }
    if task in ("unetkit_convert_diffusers", "unetkit_convert_cached"):
        rec["sha256_cached"] = cached
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="bench_out/sd15_fp32.safetensors")
    ap.add_argument("--workdir", default="bench_out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="bench_out/convert_load.json")
    ap.add_argument("--only", nargs="*", help="run only these rows (merged into an existing --json file)")
    args = worker_or_args(ap, worker)  # in a worker process (run_worker) this runs the task and exits

    work = Path(args.workdir)
    src = make_sd15_source(Path(args.src))
    config_dir = local_config(src, work / "sd15_config")
    out = work / "bench_output"
    warm(src)
    size_gb = src.stat().st_size / 1e9
    print(f"source: {src} ({size_gb:.2f} GB); {machine()}", flush=True)

    def w(task: str):
        return lambda: run_worker(SCRIPT, task, str(src), str(out), str(config_dir))

    cleanup = lambda: remove(out)
    previous = load_results(Path(args.json)) if args.only else {}
    r: dict[str, dict] = dict(previous)
    plan = [
        ("cp", lambda: run_command(["cp", str(src), str(out)])),
        ("unetkit_convert_diffusers", w("unetkit_convert_diffusers")),
        ("unetkit_convert_cached", w("unetkit_convert_cached")),
        (
            "unetkit_cli_convert",
            lambda: run_command(
                [
                    str(Path(sys.executable).parent / "unetkit"),
                    "-q",
                    "convert",
                    str(src),
                    str(out),
                    "--to",
                    "diffusers",
                ],
                env={"UNETKIT_HASH_CACHE": "0"},
            ),
        ),
        ("diffusers_convert", w("diffusers_convert")),
        ("unetkit_convert_fp16", w("unetkit_convert_fp16")),
        ("load_file", w("load_file")),
        ("load_file_touch", w("load_file_touch")),
        ("load_unet", w("load_unet")),
        ("load_unet_noalign", w("load_unet_noalign")),
        ("from_single_file", w("from_single_file")),
    ]
    own = work / "sd15_unetkit_ldm.safetensors"
    if not own.exists():
        from unetkit import convert

        convert(src, own, to="ldm")
    warm(own)
    plan.append(
        ("load_unet_own_file", lambda: run_worker(SCRIPT, "load_unet_own_file", str(src), str(own), str(config_dir)))
    )
    for name, fn in plan:
        if args.only and name not in args.only:
            continue
        print(f"  {name} ...", end=" ", flush=True)
        r[name] = repeat(fn, args.repeats, cleanup)
        print(
            fmt_s(r[name]),
            f"peak RSS {r[name].get('peak_rss_mb', 0):.0f} MB" if "peak_rss_mb" in r[name] else "",
            flush=True,
        )

    def rss(k):
        if "peak_rss_mb" not in r[k]:
            return "-"
        if "base_rss_mb" not in r[k]:  # a whole command (its own process)
            return f"{r[k]['peak_rss_mb'] / 1024:.2f} GB"
        above = (r[k]["peak_rss_mb"] - r[k]["base_rss_mb"]) / 1024
        return f"{r[k]['peak_rss_mb'] / 1024:.2f} GB ({above:.2f} GB above imports)"

    def ratio(k, base):
        if "error" in r[k] or "error" in r[base]:
            return "-"
        return f"{r[k]['median_s'] / r[base]['median_s']:.2f}x"

    def row(label: str, key: str, base: str, goal: str = "") -> list[str]:
        return [label, fmt_s(r[key]), ratio(key, base) if key != base else "1.00x", rss(key), goal]

    conv = [
        ["`cp` (reference)", fmt_s(r["cp"]), "1.00x", "-", "-"],
        row("unetkit convert --to diffusers, first run (source sha256 computed)", "unetkit_convert_diffusers", "cp",
            "<= 1.3x cp, <= 0.5 GB"),
        row("unetkit convert --to diffusers, later run (sha256 remembered)", "unetkit_convert_cached", "cp",
            "<= 1.3x cp, <= 0.5 GB"),
        row("`unetkit convert --to diffusers` (whole CLI process, first run)", "unetkit_cli_convert", "cp",
            "<= 0.5 GB"),
        row("diffusers from_single_file + save_pretrained", "diffusers_convert", "cp"),
        row("unetkit convert --to diffusers --dtype fp16", "unetkit_convert_fp16", "cp", "recorded"),
    ]  # fmt: skip
    load = [
        row("safetensors load_file (lazy mmap, pages not touched)", "load_file", "load_file"),
        row("safetensors load_file + touch every page", "load_file_touch", "load_file"),
        row("unetkit load_unet -> ready UNet2DConditionModel (default align=True)", "load_unet", "load_file",
            "<= 1.3x load_file; < from_single_file"),
        row("unetkit load_unet(align=False): zero-copy like diffusers", "load_unet_noalign", "load_file"),
        row("unetkit load_unet of a unetkit-written LDM file (aligned: zero-copy)", "load_unet_own_file", "load_file"),
        row("diffusers from_single_file (local config)", "from_single_file", "load_file"),
    ]  # fmt: skip
    text = (
        markdown(
            conv,
            ["convert (3.44 GB fp32 LDM -> diffusers folder)", "wall, median (min-max)", "vs cp", "peak RSS", "target"],
        )
        + "\n\n"
        + markdown(load, ["load", "wall, median (min-max)", "vs load_file", "peak RSS", "target"])
    )
    print("\n" + text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"machine": machine(), "source_bytes": src.stat().st_size, "results": r, "markdown": text}, indent=2)
    )


if __name__ == "__main__":
    main()
