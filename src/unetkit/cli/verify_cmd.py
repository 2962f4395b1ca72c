"""unetkit verify REFERENCE CANDIDATE [...]: bit-identical, or how far off, where, and which layer is to blame."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unetkit.errors import VerificationFailed
from unetkit.verification.presets import PRESETS

HELP = "check a converted or quantized UNet against its reference: exact or measured, with per-layer blame"
_D, _Q = PRESETS["default"], PRESETS["quick"]
DESCRIPTION = f"""Run REFERENCE and CANDIDATE (any file or folder unetkit reads: safetensors, ckpt, diffusers folder,
GGUF, a torchao/quanto folder) on the same seeded latents and text embeddings, and report:
  - exact mode (automatic when neither side is quantized and the dtypes agree): every weight compared bit for
    bit; the verdict is "bit-identical" or names the first tensor and the first output that differ;
  - per timestep (spread over the schedule): SQNR dB, cosine, relative L2 and max abs error of the guided noise
    prediction (classifier-free guidance; LCM models get their guidance embedding as timestep_cond);
  - a denoising loop with the diffusers scheduler from the same noise: the final latents' error (and, with
    --vae, the decoded images' PSNR, shown side by side in the HTML page);
  - per-layer blame at t=499: each leaf module of the candidate run on the reference's own inputs, ranked by
    its error, so a zeroed, perturbed or badly quantized layer is named first.
Exit code 0 when it passes, 1 when not bit-identical (exact mode) or below --min-sqnr, 2 on bad input.

Presets (full-size SD1.5, fp32, 2 CPU cores): the default ({_D["timesteps"]} timesteps, {_D["steps"]} steps;
LCM {_D["lcm_steps"]}) takes about 10 minutes; --quick ({_Q["timesteps"]} timesteps, {_Q["steps"]} steps;
LCM {_Q["lcm_steps"]}) about 2. A full-size SDXL (fp16 against Q8_0) computes twice as much per call: --quick about
5 minutes at --size 64, about 17 at its native --size 128, in about 10-11 GB of memory (fp16 weights are held as
stored and computed in fp32 layer by layer; blame stores no activations). Tiny models take seconds."""
EPILOG = """examples:
  unetkit verify v1-5.safetensors unet_diffusers/
      a layout conversion: expect "bit-identical"
  unetkit verify v1-5.safetensors v1-5-Q4_K_M.gguf --quick --min-sqnr 15 --html q4.html
      a quantized file: measured, pass/fail at 15 dB, report with plots
  unetkit verify lcm.safetensors lcm-Q8_0.gguf --scheduler lcm --steps 4 --json report.json
  unetkit verify a.safetensors b.safetensors --no-exact --vae sd15/vae/ --html cmp.html
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("reference", help="the UNet taken as right (e.g. the original file)")
    p.add_argument("candidate", help="the UNet to check (converted, quantized, ...)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer timesteps and steps (full size on 2 CPU cores: SD1.5 about 2 min, SDXL about 5 at --size 64)",
    )
    p.add_argument("--timesteps", type=int, help="timesteps compared one by one (default 10; --quick 2)")
    p.add_argument("--steps", type=int, help="sampling steps (default 20, LCM 4; --quick 3, LCM 2)")
    p.add_argument(
        "--scheduler",
        choices=("ddim", "euler", "lcm"),
        help="sampling loop scheduler (default: lcm for LCM UNets, else ddim)",
    )
    p.add_argument("--size", type=int, default=64, help="latent size (64 = 512x512 images; default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--guidance", type=float, help="guidance scale (default 7.5 with CFG, 8 for LCM)")
    p.add_argument(
        "--prompt-embeds",
        metavar="FILE",
        help=".safetensors/.pt with prompt_embeds (and negative_prompt_embeds); default random",
    )
    p.add_argument("--vae", metavar="DIR", help="a diffusers AutoencoderKL folder: decode and compare the images")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="load both sides in this dtype")
    p.add_argument(
        "--prediction-type",
        default=None,
        choices=("epsilon", "v_prediction"),
        help="the schedulers' prediction type (default: the reference's, as its file says it: marker keys, "
        "scheduler_config.json or metadata, else its family's default; the report says which and where from)",
    )
    exact = p.add_mutually_exclusive_group()
    exact.add_argument(
        "--exact", dest="exact", action="store_true", default=None, help="require bit-identical weights and outputs"
    )
    exact.add_argument("--no-exact", dest="exact", action="store_false", help="measure only, even if lossless")
    p.add_argument("--min-sqnr", type=float, metavar="DB", help="fail (exit 1) when the worst SQNR is below DB")
    p.add_argument("--no-blame", dest="blame", action="store_false", help="skip the per-layer blame")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON (schema unetkit.verify/1); - for stdout")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with plots")
    p.add_argument("--force", action="store_true", help="replace existing report files")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from unetkit.formats.atomic import check_output, check_writable
    from unetkit.verification import verify

    for out in (args.json, args.html):
        if out and out != "-":  # fail before minutes of work, not after; a report never replaces a model
            check_output(Path(out), args.force, inputs=(args.reference, args.candidate))
            check_writable(Path(out))
    bar = None
    show = not args.quiet and args.json != "-"

    def progress(done: int, total: int, what: str) -> None:
        nonlocal bar
        if not show:
            return
        if bar is None:
            bar = tqdm(total=total, desc="verify", unit="call", file=sys.stderr)
        bar.set_postfix_str(what, refresh=False)
        bar.update(done - bar.n)

    try:
        report = verify(
            args.reference,
            args.candidate,
            timesteps=args.timesteps,
            steps=args.steps,
            scheduler=args.scheduler,
            size=args.size,
            seed=args.seed,
            batch=args.batch,
            guidance=args.guidance,
            prompt_embeds=args.prompt_embeds,
            vae=args.vae,
            exact=args.exact,
            min_sqnr=args.min_sqnr,
            blame=args.blame,
            quick=args.quick,
            dtype=args.dtype,
            prediction_type=args.prediction_type,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    if args.json == "-":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.text())
        if args.json:
            report.write_json(args.json, force=args.force)
            print(f"wrote {args.json}")
    if args.html:
        report.write_html(args.html, force=args.force)
        if args.json != "-":
            print(f"wrote {args.html}")
    if not report.passed:
        raise VerificationFailed(f"{report.summary['verdict']}: {report.summary['reason']}")
    return 0
