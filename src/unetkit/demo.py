"""`make demo`: the main job on a built-in default or on your own file.

Default input: a seeded UNet with SD1.5's full architecture and LCM's cond_proj, random weights (no real weights
can be downloaded here), written as an LDM single file in fp16 the way community LCM checkpoints ship. Steps:
inspect -> convert to diffusers -> convert back to LDM -> byte-for-byte comparison -> strict loads -> forward
outputs compared bit for bit -> what diffusers' own from_single_file does with the same file -> GGUF Q8_0 and
Q4_K_M, run on the fly, with their size and output SQNR -> torchao and optimum-quanto -> `unetkit verify` of every
artifact against the original, with one HTML report.

    python -m unetkit.demo                       # built-in default
    python -m unetkit.demo path/to/model.safetensors
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from pathlib import Path

import torch

from unetkit import convert, inspect_file, load_unet, open_unet
from unetkit.dtypes import lookup
from unetkit.errors import UnetkitError
from unetkit.provenance import LDM_PREFIX
from unetkit.formats.safetensors_io import OutTensor, aligned_order, write_safetensors
from unetkit.keymap import KeyMap, Topology
from unetkit.metrics import compare
from unetkit.gguf_export import quantize_file
from unetkit.sample import example_inputs
from unetkit.spec import expected_shapes

SD15_LCM = dict(  # complete: the default is written from this config alone, before any model exists
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=256,
)


def make_default(path: Path, seed: int = 1234, dtype: torch.dtype = torch.float16) -> Path:
    """Write the built-in default: full-size SD1.5-architecture LCM UNet, seeded random weights, LDM names under
    model.diffusion_model., plus the noise-schedule buffers a full checkpoint carries."""
    keymap = KeyMap.for_topology(Topology.from_config(SD15_LCM))
    tensors = []
    for i, (name, shape) in enumerate(expected_shapes(SD15_LCM).items()):
        def load(shape=shape, i=i, norm=name.endswith("weight") and "norm" in name):
            g = torch.Generator().manual_seed(seed + i)
            t = torch.randn(shape, generator=g).mul_(0.02)
            return (t.add_(1.0) if norm else t).to(dtype)

        tensors.append(OutTensor(LDM_PREFIX + keymap.to_ldm(name), shape, lookup(dtype).code, load=load))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled-linear schedule
    for name, value in (("betas", betas), ("alphas_cumprod", torch.cumprod(1 - betas, 0))):
        tensors.append(OutTensor(name, (1000,), "F32", load=lambda v=value: v.float()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    write_safetensors(tmp, aligned_order(tensors), {"format": "pt", "unetkit.demo": f"seed={seed}"})
    os.replace(tmp, path)
    return path


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def done(t0: float, msg: str = "") -> None:
    print(f"   {msg}{' ' if msg else ''}({time.perf_counter() - t0:.1f} s)", flush=True)


@torch.no_grad()
def run_forward(path, size: int, dequantize: str = "load") -> torch.Tensor:
    unet = load_unet(path, dtype=torch.float32, dequantize=dequantize)
    assert not any(p.is_meta for p in unet.parameters())
    out = unet(**example_inputs(unet, size)).sample
    del unet
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unetkit.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="your SD1.x/2.x UNet file or folder (default: built-in)")
    ap.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    ap.add_argument("--size", type=int, default=32, help="latent size of the forward check (64 = 512 px)")
    args = ap.parse_args(argv)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    out = Path(args.out)
    torch.manual_seed(0)
    try:
        t0 = step("0. input")
        if args.checkpoint:
            src = Path(args.checkpoint)
            print(f"   your file: {src}")
        else:
            src = out / "sd15_lcm_random.safetensors"
            if not src.exists():
                make_default(src)
                print(f"   wrote the built-in default: {src} (SD1.5 architecture + LCM cond_proj, seeded random fp16)")
            else:
                print(f"   using {src}")
        done(t0)

        t0 = step("1. unetkit inspect")
        info = inspect_file(src)
        print(f"   {info['format']}, {info['layout']} layout (prefix '{info['prefix']}'), variant {info['variant']}")
        print(f"   {info['unet_tensors']} UNet tensors, {info['parameters']:,} parameters; "
              f"dtypes {', '.join(k + ': ' + str(v['tensors']) for k, v in info['dtypes'].items())}")
        for row in info["ignored"]:
            print(f"   ignored {row['count']}: {row['reason']}")
        print(f"   suspicious tensors: {len(info['suspicious']) or 'none'}")
        done(t0)

        t0 = step("2. unetkit convert --to diffusers")
        r1 = convert(src, out / "unet_diffusers", to="diffusers", force=True)
        done(t0, f"{out / 'unet_diffusers'}: {r1.tensors} tensors, {r1.bytes_copied / 2**20:.0f} MiB copied byte for byte")

        t0 = step("3. unetkit convert --to ldm (back)")
        back = out / "unet_ldm_roundtrip.safetensors"
        r2 = convert(out / "unet_diffusers", back, to="ldm", force=True)
        done(t0, f"{back}: {r2.tensors} tensors")

        t0 = step("4. round trip, tensor by tensor")
        a, b = open_unet(src), open_unet(back)
        same = sum(torch.equal(e.load(), b.tensors[k].load()) and e.dtype == b.tensors[k].dtype
                   for k, e in a.tensors.items())
        print(f"   {same}/{len(a.tensors)} tensors identical (keys, dtypes, bytes); "
              f"key sets equal: {set(a.tensors) == set(b.tensors)}")
        done(t0)
        ok = same == len(a.tensors) == len(b.tensors)

        t0 = step(f"5. strict load (load_unet) and forward, fp32, {args.size}x{args.size} latents")
        outs = {}
        for label, path in (("original", src), ("diffusers folder", out / "unet_diffusers"), ("round trip", back)):
            outs[label] = run_forward(path, args.size)
        ref = outs["original"]
        for label, o in outs.items():
            print(f"   {label:17s} max |diff| vs original = {(o - ref).abs().max().item():.3g}  "
                  f"bit-identical: {torch.equal(o, ref)}")
            ok &= torch.equal(o, ref)
        done(t0)

        t0 = step("6. for comparison: diffusers' from_single_file on the same file")
        print("   " + diffusers_single_file_outcome(src, out / "unet_diffusers", ref, args.size))
        done(t0)

        step("7. GGUF: unetkit quantize (ComfyUI flavor), reload on the fly (weights stay packed), forward")
        for recipe in ("Q8_0", "Q4_K_M"):
            t0 = time.perf_counter()
            path = out / f"unet_{recipe}.gguf"
            q = quantize_file(src, path, f"gguf:{recipe}", force=True)
            t1 = time.perf_counter()
            o = run_forward(path, args.size, dequantize="on-the-fly")
            kinds = ", ".join(f"{k} {v['tensors']}" for k, v in q.by_qtype.items())
            print(f"   {recipe:7s} {q.file_bytes / 2**20:6.0f} MiB ({src.stat().st_size / q.file_bytes:.1f}x smaller), "
                  f"{q.bits_per_weight:.2f} bits/weight; tensors: {kinds}")
            print(f"           quantized in {t1 - t0:.1f} s; on-the-fly output vs original: {compare(ref, o)}")
        print("   (lossy by design: the figure to read is the SQNR; bit-exactness of the codecs is tested against ggml)")

        step("8. runtime quantization (torchao, optimum-quanto), Conv2d included; saved, reloaded, run")
        for method in RUNTIME_METHODS:
            print("   " + runtime_quant_outcome(src, method, ref, args.size, out))

        t0 = step("9. unetkit verify: every artifact against the original (exact when lossless), one HTML report")
        artifacts = [out / "unet_diffusers", back, *(out / f"unet_{r}.gguf" for r in ("Q8_0", "Q4_K_M")),
                     *(out / ("unet_" + m.replace(":", "_")) for m in RUNTIME_METHODS)]
        ok &= verify_artifacts(src, [a for a in artifacts if a.exists()], args.size, out / "verify_report.html")
        done(t0)
    except UnetkitError as e:
        print(f"\nunetkit error: {e}", file=sys.stderr)
        return e.exit_code
    print("\nRESULT: " + ("all checks bit-exact" if ok else "MISMATCH (see above)"))
    return 0 if ok else 1


RUNTIME_METHODS = ("torchao:int8-weight-only", "quanto:qint8")


def verify_artifacts(src: Path, artifacts: list[Path], size: int, html: Path) -> bool:
    """``unetkit verify`` each artifact against ``src`` (loaded once, fp32) with a small setting; True when every
    lossless one is bit-identical. Writes one HTML page for all of them."""
    from unetkit.verification import verify, write_html

    reference = load_unet(src, dtype=torch.float32)
    reports, ok = [], True
    for path in artifacts:
        r = verify(reference, path, timesteps=2, steps=2, size=size, dtype="fp32")
        reports.append(r)
        r.reference.source = str(src)
        lossless = r.exact is not None
        ok &= r.passed if lossless else True
        worst = r.summary["worst_sqnr_db"]
        blamed = f"; worst layer {r.blame['blamed']}" if r.blame and r.blame["blamed"] else ""
        print(f"   {path.name:32s} {r.summary['verdict']:18s} "
              f"{'' if worst is None else f'worst SQNR {worst:5.1f} dB'}{blamed} ({r.seconds:.0f} s)", flush=True)
    write_html(reports, html, title="unetkit make demo: verify", force=True)
    print(f"   report: {html} (open it in a browser: plots per timestep, per layer, latents)")
    return ok


def runtime_quant_outcome(src: Path, method: str, ref: torch.Tensor, size: int, out: Path) -> str:
    """Quantize the fp32 UNet with ``method``, save the folder, reload it and time one forward step."""
    from unetkit import quantize, save_quantized
    from unetkit.errors import BackendUnavailable
    from unetkit.metrics import weight_bytes

    unet = load_unet(src, dtype=torch.float32)
    fp32_bytes = weight_bytes(unet)
    t0 = time.perf_counter()
    try:
        unet, report = quantize(unet, method)
    except BackendUnavailable as e:
        return f"{method}: not available here: {e}"
    t_quant = time.perf_counter() - t0
    folder = out / ("unet_" + method.replace(":", "_"))
    save_quantized(unet, folder, report, force=True)
    del unet
    gc.collect()
    reloaded = load_unet(folder)
    args = example_inputs(reloaded, size)
    with torch.no_grad():
        t0 = time.perf_counter()
        o = reloaded(**args).sample
        t_step = time.perf_counter() - t0
    share = report.params_quantized / report.params_total
    size_now = weight_bytes(reloaded)
    return (f"{method:25s} weights {size_now / 2**20:5.0f} MiB ({size_now / fp32_bytes:.2f}x fp32), "
            f"{100 * share:.1f} % of parameters quantized (Conv2d included); quantized in {t_quant:.1f} s; "
            f"reloaded from {folder.name}/: one step {t_step:.2f} s; output vs original: {compare(ref, o)}")


def diffusers_single_file_outcome(src: Path, config_dir: Path, ref: torch.Tensor, size: int) -> str:
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_single_file(str(src), config=str(config_dir), torch_dtype=torch.float32)
    except Exception as e:  # we are showing what the other tool does, whatever it raises
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    try:
        with torch.no_grad():
            o = unet(**example_inputs(unet, size)).sample
    except Exception as e:
        return f"loaded, but the forward failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    meta = [n for n, p in unet.named_parameters() if p.is_meta]
    return (f"loaded; meta tensors left: {len(meta)}; max |diff| vs original = {(o - ref).abs().max().item():.3g}, "
            f"bit-identical: {torch.equal(o, ref)}")


if __name__ == "__main__":
    sys.exit(main())
