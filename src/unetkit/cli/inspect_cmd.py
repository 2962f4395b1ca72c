"""unetkit inspect FILE: what a checkpoint holds and whether unetkit can use it."""

from __future__ import annotations

import argparse

from unetkit.cli.common import ByteBar, emit_json, human_bytes, table

HELP = "show format, layout, variant, inferred config, counts, dtypes, ignored keys, suspicious tensors"
EPILOG = """examples:
  unetkit inspect model.safetensors              human-readable summary (reads every tensor for NaN/inf/zeros)
  unetkit inspect model.ckpt --no-scan           names and shapes only: instant, even for multi-GB files
  unetkit inspect unet_folder/ --json > info.json  the same as JSON, for scripts
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help=HELP,
        description=HELP + ".",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="a .safetensors/.ckpt/.pt/.bin/.gguf file, a diffusers UNet folder or pipeline folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--no-scan", action="store_true", help="do not read tensor data (skip the NaN/inf/zero check)")
    p.add_argument("--ema", action="store_true", help="describe the EMA weights (model_ema.*) instead of the live ones")
    p.add_argument("--config", help="a diffusers UNet config.json (or its folder) to use instead of inferring one")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from unetkit.inspection import inspect_file

    with ByteBar("scanning", enabled=not args.json and not args.no_scan and not args.quiet) as bar:
        report = inspect_file(args.path, scan=not args.no_scan, ema=args.ema, config=args.config, progress=bar.update)
    if args.json:
        emit_json(report)
        return 0
    cfg = report["config"]
    print(f"{report['path']}")
    print(f"  format       {report['format']} ({human_bytes(report['file_bytes'])})")
    if report["gguf_flavor"]:
        print(f"  gguf flavor  {report['gguf_flavor']}")
    print(f"  layout       {report['layout']}" + (f" under prefix '{report['prefix']}'" if report["prefix"] else ""))
    print(f"  variant      {report['variant']}")
    print(
        f"  config       {report['config_source']}: block_out_channels={cfg['block_out_channels']}, "
        f"in={cfg['in_channels']}, cross_attention_dim={cfg['cross_attention_dim']}, "
        f"heads={cfg['attention_head_dim']}, linear_proj={cfg.get('use_linear_projection', False)}"
        + (f", time_cond_proj_dim={cfg['time_cond_proj_dim']}" if cfg.get("time_cond_proj_dim") else "")
    )
    for a in report["assumptions"]:
        print(f"    assumed    {a}")
    print(
        f"  tensors      {report['unet_tensors']} UNet tensors, {report['parameters']:,} parameters "
        f"({report['keys_in_file']} keys in the file), {report['bits_per_weight']:.2f} bits per weight"
    )
    rows = [
        [k, str(v["tensors"]), f"{v['parameters']:,}", human_bytes(v["bytes"])] for k, v in report["dtypes"].items()
    ]
    print("\n" + table(rows, ["dtype", "tensors", "parameters", "bytes"]))
    if report["ignored"]:
        print("\nignored (not UNet weights):")
        for row in report["ignored"]:
            print(f"  {row['count']:>5}  {row['reason']}  e.g. {', '.join(row['examples'])}")
    if report["scanned"]:
        if report["suspicious"]:
            print(f"\nsuspicious tensors ({len(report['suspicious'])}):")
            for s in report["suspicious"][:20]:
                print(f"  {s['tensor']}: {s['problem']}")
        else:
            print("\nno NaN, inf or all-zero tensors")
    return 0
