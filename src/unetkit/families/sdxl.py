"""SDXL: Stable Diffusion XL UNets (base 1.0 and its fine-tunes: Illustrious, Pony, NoobAI, Lightning, Turbo; the
refiner; SDXL inpainting).

Recognised by the "text_time" additional embedding: ``label_emb.0.*`` in LDM names, ``add_embedding.*`` in
diffusers names (pooled text embeddings and six size/crop time ids, each time id embedded in 256 channels).
Linear projections, heads of 64 channels, deep transformer stacks (base 0/2/10, refiner 0/4/4/0), latent size 128
(1024 px). The refiner has four levels of 384 channels and a 1280-wide context; its add embedding takes 2560 inputs
(five time ids: no target size, an aesthetic score instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from unetkit.errors import ModelDetectionError
from unetkit.families.base import (
    SD_FIXED,
    SD_SENSITIVE,
    Family,
    Shape,
    sd_base_config,
    shape_of,
)
from unetkit.keymap.topology import ADD_EMBEDDING, Topology

#: the pooled text embedding every SDXL UNet takes (OpenCLIP bigG's projection), beside the time ids
TEXT_EMBEDS_DIM = 1280
#: each time id's sinusoidal embedding width: not stored in weights; every SDXL UNet uses 256
ADDITION_TIME_EMBED_DIM = 256
#: time ids (original size, crop, target size or aesthetic score): base 6, refiner 5
TIME_IDS = {6: "", 5: "refiner"}

SDXL_SENSITIVE = (
    *SD_SENSITIVE,
    (
        "add_embedding",
        "sensitive layer: the add embedding (pooled text + size conditioning) conditions every block "
        "(ComfyUI-GGUF keeps label_emb high-precision too)",
    ),
)


class SDXLFamily(Family):
    def claims(self, topo: Topology, shapes: Mapping[str, Shape]) -> bool:
        return topo.has_add_embedding

    def claims_config(self, config: Mapping[str, Any]) -> bool:
        return config.get("addition_embed_type") == "text_time"

    def infer_config(self, topo: Topology, shapes: Mapping[str, Shape]) -> tuple[dict[str, Any], list[str]]:
        config = {"sample_size": self.sample_size, **sd_base_config(topo, shapes, self.fixed_config)}
        if not config["use_linear_projection"]:
            raise ModelDetectionError(
                "not an SDXL UNet: an add embedding (label_emb) but 1x1-conv transformer projections "
                "(every SDXL UNet has linear ones)"
            )
        heads = [max(1, c // 64) for c in config["block_out_channels"]]
        # diffusers reads the mid block's depth from the last entry; blocks without attention keep the default 1;
        # one int when every stack has the same depth (as the refiner's own config says)
        depths = [d or 1 for d in topo.down_attention[:-1]] + [topo.mid_attention or 1]
        stacks = {d for d in topo.down_attention if d} | {topo.mid_attention}
        in_dim = shape_of(shapes, ADD_EMBEDDING)[1]
        config.update(
            attention_head_dim=heads,
            transformer_layers_per_block=stacks.pop() if len(stacks) == 1 else depths,
            addition_embed_type="text_time",
            addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=in_dim,
            upcast_attention=False,
        )
        n_ids = time_ids(config)
        assumptions = [
            "norm_num_groups=32 (GroupNorm group count is not stored in weights; SDXL uses 32)",
            f"attention_head_dim={heads} (heads of 64 channels, the SDXL convention; not stored in weights)",
            f"addition_time_embed_dim={ADDITION_TIME_EMBED_DIM} (not stored in weights; every SDXL UNet uses it): "
            f"{n_ids} time ids beside {TEXT_EMBEDS_DIM} pooled text channels make the {in_dim} inputs",
            f"sample_size={self.sample_size} (the default latent size; not stored in weights)",
        ]
        return config, assumptions

    def variant(self, config: Mapping[str, Any], where: str = "") -> str:
        """'sdxl', 'sdxl-inpainting', 'sdxl-refiner', 'sdxl-lcm', ..."""
        plain = super().variant(config, where)  # 'sdxl.x-inpainting-lcm': checks the input channels
        parts = [self.name, *plain.split("-")[1:]]
        kind = TIME_IDS.get(time_ids(config), "")
        if kind:
            parts.insert(1, kind)
        return "-".join(parts)

    def added_cond_kwargs(self, config: Mapping[str, Any], batch: int, generator: Any) -> dict[str, Any] | None:
        """Seeded pooled text embeddings ``text_embeds`` (batch, 1280) and ``time_ids`` (batch, 6 or 5) as the
        pipelines make them: original size and target size of 1024 px, no crop (the refiner: an aesthetic score
        of 6 in place of the target size)."""
        import torch

        n = time_ids(config)
        ids = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0] if n == 6 else [1024.0, 1024.0, 0.0, 0.0, 6.0][:n]
        return {
            "text_embeds": torch.randn(batch, TEXT_EMBEDS_DIM, generator=generator),
            "time_ids": torch.tensor([ids + [0.0] * (n - len(ids))] * batch),
        }


def time_ids(config: Mapping[str, Any]) -> int:
    """How many time ids the add embedding takes beside the pooled text embedding."""
    in_dim = _get(config, "projection_class_embeddings_input_dim")
    per = _get(config, "addition_time_embed_dim") or ADDITION_TIME_EMBED_DIM
    if not in_dim or in_dim <= TEXT_EMBEDS_DIM or (in_dim - TEXT_EMBEDS_DIM) % per:
        raise ModelDetectionError(
            f"an SDXL add embedding takes {TEXT_EMBEDS_DIM} pooled text channels plus time ids of {per} channels "
            f"each; projection_class_embeddings_input_dim={in_dim!r} is not that"
        )
    return (in_dim - TEXT_EMBEDS_DIM) // per


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


SDXL = SDXLFamily(
    name="sdxl",
    title="SDXL",
    gguf_architecture="sdxl",  # ComfyUI-GGUF's name; stable-diffusion.cpp tells SDXL from the tensors
    prediction_type="epsilon",
    fixed_config=SD_FIXED,
    sample_size=128,
    sensitive=SDXL_SENSITIVE,
    max_transformer_depth=10,
)
