"""unetkit quantize IN OUT.gguf --method gguf:Q4_K_M [--flavor comfy|sdcpp|diffusers]
unetkit quantize IN OUTDIR --method torchao:int8-weight-only|quanto:qint8|... [--include GLOB] [--exclude GLOB]."""

from __future__ import annotations

import argparse

from unetkit.cli.common import (
    ByteBar,
    add_sensitivity_options,
    add_source_options,
    emit_json,
    human_bytes,
    progress_bar,
    settings_from,
    table,
)
from unetkit.errors import UnetkitError, VerificationFailed
from unetkit.quant.gguf.policy import FLAVORS, GGUF_METHOD, RECIPES

HELP = "quantize a UNet to GGUF (K-quants included), or with torchao / optimum-quanto to a reloadable folder"
DESCRIPTION = f"""Quantize any UNet unetkit reads into a GGUF file, one tensor at a time, with encoders that produce
exactly ggml's reference bytes. Sensitive tensors (conv_in, conv_out, time embedding: F16; biases and norms: F32)
stay high-precision by default; every tensor's decision and reason is stored in the file and printed with --json.

recipes: {", ".join("gguf:" + r for r in RECIPES)}, gguf:auto
gguf:auto  chooses each tensor's qtype to meet exactly one target: --target-size 600MiB (the file is never larger),
           --target-bpw 5.0, or --target-sqnr 30 (dB, the output's SQNR on the calibration set; planned 0.25 dB
           above it, the prediction's margin of error). It measures the
           UNet's per-tensor sensitivity first (see `unetkit sensitivity`; cached, so a second target is quick),
           honours --keep/--override and the flavor's rules, records each choice's reason in the file, then
           runs the written file on the calibration set and reports predicted against measured SQNR.
flavors:
  comfy      ComfyUI-GGUF (default): LDM names without prefix, general.architecture=sd1; tensors whose last dim
             does not fit the block are stored as rows of 256 with comfy.gguf.orig_shape, so convolutions quantize
  sdcpp      stable-diffusion.cpp: model.diffusion_model. names, exact shapes; 3x3 convolutions stay F16
  diffusers  diffusers 0.42 from_single_file(..., quantization_config=GGUFQuantizationConfig(...)):
             model.diffusion_model. names, exact shapes, only 2-D Linear weights quantized

runtime methods (OUTPUT is a folder that unetkit.load_unet(OUTPUT) reloads without re-quantizing):
  torchao:int8-weight-only, torchao:int8-dynamic, torchao:float8-weight-only, torchao:int4-weight-only (CUDA),
  quanto:qint8, quanto:qint4, quanto:qint2, quanto:qfloat8
  Every Linear and Conv2d is a candidate. Kept by default: conv_in, conv_out, time_embedding (incl. LCM's
  cond_proj), norms. --exclude GLOB keeps a module; else --include GLOB quantizes it (defaults included);
  else, when --include is given, the module is kept; else the defaults apply. Globs match diffusers module
  names (fnmatch; a name without wildcards matches as dotted parts, e.g. attn2.to_v)."""
