"""Fuzz every parser unetkit owns and count the outcomes: valid, a clear error (UnetkitError), or a crash (anything
else, or an input that takes too long). The same targets as tests/test_fuzz.py, without hypothesis, with a fixed
seed, so that a tree can be compared with an older one on the very same inputs:

    .venv/bin/python benchmarks/fuzz_parsers.py --examples 300                       # this tree
    git worktree add /tmp/old ab1a870
    .venv/bin/python benchmarks/fuzz_parsers.py --examples 300 --src /tmp/old/src    # the same inputs, older code

Seeds (valid tiny files) are built once with this tree, in bench_out/fuzz_seeds/; each target then runs in a child
process whose PYTHONPATH puts ``--src`` first. Results: a table, and bench_out/fuzz_<label>.json."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHILD = r"""
import json, random, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from fuzz.targets import TARGETS, Seeds, run
seeds, name, n = Seeds(Path(sys.argv[2])), sys.argv[3], int(sys.argv[4])
counts, crashes = {"ok": 0, "error": 0, "crash": 0, "slow": 0}, {}
for i in range(n):
    rng = random.Random(f"{name}/{i}")
    with tempfile.TemporaryDirectory() as d:
        try:
            target = TARGETS[name](seeds, rng, Path(d))
            t0 = time.perf_counter()
            outcome = run(target)
            counts["slow" if time.perf_counter() - t0 > 10 else outcome] += 1
        except Exception as e:
            counts["crash"] += 1
            kind = f"{type(e).__name__}: {str(e)[:80]}"
            crashes[type(e).__name__] = crashes.get(type(e).__name__, kind)
print(json.dumps({"counts": counts, "crashes": crashes}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=300, help="inputs per parser (default 300)")
    ap.add_argument("--src", default=str(ROOT / "src"), help="the unetkit source tree to fuzz (default: this one)")
    ap.add_argument("--label", default=None, help="name of the JSON result (default: 'this' or 'other')")
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]
    from fuzz.targets import TARGETS, Seeds
    from unetkit._quiet import quiet_third_party

    quiet_third_party()
    seed_dir = ROOT / "bench_out" / "fuzz_seeds"
    if not (seed_dir / "seed.ckpt").exists():
        seed_dir.mkdir(parents=True, exist_ok=True)
        Seeds.build(seed_dir)
    label = args.label or ("this" if Path(args.src).resolve() == (ROOT / "src").resolve() else "other")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.src, str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    results = {}
    print(f"{'parser':34} {'inputs':>6} {'valid':>6} {'error':>6} {'crash':>6} {'slow':>5}  first crash of each kind")
    for name in TARGETS:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(ROOT / "tests"), str(seed_dir), name, str(args.examples)],
            capture_output=True,
            text=True,
            env=env,
        )
        if out.returncode:
            print(f"{name}: the child failed: {out.stderr[-2000:]}", file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[name] = r
        c = r["counts"]
        kinds = "; ".join(r["crashes"].values())
        print(f"{name:34} {args.examples:>6} {c['ok']:>6} {c['error']:>6} {c['crash']:>6} {c['slow']:>5}  {kinds}")
    path = ROOT / "bench_out" / f"fuzz_{label}.json"
    path.write_text(json.dumps({"src": args.src, "examples": args.examples, "results": results}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
