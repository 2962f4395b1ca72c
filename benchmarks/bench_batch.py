"""unetkit batch against a shell loop of unetkit commands, and the Ray engine against the local one.

    python benchmarks/bench_batch.py                  # 8 mid-size models x 3 jobs (about 15 minutes on 2 cores)
    python benchmarks/bench_batch.py --models 3 --width 0.25   # a smoke run (about 2 minutes)
    python benchmarks/bench_batch.py --table          # the markdown from --json

The catalog: --models UNets of SD1.5's topology at --width of its channels (0.5: 160/320/640/640 channels, 216 M
parameters, 432 MB in fp16; distilled SD1.5 models such as segmind's tiny-sd are about this size), seeded random
fp16 weights, each a different seed. The jobs, the same in every row: convert to a diffusers folder, quantize to
GGUF Q8_0, quantize to GGUF Q4_K_M.

Rows, each timed as one whole command (benchmarks/common.py's run_command: wall time, GNU time's peak RSS), each
with a fresh output folder and a fresh sha256 cache, the inputs warm in the page cache:
- shell loop: `for f in models/*; do unetkit convert ...; unetkit quantize ... Q8_0; unetkit quantize ... Q4_K_M;
  done`: what users write today (each command imports torch again; quantize uses its own 2-process encoder pool).
- local engine: `unetkit batch plan.toml` (2 workers, one per core). Goal: >= 1.5x the shell loop's throughput.
- ray engine: `unetkit batch plan.toml --engine ray` (a local Ray instance started and stopped by the command,
  2 CPUs). Goal: <= 1.2x the local engine's time.
The outputs of the local and Ray engines are compared byte for byte. The ledger's per-job times, peak RSS and sizes
are kept in --json for the scaling estimate in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PY, ROOT, machine, markdown, run_command, write_random_ldm

JOBS = [("convert", "diffusers"), ("quantize", "gguf:Q8_0"), ("quantize", "gguf:Q4_K_M")]


def plan_toml(output_dir: str) -> str:
    """The batch plan of JOBS over models/ (the same jobs as the shell loop)."""
    lines = ['inputs = ["models/*.safetensors"]', f'output_dir = "{output_dir}"']
    for verb, arg in JOBS:
        lines += ["[[jobs]]", f'verb = "{verb}"', f'{"to" if verb == "convert" else "method"} = "{arg}"']
    return "\n".join(lines) + "\n"


def catalog(work: Path, n: int, width: float) -> list[Path]:
    from unetkit.sample import variant_overrides

    cfg = variant_overrides("sd1.x", "full")
    cfg["block_out_channels"] = [int(round(c * width / 32)) * 32 for c in cfg["block_out_channels"]]
    paths = []
    for i in range(n):
        p = work / "models" / f"mid{i:02d}.safetensors"
        if not p.exists():
            write_random_ldm(p, cfg, seed=100 + i, label=f"sd1.x width={width} seed={100 + i}")
        paths.append(p)
    return paths


def shell_loop(models: list[Path], out: Path) -> str:
    lines = [
        "set -e",
        f"mkdir -p {out}",
        f"for f in {' '.join(str(m) for m in models)}; do",
        '  s=$(basename "$f" .safetensors)',
    ]
    cli = f"{PY} -m unetkit.cli.app -q"
    lines.append(f'  {cli} convert "$f" {out}/"$s"-diffusers --to diffusers')
    for _, method in JOBS[1:]:
        lines.append(f'  {cli} quantize "$f" {out}/"$s"-{method.split(":")[1]}.gguf --method {method}')
    lines.append("done")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--width", type=float, default=0.5, help="fraction of SD1.5's channels (default 0.5)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "batch")
    ap.add_argument("--json", type=Path, default=ROOT / "bench_out" / "batch.json")
    ap.add_argument("--only", nargs="+", choices=("shell", "local", "ray"), default=["shell", "local", "ray"])
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.json.read_text())))
        return 0
    work = args.workdir
    models = catalog(work, args.models, args.width)
    for m in models:  # warm the page cache: every row reads warm inputs
        m.read_bytes()
    res: dict = (
        json.loads(args.json.read_text()) if args.json.exists() and set(args.only) != {"shell", "local", "ray"} else {}
    )
    res.update(
        machine=machine(),
        models=len(models),
        width=args.width,
        model_bytes=sum(m.stat().st_size for m in models),
        jobs=[f"{v}:{o}" for v, o in JOBS],
    )
    for row in args.only:
        out = work / f"out_{row}"
        cache = work / f"cache_{row}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        env = {"UNETKIT_CACHE_DIR": str(cache)}
        if row == "shell":
            script = work / "loop.sh"
            script.write_text(shell_loop(models, out))
            rec = run_command(["bash", str(script)], env=env)
        else:
            plan = work / f"plan_{row}.toml"
            plan.write_text(plan_toml(out.name))
            stdout = work / f"result_{row}.json"
            cmd = [PY, "-m", "unetkit.cli.app", "-q", "batch", str(plan), "--json", "--engine", row, "--workers", "2"]
            rec = run_command(cmd, env=env, stdout=stdout)
            r = json.loads(stdout.read_text())
            rec.update(done=r["done"], failed=r["failed"], skipped=r["skipped"])
            rec["per_job"] = [
                {k: x.get(k) for k in ("input", "job", "seconds", "peak_rss_mb", "bytes", "status")} for x in r["rows"]
            ]
        rec["outputs_bytes"] = sum(
            f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix in (".gguf", ".safetensors", ".json")
        )
        res[row] = rec
        print(row, {k: v for k, v in rec.items() if k != "per_job"}, flush=True)
        args.json.write_text(json.dumps(res, indent=1))
    if "local" in res and "ray" in res:
        res["ray_identical"] = identical(work / "out_local", work / "out_ray")
    args.json.write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


def identical(a: Path, b: Path) -> bool:
    """Every output file of ``a`` (but the ledger and the page) equal byte for byte in ``b``."""
    for f in sorted(a.rglob("*")):
        if f.is_file() and f.suffix not in (".jsonl", ".html"):
            g = b / f.relative_to(a)
            if not g.is_file() or g.read_bytes() != f.read_bytes():
                print("differs:", f, file=sys.stderr)
                return False
    return True


def table(res: dict) -> str:
    n = res["models"] * len(res["jobs"])
    rows = []
    for row, label in (
        ("shell", "shell loop of unetkit commands"),
        ("local", "unetkit batch (local, 2 workers)"),
        ("ray", "unetkit batch --engine ray (local Ray, 2 CPUs)"),
    ):
        if row in res:
            r = res[row]
            rows.append(
                [
                    label,
                    f"{r['seconds']:.0f} s",
                    f"{3600 * n / r['seconds']:.0f} jobs/h",
                    f"{r.get('peak_rss_mb', 0) / 1024:.2f} GB",
                ]
            )
    out = [
        f"{res['models']} models ({res['model_bytes'] / 1e9:.2f} GB, SD1.5 topology at width {res['width']}) x "
        f"{len(res['jobs'])} jobs ({', '.join(res['jobs'])}) = {n} jobs",
        "",
        markdown(rows, ["how", "wall", "throughput", "peak RSS (whole command)"]),
        "",
    ]
    if "shell" in res and "local" in res:
        x = res["shell"]["seconds"] / res["local"]["seconds"]
        out.append(
            f"- local engine: {x:.2f}x the shell loop's throughput (goal 1.5x: {'met' if x >= 1.5 else 'missed'})"
        )
    if "local" in res and "ray" in res:
        x = res["ray"]["seconds"] / res["local"]["seconds"]
        out.append(
            f"- Ray engine: {x:.2f}x the local engine's time (goal <= 1.2x: {'met' if x <= 1.2 else 'missed'}); "
            f"outputs byte-identical: {res.get('ray_identical')}"
        )
    if "local" in res:
        out += ["", scaling(res)]
    return "\n".join(out)


#: parameters of the UNets the estimate is for (fp16 files: 2 bytes per parameter)
TARGETS = {"SD1.5 UNet (fp16, 1.72 GB)": 859_520_964, "SDXL UNet (fp16, 5.14 GB)": 2_567_463_684}
NODE_CORES = 16


def scaling(res: dict) -> str:
    """On paper, from the local engine's measured per-job times and bytes: jobs are streaming and single-threaded
    in a worker, so CPU time and bytes scale with the parameter count. A node of NODE_CORES cores runs that many
    workers; the shared storage must read each input once per job plus once for its hash, and take every output."""
    rows = res["local"]["per_job"]
    n_models = res["models"]
    params = res["model_bytes"] / n_models / 2  # per model (fp16 inputs)
    cpu_s = sum(r["seconds"] for r in rows) / n_models  # per model, all jobs
    out_b = sum(r["bytes"] or 0 for r in rows) / n_models
    in_b = res["model_bytes"] / n_models * (len(res["jobs"]) + 1)
    peak = max(r["peak_rss_mb"] or 0 for r in rows) / 1024
    lines = [
        f"Scaling on paper, from the local run: per model {cpu_s:.1f} CPU-s, {in_b / 1e9:.2f} GB read, "
        f"{out_b / 1e9:.2f} GB written, peak RSS per worker {peak:.2f} GB ({params / 1e6:.0f} M parameters).",
        "",
    ]
    table_rows = []
    crossover = []
    for name, p in TARGETS.items():
        k = p / params
        for bw in (1e9, 10e9):
            n = bw * cpu_s * k / ((in_b + out_b) * k * NODE_CORES)
            crossover.append(f"{name} at {bw / 1e9:.0f} GB/s: from {n:.1f} nodes ({n * NODE_CORES:.0f} workers)")
    for name, p in TARGETS.items():
        k = p / params
        cpu, moved = cpu_s * k, (in_b + out_b) * k
        for nodes in (1, 4, 16, 64, 256):
            cpu_rate = nodes * NODE_CORES / cpu  # models per second, CPU-bound
            cells = [name, str(nodes), f"{10_000 / cpu_rate / 3600:.1f} h"]
            for bw in (1e9, 10e9):
                io_rate = bw / moved
                rate = min(cpu_rate, io_rate)
                bound = "storage" if io_rate < cpu_rate else "CPU"
                cells.append(f"{10_000 / rate / 3600:.1f} h ({bound})")
            table_rows.append(cells)
    lines.append(
        markdown(
            table_rows,
            ["10,000 checkpoints of", f"nodes ({NODE_CORES} cores)", "CPU only", "storage 1 GB/s", "storage 10 GB/s"],
        )
    )
    lines += ["", "Where the shared storage becomes the limit: " + "; ".join(crossover) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
