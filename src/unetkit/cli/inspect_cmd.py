"""unetkit inspect FILE: what a checkpoint holds and whether unetkit can use it."""

from __future__ import annotations

import argparse

from unetkit.cli.common import ByteBar, emit_json, human_bytes, table

HELP = (
    "show format, layout, variant, inferred config, counts, dtypes, ignored keys, suspicious tensors, "
    "prediction type and metadata"
)
EPILOG = """examples:
  unetkit inspect model.safetensors              human-readable summary (reads every tensor for NaN/inf/zeros)
  unetkit inspect model.ckpt --no-scan           names and shapes only: instant, even for multi-GB files
  unetkit inspect unet_folder/ --json > info.json  the same as JSON, for scripts
  unetkit inspect sd2-768.safetensors --probe-prediction   no marker in the file: run the model once to guess

The prediction type (epsilon or v_prediction) is read from marker keys (v_pred, ztsnr, edm_vpred.*, edm_mean/std),
a folder's scheduler_config.json or metadata (modelspec.prediction_type, ss_v_parameterization), else it is the
family's default; the output says which. --probe-prediction runs A1111's test (constant 0.5 latent at t=999:
v-prediction if mean(output - input) < -1) and reports it as a probe, not a marker.
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
    p.add_argument(
        "--probe-prediction",
        action="store_true",
        help="run the model once to guess the prediction type from the weights (for files without a marker)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from unetkit.inspection import inspect_file

    with ByteBar("scanning", enabled=not args.json and not args.no_scan and not args.quiet) as bar:
        report = inspect_file(
            args.path,
            scan=not args.no_scan,
            ema=args.ema,
            config=args.config,
            progress=bar.update,
            probe_prediction=args.probe_prediction,
        )
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
    pred = report["prediction"]
    print(f"  prediction   {pred['summary']}")
    for key, marker in pred["markers"].items():
        values = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in marker["values"][:8])
        print(f"    marker     {key}: {marker['dtype']} {marker['shape']}" + (f" = [{values}]" if values else ""))
    for decision in pred["decisions"]:
        print(f"    decided    {decision}")
    probe = report["prediction_probe"]
    if probe:
        print(
            f"  probe        {probe['prediction_type']} (mean(output - input) = {probe['mean_output_minus_input']:.3f})"
        )
        print(f"    note       {probe['note']}")
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
    meta = report["metadata"]
    if meta:
        print(f"\nmetadata ({len(meta)} keys; --json shows every value in full):")
        width = min(40, max(len(k) for k in meta))
        for key, value in meta.items():
            print(f"  {key:<{width}}  {_shorten(value)}")
    if report["scanned"]:
        if report["suspicious"]:
            print(f"\nsuspicious tensors ({len(report['suspicious'])}):")
            for s in report["suspicious"][:20]:
                print(f"  {s['tensor']}: {s['problem']}")
        else:
            print("\nno NaN, inf or all-zero tensors")
    return 0


def _shorten(value: str, limit: int = 100) -> str:
    one_line = " ".join(value.split())
    return one_line if len(one_line) <= limit else f"{one_line[:limit]}... ({len(value):,} characters)"
