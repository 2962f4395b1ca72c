"""Start-up: how long a fresh process takes, side by side, in one run.

    python benchmarks/bench_startup.py [--runs 10] [--json bench_out/startup.json]   # --table: print from the JSON

Rows, each a fresh process started from here and timed as a whole (wall time, no GNU time in between):
- `python -c pass`: bare interpreter start-up, the reference;
- `python -c "import torch"`: what any command that imports torch pays on top of it;
- `python -c "import unetkit"`: the package itself (its public names are lazy);
- `python -m unetkit.cli.app --help` and the `unetkit` console script's `--help`;
- `unetkit inspect FILE --no-scan --json` of a 3.44 GB SD1.5 fp32 safetensors file and of a 1.72 GB SD1.5 F16
  GGUF file (header only: no tensor data is read).
Goal (the issue): `--help` and header-only `inspect` within 0.3 s of bare Python start-up (median against
median; the min-to-min difference is shown too, as it is the one least disturbed by other load).

Runs are interleaved (one warm-up round, then --runs rounds, each running every row once), so a change in the
machine's load spreads over all rows alike; each row reports the median and the min-max. Bytecode: by default
every process reads and writes .pyc files under WORKDIR/pycache (an installed package has its .pyc; an editable
install under PYTHONDONTWRITEBYTECODE=1 would compile its sources in every process); `--bytecode env` measures
the environment as it is. A separate, untimed run of each row with PYTHONPROFILEIMPORTTIME=1 records which heavy
modules it imported (torch above all), the slowest imports, the interpreter's own import-time total, and its
peak RSS (GNU time).

The inputs are made once under --workdir, in a worker process (benchmarks/common.py's protocol), and cost no
3.4 GB write: a valid safetensors header listing every tensor of the SD1.5 UNet (LDM names under
model.diffusion_model., fp32, shapes from unetkit.spec.expected_shapes) followed by a sparse data section, and a
GGUF file the same way (gguf-py's GGUFWriter: header and tensor infos of the ComfyUI-GGUF layout, F16 weights and
F32 1-D tensors, sparse data). Reading their headers is what is measured; the data is never read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, load_results, machine, markdown, run_command, run_worker, worker_or_args

SCRIPT = Path(__file__).resolve()
UNETKIT = Path(PY).parent / "unetkit"  # the console script next to this interpreter (a venv's bin/)
LDM_PREFIX = "model.diffusion_model."
GOAL_S = 0.3  # within this of bare Python start-up
HEAVY = ["torch", "numpy", "diffusers", "transformers", "safetensors", "gguf", "numba", "huggingface_hub", "scipy"]

#: the full SD1.5 UNet config (expected_shapes and the key map want every block type spelled out)
SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)


# ------------------------------------------------------------------------------------------ inputs (in a worker)


def sd15_ldm_shapes() -> dict[str, tuple[int, ...]]:
    """Every SD1.5 UNet tensor: LDM name (no prefix) -> shape."""
    from unetkit.keymap import KeyMap, Topology
    from unetkit.spec import expected_shapes

    km = KeyMap.for_topology(Topology.from_config(SD15))
    return {km.to_ldm(name): tuple(shape) for name, shape in expected_shapes(SD15).items()}


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A valid safetensors file (fp32, 8-byte aligned header as the safetensors library writes it) whose data
    section is a hole: the file has its full size but only the header is written."""
    header: dict = {"__metadata__": {"format": "pt", "unetkit.bench": "start-up input: header only, sparse data"}}
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 4
        header[LDM_PREFIX + name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        f.truncate(8 + len(blob) + offset)
    os.replace(tmp, path)


def write_sparse_gguf(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A GGUF file as ComfyUI-GGUF lays out an F16 SD1.5 UNet (LDM names without prefix, architecture sd1; F16
    weights, F32 1-D tensors), written by gguf-py's GGUFWriter up to the tensor infos; the data section is a hole."""
    import numpy as np
    from gguf import GGUFWriter

    tmp = path.with_name(path.name + ".partial")
    w = GGUFWriter(str(tmp), "sd1")
    w.add_quantization_version(2)
    data = 0
    for name, shape in shapes.items():
        dtype = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        nbytes = math.prod(shape) * dtype.itemsize
        w.add_tensor_info(name, shape, dtype, nbytes)
        data += GGUFWriter.ggml_pad(nbytes, w.data_alignment)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(tmp, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        f.truncate(GGUFWriter.ggml_pad(end, w.data_alignment) + data)
    os.replace(tmp, path)


def worker(task: str, workdir: str) -> dict:
    """``prepare``: write both inputs (once) and check them with unetkit's own header readers."""
    if task != "prepare":
        raise ValueError(f"unknown task {task}")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    st, gg = work / "sd15_fp32_sparse.safetensors", work / "sd15_f16_sparse.gguf"
    shapes = sd15_ldm_shapes()
    if not st.exists():
        write_sparse_safetensors(st, shapes)
    if not gg.exists():
        write_sparse_gguf(gg, shapes)
    from unetkit.inspection import inspect_file

    out = {}
    for key, path in (("safetensors", st), ("gguf", gg)):
        info = inspect_file(path, scan=False)
        out[key] = {
            "path": str(path),
            "file_bytes": path.stat().st_size,
            "disk_bytes": path.stat().st_blocks * 512,
            "format": info["format"],
            "variant": info["variant"],
            "unet_tensors": info["unet_tensors"],
            "parameters": info["parameters"],
        }
    return out


# ------------------------------------------------------------------------------------------------ measurement


def rows(inputs: dict) -> list[tuple[str, str, list[str]]]:
    """(key, label, command) of every row; the `unetkit` console script where it exists, else python -m."""
    cli = [str(UNETKIT)] if UNETKIT.exists() else [PY, "-m", "unetkit.cli.app"]
    out = [
        ("python_pass", "`python -c pass` (reference)", [PY, "-c", "pass"]),
        ("import_torch", '`python -c "import torch"`', [PY, "-c", "import torch"]),
        ("import_unetkit", '`python -c "import unetkit"`', [PY, "-c", "import unetkit"]),
        ("help_module", "`python -m unetkit.cli.app --help`", [PY, "-m", "unetkit.cli.app", "--help"]),
    ]
    if UNETKIT.exists():
        out.append(("help_script", "`unetkit --help` (console script)", [str(UNETKIT), "--help"]))
    out += [
        (
            "inspect_safetensors",
            f"`unetkit inspect --no-scan --json`, {inputs['safetensors']['file_bytes'] / 1e9:.2f} GB fp32 safetensors",
            [*cli, "inspect", inputs["safetensors"]["path"], "--no-scan", "--json"],
        ),
        (
            "inspect_gguf",
            f"`unetkit inspect --no-scan --json`, {inputs['gguf']['file_bytes'] / 1e9:.2f} GB F16 GGUF",
            [*cli, "inspect", inputs["gguf"]["path"], "--no-scan", "--json"],
        ),
    ]
    return out


GOAL_ROWS = ("help_module", "help_script", "inspect_safetensors", "inspect_gguf")


def trace(cmd: list[str], env: dict[str, str]) -> dict:
    """One untimed run with PYTHONPROFILEIMPORTTIME=1 under GNU time: exit code, heavy modules imported, the
    interpreter's import-time total, peak RSS, and (for --json output) the JSON's summary."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *cmd],
            capture_output=True,
            text=True,
            env={**os.environ, **env, "PYTHONPROFILEIMPORTTIME": "1"},
        )
        rss = rss_file.read().strip().splitlines()
    modules: dict[str, int] = {}  # module -> cumulative import time, us (first import only, as Python reports it)
    top_us, depth0 = 0, None
    other_err = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:"):
            other_err.append(line)
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue  # the column header
        name = parts[2].rstrip()
        depth = len(name) - len(name.lstrip())
        name = name.strip()
        modules.setdefault(name, int(parts[1]))
        if depth0 is None or depth < depth0:
            depth0, top_us = depth, 0
        if depth == depth0:
            top_us += int(parts[1])
    rec = {
        "returncode": proc.returncode,
        "torch_imported": "torch" in modules,
        "heavy_imported": [m for m in HEAVY if m in modules],
        "torch_import_s": modules["torch"] / 1e6 if "torch" in modules else None,
        "modules_imported": len(modules),
        "import_total_s": top_us / 1e6,
        "peak_rss_mb": int(rss[-1]) / 1024 if rss and rss[-1].isdigit() else None,
        # where the time goes: the modules with the largest cumulative import time (nested ones included)
        "slowest_imports_s": {m: us / 1e6 for m, us in sorted(modules.items(), key=lambda kv: -kv[1])[:12]},
    }
    if proc.returncode != 0:
        rec["error"] = " | ".join(ln for ln in other_err if ln.strip())[-300:] or f"exit code {proc.returncode}"
    if "--json" in cmd and proc.returncode == 0:
        try:
            info = json.loads(proc.stdout)
            rec["output"] = {k: info.get(k) for k in ("format", "variant", "unet_tensors", "file_bytes")}
        except json.JSONDecodeError as e:
            rec["error"] = f"--json output is not JSON: {e}"
    return rec


def measure(plan: list[tuple[str, str, list[str]]], runs: int, env: dict[str, str]) -> dict[str, dict]:
    """Interleaved: one warm-up round, then ``runs`` rounds of every row once."""
    times: dict[str, list[float]] = {key: [] for key, _, _ in plan}
    errors: dict[str, str] = {}
    for i in range(runs + 1):
        for key, _, cmd in plan:
            if key in errors:
                continue
            rec = run_command(cmd, env=env, rss=False)
            if "error" in rec:
                errors[key] = rec["error"]
            elif i:
                times[key].append(rec["seconds"])
        print(f"  round {i}/{runs}" + (" (warm-up)" if not i else ""), end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    out = {}
    for key, label, cmd in plan:
        if key in errors:
            out[key] = {"label": label, "cmd": cmd, "error": errors[key]}
            continue
        t = times[key]
        out[key] = {
            "label": label,
            "cmd": cmd,
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "runs": len(t),
            "all_s": t,
        }
    return out


def table(r: dict) -> str:
    base = r.get("python_pass", {}).get("median_s")
    base_min = r.get("python_pass", {}).get("min_s")
    body = []
    for key, rec in r.items():
        if not isinstance(rec, dict) or "label" not in rec:
            continue
        tr = rec.get("trace", {})
        if "error" in rec:
            body.append([rec["label"], "failed: " + rec["error"][:80], "", "", "", "", ""])
            continue
        delta = rec["median_s"] - base if base is not None else None
        goal = ""
        if key in GOAL_ROWS and delta is not None:
            goal = f"<= +{GOAL_S:.1f} s: " + ("met" if delta <= GOAL_S else "NOT met")
        torch_txt = (
            (
                "yes" + (f" ({tr['torch_import_s']:.2f} s of imports)" if tr.get("torch_import_s") else "")
                if tr.get("torch_imported")
                else "no"
            )
            if tr
            else "?"
        )
        heavy = ", ".join(m for m in tr.get("heavy_imported", []) if m != "torch") or "-"
        body.append(
            [
                rec["label"],
                f"{rec['median_s']:.3f} s ({rec['min_s']:.3f}-{rec['max_s']:.3f})",
                "-"
                if key == "python_pass" or delta is None
                else f"+{delta:.3f} s (min to min +{rec['min_s'] - base_min:.3f} s)",
                torch_txt,
                heavy,
                f"{tr['peak_rss_mb']:.0f} MiB" if tr.get("peak_rss_mb") else "-",
                goal,
            ]
        )
    return markdown(
        body,
        [
            "fresh process",
            "wall, median (min-max)",
            "vs `python -c pass`, median",
            "torch imported",
            "other heavy modules imported",
            "peak RSS",
            "goal",
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="timed rounds (after one warm-up round); default 10")
    ap.add_argument("--workdir", default="bench_out/startup", help="where the sparse input files are made once")
    ap.add_argument("--json", default="bench_out/startup.json")
    ap.add_argument("--table", action="store_true", help="print the markdown table from --json and exit")
    ap.add_argument(
        "--bytecode",
        choices=["cached", "env"],
        default="cached",
        help="cached (default): every process may read and write .pyc files, kept under "
        "WORKDIR/pycache (PYTHONPYCACHEPREFIX; the warm-up round writes them), as an installed "
        "package has them; env: as this environment says (PYTHONDONTWRITEBYTECODE=1 means an "
        "editable install compiles its sources in every process)",
    )
    args = worker_or_args(ap, worker)  # in a worker process (run_worker) this runs the task and exits
    jpath = Path(args.json)
    if args.table:
        print(table(load_results(jpath)))
        return
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    inputs = run_worker(SCRIPT, "prepare", args.workdir)
    if "error" in inputs:
        raise SystemExit(f"could not make the input files: {inputs['error']}")
    for k in ("safetensors", "gguf"):
        i = inputs[k]
        print(
            f"input: {i['path']} ({i['file_bytes'] / 1e9:.2f} GB, {i['disk_bytes'] / 1e6:.1f} MB on disk): "
            f"{i['format']}, {i['variant']}, {i['unet_tensors']} tensors",
            file=sys.stderr,
        )
    info = machine()
    print(f"machine: {info}", file=sys.stderr)
    plan = rows(inputs)
    env: dict[str, str] = {}
    if args.bytecode == "cached":
        env = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(Path(args.workdir).resolve() / "pycache")}
    info["bytecode"] = args.bytecode
    info["env_PYTHONDONTWRITEBYTECODE"] = os.environ.get("PYTHONDONTWRITEBYTECODE")
    results = measure(plan, args.runs, env)
    for key, _, cmd in plan:
        results[key]["trace"] = trace(cmd, env)
        if "error" in results[key]["trace"] and "error" not in results[key]:
            results[key]["error"] = results[key]["trace"]["error"]
    info["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    text = table(results)
    print(text)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(
        json.dumps(
            {"machine": info, "runs": args.runs, "inputs": inputs, "results": results, "markdown": text}, indent=2
        )
    )


if __name__ == "__main__":
    main()
