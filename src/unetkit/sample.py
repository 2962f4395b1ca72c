"""Example UNet inputs: seeded latents, timestep, text embeddings and, for LCM, the guidance embedding."""

from __future__ import annotations

from typing import Any

import torch


def example_inputs(unet: Any, size: int = 64, tokens: int = 77, seed: int = 0, timestep: int = 499,
                   batch: int = 1) -> dict[str, torch.Tensor]:
    """Keyword arguments for ``unet(**inputs)``, from its config: ``sample`` (batch, in_channels, size, size),
    ``timestep``, ``encoder_hidden_states`` (batch, tokens, cross_attention_dim) and ``timestep_cond`` when the UNet
    has LCM's ``time_cond_proj_dim``. Same seed, same tensors."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    args = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
        "timestep": torch.tensor([timestep] * batch),
        "encoder_hidden_states": torch.randn(batch, tokens, cfg.cross_attention_dim, generator=g),
    }
    if cfg.time_cond_proj_dim:
        args["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, generator=g)
    return args
