"""Shared benchmark plumbing: the full-size source file, the one worker protocol, whole-command timing, tables.

Every measurement runs in a fresh process of its own (so its peak RSS is that operation's own and nothing the
parent imported or freed blurs it), after one warm-up run, repeated; we report the median and the spread, never a
lone mean. There are two kinds of fresh process, and this module is the only place that starts either:

- A worker: ``python benchmarks/bench_X.py --worker``, started by ``run_worker(script, task, *args)``. This is THE
  worker protocol of every script under benchmarks/ (no script has its own):

  * request: one JSON object on stdin, ``{"task": TASK, "args": [ARG, ...]}``; the script's
    ``worker(task, *args)`` function runs it (``worker_or_args`` dispatches; a script's ``main`` calls it first);
  * answer: one JSON object, the last line on stdout: the record (``seconds``, ``peak_rss_mb``, ...), or
    ``{"error": message, "error_type": class name}`` with exit code 2 when the task raised (its traceback goes
    to stderr). While the task runs, ``sys.stdout`` points at stderr, so a library that prints cannot corrupt the
    answer;
  * the parent adds ``process_s``, the wall time of the whole process (interpreter start and imports included).

  It is the same wire format as the library's own per-variant worker, ``python -m unetkit.benchmarking.worker``
  (``unetkit.benchmarking.runner.run_isolated``, what ``unetkit bench`` uses): JSON request on stdin, JSON record
  or ``{"error", "error_type"}`` as the last stdout line, stdout redirected to stderr while measuring. The
  library's worker can only measure a *variant* (load a UNet file, optionally runtime-quantize it, time
  forwards: a ``BenchRecord``); the benchmarks measure other tasks too (convert, GGUF export, third-party tools
  such as diffusers and gguf-py side by side), so they run their task functions through this module with the
  same protocol. Where a benchmark wants exactly a variant measurement, it runs ``unetkit bench`` (which goes
  through the library's worker; see bench_verify.py) rather than copying it. src/ cannot be changed from here;
  if the library ever accepts arbitrary tasks, ``run_worker`` is the one function to point at it.

- A whole command (``cp``, the ``unetkit`` CLI, ``python -c pass``): ``run_command``, wall time of the process and,
  through GNU time, its own peak RSS. Nothing is exchanged with it, so there is no protocol to share.
"""

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
    """Full-size SD1.5 UNet, seeded random fp32 weights (unetkit.sample's builder, the one the tests and `make demo`
    use), LDM names under model.diffusion_model., written by the safetensors library itself (as real files are:
    8-byte aligned, not unetkit's 64)."""
    if path.exists():
        return path
    from unetkit.sample import write_ldm_checkpoint

    return write_ldm_checkpoint(path, "sd1.x", "full", seed=seed, dtype="fp32", writer="safetensors")


def write_random_ldm(path: Path, cfg: dict, seed: int, label: str, scale: float = 0.02) -> Path:
    """A UNet of diffusers config ``cfg`` (any width: the mid-size models of bench_sdxl and bench_batch) as an fp16
    LDM file: seeded weights drawn one tensor at a time (randn * scale; norm weights 1 + that), written by the
    safetensors library (8-byte aligned, as downloaded files are), ``label`` in its metadata."""
    import torch
    from safetensors.torch import save_file

    from unetkit.keymap import KeyMap, Topology
    from unetkit.spec import build_model

    model = build_model(cfg, device="meta")
    keymap = KeyMap.for_topology(Topology.from_config(model.config))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        t = torch.randn(tuple(p.shape), generator=g).mul_(scale)
        if name.endswith("weight") and "norm" in name:
            t.add_(1.0)
        state["model.diffusion_model." + keymap.to_ldm(name)] = t.half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", "bench": label})
    return path


def local_config(src: Path, config_dir: Path) -> Path:
    """A local diffusers config folder for ``src`` (diffusers must not reach the Hub), written once."""
    if not (config_dir / "config.json").exists():
        from unetkit import open_unet
        from unetkit.spec import build_model

        build_model(open_unet(src).spec.config).save_config(config_dir)
    return config_dir


def worker_or_args(ap, worker):
    """Parse the command line. In a worker process (``--worker``, started by ``run_worker``) read the request from
    stdin, run ``worker(task, *args)``, print the answer as the last stdout line and exit; otherwise return the
    parsed arguments. Every script's ``main`` calls this first."""
    import argparse

    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.exit(serve(worker))
    return args


