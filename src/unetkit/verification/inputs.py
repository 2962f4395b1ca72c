"""What `verify` feeds both UNets: seeded latents and noise, text embeddings, LCM's guidance embedding, and a
diffusers scheduler configured as SD1.5's (built locally: nothing is fetched).

Both UNets always get the very same tensors, cast to each model's compute dtype."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unetkit import families
from unetkit.errors import UnetkitError

SCHEDULERS = ("ddim", "euler", "lcm")

#: SD1.5's scheduler settings (its scheduler_config.json); prediction_type is a setting, not readable from weights
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

#: guidance scale per scheduler: classifier-free guidance for ddim/euler, LCM's embedded guidance for lcm
DEFAULT_GUIDANCE = {"ddim": 7.5, "euler": 7.5, "lcm": 8.0}


def make_scheduler(name: str, prediction_type: str = "epsilon"):
    """A fresh diffusers scheduler (they keep state between steps: one per sampling run)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "lcm": LCMScheduler}
    if name not in classes:
        raise UnetkitError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = classes[name]
    accepted = set(cls.__init__.__code__.co_varnames)
    cfg = {k: v for k, v in {**SD15_SCHEDULER, "prediction_type": prediction_type}.items() if k in accepted}
    return cls(**cfg)


def guidance_embedding(w: float, dim: int, batch: int) -> torch.Tensor:
    """LCM's ``timestep_cond``: the sinusoidal embedding of ``w * 1000`` (``w = guidance_scale - 1``), as the
    latent-consistency pipelines compute it, ``(batch, dim)`` float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = (w * 1000.0) * freqs
    emb = torch.cat([torch.sin(angles), torch.cos(angles)])
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.expand(batch, dim).clone()


@dataclass
class VerifyInputs:
    """Seeded inputs shared by both UNets."""

    x0: torch.Tensor  # a "clean" latent the per-timestep inputs are noised from, (B, C_out, H, W)
    noise: torch.Tensor  # the noise of every noised input and the start of the sampling loop
    extra: torch.Tensor | None  # extra input channels (inpainting mask + masked image, pix2pix image), or None
    cond: torch.Tensor  # (B, tokens, cross_attention_dim)
    uncond: torch.Tensor | None  # classifier-free guidance's unconditional embeddings; None without CFG
    timestep_cond: torch.Tensor | None  # LCM guidance embedding
    guidance: float
    embeds_source: str  # "random (seed S)" or the file they came from
    added_cond: dict[str, torch.Tensor] | None = None  # the family's extra conditioning (SDXL: text_embeds, time_ids)
    added_uncond: dict[str, torch.Tensor] | None = None  # the same for CFG's unconditional half (negative pooled)

    def added_cond_kwargs(self, batch: int, guided: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """``{"added_cond_kwargs": ...}`` for the first ``batch`` rows; empty when the family needs none. ``guided``:
        for a classifier-free-guidance call, whose batch is ``[unconditional rows, conditional rows]`` (as
        ``encoder_hidden_states``): the unconditional rows get ``added_uncond`` (SDXL: the negative pooled text
        embedding, the same time ids), the conditional ones ``added_cond``, as diffusers' SDXL pipelines do."""
        if not self.added_cond:
            return {}
        if not guided:
            return {"added_cond_kwargs": {k: v[:batch] for k, v in self.added_cond.items()}}
        uncond = self.added_uncond or self.added_cond
        return {"added_cond_kwargs": {k: torch.cat([uncond[k][:batch], v[:batch]]) for k, v in self.added_cond.items()}}


