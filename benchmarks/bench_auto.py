"""gguf:auto against the fixed recipes: the size/SQNR front on a full-size SD1.5 UNet (fp32, seeded random weights),
or SDXL (fp16 source, as SDXL fine-tunes ship; seeded random weights).

    python benchmarks/bench_auto.py                 # everything (about 40 minutes on 2 cores; nothing else running)
    python benchmarks/bench_auto.py --family sdxl   # the same on full-size SDXL (about 2 hours)
    python benchmarks/bench_auto.py --size tiny     # the same on a tiny SD1.5 (about 2 minutes; a smoke run)
    python benchmarks/bench_auto.py --table         # the markdown from --json
    python benchmarks/bench_auto.py --only sensitivity retarget   # some sections again, merged into --json
    python benchmarks/bench_auto.py --family sdxl --only auto --resume   # auto's size points not yet in --json

Rows (each command a fresh `unetkit` process, timed as a whole by benchmarks/common.py's run_command, GNU time for
the peak RSS):
- sensitivity: `unetkit sensitivity SRC` with an empty cache (default settings: 32x32 latent, 4 timesteps, 4
  probes, 8 check runs). Goal: <= 15 minutes on 2 cores. Its check: predicted against measured noise.
- every fixed K-quant recipe and Q8_0: `unetkit quantize --method gguf:<recipe>`: time and file size; the file's
  output SQNR measured on the calibration set (verify's seeded inputs and guided prediction, the same timesteps
  and latent size as the sensitivity run: `unetkit.sensitivity.target.measure_file`).
- auto at --targets sizes from Q2_K's to Q8_0's file size, Q4_K_M's own size among them: `unetkit quantize
  --method gguf:auto --target-size N --json` (sensitivity from the cache); the command measures its own file the
  same way. Goal: at Q4_K_M's size, measured SQNR >= Q4_K_M's + 3 dB.
- auto at `--target-sqnr` = Q4_K_M's measured SQNR. Goal: a file >= 15 % smaller than Q4_K_M's.
- re-targeting from the cache: auto at Q4_K_M's size with --no-measure against `gguf:Q4_K_M`'s own quantize time.
  Goal: no slower.
No other tool chooses per-tensor GGUF types for SD UNets (ggufy's fixed bands and sd.cpp's open pull request have no
target), so the fixed recipes, what users pick today, are the comparison. A plot of the front goes to
bench_out/auto/front.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PY, ROOT, machine, markdown, run_command

SECTIONS = ["sensitivity", "recipes", "auto", "auto_sqnr", "retarget"]
RECIPES = ["Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]


def unetkit(*args: str) -> list[str]:
    return [PY, "-m", "unetkit.cli.app", "-q", *args]


# family -> (variant, source dtype, file stem)
FAMILIES = {"sd15": ("sd1.x", "fp32", "sd15"), "sdxl": ("sdxl", "fp16", "sdxl")}


def source(family: str, size: str, work: Path) -> Path:
    variant, dtype, stem = FAMILIES[family]
    path = work / f"{stem}_{size}_{dtype}.safetensors"
    if not path.exists():
        from unetkit.sample import write_ldm_checkpoint

        write_ldm_checkpoint(path, variant, size, seed=0, dtype=dtype, writer="safetensors")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--keep-files", action="store_true", help="keep the GGUF files (default: deleted once measured)")
    ap.add_argument("--targets", type=int, default=8, help="auto size targets (default 8)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "auto")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--resume",
        action="store_true",
        help="auto: keep the size points already recorded in --json (each point is saved as it finishes)",
    )
    ap.add_argument("--table", action="store_true")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        help="rerun these sections into the existing --json (auto_sqnr and retarget take Q4_K_M's row from it)",
    )
    args = ap.parse_args()
    tag = args.size if args.family == "sd15" else f"{args.family}_{args.size}"
    json_path = args.json or ROOT / "bench_out" / f"auto_{tag}.json"
    if args.table:
        print(table(json.loads(json_path.read_text())))
        return 0
    work = args.workdir / tag
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    env = {"UNETKIT_CACHE_DIR": str(cache)}
    src = source(args.family, args.size, work)
    only = set(args.only or SECTIONS)
    res: dict = json.loads(json_path.read_text()) if args.only else {}
    res.update(machine=machine(), family=args.family, size=args.size, source=str(src), src_bytes=src.stat().st_size)

    # 1. sensitivity, from an empty cache
    if "sensitivity" in only:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
        rec = run_command(unetkit("sensitivity", str(src), "--json", str(work / "sens.json"), "--force"), env=env)
        sens = json.loads((work / "sens.json").read_text())
        rec["check"] = {k: v for k, v in sens["check"].items() if k != "pairs"}
        rec["phases_s"] = sens["seconds"]
        rec["settings"] = sens["settings"]
        res["sensitivity"] = rec
        print("sensitivity", rec, flush=True)
        json_path.write_text(json.dumps(res, indent=1))
    sens = json.loads((work / "sens.json").read_text())

    # 2. the fixed recipes
    if "recipes" in only:
        from unetkit.sensitivity.measure import Sensitivity
        from unetkit.sensitivity.target import measure_file

        s = Sensitivity.from_dict(sens)
        res["recipes"] = {}
        for recipe in RECIPES:
            out = work / f"{recipe}.gguf"
            cmd = unetkit("quantize", str(src), str(out), "--method", f"gguf:{recipe}", "--force")
            rec = run_command(cmd, env=env)
            rec["file_bytes"] = out.stat().st_size
            rec["measured_sqnr_db"], rec["measured_per_timestep_db"] = measure_file(src, out, s)
            if not args.keep_files:
                out.unlink()
            res["recipes"][recipe] = rec
            print(recipe, rec, flush=True)
        json_path.write_text(json.dumps(res, indent=1))
    q4 = res["recipes"]["Q4_K_M"]

    # 3. auto at sizes from Q2_K's to Q8_0's, Q4_K_M's size among them
    # (from 1 % above Q2_K's: auto's own header, every tensor's reason, is longer than a recipe's)
    if "auto" in only:
        lo, hi = int(res["recipes"]["Q2_K"]["file_bytes"] * 1.01), res["recipes"]["Q8_0"]["file_bytes"]
        steps = range(args.targets - 1)
        sizes = sorted({lo + (hi - lo) * k // (args.targets - 2) for k in steps} | {q4["file_bytes"]})
        done = {a["target"]["given"]: a for a in res.get("auto", [])} if args.resume else {}
        res["auto"] = []
        for n in sizes:
            res["auto"].append(done.get(str(n)) or auto(src, work, env, "--target-size", str(n), args.keep_files))
            json_path.write_text(json.dumps(res, indent=1))
    # 4. auto at Q4_K_M's measured SQNR
    if "auto_sqnr" in only:
        res["auto_sqnr"] = auto(src, work, env, "--target-sqnr", f"{q4['measured_sqnr_db']:.3f}", args.keep_files)
    # 5. re-targeting from the cache, no measuring, against the fixed recipe's quantize
    if "retarget" in only:
        out = work / "retarget.gguf"
        cmd = ["quantize", str(src), str(out), "--method", "gguf:auto", "--target-size", str(q4["file_bytes"])]
        res["retarget"] = run_command(unetkit(*cmd, "--no-measure", "--force"), env=env)
        if not args.keep_files:
            out.unlink()
        print("retarget", res["retarget"], flush=True)
    json_path.write_text(json.dumps(res, indent=1))
    plot(res, work / "front.png")
    print(table(res))
    return 0


def auto(src: Path, work: Path, env: dict, flag: str, value: str, keep: bool) -> dict:
    out = work / f"auto_{flag.strip('-')}_{value}.gguf"
    stdout = work / f"auto_{flag.strip('-')}_{value}.json"
    cmd = ["quantize", str(src), str(out), "--method", "gguf:auto", flag, value, "--json", "--force"]
    rec = run_command(unetkit(*cmd), env=env, stdout=stdout)
    r = json.loads(stdout.read_text())
    if not keep:
        out.unlink()
    rec.update(
        target=r["target"],
        file_bytes=r["file_bytes"],
        bits_per_weight=r["bits_per_weight"],
        predicted_sqnr_db=r["predicted_sqnr_db"],
        measured_sqnr_db=r["measured_sqnr_db"],
        met=r["met"],
        by_qtype={q: v["parameters"] for q, v in r["by_qtype"].items()},
    )
    print("auto", flag, value, {k: v for k, v in rec.items() if k != "by_qtype"}, flush=True)
    return rec


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = sorted((a["file_bytes"] / 2**20, a["measured_sqnr_db"]) for a in res["auto"])
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="gguf:auto (measured)")
    for name, r in res["recipes"].items():
        ax.plot(r["file_bytes"] / 2**20, r["measured_sqnr_db"], "s", color="gray")
        ax.annotate(name, (r["file_bytes"] / 2**20, r["measured_sqnr_db"]), fontsize=7)
    a = res["auto_sqnr"]
    ax.plot(a["file_bytes"] / 2**20, a["measured_sqnr_db"], "*", ms=12, label="auto at Q4_K_M's SQNR")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("output SQNR on the calibration set (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=90, bbox_inches="tight")


def table(res: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    s = res["sensitivity"]
    c = s["check"]
    out = [
        f"sensitivity: {s['seconds']:.0f} s wall, peak RSS {s.get('peak_rss_mb', 0) / 1024:.2f} GB; phases "
        + ", ".join(f"{k} {v:.0f} s" for k, v in s["phases_s"].items())
        + f"; check over {c['n']} single-tensor runs: Pearson (log) {c['pearson_log']:.3f}, Spearman "
        f"{c['spearman']:.3f}, median measured/predicted {c['median_ratio']:.2f}",
        "",
    ]
    rows = [
        [f"gguf:{n}", mib(r["file_bytes"]), f"{r['measured_sqnr_db']:.2f}", "", f"{r['seconds']:.0f} s"]
        for n, r in res["recipes"].items()
    ]
    for a in res["auto"]:
        rows.append(
            [
                f"gguf:auto --target-size {a['target']['given']}",
                mib(a["file_bytes"]),
                f"{a['measured_sqnr_db']:.2f}",
                f"{a['predicted_sqnr_db']:.2f}",
                f"{a['seconds']:.0f} s",
            ]
        )
    a = res["auto_sqnr"]
    rows.append(
        [
            f"gguf:auto --target-sqnr {a['target']['given']}",
            mib(a["file_bytes"]),
            f"{a['measured_sqnr_db']:.2f}",
            f"{a['predicted_sqnr_db']:.2f}",
            f"{a['seconds']:.0f} s",
        ]
    )
    rows.sort(key=lambda r: float(r[1].split()[0]))
    out.append(markdown(rows, ["file", "size", "measured SQNR (dB)", "predicted (dB)", "wall (whole command)"]))
    q4 = res["recipes"]["Q4_K_M"]
    same = min(res["auto"], key=lambda x: abs(x["file_bytes"] - q4["file_bytes"]))
    gain = same["measured_sqnr_db"] - q4["measured_sqnr_db"]
    smaller = 1 - a["file_bytes"] / q4["file_bytes"]
    out += [
        "",
        f"- at Q4_K_M's size ({mib(q4['file_bytes'])}): auto {same['measured_sqnr_db']:.2f} dB against "
        f"{q4['measured_sqnr_db']:.2f} dB, {gain:+.2f} dB (goal +3 dB: {'met' if gain >= 3 else 'missed'})",
        f"- at Q4_K_M's SQNR ({q4['measured_sqnr_db']:.2f} dB): auto {mib(a['file_bytes'])} "
        f"(measured {a['measured_sqnr_db']:.2f} dB), {100 * smaller:.1f} % smaller "
        f"(goal 15 %: {'met' if smaller >= 0.15 and a['met'] else 'missed'})",
    ]
    if "retarget" in res:
        out.append(
            f"- re-targeting from the cache (auto at Q4_K_M's size, --no-measure): {res['retarget']['seconds']:.0f} s "
            f"against {q4['seconds']:.0f} s for gguf:Q4_K_M"
        )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
