"""UNetSpec: layout, family, variant and a complete diffusers config, inferred from tensor names and shapes alone.

No Hub, no yaml, no network. What the weights cannot tell (GroupNorm group count, attention head count, sample
size) is filled with the family's convention (``families/``) and listed in ``assumptions``; a config stored by
unetkit in the file's metadata, a diffusers ``config.json`` or one given by the user takes precedence and is checked
against every tensor shape. Importing this module imports no torch."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from unetkit import families
from unetkit.errors import ModelDetectionError
from unetkit.families.base import Family
from unetkit.keymap.topology import COND_PROJ, Topology, resnet_channels

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DConditionModel

Shape = tuple[int, ...]

LDM_MARKERS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")
DIFFUSERS_MARKERS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "time_embedding.linear")

#: Files that hold UNet-like names but are something else: refused by name before any layout is read.
NOT_A_UNET = (
    (
        ("lora_unet_", "lora_te_", "lora_down.", "lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up."),
        "a LoRA (low-rank adapter weights, not a UNet: apply it to a UNet with your pipeline's LoRA loader)",
    ),
    (
        ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.", "control_model.",
         "zero_convs.", "input_hint_block."),
        "a ControlNet (an adapter beside the UNet, not a UNet)",
    ),
)  # fmt: skip
#: What other files look like, to say what a refused file is instead of "unknown".
LOOKS_LIKE = (
    *NOT_A_UNET,
    (("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.", "quant_conv."), "a VAE"),
    (("text_model.", "transformer.text_model.", "token_embedding."), "a CLIP text encoder"),
    (("double_blocks.", "single_blocks."), "a Flux transformer"),
    (("joint_blocks.",), "an SD3 MMDiT"),
)


@dataclass
class UNetSpec:
    layout: str  # "ldm" | "diffusers"
    family: str  # a family's name: "sd1" | "sd2" | "sdxl" (see unetkit.families)
    variant: str  # e.g. "sd1.x", "sd1.x-inpainting", "sd1.x-lcm", "sd2.x", "sdxl", "sdxl-refiner"
    config: dict[str, Any]  # complete UNet2DConditionModel config (init arguments only)
    config_source: str  # "inferred" | "file metadata" | "config.json" | "user"
    topology: Topology
    assumptions: list[str] = field(default_factory=list)

    @property
    def model_family(self) -> Family:
        return families.named(self.family)

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
    for markers, what in NOT_A_UNET:
        if any(m in k for k in seen for m in markers):
            raise ModelDetectionError(f"{where}this is {what}; unetkit reads {families.TITLES} UNets")
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


def infer_config(topo: Topology, shapes: Mapping[str, Shape]) -> tuple[Family, dict[str, Any], list[str]]:
    """The family, a complete config and the assumptions made, from the topology and tensor shapes (diffusers
    names): the family is detected, then asked."""
    family = families.detect(topo, shapes)
    config, assumptions = family.infer_config(topo, shapes)
    return family, config, assumptions


def family_of(config: Mapping[str, Any]) -> str:
    return families.for_config(config).name


def variant_of(config: Mapping[str, Any], where: str = "") -> str:
    return families.for_config(config).variant(config, where)


def clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only what UNet2DConditionModel's __init__ takes (drops _class_name, _diffusers_version, ...)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


def build_model(config: Mapping[str, Any], device: str | torch.device = "meta") -> UNet2DConditionModel:
    """``UNet2DConditionModel`` from ``config``; on the meta device it costs no memory."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel.from_config(clean_config(config))


def expected_shapes(config: Mapping[str, Any]) -> dict[str, Shape]:
    """Every state-dict key of ``UNet2DConditionModel(**config)`` with its shape (diffusers names), computed from
    the config alone (no diffusers import, no model), for every family (SD1.x, SD2.x, SDXL). Tested equal to
    diffusers' own model for every variant and at full size."""
    return dict(_expected(json.dumps(clean_config(config), sort_keys=True)))


