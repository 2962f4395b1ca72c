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


Printer = Callable[[str], None]
