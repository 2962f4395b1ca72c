"""Helpers shared by the subcommands: JSON output, progress bars, human-readable sizes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from tqdm import tqdm


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``unetkit verify: error: argument --min-sqnr: invalid float value: 'abc'``
    (and exit code 2), as every other unetkit error; the full usage stays behind ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


class ByteBar:
    """A tqdm bar over bytes on stderr, created when the total is known; silent when ``enabled`` is False."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled = desc, enabled
        self.bar: tqdm | None = None

    def start(self, total: int) -> None:
        if self.enabled:
            from tqdm import tqdm  # imported when a bar is shown: tqdm costs 0.1 s of start-up

            self.bar = tqdm(total=total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> ByteBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_source_options(p, action: str) -> None:
    """Options every command that reads a UNet and writes an output shares."""
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument(
        "--ema", action="store_true", help=f"{action} the EMA weights (model_ema.*) of a training checkpoint"
    )
    p.add_argument("--config", help="a diffusers UNet config.json (or its folder) to use instead of the inferred one")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def add_sensitivity_options(p: argparse.ArgumentParser) -> None:
    """The calibration settings, shared with quantize's gguf:auto."""
    g = p.add_argument_group("calibration (sensitivity settings; part of the cache key)")
    g.add_argument("--calib-size", type=int, default=32, metavar="N", help="latent side (default 32)")
    g.add_argument("--calib-timesteps", type=int, default=4, metavar="N", help="timesteps (default 4)")
    g.add_argument("--probes", type=int, default=4, help="random output probes per timestep (default 4)")
    g.add_argument("--calib-seed", type=int, default=0, metavar="N")
    g.add_argument("--prompt-embeds", metavar="FILE", help="prompt_embeds (and pooled) to calibrate with")
    g.add_argument("--check", type=int, default=8, metavar="N", help="single-tensor runs that check the estimate (8)")
    g.add_argument("--no-cache", dest="cache", action="store_false", help="measure again, store nothing")


def settings_from(args: argparse.Namespace) -> Any:
    from unetkit.sensitivity import Settings

    return Settings(
        size=args.calib_size,
        timesteps=args.calib_timesteps,
        probes=args.probes,
        seed=args.calib_seed,
        prompt_embeds=args.prompt_embeds,
        check=args.check,
    )


def progress_bar(desc: str, enabled: bool, percent: bool = False):
    """A (done, total, what) callback drawing a tqdm bar on stderr, and a function closing it. ``percent``: the
    bar shows the share done and the ETA, not counts (for totals of estimated work, which are not steps)."""
    bar: Any = None

    def progress(done: float, total: float, what: str) -> None:
        nonlocal bar
        if not enabled:
            return
        if bar is None:
            from tqdm import tqdm

            fmt = "{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}{postfix}]" if percent else None
            bar = tqdm(total=total, desc=desc, unit="step", bar_format=fmt, file=sys.stderr)
        bar.set_postfix_str(what[-50:], refresh=False)
        bar.update(done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return progress, close


Printer = Callable[[str], None]
