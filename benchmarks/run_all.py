"""Every benchmark of BENCHMARKS.md, one script after the other (each writes its JSON under bench_out/).

    python benchmarks/run_all.py            # about 60 minutes on the 2-core VM; run it on a quiet machine

Nothing else may run meanwhile: with 2 cores, any other load changes every figure (torch's OpenMP threads
collapse when a core is taken)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = [
    ["bench_foundation.py", "--repeats", "5"],
    ["bench_gguf_codecs.py", "--repeats", "5", "--json", "bench_out/gguf_codecs.json"],
    ["bench_gguf.py"],
    ["bench_runtime_quant.py"],
    ["bench_verify.py"],
]


def main() -> int:
    for script, *args in SCRIPTS:
        print(f"== {script} {' '.join(args)}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / script), *args])
        if code:
            print(f"{script} failed with exit code {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
