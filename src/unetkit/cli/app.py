"""The `unetkit` command: subcommand registry and error handling.

A ``UnetkitError`` becomes one line on stderr and exit code 2 (1 for VerificationFailed); anything else is a bug
and keeps its traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from unetkit._quiet import quiet_third_party
from unetkit._version import __version__
from unetkit.cli.common import Parser
from unetkit.errors import UnetkitError

DESCRIPTION = """unetkit: read, convert, quantize and verify Stable Diffusion 1.x/2.x and SDXL UNet checkpoints.

Every input key is mapped, listed as ignored with a reason, or reported in an error. Conversions are bit-exact;
outputs are written atomically and never overwrite an existing file without --force."""
EPILOG = """start here:
  unetkit inspect model.safetensors                       what is in a file
  unetkit convert model.safetensors unet/ --to diffusers   LDM single file -> diffusers folder
  unetkit convert unet/ model.safetensors --to ldm         and back, bit for bit
  unetkit quantize model.safetensors m.gguf --method gguf:Q4_K_M   GGUF for ComfyUI-GGUF (K-quants included)
  unetkit quantize model.safetensors m.gguf --method gguf:auto --target-size 600MiB   the best file of 600 MiB
  unetkit verify model.safetensors m.gguf --quick --html r.html   how far off, where, which layer to blame
  unetkit bench model.safetensors m.gguf m.gguf@load         load time, memory, latency of each, one table
  unetkit batch catalog.toml [--engine ray]                 every model x every job, resumable, with a ledger
run `unetkit COMMAND --help` for each command's options and examples."""


def build_parser() -> argparse.ArgumentParser:
    from unetkit.cli import batch_cmd, bench_cmd, convert_cmd, inspect_cmd, quantize_cmd, sensitivity_cmd, verify_cmd

    parser = Parser(
        prog="unetkit", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"unetkit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (inspect_cmd, convert_cmd, quantize_cmd, sensitivity_cmd, verify_cmd, bench_cmd, batch_cmd):
        module.add_parser(sub)
    for p in sub.choices.values():  # -v and -q work after the command too; SUPPRESS keeps the value given before it
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output")
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        quiet_third_party()  # import-time chatter of torch, diffusers and torchao (see unetkit/_quiet.py)
    try:
        return int(args.run(args) or 0)
    except UnetkitError as e:
        print(f"unetkit {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted; no output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
