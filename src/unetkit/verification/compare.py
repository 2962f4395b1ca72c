"""`verify`: run a reference and a candidate UNet on the same seeded inputs and measure how far apart they are.

Steps (each counted by the progress callback in UNet calls):

1. exact mode (lossless candidates: neither side quantized, same dtype): every weight compared bit for bit in
   module order; the first differing tensor is named;
2. per timestep: both UNets predict on the same noised latents (classifier-free guidance, or LCM's guidance
   embedding), error of the guided prediction;
3. a denoising loop with a diffusers scheduler from the same noise, in lockstep; error of the latents per step and
   at the end (and of the decoded images with ``vae``);
4. per-layer blame at a middle timestep (:mod:`.blame`).

With ``exact_fast=True``, a lossless pair whose weights all compare bit-identical in step 1 is confirmed with one
forward per model at the middle timestep instead of steps 2-4: seconds instead of minutes for a full-size UNet.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetkit import families
from unetkit.dtypes import compute_dtype
from unetkit.errors import UnetkitError
from unetkit.loading import load_unet
from unetkit.metrics import compare
from unetkit.verification.blame import run_blame
from unetkit.verification.inputs import DEFAULT_GUIDANCE, SCHEDULERS, make_inputs, make_scheduler, spread_timesteps
from unetkit.verification.presets import PRESETS, check_settings
from unetkit.verification.report import Report, Side

log = logging.getLogger(__name__)

#: (timesteps, sampling steps) per preset; LCM samples in few steps

Progress = Callable[[int, int, str], None]  # (done, total, what)


def ticker(total: int, progress: Progress | None) -> Callable[..., None]:
    """``tick(what, n=1)``: counts ``n`` more steps done of ``total`` and tells ``progress``, if any."""
    done = 0

    def tick(what: str, n: int = 1) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total, what)

    return tick


def verify(
    reference: str | Path | nn.Module,
    candidate: str | Path | nn.Module,
    *,
    timesteps: int | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    size: int = 64,
    seed: int = 0,
    batch: int = 1,
    guidance: float | None = None,
    prompt_embeds: str | Path | None = None,
    vae: str | Path | nn.Module | None = None,
    exact: bool | None = None,
    min_sqnr: float | None = None,
    blame: bool = True,
    quick: bool = False,
    dtype: str | torch.dtype | None = None,
    prediction_type: str | None = None,
    progress: Progress | None = None,
    exact_fast: bool = False,
) -> Report:
    """Compare ``candidate`` with ``reference`` (paths ``load_unet`` reads, or loaded UNets) and return a
    :class:`~unetkit.verification.report.Report`. ``exact``: None decides (exact when neither side is quantized and the
    dtypes agree). ``min_sqnr``: the report fails below it (dB, worst timestep and final latents). ``quick``:
    fewer timesteps and steps (about 2 minutes for a full-size SD1.5 on 2 CPU cores instead of about 10; a
    full-size SDXL, 3.2 TFLOP per guided call at 64x64 against SD1.5's 1.6, about 5 minutes, or 17 at 128x128).
    Nothing is raised for a failing verification: see ``report.passed`` (the CLI turns it into exit code 1).
    Memory: each side is held as stored (fp16/bf16 weights computed in float32 layer by layer, GGUF blocks decoded
    layer by layer) and blame stores no activations; :func:`unetkit.verification.memory.estimate_memory` gives
    the peak by component (a full-size SDXL, fp16 against Q8_0: about 10 GB). ``dtype``: both sides' weights in
    this dtype (loaded paths; a model passed in is cast as a whole); fp16/bf16 weights loaded from paths are
    computed in float32 all the same (half-precision CPU convolutions are hundreds of times slower); the report's
    ``settings.compute_dtype`` says what each side computed in. SDXL's ``added_cond_kwargs`` come from the
    family (seeded ``text_embeds`` and ``time_ids``; under CFG the unconditional half gets a pooled embedding of its
    own, as a negative prompt does; ``prompt_embeds`` files may hold ``pooled_prompt_embeds`` and
    ``negative_pooled_prompt_embeds``).
    ``exact_fast``: in exact mode, when every weight is bit-identical, confirm with one forward per model (the
    middle timestep, at ``size``) instead of the timestep sweep, the sampling loop and the blame; the report then
    has one timestep row, no ``sampling`` and no ``blame``. A differing weight, or measured mode, runs in full.
    ``prediction_type``: the schedulers' (epsilon or v_prediction); None takes the reference's, as its file says
    it (``unetkit.prediction``); the report's settings say which and where from."""
    t0 = time.perf_counter()
    prediction_type, prediction_source = _prediction_type(reference, prediction_type)
    preset = PRESETS["quick" if quick else "default"]
    check_settings(timesteps=timesteps, steps=steps, size=size, batch=batch, guidance=guidance, min_sqnr=min_sqnr)
    ref_model, ref_side = _load(reference, dtype, "reference")
    cand_model, cand_side = _load(candidate, dtype, "candidate")
    _check_compatible(ref_model, cand_model, ref_side, cand_side)
    cfg: Any = ref_model.config  # a diffusers FrozenDict (nn.Module's __getattr__ types it as Tensor | Module)
    lcm = bool(cfg.time_cond_proj_dim)
    scheduler = scheduler or ("lcm" if lcm else "ddim")
    if scheduler not in SCHEDULERS:
        raise UnetkitError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    timesteps = preset["timesteps"] if timesteps is None else timesteps
    steps = (preset["lcm_steps"] if scheduler == "lcm" else preset["steps"]) if steps is None else steps
    guidance = DEFAULT_GUIDANCE[scheduler] if guidance is None else guidance
    if exact is None:
        exact = not (ref_side.quantized or cand_side.quantized) and ref_side.dtype == cand_side.dtype
    inputs = make_inputs(
        cfg, size=size, batch=batch, seed=seed, scheduler=scheduler, guidance=guidance, prompt_embeds=prompt_embeds
    )
    cfg_mult = 2 if inputs.uncond is not None else 1
    vae_model = _load_vae(vae) if vae is not None else None
    total = 2 * timesteps + 2 * steps + (3 if blame else 0)  # progress counts UNet calls (CFG: batch of two)
    tick = ticker(total, progress)

    report = Report(
        reference=ref_side,
        candidate=cand_side,
        settings={
            "timesteps": timesteps,
            "steps": steps,
            "scheduler": scheduler,
            "size": size,
            "seed": seed,
            "batch": batch,
            "guidance": guidance,
            "cfg": cfg_mult == 2,
            "lcm_guidance_embedding": lcm,
            "prediction_type": prediction_type,
            "prediction_type_source": prediction_source,
            "exact_mode": exact,
            "min_sqnr_db": min_sqnr,
            "blame": blame,
            "prompt_embeds": inputs.embeds_source,
            "vae": str(vae) if isinstance(vae, (str, Path)) else (type(vae).__name__ if vae is not None else None),
            "preset": "quick" if quick else "default",
            "device": "cpu",
            # what each side computes in (fp16/bf16 weights are cast to fp32 layer by layer: ``_load``)
            "compute_dtype": {
                "reference": str(compute_dtype(ref_model)).removeprefix("torch."),
                "candidate": str(compute_dtype(cand_model)).removeprefix("torch."),
            },
            "unet_calls": total,
        },
    )
    if exact:
        report.exact = compare_weights(ref_model, cand_model)
        if exact_fast and report.exact["first_tensor"] is None:
            return _confirm_exact(report, ref_model, cand_model, inputs, prediction_type, progress, t0)

    train_sched = make_scheduler("ddim", prediction_type)
    with torch.no_grad():  # not inference_mode: optimum-quanto's int4/int2 layers refuse it
        # per timestep
        first_output = None
        for t in spread_timesteps(timesteps, train_sched.config.num_train_timesteps):
            xt = train_sched.add_noise(inputs.x0, inputs.noise, torch.tensor([t]))
            ref_out = predict(ref_model, inputs, xt, t)
            tick(f"timestep {t} (reference)")
            cand_out = predict(cand_model, inputs, xt, t)
            tick(f"timestep {t} (candidate)")
            stats = compare(ref_out, cand_out)
            report.timesteps.append({"timestep": t, **stats.to_dict()})
            if first_output is None and not stats.identical:
                first_output = {"timestep": t, **stats.to_dict()}
        if report.exact is not None:
            report.exact["first_output"] = first_output
            report.exact["bit_identical"] = report.exact["first_tensor"] is None and first_output is None

        # the sampling loop, both models in lockstep from the same noise
        report.sampling, final_ref, final_cand = _sample(
            ref_model, cand_model, inputs, scheduler, steps, seed, prediction_type, tick
        )
        report.latents = (final_ref[0].float().clone(), final_cand[0].float().clone())
        if vae_model is not None:
            report.images, report.image_pair = _decode_compare(vae_model, final_ref, final_cand)

    if blame:
        t_mid = spread_timesteps(1, train_sched.config.num_train_timesteps)[0]
        xt = train_sched.add_noise(inputs.x0[:1], inputs.noise[:1], torch.tensor([t_mid]))
        one = replace(inputs, uncond=None)  # one conditional call: blame needs no guidance
        res = run_blame(
            ref_model,
            cand_model,
            lambda: predict(ref_model, one, xt, t_mid, guided=False),
            lambda: predict(cand_model, one, xt, t_mid, guided=False),
            t_mid,
        )
        tick("per-layer blame", 3)
        report.blame = res.to_dict()
    report.seconds = time.perf_counter() - t0
    report.finish(min_sqnr)
    return report


# --------------------------------------------------------------------------------------------------------------------


def _load(src: str | Path | nn.Module, dtype, role: str) -> tuple[nn.Module, Side]:
    stored_quantized = False
    if isinstance(src, nn.Module):
        model, name, variant = src.eval(), f"<{type(src).__name__} object>", _variant(src)
        if dtype is not None:
            from unetkit.dtypes import parse_dtype

            model = model.to(parse_dtype(dtype))
    else:
        from unetkit.formats.quantized_dir import is_quantized_dir
        from unetkit.resolve import open_unet

        path = Path(src)
        if not path.exists():
            raise UnetkitError(f"{role} {path}: no such file or folder")
        if is_quantized_dir(path):  # torchao / quanto folder: its weights are tensor subclasses (seen below)
            model, variant = load_unet(path, dtype=dtype), None
        else:
            source = open_unet(path)
            stored_quantized = any(e.qtype is not None for e in source.tensors.values())  # GGUF blocks
            # Weights stay as stored and each layer decodes or casts its own in forward: GGUF runs on the fly, as
            # users run it (a full-size fp32 decode would add 2.5 GB for SD1.5, 10.3 GB for SDXL, next to the
            # reference; 'load' gives the same output bit for bit, tested), and fp16/bf16 weights are computed in
            # fp32, cast layer by layer (loading.cast_in_forward: half-precision CPU convolutions are hundreds of
            # times slower, and an SDXL reference cast whole would hold 10.3 GB instead of 5.1)
            model = load_unet(
                source, dtype=dtype, dequantize="on-the-fly", compute_dtype=_cpu_compute_dtype(source, dtype)
            )
            variant = source.spec.variant
        name = str(path)
    params = [*model.parameters(), *model.buffers()]
    quantized = (
        stored_quantized
        or any(type(p) not in (torch.Tensor, nn.Parameter) for p in params)
        or any(type(m).__module__.startswith(("unetkit.quant", "optimum", "torchao")) for m in model.modules())
    )
    floats = [
        p.dtype for p in model.parameters() if p.dtype.is_floating_point and type(p) in (torch.Tensor, nn.Parameter)
    ]
    main_dtype = max(set(floats), key=floats.count) if floats else torch.float32
    return model, Side(
        source=name,
        variant=variant or _variant(model),
        dtype=str(main_dtype).removeprefix("torch."),
        quantized=quantized,
        parameters=sum(p.numel() for p in model.parameters()),
    )


def _cpu_compute_dtype(source, dtype) -> torch.dtype | None:
    """float32 for weights held in fp16/bf16 (verify runs on the CPU); None (the weights' own) otherwise."""
    from unetkit.dtypes import parse_dtype
    from unetkit.loading import default_dtype

    held = parse_dtype(dtype) or default_dtype(source)
    return torch.float32 if held in (torch.float16, torch.bfloat16) else None


def _prediction_type(reference: str | Path | nn.Module, given: str | None) -> tuple[str, str]:
    """The schedulers' prediction type and where it came from: as given, else what the reference's file says."""
    from unetkit.prediction import TYPES

    if given is not None:
        if given not in TYPES:
            raise UnetkitError(f"prediction_type={given!r}; use one of {', '.join(TYPES)}")
        return given, "given (--prediction-type)"
    if isinstance(reference, nn.Module):
        config: Any = reference.config
        try:
            family = families.for_config(dict(config))
        except UnetkitError:
            return "epsilon", "default: a loaded model carries no marker, and its family is unknown"
        return family.prediction_type, f"family default ({family.title}): a loaded model carries no marker"
    from unetkit.resolve import prediction_of

    if not Path(reference).exists():
        return "epsilon", "default"  # _load names the missing file
    found = prediction_of(reference)
    return found.type, f"the reference's {found.where()}"


def _variant(model: nn.Module) -> str:
    from unetkit.spec import variant_of

    config: Any = model.config
    try:
        return variant_of(config)
    except UnetkitError:  # the report's label only: a UNet of no known family is named "unknown"
        return "unknown"


def _check_compatible(ref: nn.Module, cand: nn.Module, rs: Side, cs: Side) -> None:
    keys = (
        "in_channels",
        "out_channels",
        "cross_attention_dim",
        "time_cond_proj_dim",
        "block_out_channels",
        "use_linear_projection",
        "layers_per_block",
        "transformer_layers_per_block",
    )
    rc: Any = ref.config
    cc: Any = cand.config
    diff = [
        f"{k}: {rc.get(k)} vs {cc.get(k)}" for k in keys if rc.get(k) != cc.get(k) and str(rc.get(k)) != str(cc.get(k))
    ]
    rf, cf = families.for_config(dict(rc)), families.for_config(dict(cc))
    if rf is not cf:
        diff.insert(0, f"family: {rf.title} vs {cf.title}")
    if diff:
        raise UnetkitError(
            f"{rs.source} and {cs.source} are different architectures ({'; '.join(diff)}); verify "
            f"compares two versions of the same UNet"
        )


def compare_weights(ref: nn.Module, cand: nn.Module) -> dict[str, Any]:
    """Every reference tensor against the candidate's, in module order; the first that differs is named."""
    ref_sd, cand_sd = ref.state_dict(), cand.state_dict()
    first = None
    compared = 0
    for name, r in ref_sd.items():
        c = cand_sd.get(name)
        compared += 1
        if c is None:
            first = {"name": name, "reason": "missing in the candidate"}
        elif c.shape != r.shape:
            first = {"name": name, "reason": f"shape {list(c.shape)}, expected {list(r.shape)}"}
        elif c.dtype != r.dtype:
            first = {"name": name, "reason": f"dtype {c.dtype}, expected {r.dtype}"}
        elif not torch.equal(c, r):
            stats = compare(r.float(), c.float())
            n = int((c != r).sum())
            first = {"name": name, "reason": f"{n} of {r.numel()} values differ", **stats.to_dict()}
        if first is not None:
            break
    extra = [k for k in cand_sd if k not in ref_sd]
    if first is None and extra:
        first = {"name": extra[0], "reason": "only in the candidate"}
    return {"bit_identical": None, "tensors_compared": compared, "first_tensor": first, "first_output": None}


def _confirm_exact(
    report: Report, ref: nn.Module, cand: nn.Module, inputs, prediction_type: str, progress: Progress | None, t0: float
) -> Report:
    """``exact_fast`` once every weight compared bit-identical: one (guided) forward per model at the middle
    timestep, compared bit for bit; no sampling loop, no blame."""
    train_sched = make_scheduler("ddim", prediction_type)
    t = spread_timesteps(1, train_sched.config.num_train_timesteps)[0]
    xt = train_sched.add_noise(inputs.x0, inputs.noise, torch.tensor([t]))
    with torch.no_grad():
        ref_out = predict(ref, inputs, xt, t)
        if progress:
            progress(1, 2, f"timestep {t} (reference)")
        cand_out = predict(cand, inputs, xt, t)
        if progress:
            progress(2, 2, f"timestep {t} (candidate)")
    stats = compare(ref_out, cand_out)
    report.timesteps = [{"timestep": t, **stats.to_dict()}]
    assert report.exact is not None
    report.exact["first_output"] = None if stats.identical else {"timestep": t, **stats.to_dict()}
    report.exact["bit_identical"] = stats.identical
    report.settings.update(timesteps=1, blame=False, unet_calls=2, exact_fast=True)
    report.seconds = time.perf_counter() - t0
    report.finish(report.settings["min_sqnr_db"])
    return report


def predict(model: nn.Module, inputs, latents: torch.Tensor, t: int, guided: bool = True) -> torch.Tensor:
    """The model's (guided) noise prediction for ``latents`` at timestep ``t``, as float32."""
    dt = compute_dtype(model)
    x = latents if inputs.extra is None else torch.cat([latents, inputs.extra[: latents.shape[0]]], dim=1)
    cond = inputs.cond[: latents.shape[0]]
    kwargs = {}
    if inputs.timestep_cond is not None:
        kwargs["timestep_cond"] = inputs.timestep_cond[: latents.shape[0]].to(dt)
    if guided and inputs.uncond is not None:
        x2 = torch.cat([x, x])
        ehs = torch.cat([inputs.uncond[: latents.shape[0]], cond])
        kwargs.update(inputs.added_cond_kwargs(latents.shape[0], guided=True))  # [uncond, cond] as ehs
        out = model(x2.to(dt), t, encoder_hidden_states=ehs.to(dt), **kwargs).sample.float()
        un, co = out.chunk(2)
        return un + inputs.guidance * (co - un)
    kwargs.update(inputs.added_cond_kwargs(latents.shape[0]))
    return model(x.to(dt), t, encoder_hidden_states=cond.to(dt), **kwargs).sample.float()


def _sample(
    ref: nn.Module, cand: nn.Module, inputs, scheduler: str, steps: int, seed: int, prediction_type: str, tick
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    s_ref, s_cand = make_scheduler(scheduler, prediction_type), make_scheduler(scheduler, prediction_type)
    s_ref.set_timesteps(steps)
    s_cand.set_timesteps(steps)
    g_ref, g_cand = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    lat_ref = inputs.noise * s_ref.init_noise_sigma
    lat_cand = lat_ref.clone()
    per_step = []
    for i, t in enumerate(s_ref.timesteps):
        p_ref = predict(ref, inputs, s_ref.scale_model_input(lat_ref, t), int(t))
        tick(f"sampling step {i + 1}/{steps} (reference)")
        p_cand = predict(cand, inputs, s_cand.scale_model_input(lat_cand, t), int(t))
        tick(f"sampling step {i + 1}/{steps} (candidate)")
        lat_ref = s_ref.step(p_ref, t, lat_ref, generator=g_ref).prev_sample
        lat_cand = s_cand.step(p_cand, t, lat_cand, generator=g_cand).prev_sample
        per_step.append({"step": i + 1, "timestep": int(t), **compare(lat_ref, lat_cand).to_dict()})
    final = compare(lat_ref, lat_cand)
    return {"scheduler": scheduler, "steps": steps, "per_step": per_step, "final": final.to_dict()}, lat_ref, lat_cand


def _load_vae(vae: str | Path | nn.Module) -> nn.Module:
    if isinstance(vae, nn.Module):
        return vae.eval()
    path = Path(vae)
    if not (path / "config.json").is_file():
        raise UnetkitError(
            f"--vae {path}: expected a diffusers AutoencoderKL folder (config.json + weights), e.g. "
            f"the vae/ folder of a diffusers pipeline"
        )
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(str(path), local_files_only=True).eval()
    except Exception as e:  # diffusers raises many kinds
        raise UnetkitError(f"--vae {path}: cannot load it as an AutoencoderKL ({e})") from e


def _decode_compare(vae: Any, lat_ref: torch.Tensor, lat_cand: torch.Tensor):
    """Decode both final latents: (the images' PSNR and error stats, (reference image, candidate image))."""
    scale = getattr(vae.config, "scaling_factor", 0.18215)
    dt = next(vae.parameters()).dtype
    img_ref = (vae.decode((lat_ref / scale).to(dt)).sample.float().clamp(-1, 1) + 1) / 2
    img_cand = (vae.decode((lat_cand / scale).to(dt)).sample.float().clamp(-1, 1) + 1) / 2
    mse = float((img_ref.double() - img_cand.double()).pow(2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    stats = compare(img_ref, img_cand).to_dict()
    return {"psnr_db": None if math.isinf(psnr) else psnr, **stats}, (img_ref[0].clone(), img_cand[0].clone())