def make_inputs(
    config: Any,
    *,
    size: int,
    batch: int,
    seed: int,
    scheduler: str,
    guidance: float,
    prompt_embeds: str | Path | None = None,
) -> VerifyInputs:
    """Seeded latents/noise/embeddings for a UNet with diffusers ``config``; ``prompt_embeds`` is an optional
    .safetensors/.pt file holding ``prompt_embeds`` (and optionally ``negative_prompt_embeds``) tensors."""
    g = torch.Generator().manual_seed(seed)
    c_out, c_in = config.out_channels, config.in_channels
    x0 = torch.randn(batch, c_out, size, size, generator=g)
    noise = torch.randn(batch, c_out, size, size, generator=g)
    extra = torch.randn(batch, c_in - c_out, size, size, generator=g) if c_in > c_out else None
    dim = config.cross_attention_dim
    cond = torch.randn(batch, 77, dim, generator=g)
    uncond = torch.randn(batch, 77, dim, generator=g)
    source = f"random (seed {seed})"
    if prompt_embeds is not None:
        cond, loaded_uncond = load_prompt_embeds(prompt_embeds, batch, dim)
        uncond = loaded_uncond if loaded_uncond is not None else uncond
        source = str(prompt_embeds)
    lcm = bool(config.time_cond_proj_dim)
    timestep_cond = guidance_embedding(guidance - 1.0, config.time_cond_proj_dim, batch) if lcm else None
    use_cfg = scheduler != "lcm" and not lcm and guidance != 1.0
    family = families.for_config(dict(config))
    # the family's extra conditioning, drawn after everything above (the inputs of other families stay as they
    # were); CFG's unconditional half gets a draw of its own, as a negative prompt has its own pooled embedding
    added = family.added_cond_kwargs(config, batch, g)
    added_uncond = family.added_cond_kwargs(config, batch, g) if added else None
    if added and prompt_embeds is not None:
        pooled, negative = load_pooled_embeds(prompt_embeds, batch, added)
        if pooled is not None:
            added["text_embeds"] = pooled
        if negative is not None and added_uncond is not None:
            added_uncond["text_embeds"] = negative
    return VerifyInputs(
        x0, noise, extra, cond, uncond if use_cfg else None, timestep_cond, guidance, source, added, added_uncond
    )


def load_pooled_embeds(
    path: str | Path, batch: int, added: dict[str, torch.Tensor]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SDXL's pooled text embeddings from a ``--prompt-embeds`` file, under diffusers' pipeline names
    ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds``, (dim,) or (n, dim), repeated or cut to
    ``batch``; (None, None) when the file has neither (the seeded ones are used)."""
    data = _read_embeds(Path(path))
    if not isinstance(data, dict) or "text_embeds" not in added:
        return None, None
    want = added["text_embeds"].shape[-1]

    def fit(name: str) -> torch.Tensor | None:
        if name not in data:
            return None
        t = data[name].float()
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[-1] != want:
            raise UnetkitError(
                f"--prompt-embeds {path}: {name} has shape {list(data[name].shape)}; expected ({want},) or "
                f"(n, {want}) for this UNet's pooled text embedding"
            )
        return t.repeat(math.ceil(batch / t.shape[0]), 1)[:batch].contiguous()

    return fit("pooled_prompt_embeds"), fit("negative_pooled_prompt_embeds")


def load_prompt_embeds(path: str | Path, batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``prompt_embeds`` (and ``negative_prompt_embeds`` when present) from a .safetensors or torch file: (tokens,
    dim) or (n, tokens, dim), repeated or cut to ``batch``."""
    path = Path(path)
    data = _read_embeds(path)
    if not isinstance(data, dict) or "prompt_embeds" not in data:
        raise UnetkitError(
            f"--prompt-embeds {path}: expected a tensor named 'prompt_embeds' "
            f"(and optionally 'negative_prompt_embeds'); found "
            f"{sorted(data) if isinstance(data, dict) else type(data).__name__}"
        )

    def fit(name: str) -> torch.Tensor:
        t = data[name].float()
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3 or t.shape[-1] != dim:
            raise UnetkitError(
                f"--prompt-embeds {path}: {name} has shape {list(data[name].shape)}; expected "
                f"(tokens, {dim}) or (n, tokens, {dim}) for this UNet's cross_attention_dim"
            )
        reps = math.ceil(batch / t.shape[0])
        return t.repeat(reps, 1, 1)[:batch].contiguous()

    return fit("prompt_embeds"), fit("negative_prompt_embeds") if "negative_prompt_embeds" in data else None


def _read_embeds(path: Path) -> Any:
    """The tensors of a ``--prompt-embeds`` file (a lone tensor is its ``prompt_embeds``)."""
    if not path.is_file():
        raise UnetkitError(f"--prompt-embeds {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnetkitError(f"--prompt-embeds {path}: cannot read it ({e})") from e
    return {"prompt_embeds": data} if isinstance(data, torch.Tensor) else data


def spread_timesteps(k: int, num_train_timesteps: int = 1000) -> list[int]:
    """``k`` timesteps spread evenly over the training schedule, from the noisiest down."""
    if k < 1:
        raise UnetkitError(f"--timesteps {k}: need at least 1")
    if k == 1:
        return [num_train_timesteps // 2 - 1]
    top = num_train_timesteps - 1
    return [round(top - i * (top - 1) / (k - 1)) for i in range(k)]
