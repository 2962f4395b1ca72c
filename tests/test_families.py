"""The families seam: each family is detected from names and shapes alone, infers exactly the config diffusers
builds, names its variants, sensitive modules and GGUF architecture; nothing else decides what a family is."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from helpers import FULL_SD15, VARIANTS, save_ldm, tiny_config, tiny_unet
from unetkit import families
from unetkit.errors import ModelDetectionError
from unetkit.keymap import Topology
from unetkit.resolve import open_unet
from unetkit.sample import unet_config
from unetkit.spec import clean_config, infer_config

FULL_SD2 = dict(
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
    upcast_attention=False,
)
#: config -> (family, variant), at tiny and full size (full size on the meta device)
CASES = {
    **{f"tiny-{v}": (tiny_config(v), v.split(".")[0].split("-")[0], v) for v in VARIANTS},
    "full-sd15": (FULL_SD15, "sd1", "sd1.x"),
    "full-sd15-lcm": ({**FULL_SD15, "time_cond_proj_dim": 256}, "sd1", "sd1.x-lcm"),
    "full-sd2": (FULL_SD2, "sd2", "sd2.x"),
    "full-sd2-depth": ({**FULL_SD2, "in_channels": 5}, "sd2", "sd2.x-depth"),
    **{f"full-{v}": (unet_config(v, "full"), "sdxl", v) for v in ("sdxl", "sdxl-refiner", "sdxl-inpainting")},
}


def _shapes(cfg: dict) -> tuple[Topology, dict]:
    with torch.device("meta"):
        model = UNet2DConditionModel(**cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return Topology.from_diffusers_names(shapes), shapes


@pytest.mark.parametrize("case", list(CASES))
def test_detect_infer_and_name_the_variant(case):
    cfg, family_name, variant = CASES[case]
    topo, shapes = _shapes(cfg)
    family, config, assumptions = infer_config(topo, shapes)
    assert family.name == family_name and family is families.named(family_name)
    assert family.variant(config) == variant
    assert families.for_config(config) is family
    assert assumptions and all(isinstance(a, str) for a in assumptions)
    with torch.device("meta"):
        rebuilt = UNet2DConditionModel(**clean_config(config))
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
    for key in (
        "in_channels",
        "cross_attention_dim",
        "use_linear_projection",
        "block_out_channels",
        "time_cond_proj_dim",
    ):
        assert config.get(key) == rebuilt.config[key] == dict(cfg).get(key, rebuilt.config[key]), key


def test_exactly_one_family_claims_each_unet():
    for cfg, _, _ in CASES.values():
        topo, shapes = _shapes(cfg)
        assert sum(f.claims(topo, shapes) for f in families.FAMILIES) == 1


def test_sensitive_modules_come_from_the_family():
    for family in families.FAMILIES:
        for module in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.cond_proj"):
            assert family.sensitive_reason(module), (family.name, module)
        assert bool(family.sensitive_reason("add_embedding.linear_1")) == (family.name == "sdxl")
        for module in ("down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.proj_in"):
            assert family.sensitive_reason(module) is None


def test_gguf_architecture_is_the_one_comfyui_gguf_accepts():
    # ComfyUI-GGUF's loader accepts "sd1" for SD1 and SD2 alike (its IMG_ARCH_LIST has no "sd2"), and "sdxl"
    archs = {f.name: f.gguf_architecture for f in families.FAMILIES}
    assert archs == {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl"}


def test_sd_families_refuse_deep_transformer_stacks():
    cfg = {**tiny_config("sd1.x"), "transformer_layers_per_block": 2}
    topo, shapes = _shapes(cfg)
    with pytest.raises(ModelDetectionError, match="transformer depths"):
        infer_config(topo, shapes)


def test_topology_reads_deep_stacks_from_names():
    cfg = {**tiny_config("sd1.x"), "transformer_layers_per_block": [1, 2, 3, 1]}
    topo, _ = _shapes(cfg)
    assert topo.down_attention == (1, 2, 3, 0) and topo.up_attention == (0, 3, 2, 1)
    with torch.device("meta"):
        assert topo == Topology.from_config(UNet2DConditionModel(**cfg).config)


def test_unknown_family_and_config_are_clear_errors():
    with pytest.raises(ModelDetectionError, match="unknown model family 'sd3'"):
        families.named("sd3")
    with pytest.raises(ModelDetectionError, match="no UNet of a known family"):
        families.for_config({**FULL_SD15, "addition_embed_type": "image"})


def test_the_spec_records_the_family(tmp_path):
    src = open_unet(save_ldm(tiny_unet("sd2.x"), tmp_path / "m.safetensors"))
    assert src.spec.family == "sd2" and src.spec.model_family is families.named("sd2")
    assert src.spec.model_family.prediction_type == "epsilon"
