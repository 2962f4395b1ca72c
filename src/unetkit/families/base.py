"""What a model family is, in one place: :class:`Family`.

A family declares everything that differs between model families and that the rest of unetkit needs: how to
recognise its tensors, the config values its weights cannot tell, how to infer the rest from names and shapes, its
sensitive modules, its example inputs, its GGUF architecture string and its prediction-type default. (SD1.x and
SD2.x share the key table exactly; a family with keys of its own, SDXL's ``label_emb`` <-> ``add_embedding``, adds
them with its topology.) Nothing outside ``families/`` branches on a family's name: spec, key map, GGUF policy,
runtime backends, verify and the example inputs ask the family.

A family is frozen data plus a few methods; ``families/sd1.py`` and ``families/sd2.py`` are the examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from unetkit.errors import ModelDetectionError
from unetkit.keymap.topology import COND_PROJ, Topology

Shape = tuple[int, ...]

#: Config fields every SD-style UNet fixes and its weights cannot tell.
SD_FIXED: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "downsample_padding": 1,
}

#: The modules quantization hurts most, as (glob on diffusers module names, reason); shared by the GGUF policy
#: (which keeps them in F16) and the runtime backends (which keep them float). Norms are kept by a rule of their own.
SD_SENSITIVE: tuple[tuple[str, str], ...] = (
    ("conv_in", "sensitive layer: conv_in sees the raw latents (few parameters, large error impact)"),
    ("conv_out", "sensitive layer: conv_out writes the prediction (few parameters, large error impact)"),
    ("time_embedding", "sensitive layer: the time embedding (incl. LCM's cond_proj) conditions every block"),
)

#: conv_in's input channels -> variant suffix
SD_VARIANTS_BY_IN_CHANNELS: dict[int, str] = {4: "", 5: "depth", 8: "pix2pix", 9: "inpainting"}


@dataclass(frozen=True)
class Family:
    """One model family. Instances are registered in ``families/__init__.py``."""

    name: str  # "sd1": stored in metadata as unetkit.family
    title: str  # "SD1.x": what messages and variant names show
    gguf_architecture: str  # general.architecture of GGUF files (ComfyUI-GGUF's and sd.cpp's name)
    prediction_type: str  # the default when a file says nothing: "epsilon" or "v_prediction"
    fixed_config: Mapping[str, Any]
    sample_size: int  # the default latent size (not stored in weights)
    variants_by_in_channels: Mapping[int, str] = field(default_factory=lambda: dict(SD_VARIANTS_BY_IN_CHANNELS))
    sensitive: tuple[tuple[str, str], ...] = SD_SENSITIVE
    max_transformer_depth: int = 1

    # ------------------------------------------------------------------------------------------- detection
    def claims(self, topo: Topology, shapes: Mapping[str, Shape]) -> bool:
        """Whether tensors with this topology and these shapes (diffusers names) belong to this family."""
        raise NotImplementedError

    def claims_config(self, config: Mapping[str, Any]) -> bool:
        """Whether a complete diffusers config describes a UNet of this family."""
        raise NotImplementedError

    def check_topology(self, topo: Topology) -> None:
        """Refuse what this family's UNets never look like, saying what was seen."""
        depths = {*topo.down_attention, *topo.up_attention, topo.mid_attention}
        if max(depths) > self.max_transformer_depth:
            raise ModelDetectionError(
                f"not an {self.title} UNet: transformer depths {sorted(depths)} "
                f"(an {self.title} UNet has at most {self.max_transformer_depth} per block)"
            )

    # ------------------------------------------------------------------------------------------ the config
    def infer_config(self, topo: Topology, shapes: Mapping[str, Shape]) -> tuple[dict[str, Any], list[str]]:
        """A complete diffusers config from the topology and the shapes (diffusers names), and what was assumed."""
        raise NotImplementedError

    def variant(self, config: Mapping[str, Any], where: str = "") -> str:
        """'sd1.x', 'sd1.x-inpainting', 'sd2.x-depth', 'sd1.x-lcm', ..."""
        in_ch = config.get("in_channels", 4)
        if in_ch not in self.variants_by_in_channels:
            known = ", ".join(f"{c} ({v or 'text-to-image'})" for c, v in self.variants_by_in_channels.items())
            raise ModelDetectionError(f"{where}conv_in takes {in_ch} input channels; {self.title} UNets take {known}")
        parts = [self.name + ".x"]
        if self.variants_by_in_channels[in_ch]:
            parts.append(self.variants_by_in_channels[in_ch])
        if config.get("time_cond_proj_dim"):
            parts.append("lcm")
        return "-".join(parts)

    def sensitive_reason(self, module: str) -> str | None:
        """Why the module (diffusers name) is kept at high precision by default, or None when it is not."""
        from unetkit.globs import matches

        return next((reason for glob, reason in self.sensitive if matches(module, glob)), None)

    # ------------------------------------------------------------------------------------------ the inputs
    def added_cond_kwargs(self, config: Mapping[str, Any], batch: int, generator: Any) -> dict[str, Any] | None:
        """Extra conditioning the UNet's forward needs (SDXL: text_embeds, time_ids); None when it needs none."""
        return None


def shape_of(shapes: Mapping[str, Shape], name: str) -> Shape:
    if name not in shapes:
        raise ModelDetectionError(f"cannot infer the UNet config: tensor {name!r} is missing")
    return shapes[name]


def sd_base_config(topo: Topology, shapes: Mapping[str, Shape], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields every SD-style UNet reads from its weights the same way."""
    n = topo.n_blocks
    channels = [shape_of(shapes, f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(n)]
    conv_in, conv_out = shape_of(shapes, "conv_in.weight"), shape_of(shapes, "conv_out.weight")
    attn = first_attention(topo)
    config: dict[str, Any] = {
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in topo.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in topo.up_attention],
        "block_out_channels": channels,
        "layers_per_block": topo.layers_per_block,
        "cross_attention_dim": shape_of(shapes, attn + "transformer_blocks.0.attn2.to_k.weight")[1],
        "use_linear_projection": len(shape_of(shapes, attn + "proj_in.weight")) == 2,
        "norm_num_groups": 32,
        "conv_in_kernel": conv_in[2] if len(conv_in) == 4 else 3,
        "conv_out_kernel": conv_out[2] if len(conv_out) == 4 else 3,
        **fixed,
    }
    temb = shape_of(shapes, "time_embedding.linear_1.weight")[0]
    if temb != 4 * channels[0]:
        config["time_embedding_dim"] = temb
    if topo.has_cond_proj:
        config["time_cond_proj_dim"] = shape_of(shapes, COND_PROJ)[1]
    return config


def first_attention(topo: Topology) -> str:
    """The diffusers prefix of the first spatial transformer (the mid block's when no down block has one)."""
    return next(
        (f"down_blocks.{i}.attentions.0." for i in range(topo.n_blocks) if topo.down_attention[i]),
        "mid_block.attentions.0.",
    )


def uses_linear_projection(topo: Topology, shapes: Mapping[str, Shape]) -> bool:
    return len(shapes.get(first_attention(topo) + "proj_in.weight", ())) == 2
