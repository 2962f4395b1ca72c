"""`make demo`: the main job on a built-in default or on your own file.

Default input: a seeded UNet with SD1.5's full architecture and LCM's cond_proj, random weights (no real weights
can be downloaded here; unetkit.sample's builder, shared with the tests and the benchmarks), streamed to an LDM
single file in fp16 the way community LCM checkpoints ship. Steps: inspect -> convert to diffusers -> convert back
to LDM -> byte-for-byte comparison -> strict loads, forward, and an exact `unetkit verify` of both conversions
(every weight and the output bit for bit) -> what diffusers' own from_single_file does with the same file -> GGUF
Q8_0 and Q4_K_M, run on the fly, with their size and output SQNR -> torchao and optimum-quanto -> `unetkit verify`
of the quantized artifacts against the original (quick preset, small latents, per-layer blame), with one HTML
report for all six. Each model is loaded once (the reference twice); about 4 minutes on 2 CPU cores.

    python -m unetkit.demo                       # built-in default
    python -m unetkit.demo path/to/model.safetensors     # any SD1.x, SD2.x or SDXL UNet file unetkit reads

Memory: every float model is held as its file stores it and computed in float32, cast layer by layer
(``load_unet(..., dequantize="on-the-fly", compute_dtype="fp32")``: bit for bit the output of a whole float32
copy), the reference is let go while steps 6-8 run and loaded again for step 9, and only small reloaded quantized
models are kept between steps 8 and 9. For a full-size fp16 SDXL (5.1 GB) the peak is step 8's float32 copy that
torchao and quanto quantize from (10.3 GB), with the file's pages while it loads (5.1 GB) or its quantized twin
(2.6 GB): about 16 GB (a float32 reference held throughout, as before, would add 10.3 GB to every step).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

from unetkit._quiet import quiet_third_party
from unetkit.conversion import convert
from unetkit.errors import UnetkitError
from unetkit.gguf_export import quantize_file
from unetkit.inspection import inspect_file
from unetkit.loading import load_unet
from unetkit.metrics import compare
from unetkit.resolve import open_unet
from unetkit.sample import example_inputs, sd_schedule_buffers, unet_config, write_ldm_checkpoint
from unetkit.verification import Report, verify, write_html

#: the built-in default's complete config: SD1.5's architecture with LCM's cond_proj (unetkit.sample's full size)
SD15_LCM = unet_config("sd1.x-lcm", "full")
DEFAULT_SEED = 1234


def make_default(path: Path, seed: int = DEFAULT_SEED, dtype: torch.dtype = torch.float16) -> Path:
    """Write the built-in default: full-size SD1.5-architecture LCM UNet, seeded random weights (unetkit.sample's
    builder), LDM names under model.diffusion_model., plus the noise-schedule buffers a full checkpoint carries.
    Streamed tensor by tensor: no model is built in memory."""
    return write_ldm_checkpoint(
        path,
        "sd1.x-lcm",
        "full",
        seed=seed,
        dtype=dtype,
        extra_buffers=sd_schedule_buffers(),
        metadata={"unetkit.demo": f"seed={seed}"},
    )


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def done(t0: float, msg: str = "") -> None:
    print(f"   {msg}{' ' if msg else ''}({time.perf_counter() - t0:.1f} s)", flush=True)


@torch.no_grad()
def forward(unet: torch.nn.Module, size: int) -> torch.Tensor:
    assert not any(p.is_meta for p in unet.parameters())
    return unet(**example_inputs(unet, size)).sample


def load_float32(path) -> torch.nn.Module:
    """A float UNet file or folder, strictly loaded, computed in float32 with its weights held as stored (an
    fp16 file: half the memory of a float32 copy, the same output bit for bit)."""
    return load_unet(path, dequantize="on-the-fly", compute_dtype=torch.float32)


#: reloaded quantized models up to this size are kept from step 8 for step 9; bigger ones are loaded again there
KEEP_BYTES = 2 << 30


def run_forward(path, size: int, dequantize: str = "load") -> torch.Tensor:
    unet = load_unet(path, dtype=torch.float32, dequantize=dequantize)
    out = forward(unet, size)
    del unet
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m unetkit.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("checkpoint", nargs="?", help="your SD1.x/2.x/SDXL UNet file or folder (default: built-in)")
    ap.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    ap.add_argument("--size", type=int, default=16, help="latent size of the forward checks (64 = 512 px)")
    ap.add_argument("--verify-size", type=int, default=8, help="latent size of step 9's verify runs")
    args = ap.parse_args(argv)
    quiet_third_party()  # import-time chatter of torch, diffusers and torchao (see unetkit/_quiet.py)
    out = Path(args.out)
    torch.manual_seed(0)
    t_start = time.perf_counter()
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
        print(
            f"   {info['unet_tensors']} UNet tensors, {info['parameters']:,} parameters; "
            f"dtypes {', '.join(k + ': ' + str(v['tensors']) for k, v in info['dtypes'].items())}"
        )
        for row in info["ignored"]:
            print(f"   ignored {row['count']}: {row['reason']}")
        print(f"   suspicious tensors: {len(info['suspicious']) or 'none'}")
        done(t0)

        t0 = step("2. unetkit convert --to diffusers")
        r1 = convert(src, out / "unet_diffusers", to="diffusers", force=True)
        copied = r1.bytes_copied / 2**20
        done(t0, f"{out / 'unet_diffusers'}: {r1.tensors} tensors, {copied:.0f} MiB copied byte for byte")

        t0 = step("3. unetkit convert --to ldm (back)")
        back = out / "unet_ldm_roundtrip.safetensors"
        r2 = convert(out / "unet_diffusers", back, to="ldm", force=True)
        done(t0, f"{back}: {r2.tensors} tensors")

        t0 = step("4. round trip, tensor by tensor")
        a, b = open_unet(src), open_unet(back)
        same = sum(
            torch.equal(e.load(), b.tensors[k].load()) and e.dtype == b.tensors[k].dtype
            for k, e in a.tensors.items()
            if k in b.tensors
        )
        print(
            f"   {same}/{len(a.tensors)} tensors identical (keys, dtypes, bytes); "
            f"key sets equal: {set(a.tensors) == set(b.tensors)}"
        )
        done(t0)
        ok = same == len(a.tensors) == len(b.tensors)

        t0 = step(f"5. strict load (load_unet), forward and exact verify, fp32, {args.size}x{args.size} latents")
        reference = load_float32(src)  # the reference of steps 5 and 9 (let go in between: steps 6-8 need memory)
        ref = forward(reference, args.size)
        print(f"   original          loaded strictly; output {tuple(ref.shape)}, finite: {bool(ref.isfinite().all())}")
        reports: dict[Path, Report] = {}
        for label, path in (("diffusers folder", out / "unet_diffusers"), ("round trip", back)):
            # loaded once: `unetkit verify` (exact mode) runs on this model: every weight bit for bit, then one
            # forward of both models on the same inputs, compared bit for bit (step 9 reports it with the others)
            cand = load_float32(path)
            r = reports[path] = verify_one(reference, src, path, cand, args.size)
            del cand
            gc.collect()
            assert r.exact is not None
            first, row = r.exact["first_tensor"], r.timesteps[0]
            n = r.exact["tensors_compared"]
            weights = f"all {n} bit-identical" if first is None else f"{first['name']} differs"
            print(
                f"   {label:17s} loaded strictly; weights vs original: {weights}; "
                f"output max |diff| = {row['max_abs']:.3g}, bit-identical: {row['identical']}"
            )
            ok &= r.passed
        del reference
        gc.collect()
        done(t0)

        t0 = step("6. for comparison: diffusers' from_single_file on the same file")
        print("   " + diffusers_single_file_outcome(src, out / "unet_diffusers", ref, args.size))
        done(t0)

        t0 = step("7. GGUF: unetkit quantize (ComfyUI flavor), reload on the fly (weights stay packed), forward")
        for recipe in ("Q8_0", "Q4_K_M"):
            t1 = time.perf_counter()
            path = out / f"unet_{recipe}.gguf"
            q = quantize_file(src, path, f"gguf:{recipe}", force=True)
            t2 = time.perf_counter()
            o = run_forward(path, args.size, dequantize="on-the-fly")
            kinds = ", ".join(f"{k} {v['tensors']}" for k, v in q.by_qtype.items())
            print(
                f"   {recipe:7s} {q.file_bytes / 2**20:6.0f} MiB ({src.stat().st_size / q.file_bytes:.1f}x smaller), "
                f"{q.bits_per_weight:.2f} bits/weight; tensors: {kinds}"
            )
            print(f"           quantized in {t2 - t1:.1f} s; on-the-fly output vs original: {compare(ref, o)}")
        print("   (lossy by design: the figure to read is the SQNR; the codecs' bytes are tested against ggml's)")
        done(t0)

        t0 = step("8. runtime quantization (torchao, optimum-quanto), Conv2d included; saved, reloaded, run")
        reloaded: dict[Path, torch.nn.Module] = {}
        for method in RUNTIME_METHODS:
            line, folder, model = runtime_quant_outcome(src, method, ref, args.size, out)
            print("   " + line, flush=True)
            if model is not None:
                reloaded[folder] = model
        done(t0)

        t0 = step("9. unetkit verify: every artifact against the original (exact when lossless), one HTML report")
        reference = load_float32(src)
        artifacts = [
            out / "unet_diffusers",
            back,
            *(out / f"unet_{r}.gguf" for r in ("Q8_0", "Q4_K_M")),
            *(out / ("unet_" + m.replace(":", "_")) for m in RUNTIME_METHODS),
        ]
        for path in artifacts:
            if path in reports:
                print_verdict(path, reports[path], "in step 5, on the model loaded there")
            elif path.exists():
                reports[path] = verify_one(reference, src, path, reloaded.get(path), args.verify_size)
                print_verdict(path, reports[path], "on the model step 8 reloaded" if path in reloaded else "")
                ok &= reports[path].passed if reports[path].exact is not None else True
        html = write_html(
            list(reports.values()), out / "verify_report.html", title="unetkit make demo: verify", force=True
        )
        print(f"   report: {html} (open it in a browser: plots per timestep, sampling, per layer, latents)")
        done(t0)
    except UnetkitError as e:
        print(f"\nunetkit error: {e}", file=sys.stderr)
        return e.exit_code
    print(
        f"\nRESULT: {'all checks bit-exact' if ok else 'MISMATCH (see above)'} "
        f"({time.perf_counter() - t_start:.0f} s in all)"
    )
    return 0 if ok else 1


RUNTIME_METHODS = ("torchao:int8-weight-only", "quanto:qint8")


def verify_one(reference: torch.nn.Module, src: Path, path: Path, model: torch.nn.Module | None, size: int) -> Report:
    """``unetkit verify`` of the artifact ``path`` (or of ``model``, already loaded from it) against ``reference``
    (``src`` as stored, computed in fp32), at ``size`` x ``size`` latents. Lossless pairs (exact mode): every weight
    bit for bit, then one forward each (``exact_fast``). Quantized ones: the quick preset (two timesteps, a two-step
    LCM loop) and per-layer blame."""
    # no dtype: verify computes every side in float32 (fp16/bf16 weights cast layer by layer, GGUF decoded to it),
    # and a dtype would cast the reference model passed in as a whole
    r = verify(reference, path if model is None else model, size=size, quick=True, exact_fast=True)
    r.reference.source, r.candidate.source = str(src), str(path)
    return r


def print_verdict(path: Path, r: Report, where: str) -> None:
    worst = r.summary["worst_sqnr_db"]
    blamed = f"; worst layer {r.blame['blamed']}" if r.blame and r.blame["blamed"] else ""
    how = "weights + one forward" if r.settings.get("exact_fast") else f"{r.settings['unet_calls']} UNet calls"
    print(
        f"   {path.name:32s} {r.summary['verdict']:18s} "
        f"{'' if worst is None else f'worst SQNR {worst:5.1f} dB'}{blamed} "
        f"({how}, {r.settings['size']}x{r.settings['size']}, {r.seconds:.0f} s{', ' + where if where else ''})",
        flush=True,
    )


def runtime_quant_outcome(src: Path, method: str, ref: torch.Tensor, size: int, out: Path):
    """Quantize the fp32 UNet with ``method``, save the folder, reload it and time one forward step. Returns the
    line to print, the folder and the reloaded model (None when the method is not available here)."""
    from unetkit.errors import BackendUnavailable
    from unetkit.metrics import weight_bytes
    from unetkit.quantization import quantize, save_quantized

    folder = out / ("unet_" + method.replace(":", "_"))
    unet = load_unet(src, dtype=torch.float32)
    fp32_bytes = weight_bytes(unet)
    t0 = time.perf_counter()
    try:
        unet, report = quantize(unet, method)
    except BackendUnavailable as e:
        return f"{method}: not available here: {e}", folder, None
    t_quant = time.perf_counter() - t0
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
    kept = reloaded if size_now <= KEEP_BYTES else None  # step 9 loads a big one again rather than hold it
    line = (
        f"{method:25s} weights {size_now / 2**20:5.0f} MiB ({size_now / fp32_bytes:.2f}x fp32), "
        f"{100 * share:.1f} % of parameters quantized (Conv2d included); quantized in {t_quant:.1f} s; "
        f"reloaded from {folder.name}/: one step {t_step:.2f} s; output vs original: {compare(ref, o)}"
    )
    return line, folder, kept


def diffusers_single_file_outcome(src: Path, config_dir: Path, ref: torch.Tensor, size: int) -> str:
    """diffusers' ``from_single_file`` (with the local config: no Hub) in the file's own dtype, computed in float32
    as the reference is (cast layer by layer: the same float32 values a float32 load gives)."""
    from diffusers import UNet2DConditionModel

    from unetkit.loading import cast_in_forward, default_dtype

    held = default_dtype(open_unet(src))
    try:
        unet = UNet2DConditionModel.from_single_file(str(src), config=str(config_dir), torch_dtype=held)
    except Exception as e:  # we are showing what the other tool does, whatever it raises
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if held != torch.float32:
        cast_in_forward(unet, torch.float32)
    try:
        with torch.no_grad():
            o = unet(**example_inputs(unet, size)).sample
    except Exception as e:
        return f"loaded, but the forward failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    meta = [n for n, p in unet.named_parameters() if p.is_meta]
    return (
        f"loaded; meta tensors left: {len(meta)}; max |diff| vs original = {(o - ref).abs().max().item():.3g}, "
        f"bit-identical: {torch.equal(o, ref)}"
    )


if __name__ == "__main__":
    sys.exit(main())
