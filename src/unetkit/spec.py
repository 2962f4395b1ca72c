"""UNetSpec: layout, variant and a complete diffusers config, inferred from tensor names and shapes alone.

No Hub, no yaml, no network. What the weights cannot tell (GroupNorm group count, attention head count,
sample size) is filled with the SD1.x/2.x convention and listed in ``assumptions``; a config stored by unetkit in
the file's metadata, a diffusers ``config.json`` or one given by the user takes precedence and is checked
against every tensor shape."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from unetkit.errors import ModelDetectionError
from unetkit.keymap.topology import COND_PROJ, Topology

Shape = tuple[int, ...]

LDM_MARKERS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")
DIFFUSERS_MARKERS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "time_embedding.linear")

#: What other files look like, to say what a refused file is instead of "unknown".
LOOKS_LIKE = (
    (("label_emb.", "add_embedding.", "conditioner."), "an SDXL UNet or checkpoint (label_emb / add_embedding present)"),
    (("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.", "quant_conv."), "a VAE"),
    (("text_model.", "transformer.text_model.", "token_embedding."), "a CLIP text encoder"),
    (("lora_unet_", "lora_te_", "lora_down", ".lora_A.", ".lora_B."), "a LoRA"),
    (("double_blocks.", "single_blocks."), "a Flux transformer"),
    (("joint_blocks.",), "an SD3 MMDiT"),
    (("control_model.", "zero_convs.", "input_hint_block."), "a ControlNet"),
)

#: Config fields fixed by every SD1.x/2.x UNet (and not readable from weights).
SD_FIXED: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "downsample_padding": 1,
}

VARIANT_BY_IN_CHANNELS = {4: "", 5: "depth", 8: "pix2pix", 9: "inpainting"}


@dataclass
class UNetSpec:
    layout: str  # "ldm" | "diffusers"
    family: str  # "sd1" | "sd2"
    variant: str  # e.g. "sd1.x", "sd1.x-inpainting", "sd1.x-lcm", "sd2.x"
    config: dict[str, Any]  # complete UNet2DConditionModel config (init arguments only)
    config_source: str  # "inferred" | "file metadata" | "config.json" | "user"
    topology: Topology
    assumptions: list[str] = field(default_factory=list)

    @property
    def time_cond_proj_dim(self) -> int | None:
        return self.config.get("time_cond_proj_dim")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "family": self.family,
            "variant": self.variant,
            "config_source": self.config_source,
            "assumptions": list(self.assumptions),
            "config": self.config,
        }


def detect_layout(names: Iterable[str], all_keys: Iterable[str] = (), where: str = "") -> str:
    """'ldm' or 'diffusers' from prefix-free names; otherwise say what the file looks like."""
    names = list(names)
    is_ldm = any(n.startswith(LDM_MARKERS) for n in names if n != COND_PROJ)
    is_diffusers = any(n.startswith(DIFFUSERS_MARKERS) for n in names)
    seen = list(all_keys) or names
    for markers, what in LOOKS_LIKE[:1]:
        if any(m in k for k in seen for m in markers):
            raise ModelDetectionError(f"{where}looks like {what}; unetkit handles SD1.x/SD2.x UNets only")
    if is_ldm and is_diffusers:
        raise ModelDetectionError(f"{where}mixes LDM names (input_blocks.*) and diffusers names (down_blocks.*)")
    if is_ldm:
        return "ldm"
    if is_diffusers:
        return "diffusers"
    guess = next((what for markers, what in LOOKS_LIKE if any(m in k for k in seen for m in markers)), None)
    sample = ", ".join(sorted(seen)[:5]) or "no tensors at all"
    raise ModelDetectionError(
        f"{where}not a UNet: no input_blocks.* / down_blocks.* tensors"
        + (f"; this looks like {guess}" if guess else "")
        + f" (first keys: {sample})"
    )


def infer_config(topo: Topology, shapes: Mapping[str, Shape]) -> tuple[dict[str, Any], list[str]]:
    """A complete SD1.x/2.x config from the topology and tensor shapes (keyed by diffusers name)."""
    topo.check_supported()
    n = topo.n_blocks

    def shape(name: str) -> Shape:
        if name not in shapes:
            raise ModelDetectionError(f"cannot infer the UNet config: tensor {name!r} is missing")
        return shapes[name]

    channels = [shape(f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(n)]
    conv_in, conv_out = shape("conv_in.weight"), shape("conv_out.weight")
    attn = next((f"down_blocks.{i}.attentions.0." for i in range(n) if topo.down_attention[i]), "mid_block.attentions.0.")
    cross_dim = shape(attn + "transformer_blocks.0.attn2.to_k.weight")[1]
    linear_proj = len(shape(attn + "proj_in.weight")) == 2
    family = "sd2" if linear_proj else "sd1"
    config: dict[str, Any] = {
        "sample_size": 96 if family == "sd2" else 64,
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in topo.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in topo.up_attention],
        "block_out_channels": channels,
        "layers_per_block": topo.layers_per_block,
        "cross_attention_dim": cross_dim,
        "use_linear_projection": linear_proj,
        "norm_num_groups": 32,
        "conv_in_kernel": conv_in[2] if len(conv_in) == 4 else 3,
        "conv_out_kernel": conv_out[2] if len(conv_out) == 4 else 3,
        **SD_FIXED,
    }
    assumptions = ["norm_num_groups=32 (GroupNorm group count is not stored in weights; SD1.x/2.x use 32)"]
    if family == "sd1":
        config["attention_head_dim"] = 8
        assumptions.append("attention_head_dim=8 heads (head count is not stored in weights; SD1.x uses 8)")
    else:
        config["attention_head_dim"] = [max(1, c // 64) for c in channels]
        config["upcast_attention"] = False
        assumptions.append(
            f"attention_head_dim={config['attention_head_dim']} (heads of 64 channels, the SD2.x convention; "
            "not stored in weights)"
        )
        assumptions.append("upcast_attention=False (SD2.1-768 sets True; it changes fp16 compute only)")
    assumptions.append(f"sample_size={config['sample_size']} (the default latent size; not stored in weights)")
    temb = shape("time_embedding.linear_1.weight")[0]
    if temb != 4 * channels[0]:
        config["time_embedding_dim"] = temb
    if topo.has_cond_proj:
        config["time_cond_proj_dim"] = shape(COND_PROJ)[1]
    return config, assumptions


def family_of(config: Mapping[str, Any]) -> str:
    return "sd2" if config.get("use_linear_projection") else "sd1"


def variant_of(config: Mapping[str, Any], where: str = "") -> str:
    family = family_of(config)
    in_ch = config.get("in_channels", 4)
    if in_ch not in VARIANT_BY_IN_CHANNELS:
        raise ModelDetectionError(
            f"{where}conv_in takes {in_ch} input channels; supported: 4 (text-to-image), 5 (SD2 depth), "
            "8 (instruct-pix2pix), 9 (inpainting)"
        )
    parts = [f"{family[:2]}{family[2:]}.x"]
    if VARIANT_BY_IN_CHANNELS[in_ch]:
        parts.append(VARIANT_BY_IN_CHANNELS[in_ch])
    if config.get("time_cond_proj_dim"):
        parts.append("lcm")
    return "-".join(parts)


def clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only what UNet2DConditionModel's __init__ takes (drops _class_name, _diffusers_version, ...)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


def build_model(config: Mapping[str, Any], device: str | torch.device = "meta"):
    """``UNet2DConditionModel`` from ``config``; on the meta device it costs no memory."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel.from_config(clean_config(config))


@lru_cache(maxsize=16)
def _expected(config_json: str) -> tuple[tuple[str, Shape], ...]:
    model = build_model(json.loads(config_json))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def expected_shapes(config: Mapping[str, Any]) -> dict[str, Shape]:
    """Every state-dict key of the model ``config`` describes, with its shape (diffusers names)."""
    return dict(_expected(json.dumps(clean_config(config), sort_keys=True)))
