"""SD1.x: Stable Diffusion 1.x UNets (1.4, 1.5 and their fine-tunes, inpainting, instruct-pix2pix, LCM distillations).

Recognised by 1x1-conv projections around every spatial transformer (``proj_in`` is 4-D). Heads: 8 (a count, not a
size). Latent size 64 (512 px)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from unetkit.families.base import SD_FIXED, Family, Shape, sd_base_config, uses_linear_projection
from unetkit.keymap.topology import Topology


class SD1Family(Family):
    def claims(self, topo: Topology, shapes: Mapping[str, Shape]) -> bool:
        return not topo.has_add_embedding and not uses_linear_projection(topo, shapes)

    def claims_config(self, config: Mapping[str, Any]) -> bool:
        return not config.get("use_linear_projection") and not config.get("addition_embed_type")

    def infer_config(self, topo: Topology, shapes: Mapping[str, Shape]) -> tuple[dict[str, Any], list[str]]:
        config = {
            "sample_size": self.sample_size,
            **sd_base_config(topo, shapes, self.fixed_config),
            "attention_head_dim": 8,
        }
        assumptions = [
            "norm_num_groups=32 (GroupNorm group count is not stored in weights; SD1.x/2.x use 32)",
            "attention_head_dim=8 heads (head count is not stored in weights; SD1.x uses 8)",
            f"sample_size={self.sample_size} (the default latent size; not stored in weights)",
        ]
        return config, assumptions


SD1 = SD1Family(
    name="sd1",
    title="SD1.x",
    gguf_architecture="sd1",
    prediction_type="epsilon",
    fixed_config=SD_FIXED,
    sample_size=64,
)
