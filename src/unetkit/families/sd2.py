"""SD2.x: Stable Diffusion 2.x UNets (2.0/2.1 base and 768-v, inpainting, depth, their fine-tunes).

Recognised by linear projections around every spatial transformer (``proj_in`` is 2-D). Heads of 64 channels.
Latent size 96 (768 px). The 768-v models predict v but carry no marker for it: the default stays epsilon, as in
every tool, and a probe can tell."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from unetkit.families.base import SD_FIXED, Family, Shape, sd_base_config, uses_linear_projection
from unetkit.keymap.topology import Topology


class SD2Family(Family):
    def claims(self, topo: Topology, shapes: Mapping[str, Shape]) -> bool:
        return not topo.has_add_embedding and uses_linear_projection(topo, shapes)

    def claims_config(self, config: Mapping[str, Any]) -> bool:
        return bool(config.get("use_linear_projection")) and not config.get("addition_embed_type")

    def infer_config(self, topo: Topology, shapes: Mapping[str, Shape]) -> tuple[dict[str, Any], list[str]]:
        config = {"sample_size": self.sample_size, **sd_base_config(topo, shapes, self.fixed_config)}
        heads = [max(1, c // 64) for c in config["block_out_channels"]]
        config["attention_head_dim"] = heads
        config["upcast_attention"] = False
        assumptions = [
            "norm_num_groups=32 (GroupNorm group count is not stored in weights; SD1.x/2.x use 32)",
            f"attention_head_dim={heads} (heads of 64 channels, the SD2.x convention; not stored in weights)",
            "upcast_attention=False (SD2.1-768 sets True; it changes fp16 compute only)",
            f"sample_size={self.sample_size} (the default latent size; not stored in weights)",
        ]
        return config, assumptions


SD2 = SD2Family(
    name="sd2",
    title="SD2.x",
    # ComfyUI-GGUF's loader accepts only the architectures of its IMG_ARCH_LIST, which has "sd1" and no "sd2";
    # ComfyUI then tells SD2 from SD1 by the tensors' shapes (linear projections, 1024-wide context).
    gguf_architecture="sd1",
    prediction_type="epsilon",
    fixed_config=SD_FIXED,
    sample_size=96,
)