def serve(worker) -> int:
    """The worker side of the protocol (see the module docstring): request on stdin, answer as the last stdout line;
    returns the exit code (0, or 2 when the task raised)."""
    import traceback

    answer = sys.stdout
    sys.stdout = sys.stderr  # whatever the task prints cannot corrupt the answer
    try:
        request = json.loads(sys.stdin.read())
        reply, code = worker(request["task"], *request.get("args", [])), 0
    except Exception as e:  # any failure: the parent reports it as the row's error
        traceback.print_exc()
        reply, code = {"error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__}, 2
    finally:
        sys.stdout = answer
    answer.write(json.dumps(reply) + "\n")
    answer.flush()
    return code


def load_results(path: Path) -> dict:
    """The ``results`` of an earlier run's JSON file (rows are merged into it), or {}."""
    return json.loads(Path(path).read_text())["results"] if Path(path).exists() else {}


def save_results(path: Path, results: dict) -> None:
    """Write ``results`` with the machine they were measured on, the format :func:`load_results` reads."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


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


def _tail(text: str, lines: int = 3) -> str:
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-300:] if kept else "(no output)"


def run_worker(script: Path, task: str, *args, env: dict[str, str] | None = None) -> dict:
    """Run ``task`` of ``script`` in a fresh worker process (the protocol of the module docstring) and return its
    record plus ``process_s``; a failed task gives ``{"error": ..., "process_s": ...}``. ``args``: JSON values."""
    request = json.dumps({"task": task, "args": list(args)})
    t0 = time.perf_counter()
    proc = subprocess.run(
        [PY, str(script), "--worker"],
        input=request,
        capture_output=True,
        text=True,
        env={**os.environ, "DIFFUSERS_VERBOSITY": "error", **(env or {})},
    )
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        rec = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        rec = None
    if not isinstance(rec, dict):
        rec = {"error": f"worker exit code {proc.returncode}, no answer; stderr: {_tail(proc.stderr)}"}
    elif proc.returncode != 0 and "error" not in rec:
        rec = {"error": f"worker exit code {proc.returncode}; stderr: {_tail(proc.stderr)}"}
    rec["process_s"] = wall
    return rec


def run_command(
    cmd: list[str], env: dict[str, str] | None = None, rss: bool = True, stdout: Path | None = None
) -> dict:
    """Run a command; wall time and that process's own peak RSS. The RSS comes from GNU time, a small C
    program: measured from this Python process, a child's maxrss would include the parent's pages (fork).
    ``rss=False``: no GNU time in between (for start-up times, where its own exec would count). ``stdout``: a file
    that receives the command's standard output (else it is discarded)."""
    import tempfile

    full_env = {**os.environ, **(env or {})}
    if not rss:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env)
        wall = time.perf_counter() - t0
        rec = {"seconds": wall, "process_s": wall}
        if proc.returncode != 0:
            rec["error"] = _tail(proc.stderr, 1)
        return rec
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file, open(stdout or os.devnull, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *cmd],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        wall = time.perf_counter() - t0
        text = rss_file.read().strip().splitlines()
    rec = {"seconds": wall, "process_s": wall}
    if text and text[-1].isdigit():
        rec["peak_rss_mb"] = int(text[-1]) / 1024
    if proc.returncode != 0:
        rec["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    return rec


def settle() -> None:
    """Before a measured run: flush earlier writes (otherwise writeback throttling lands on whoever runs next)."""
    os.sync()
    time.sleep(0.5)


def repeat(fn, repeats: int, cleanup=None, warmup: bool = True) -> dict:
    """Median/min/max of ``fn()['seconds']`` over ``repeats`` runs after one warm-up; keeps the max peak RSS."""
    runs = []
    for i in range(repeats + (1 if warmup else 0)):
        settle()
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
    """This process's own peak RSS, MiB: ``VmHWM`` from /proc (the high-water mark of this process image). Not
    ``getrusage``'s ``ru_maxrss``: Linux carries that over fork and exec, so a worker would report at least its
    parent's peak (a parent that wrote a 3.4 GB source with the safetensors library gave every worker a 3.4 GB
    floor). ``ru_maxrss`` where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def machine() -> dict:
    """Where and when the figures were taken (torch's version read from its metadata: no torch import here)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch_version,
        "date": time.strftime("%Y-%m-%d"),
        "time": time.strftime("%H:%M %Z"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "source": source_revision(),
    }


def source_revision() -> str | None:
    """The commit the figures were taken at, ``+modified`` when src/ differs from it (None outside git)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+modified" if dirty else "")


def markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_s(rec: dict) -> str:
    if "error" in rec:
        return "failed: " + rec["error"][:80]
    return f"{rec['median_s']:.2f} s ({rec['min_s']:.2f}-{rec['max_s']:.2f})"
