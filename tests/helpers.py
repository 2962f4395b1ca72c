"""Tiny UNets with SD1.5's topology (channel multipliers 1, 2, 4, 4; two layers per block), so their key names
are exactly SD1.5's, built from configs: nothing is downloaded. The builder is :mod:`unetkit.sample`'s (one for
the tests, `make demo` and the benchmarks); the names here are thin wrappers of it."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from unetkit.keymap import KeyMap, Topology
from unetkit.sample import BASE, build_unet, example_inputs, variant_overrides
from unetkit.sample import VARIANTS as SAMPLE_VARIANTS

#: the builder is unetkit.sample's (shared with `make demo` and the benchmarks); these names are its tiny size
TINY_CHANNELS = BASE["tiny"]["block_out_channels"]

#: variant name -> config overrides of the tiny SD1.5-topology config
VARIANTS: dict[str, dict] = copy.deepcopy(SAMPLE_VARIANTS["tiny"])

FULL_SD15 = copy.deepcopy(BASE["full"])


def tiny_config(variant: str = "sd1.x") -> dict:
    return variant_overrides(variant, "tiny")


def tiny_unet(variant: str = "sd1.x", seed: int = 0) -> UNet2DConditionModel:
    """A tiny UNet with every weight random (diffusers zero-inits some layers; random makes tests sharper)."""
    torch.manual_seed(seed)  # as before: torch's global generator is left seeded for whatever draws from it next
    return build_unet(variant, "tiny", seed=seed)


def keymap_for(model: UNet2DConditionModel) -> KeyMap:
    return KeyMap.for_topology(Topology.from_config(model.config))


def ldm_state(model: UNet2DConditionModel, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    km = keymap_for(model)
    return {prefix + km.to_ldm(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save_ldm(model: UNet2DConditionModel, path: Path, prefix: str = "model.diffusion_model.", extra=None) -> Path:
    sd = ldm_state(model, prefix)
    sd.update(extra or {})
    save_file(sd, str(path))
    return path


def inputs(model: UNet2DConditionModel, seed: int = 1, size: int = 16) -> dict:
    return example_inputs(model, size=size, tokens=7, seed=seed, timestep=500)


@torch.no_grad()
def forward(model: UNet2DConditionModel, args: dict) -> torch.Tensor:
    def cast(v):
        if isinstance(v, dict):
            return {k: cast(x) for k, x in v.items()}
        return v.to(model.dtype) if v.is_floating_point() else v

    return model(**{k: cast(v) for k, v in args.items()}).sample


def no_temp_files(folder: Path) -> bool:
    return not any(".unetkit-tmp-" in p.name or ".unetkit-old-" in p.name for p in folder.iterdir())
