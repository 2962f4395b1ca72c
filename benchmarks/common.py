"""Shared benchmark plumbing: the full-size source file, isolated worker processes, and tables.

Every measurement runs in its own Python process (so peak RSS is that operation's own), after one warm-up
run, repeated; we report the median and the spread, never a lone mean."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


def make_sd15_source(path: Path, seed: int = 0) -> Path:
    """Full-size SD1.5 UNet, seeded random fp32 weights, LDM names under model.diffusion_model., written by the
    safetensors library itself (as real files are: 8-byte aligned, not unetkit's 64)."""
    if path.exists():
        return path
    import torch
    from safetensors.torch import save_file

    from unetkit.keymap import KeyMap, Topology
    from unetkit.spec import build_model

    model = build_model(dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8))
    km = KeyMap.for_topology(Topology.from_config(model.config))
    sd = {}
    for i, (k, p) in enumerate(model.state_dict().items()):
        g = torch.Generator().manual_seed(seed + i)
        sd["model.diffusion_model." + km.to_ldm(k)] = torch.randn(tuple(p.shape), generator=g) * 0.02
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path.with_suffix(".partial")))
    os.replace(path.with_suffix(".partial"), path)
    return path


def local_config(src: Path, config_dir: Path) -> Path:
    """A local diffusers config folder for ``src`` (diffusers must not reach the Hub), written once."""
    if not (config_dir / "config.json").exists():
        from unetkit import open_unet
        from unetkit.spec import build_model

        build_model(open_unet(src).spec.config).save_config(config_dir)
    return config_dir


def worker_or_args(ap, worker):
    """Parse the command line; in a ``--worker TASK ARGS...`` process (see run_worker) run ``worker(TASK, *ARGS)``,
    print its JSON record and return None; otherwise return the parsed arguments."""
    import argparse

    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, *args.rest)))
        return None
    return args


def load_results(path: Path) -> dict:
    """The ``results`` of an earlier run's JSON file (rows are merged into it), or {}."""
    return json.loads(Path(path).read_text())["results"] if Path(path).exists() else {}


def warm(path: Path) -> None:
    """Read a file once so it sits in the page cache (every tool then starts from the same warm state)."""
    files = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() else [Path(path)]
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_worker(script: Path, task: str, *args: str) -> dict:
    """Run ``script --worker task args`` in a fresh process; it prints one JSON line last."""
    t0 = time.perf_counter()
    proc = subprocess.run([PY, str(script), "--worker", task, *args], capture_output=True, text=True,
                          env={**os.environ, "DIFFUSERS_VERBOSITY": "error"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300], "process_s": wall}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["process_s"] = wall
    return rec


def run_command(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a command; wall time and that process's own peak RSS. The RSS comes from GNU time, a small C
    program: measured from this Python process, a child's maxrss would include the parent's pages (fork)."""
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *cmd], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - t0
        text = rss_file.read().strip().splitlines()
    rec = {"seconds": wall, "process_s": wall}
    if text and text[-1].isdigit():
        rec["peak_rss_mb"] = int(text[-1]) / 1024
    if proc.returncode != 0:
        rec["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    return rec


def repeat(fn, repeats: int, cleanup=None, warmup: bool = True) -> dict:
    """Median/min/max of ``fn()['seconds']`` over ``repeats`` runs after one warm-up; keeps the max peak RSS."""
    runs = []
    for i in range(repeats + (1 if warmup else 0)):
        os.sync()  # flush earlier writes first: otherwise writeback throttling lands on whoever runs next
        time.sleep(0.5)
        rec = fn()
        if cleanup:
            cleanup()
        if "error" in rec:
            return rec
        if warmup and i == 0:
            continue
        runs.append(rec)
    secs = [r["seconds"] for r in runs]
    out = {
        "median_s": statistics.median(secs),
        "min_s": min(secs),
        "max_s": max(secs),
        "runs": len(secs),
        "process_s": statistics.median(r["process_s"] for r in runs),
    }
    rss = [r["peak_rss_mb"] for r in runs if "peak_rss_mb" in r]
    if rss:
        out["peak_rss_mb"] = max(rss)
    base = [r["base_rss_mb"] for r in runs if "base_rss_mb" in r]
    if base:
        out["base_rss_mb"] = min(base)
    return out


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_s(rec: dict) -> str:
    if "error" in rec:
        return "failed: " + rec["error"][:80]
    return f"{rec['median_s']:.2f} s ({rec['min_s']:.2f}-{rec['max_s']:.2f})"
