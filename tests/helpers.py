"""Tiny UNets with SD1.5's topology (channel multipliers 1, 2, 4, 4; two layers per block), so their key names
are exactly SD1.5's, built from configs: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from unetkit.keymap import KeyMap, Topology
from unetkit.sample import example_inputs

TINY_CHANNELS = [32, 64, 128, 128]

#: variant name -> config overrides of the tiny SD1.5-topology config
VARIANTS: dict[str, dict] = {
    "sd1.x": {},
    "sd1.x-inpainting": {"in_channels": 9},
    "sd1.x-pix2pix": {"in_channels": 8},
    "sd1.x-lcm": {"time_cond_proj_dim": 32},
    "sd2.x": {
        "use_linear_projection": True,
        "cross_attention_dim": 96,
        "attention_head_dim": [1, 1, 2, 2],
        "sample_size": 96,
        "upcast_attention": False,
    },
}

FULL_SD15 = dict(
    block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8, sample_size=64
)


def tiny_config(variant: str = "sd1.x") -> dict:
    cfg = dict(block_out_channels=TINY_CHANNELS, cross_attention_dim=64, attention_head_dim=8, sample_size=64)
    cfg.update(VARIANTS[variant])
    return cfg


def tiny_unet(variant: str = "sd1.x", seed: int = 0) -> UNet2DConditionModel:
    """A tiny UNet with every weight random (diffusers zero-inits some layers; random makes tests sharper)."""
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**tiny_config(variant)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if (name.endswith("weight") and "norm" in name) else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=g))
    return model


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
    return model(**{k: v.to(model.dtype) if v.is_floating_point() else v for k, v in args.items()}).sample


def no_temp_files(folder: Path) -> bool:
    return not any(".unetkit-tmp-" in p.name or ".unetkit-old-" in p.name for p in folder.iterdir())