EPILOG = """examples:
  unetkit quantize model.safetensors model-Q4_K_M.gguf --method gguf:Q4_K_M
  unetkit quantize model.safetensors model-600M.gguf --method gguf:auto --target-size 600MiB --html auto.html
  unetkit quantize model.safetensors model-30dB.gguf --method gguf:auto --target-sqnr 30 --flavor sdcpp
  unetkit quantize unet/ model-Q8_0.gguf --method gguf:Q8_0 --flavor sdcpp
  unetkit quantize lcm.safetensors lcm-Q5.gguf --method gguf:Q5_K_M --keep 'out.*' --override 'attn2.to_k=Q8_0'
  unetkit quantize model.safetensors unet-int8/ --method torchao:int8-weight-only
  unetkit quantize unet/ unet-q4/ --method quanto:qint4 --exclude 'up_blocks.3.*' --json
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="file or folder to read (any layout, any dtype, GGUF too)")
    p.add_argument("output", help="the .gguf file to write (gguf:), or the folder to write (torchao:, quanto:)")
    p.add_argument(
        "--method",
        required=True,
        help="gguf:<recipe>, torchao:<scheme> or quanto:<qtype>, e.g. gguf:Q4_K_M (see the lists above)",
    )
    p.add_argument("--flavor", choices=FLAVORS, default="comfy", help="which consumer the file is for")
    p.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="GLOB",
        help="keep matching tensors (LDM names) in F16/F32; repeatable",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="GLOB=QTYPE",
        help="force a qtype for matching tensors, e.g. 'attn2.to_v=Q6_K'; repeatable",
    )
    p.add_argument(
        "--include",
        action="append",
        default=None,
        metavar="GLOB",
        help="torchao/quanto: quantize only matching modules (diffusers names); repeatable",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="GLOB",
        help="torchao/quanto: keep matching modules in float (wins over --include); repeatable",
    )
    t = p.add_argument_group("gguf:auto targets (exactly one)")
    t.add_argument("--target-size", metavar="SIZE", help="largest file size: 600MiB, 1.5GB, 700M, or bytes")
    t.add_argument("--target-bpw", type=float, metavar="N", help="bits per weight over all tensors")
    t.add_argument("--target-sqnr", type=float, metavar="DB", help="output SQNR on the calibration set (dB)")
    t.add_argument("--no-measure", dest="measure", action="store_false", help="skip running the written file")
    t.add_argument("--html", metavar="FILE", help="write the auto report (mix per block, size/SQNR front)")
    add_sensitivity_options(p)
    add_source_options(p, "quantize")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from unetkit.gguf_export import quantize_file

    if not args.method.lower().startswith(GGUF_METHOD):
        return run_runtime(args)
    if args.include or args.exclude:
        raise UnetkitError("--include/--exclude are for torchao:/quanto: methods; GGUF uses --keep/--override")
    targets = [args.target_size, args.target_bpw, args.target_sqnr]
    if args.method.lower() == "gguf:auto":
        return run_auto(args)
    if any(t is not None for t in targets) or args.html:
        raise UnetkitError(f"--target-size/--target-bpw/--target-sqnr/--html are for gguf:auto, not {args.method}")
    with ByteBar("quantizing", enabled=not args.json and not args.quiet) as bar:
        r = quantize_file(
            args.input,
            args.output,
            args.method,
            flavor=args.flavor,
            keep=args.keep,
            override=args.override,
            force=args.force,
            ema=args.ema,
            config=args.config,
            progress=bar.update,
            on_start=bar.start,
        )
    if args.json:
        emit_json(r.to_dict())
        return 0
    rows = [[q, str(v["tensors"]), f"{v['parameters']:,}", human_bytes(v["bytes"])] for q, v in r.by_qtype.items()]
    print(f"wrote {r.output} ({r.method}, flavor {r.flavor}, {r.variant}) in {r.seconds:.1f} s")
    print(table(rows, ["qtype", "tensors", "parameters", "bytes"]))
    print(f"file {human_bytes(r.file_bytes)}, {r.bits_per_weight:.2f} bits per weight over {r.parameters:,} parameters")
    fallbacks = [d for d in r.decisions if d["reason"].startswith("requested")]
    if fallbacks:
        print(
            f"{len(fallbacks)} tensor(s) could not take the requested qtype (kept F16); e.g. "
            f"{fallbacks[0]['name']}: {fallbacks[0]['reason']}"
        )
    return 0


def run_auto(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unetkit.formats.atomic import check_output, check_writable
    from unetkit.sensitivity import quantize_to_target

    if args.ema or args.config:
        raise UnetkitError("gguf:auto reads the file as it is: --ema and --config are not supported with it")
    if args.html:
        check_output(Path(args.html), args.force, inputs=(args.input,))
        check_writable(Path(args.html))
    progress, close = progress_bar("sensitivity", not args.json and not args.quiet)
    try:
        r = quantize_to_target(
            args.input,
            args.output,
            target_size=args.target_size,
            target_bpw=args.target_bpw,
            target_sqnr=args.target_sqnr,
            flavor=args.flavor,
            keep=args.keep,
            override=args.override,
            force=args.force,
            settings=settings_from(args),
            measure=args.measure,
            cache=args.cache,
            progress=progress,
        )
    finally:
        close()
    d = r.to_dict()
    if args.html:
        from unetkit.sensitivity.html import write_auto_html

        write_auto_html(d, args.html, force=args.force)
    if args.json:
        emit_json(d)
    else:
        rows = [[q, str(v["tensors"]), f"{v['parameters']:,}", human_bytes(v["bytes"])] for q, v in r.by_qtype.items()]
        target = f"{r.target['kind']} {r.target['given']}"
        print(f"wrote {r.output} (gguf:auto, target {target}, flavor {args.flavor}) in {r.seconds:.1f} s")
        print(table(rows, ["qtype", "tensors", "parameters", "bytes"]))
        measured = "not measured" if r.measured_sqnr_db is None else f"{r.measured_sqnr_db:.2f} dB measured"
        print(
            f"file {human_bytes(r.file_bytes)} ({r.file_bytes:,} bytes), {r.bits_per_weight:.2f} bits per weight; "
            f"output SQNR {r.predicted_sqnr_db:.2f} dB predicted, {measured}"
        )
        for note in r.notes:
            print(note)
        if args.html:
            print(f"wrote {args.html}")
    if r.met is False:  # exit code 1, as a failed verify
        raise VerificationFailed(
            f"target missed: measured SQNR {r.measured_sqnr_db:.2f} dB < {r.target['value']} dB (the file is kept)"
        )
    return 0


def run_runtime(args: argparse.Namespace) -> int:
    from unetkit.quantization import quantize_to_dir

    if args.keep or args.override or args.flavor != "comfy":
        raise UnetkitError(f"--keep/--override/--flavor are for gguf: methods; {args.method} uses --include/--exclude")
    r = quantize_to_dir(
        args.input,
        args.output,
        args.method,
        include=args.include,
        exclude=args.exclude,
        force=args.force,
        ema=args.ema,
        config=args.config,
    )
    if args.json:
        emit_json({"output": args.output, **r.to_dict()})
        return 0
    rows = [
        [
            kind,
            f"{v['modules_quantized']}/{v['modules_quantized'] + v['modules_kept']}",
            f"{v['params_quantized']:,}",
            f"{v['params_kept']:,}",
        ]
        for kind, v in r.coverage().items()
    ]
    print(f"wrote {args.output} ({r.method})")
    print(table(rows, ["module", "quantized", "params quantized", "params kept"]))
    share = 100 * r.params_quantized / max(r.params_total, 1)
    print(f"{r.params_quantized:,} of {r.params_total:,} parameters quantized ({share:.1f} %)")
    for reason, n in r.kept_reasons().items():
        print(f"kept {n} Linear/Conv2d module(s): {reason}")
    for note in r.notes:
        print(note)
    return 0
