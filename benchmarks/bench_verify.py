"""Verify and bench: `unetkit verify` and `unetkit bench` on a full-size SD1.5 UNet (fp32, seeded random weights).

    python benchmarks/bench_verify.py [--only verify-quick verify-default exact bench] [--table]

Rows (each a fresh `unetkit` process, timed as a whole command by benchmarks/common.py's run_command: wall time and
peak RSS through GNU time; `unetkit bench` itself measures each variant in the library's own worker process,
`python -m unetkit.benchmarking.worker`, the same protocol as benchmarks/common.py's workers):
- verify-quick:   fp32 LDM file vs its GGUF Q8_0 (on the fly decoded once), `--quick` (target: about 2 minutes)
- verify-default: the same with the defaults (10 timesteps, 20 DDIM steps; target: about 10 minutes)
- exact:          fp32 LDM file vs its diffusers-folder conversion, `--quick` (exact mode: bit-identical)
- bench:          `unetkit bench` over fp32, Q8_0 on the fly, Q4_K_M on the fly (load, RSS, latency)
What a user does instead today is eyeball images: there is no tool to put side by side, so the rows stand alone.
Results merge into --json (rows can be run one at a time); `--table` prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PY, load_results, machine, make_sd15_source, markdown, run_command

ROWS = ["verify-quick", "verify-default", "exact", "bench"]


def unetkit(*args: str) -> list[str]:
    return [PY, "-m", "unetkit.cli.app", "-q", *args]


def prepare(src: Path, work: Path) -> dict[str, Path]:
    """The candidates: GGUF Q8_0 and Q4_K_M, and the diffusers folder, made once."""
    out = {"q8": work / "sd15_Q8_0.gguf", "q4": work / "sd15_Q4_K_M.gguf", "diffusers": work / "sd15_diffusers"}
    work.mkdir(parents=True, exist_ok=True)
    for key, recipe in (("q8", "Q8_0"), ("q4", "Q4_K_M")):
        if not out[key].exists():
            run_command(unetkit("quantize", str(src), str(out[key]), "--method", f"gguf:{recipe}"))
    if not out["diffusers"].exists():
        run_command(unetkit("convert", str(src), str(out["diffusers"]), "--to", "diffusers"))
    return out


def run_row(row: str, src: Path, c: dict[str, Path], work: Path) -> dict:
    report = work / f"{row}.json"
    if row == "bench":
        cmd = unetkit("bench", str(src), str(c["q8"]), str(c["q4"]), "--runs", "3", "--json", str(report), "--force")
    else:
        cand = c["diffusers"] if row == "exact" else c["q8"]
        cmd = unetkit(
            "verify",
            str(src),
            str(cand),
            "--json",
            str(report),
            "--html",
            str(report.with_suffix(".html")),
            "--force",
            *([] if row == "verify-default" else ["--quick"]),
        )
    rec = run_command(cmd)
    if report.exists():
        data = json.loads(report.read_text())
        if row == "bench":
            rec["records"] = data.get("records", data)
        else:
            rec["summary"] = data["summary"]
            rec["unet_calls"] = data["settings"]["unet_calls"]
            rec["timesteps"], rec["steps"] = data["settings"]["timesteps"], data["settings"]["steps"]
            rec["final"] = data["sampling"]["final"]
            rec["blamed"] = data["blame"]["blamed"] if data["blame"] else None
    return rec


def table(results: dict) -> str:
    rows = []
    for row in ("verify-quick", "verify-default", "exact"):
        r = results.get(row)
        if not r:
            continue
        s = r.get("summary", {})
        worst = s.get("worst_sqnr_db")
        rows.append(
            [
                row,
                f"{r['seconds'] / 60:.1f} min",
                f"{r.get('peak_rss_mb', 0) / 1024:.1f} GB",
                f"{r.get('timesteps')} / {r.get('steps')}",
                r.get("unet_calls"),
                s.get("verdict", r.get("error")),
                "identical" if worst is None else f"{worst:.1f} dB",
                r.get("blamed") or "-",
            ]
        )
    out = [
        markdown(
            rows,
            ["run", "wall", "peak RSS", "timesteps / steps", "UNet calls", "verdict", "worst SQNR", "blamed first"],
        )
    ]
    b = results.get("bench")
    if b and "records" in b:
        recs = b["records"]
        brows = [
            [
                Path(r["path"]).name + (f"@{r['method']}" if r.get("method") else ""),
                f"{r['file_bytes'] / 2**20:.0f} MiB",
                f"{r['load_s']:.2f} s",
                f"{r['rss_mb']:.0f} / {r['rss_run_mb']:.0f} MiB",
                f"{r['latency_median_s']:.2f} s ({r['latency_min_s']:.2f}-{r['latency_max_s']:.2f})",
            ]
            for r in recs
        ]
        out.append(
            markdown(
                brows, ["variant", "file", "load", "RSS added: after load / after the runs", "forward, batch 1, 64x64"]
            )
        )
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="bench_out/sd15_fp32.safetensors")
    ap.add_argument("--workdir", default="bench_out/verify")
    ap.add_argument("--only", nargs="*", default=ROWS, choices=ROWS)
    ap.add_argument("--json", default="bench_out/verify.json")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    results = load_results(Path(args.json))
    if not args.table:
        src = make_sd15_source(Path(args.src))
        cands = prepare(src, Path(args.workdir))
        for row in args.only:
            print(f"  {row} ...", flush=True)
            results[row] = run_row(row, src, cands, Path(args.workdir))
            print(f"    {json.dumps({k: v for k, v in results[row].items() if k != 'records'})}", flush=True)
            Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
