"""unetkit sensitivity IN [--json F] [--html F]: how much each tensor of a UNet cares about each GGUF qtype."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from unetkit.cli.common import add_sensitivity_options, emit_json, progress_bar, settings_from, table

HELP = "per-tensor sensitivity to each GGUF qtype: what gguf:auto chooses from (cached per file and settings)"
DESCRIPTION = """For every weight tensor and every candidate qtype (Q2_K .. Q8_0, F16; Q4_0/Q5_0 where no K-quant
fits the exact shape), the output error that storing that tensor alone in that qtype adds, on verify's seeded
calibration inputs (the guided noise prediction, timesteps spread over the schedule).

How: the weights' first-order output sensitivity is measured with random output probes (one backward each, weight
gradients formed per module, nothing weight-sized kept), then every tensor is quantized and decoded with the
GGUF codecs and its error weighed by it. A sample of single-tensor quantizations is then run for real, and the
report gives the correlation between predicted and measured error.

The result is cached per (file sha256, settings) in $UNETKIT_CACHE_DIR/sensitivity, so `unetkit quantize
--method gguf:auto` with a second target does not measure again."""
EPILOG = """examples:
  unetkit sensitivity model.safetensors --html sensitivity.html
  unetkit sensitivity model.safetensors --json sens.json --timesteps 6 --probes 16
  unetkit sensitivity model.safetensors --json - | jq .check
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sensitivity",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="file or folder to read (any layout unetkit reads)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON; - for stdout")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML page (table and plots)")
    p.add_argument("--force", action="store_true", help="replace existing report files")
    add_sensitivity_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from unetkit.formats.atomic import atomic_output, check_output, check_writable
    from unetkit.sensitivity import analyze

    for out in (args.json, args.html):
        if out and out != "-":  # fail before minutes of work; a report never replaces a model
            check_output(Path(out), args.force, inputs=(args.input,))
            check_writable(Path(out))
    progress, close = progress_bar("sensitivity", not args.quiet and args.json != "-")
    try:
        sens = analyze(args.input, settings_from(args), cache=args.cache, progress=progress)
    finally:
        close()
    if args.json == "-":
        emit_json(sens.to_dict())
    else:
        print(text(sens))
        if args.json:
            with atomic_output(Path(args.json), force=args.force) as tmp:
                Path(tmp).write_text(json.dumps(sens.to_dict(), indent=1))
            print(f"wrote {args.json}")
    if args.html:
        from unetkit.sensitivity.html import write_sensitivity_html

        write_sensitivity_html(sens, args.html, force=args.force)
        if args.json != "-":
            print(f"wrote {args.html}")
    return 0


def text(sens: Any, top: int = 12) -> str:
    """The most sensitive tensors at Q4_K (or their middle qtype), and the check."""
    signal = sum(sens.signal)

    def db(noise: float | None) -> str:
        import math

        return "lossless" if not noise else f"{10 * math.log10(signal / noise):.1f}"

    def key(t: Any) -> float:
        q = "Q4_K" if "Q4_K" in t.noise else sorted(t.noise)[len(t.noise) // 2]
        return t.total(q) or 0.0

    worst = sorted(sens.tensors, key=key, reverse=True)[:top]
    qtypes = ["Q2_K", "Q4_K", "Q6_K", "Q8_0"]
    rows = [[t.name, *[db(t.total(q)) if q in t.noise else "-" for q in qtypes]] for t in worst]
    c = sens.check
    lines = [
        f"{sens.source} ({sens.variant}): {len(sens.tensors)} tensors, "
        + ("from the cache" if sens.cached else f"measured in {sens.seconds.get('total', 0):.1f} s"),
        f"most sensitive (output SQNR in dB if only that tensor is quantized, over {len(sens.timesteps)} timesteps):",
        table(rows, ["tensor", *qtypes]),
    ]
    if c.get("n"):
        lines.append(
            f"check: {c['n']} single-tensor runs, predicted vs measured noise: Pearson (log) "
            f"{_f(c.get('pearson_log'))}, Spearman {_f(c.get('spearman'))}, median ratio {_f(c.get('median_ratio'))}"
        )
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