@lru_cache(maxsize=16)
def _expected(config_json: str) -> tuple[tuple[str, Shape], ...]:
    cfg = json.loads(config_json)
    topo = Topology.from_config(cfg)
    channels = list(cfg["block_out_channels"])
    n = len(channels)
    c0 = channels[0]
    temb = cfg.get("time_embedding_dim") or 4 * c0
    cross = cfg.get("cross_attention_dim", 1280)
    linear = bool(cfg.get("use_linear_projection", False))
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
    k_in, k_out = cfg.get("conv_in_kernel", 3), cfg.get("conv_out_kernel", 3)
    out: dict[str, Shape] = {}

    def conv(name: str, o: int, i: int, k: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (o, i, k, k), (o,)

    def lin(name: str, o: int, i: int, bias: bool = True) -> None:
        out[f"{name}.weight"] = (o, i)
        if bias:
            out[f"{name}.bias"] = (o,)

    def norm(name: str, c: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def resnet(name: str, i: int, o: int) -> None:
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", o, i, 3)
        lin(f"{name}.time_emb_proj", o, temb)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.conv_shortcut", o, i, 1)

    def attention(name: str, c: int, n_heads: int, depth: int) -> None:
        inner = n_heads * (c // n_heads)
        norm(f"{name}.norm", c)
        lin(f"{name}.proj_in", inner, c) if linear else conv(f"{name}.proj_in", inner, c, 1)
        for t in range(depth):
            b = f"{name}.transformer_blocks.{t}"
            for a, kv in (("attn1", inner), ("attn2", cross)):
                lin(f"{b}.{a}.to_q", inner, inner, bias=False)
                lin(f"{b}.{a}.to_k", inner, kv, bias=False)
                lin(f"{b}.{a}.to_v", inner, kv, bias=False)
                lin(f"{b}.{a}.to_out.0", inner, inner)
            for k in ("norm1", "norm2", "norm3"):
                norm(f"{b}.{k}", inner)
            lin(f"{b}.ff.net.0.proj", 8 * inner, inner)  # GEGLU: two halves of 4 * inner
            lin(f"{b}.ff.net.2", inner, 4 * inner)
        lin(f"{name}.proj_out", c, inner) if linear else conv(f"{name}.proj_out", c, inner, 1)

    conv("conv_in", c0, cfg.get("in_channels", 4), k_in)
    lin("time_embedding.linear_1", temb, c0)
    if cfg.get("time_cond_proj_dim"):
        lin("time_embedding.cond_proj", c0, cfg["time_cond_proj_dim"], bias=False)
    lin("time_embedding.linear_2", temb, temb)
    if topo.has_add_embedding:
        lin("add_embedding.linear_1", temb, cfg["projection_class_embeddings_input_dim"])
        lin("add_embedding.linear_2", temb, temb)
    down_io, up_io = resnet_channels(cfg)
    for i in range(n):
        for j, (ci, co) in enumerate(down_io[i]):
            resnet(f"down_blocks.{i}.resnets.{j}", ci, co)
            if topo.down_attention[i]:
                attention(f"down_blocks.{i}.attentions.{j}", co, heads[i], topo.down_attention[i])
        if i < n - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", channels[i], channels[i], 3)
    rev_heads = list(reversed(heads))
    for i in range(n):
        for j, (ci, co) in enumerate(up_io[i]):
            resnet(f"up_blocks.{i}.resnets.{j}", ci, co)
            if topo.up_attention[i]:
                attention(f"up_blocks.{i}.attentions.{j}", co, rev_heads[i], topo.up_attention[i])
        if i < n - 1:
            c = up_io[i][-1][1]
            conv(f"up_blocks.{i}.upsamplers.0.conv", c, c, 3)
    cm = channels[-1]
    if topo.mid_attention:
        attention("mid_block.attentions.0", cm, heads[-1], topo.mid_attention)
    resnet("mid_block.resnets.0", cm, cm)
    resnet("mid_block.resnets.1", cm, cm)
    norm("conv_norm_out", c0)
    conv("conv_out", cfg.get("out_channels", 4), c0, k_out)
    return tuple(out.items())


def diffusers_config_json(config: Mapping[str, Any]) -> str:
    """The ``config.json`` of a diffusers UNet folder (what ``save_config`` writes), without importing diffusers."""
    import importlib.metadata  # 0.04 s of start-up: imported when a config.json is written

    try:
        version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        version = "0.30.0"
    body = {"_class_name": "UNet2DConditionModel", "_diffusers_version": version, **clean_config(config)}
    return json.dumps(body, indent=2, sort_keys=True) + "\n"
