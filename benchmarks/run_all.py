"""Every benchmark of BENCHMARKS.md, one script after the other (each writes its JSON under bench_out/).

    python benchmarks/run_all.py            # about 90 minutes on the 2-core VM (SDXL: 30-40); a quiet machine
    python benchmarks/run_all.py --only startup convert_load   # some of them (bench_<subject>.py)
    make bench [ONLY="startup convert_load"]                     # the same

Each script measures in fresh processes through benchmarks/common.py (its worker protocol, or whole commands).

Nothing else may run meanwhile: with 2 cores, any other load changes every figure (torch's OpenMP threads
collapse when a core is taken)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = [  # the order of BENCHMARKS.md
    ["bench_startup.py"],
    ["bench_convert_load.py", "--repeats", "5"],
    ["bench_gguf_quantize.py"],
    ["bench_gguf_codecs.py", "--repeats", "5", "--json", "bench_out/gguf_codecs.json"],
    ["bench_runtime_quant.py"],
    ["bench_verify.py"],
    ["bench_sdxl.py"],  # full-size SDXL: about 30-40 minutes, 15 GB of disk, 12 GB of free memory
]


def subject(script: str) -> str:
    return script.removeprefix("bench_").removesuffix(".py")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="SUBJECT",
        choices=[subject(s) for s, *_ in SCRIPTS],
        help="run only these (the subject of bench_<subject>.py)",
    )
    opts = ap.parse_args()
    for script, *args in SCRIPTS:
        if opts.only and subject(script) not in opts.only:
            continue
        print(f"== {script} {' '.join(args)}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / script), *args])
        if code:
            print(f"{script} failed with exit code {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
