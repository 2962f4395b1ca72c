"""unetkit convert IN OUT --to {diffusers,ldm}: exact layout conversion, streamed."""

from __future__ import annotations

import argparse

from unetkit.cli.common import ByteBar, add_source_options, emit_json, human_bytes

HELP = "convert between the LDM single-file layout and a diffusers UNet folder, bit-exact"
DESCRIPTION = """Convert a UNet between the original LDM/CompVis single-file layout (model.diffusion_model.*) and the
diffusers layout. The conversion is a pure rename: with --dtype keep every tensor keeps its exact bytes (copied as
byte ranges, never decoded). Input: any file unetkit reads (safetensors, .ckpt/.pt/.bin via weights_only, a
diffusers UNet or pipeline folder, a full checkpoint with VAE/text encoder: those keys are listed as ignored).
The output is written under a temporary name and renamed when complete; the input is never modified."""
EPILOG = """examples:
  unetkit convert v1-5.safetensors unet_diffusers/ --to diffusers
      a folder that UNet2DConditionModel.from_pretrained('unet_diffusers') loads as is
  unetkit convert unet_diffusers/ unet.safetensors --to ldm --no-prefix --dtype fp16
      ComfyUI 'diffusion_models' style: LDM names without prefix, fp16
  unetkit convert lcm.ckpt lcm_unet/ --to diffusers --ema --json
      take the EMA weights of a training checkpoint; print the result as JSON
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="file or folder to read")
    p.add_argument("output", help="output folder (--to diffusers) or .safetensors file (--to ldm)")
    p.add_argument("--to", choices=("diffusers", "ldm"), required=True, help="target layout")
    p.add_argument(
        "--dtype",
        choices=("keep", "fp32", "fp16", "bf16"),
        default="keep",
        help="cast floating tensors (default: keep the stored bytes)",
    )
    p.add_argument(
        "--prefix",
        dest="prefix",
        action="store_true",
        default=True,
        help="--to ldm: put names under model.diffusion_model. (default)",
    )
    p.add_argument(
        "--no-prefix",
        dest="prefix",
        action="store_false",
        help="--to ldm: bare LDM names (ComfyUI diffusion_models style)",
    )
    add_source_options(p, "convert")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from unetkit.conversion import convert

    with ByteBar("converting", enabled=not args.json and not args.quiet) as bar:
        result = convert(
            args.input,
            args.output,
            to=args.to,
            dtype=args.dtype,
            prefix=args.prefix,
            force=args.force,
            ema=args.ema,
            config=args.config,
            progress=bar.update,
            on_start=bar.start,
        )
    if args.json:
        emit_json(result.to_dict())
        return 0
    print(
        f"wrote {result.output} ({result.to}, {result.variant}): {result.tensors} tensors, "
        f"{human_bytes(result.bytes_written)} in {result.seconds:.1f} s"
    )
    print(
        f"  {human_bytes(result.bytes_copied)} copied byte for byte, {result.tensors_converted} tensors cast "
        f"(dtype {result.dtype}); source sha256 {result.source_sha256[:16]}..."
    )
    if result.ignored:
        print(f"  {len(result.ignored)} non-UNet keys ignored (see `unetkit inspect` for reasons)")
    pred = result.prediction
    print(f"  prediction type {pred['type']} (from {pred['source']}), kept in the output with the source's metadata")
    for note in result.notes:
        print(f"  note: {note}")
    return 0
