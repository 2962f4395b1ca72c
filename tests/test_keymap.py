import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from helpers import FULL_SD15, VARIANTS, ldm_state, tiny_unet
from unetkit.errors import KeyMapError
from unetkit.keymap import COND_PROJ, KeyMap, Topology, build_pairs


def meta_unet(**cfg):
    with torch.device("meta"):
        return UNet2DConditionModel(**cfg)


@pytest.mark.parametrize("lcm, expected", [(False, 686), (True, 687)])
def test_full_size_sd15_key_set(lcm, expected):
    cfg = dict(FULL_SD15, time_cond_proj_dim=256 if lcm else None)
    model = meta_unet(**cfg)
    keys = set(model.state_dict())
    km = KeyMap.for_topology(Topology.from_config(model.config))
    assert len(keys) == expected
    assert set(km.diffusers_to_ldm) == keys
    assert len(km.ldm_to_diffusers) == expected
    assert sum(p.numel() for p in model.parameters()) == 859_520_964 + (256 * 320 if lcm else 0)


def test_full_size_sd2_key_set():
    model = meta_unet(
        block_out_channels=[320, 640, 1280, 1280],
        cross_attention_dim=1024,
        attention_head_dim=[5, 10, 20, 20],
        use_linear_projection=True,
    )
    km = KeyMap.for_topology(Topology.from_config(model.config))
    assert set(km.diffusers_to_ldm) == set(model.state_dict())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_topology_from_names_equals_topology_from_config(variant):
    model = tiny_unet(variant)
    topo = Topology.from_config(model.config)
    km = KeyMap.for_topology(topo)
    assert Topology.from_diffusers_names(model.state_dict()) == topo
    assert Topology.from_ldm_names(km.ldm_to_diffusers) == topo


def test_map_is_checked_bijective():
    with pytest.raises(KeyMapError, match="produced twice"):
        KeyMap([("a.weight", "x.weight"), ("a.weight", "y.weight")])
    with pytest.raises(KeyMapError, match="produced twice"):
        KeyMap([("a.weight", "x.weight"), ("b.weight", "x.weight")])


def test_two_digit_block_indices_are_not_confused():
    # input_blocks.1 vs input_blocks.10/11 and output_blocks.1 vs 10/11: exact lookups only
    topo = Topology.from_config(meta_unet(**FULL_SD15).config)
    km = KeyMap.for_topology(topo)
    assert km.to_diffusers("input_blocks.1.0.in_layers.0.weight") == "down_blocks.0.resnets.0.norm1.weight"
    assert km.to_diffusers("input_blocks.10.0.in_layers.0.weight") == "down_blocks.3.resnets.0.norm1.weight"
    assert km.to_diffusers("output_blocks.11.1.proj_in.weight") == "up_blocks.3.attentions.2.proj_in.weight"
    assert km.to_diffusers("output_blocks.2.1.conv.weight") == "up_blocks.0.upsamplers.0.conv.weight"
    assert km.to_diffusers("output_blocks.5.2.conv.weight") == "up_blocks.1.upsamplers.0.conv.weight"
    assert km.to_diffusers("input_blocks.1") is None


def test_lcm_cond_proj_mapped_both_ways_with_alias():
    km = KeyMap.for_topology(Topology.from_config(meta_unet(**FULL_SD15, time_cond_proj_dim=256).config))
    assert km.to_ldm(COND_PROJ) == "time_embedding.cond_proj.weight"
    assert km.to_diffusers("time_embed.cond_proj.weight") == COND_PROJ
    assert km.to_diffusers(COND_PROJ) == COND_PROJ


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_diffusers_own_converter(variant):
    """diffusers' convert_ldm_unet_checkpoint is an independent oracle for the LDM -> diffusers direction."""
    model = tiny_unet(variant)
    ldm = ldm_state(model)
    theirs = convert_ldm_unet_checkpoint(dict(ldm), model.config)
    km = KeyMap.for_topology(Topology.from_config(model.config))
    ours = {km.to_diffusers(k.removeprefix("model.diffusion_model.")): v for k, v in ldm.items()}
    dropped = set(ours) - set(theirs)
    # diffusers drops LCM's cond_proj silently (the bug unetkit exists to fix); everything else must agree
    assert dropped == ({COND_PROJ} if variant.endswith("lcm") else set())
    assert set(theirs) <= set(ours)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


@pytest.mark.parametrize("variant, n_keys, deepest", [("sdxl", 1680, 9), ("sdxl-refiner", 1220, 3)])
def test_full_size_sdxl_key_table_matches_diffusers_converter_on_meta(variant, n_keys, deepest):
    """The full-size SDXL base and refiner: diffusers' converter moves each LDM tensor object to exactly the
    diffusers name our table gives it (identity, on the meta device: nothing allocated, nothing downloaded)."""
    from unetkit.sample import build_unet

    model = build_unet(variant, "full", device="meta")
    km = KeyMap.for_topology(Topology.from_config(model.config))
    ldm = {"model.diffusion_model." + km.to_ldm(k): v for k, v in model.state_dict().items()}
    origin = {id(v): k.removeprefix("model.diffusion_model.") for k, v in ldm.items()}
    theirs = convert_ldm_unet_checkpoint(dict(ldm), model.config)
    assert len(theirs) == len(km) == n_keys and set(theirs) == set(model.state_dict())
    assert all(origin[id(v)] == km.to_ldm(k) for k, v in theirs.items())
    assert km.to_ldm("add_embedding.linear_1.weight") == "label_emb.0.0.weight"
    assert km.to_ldm("add_embedding.linear_2.bias") == "label_emb.0.2.bias"
    # the deep stacks (base: 10, refiner: 4), at the last attention of the last attention level
    deep = f"transformer_blocks.{deepest}.attn2.to_k.weight"
    assert km.to_diffusers(f"input_blocks.8.1.{deep}") == f"down_blocks.2.attentions.1.{deep}"


def test_pairs_are_in_model_order_and_unique():
    topo = Topology.from_config(meta_unet(**FULL_SD15).config)
    pairs = build_pairs(topo)
    assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs) == 686
    assert pairs[0][1].startswith("time_embedding") and pairs[-1][1] == "conv_out.bias"


@pytest.mark.parametrize(
    "cfg",
    [
        FULL_SD15,
        dict(FULL_SD15, time_cond_proj_dim=256, in_channels=9),
        dict(
            block_out_channels=[320, 640, 1280, 1280],
            cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True,
        ),
        *[
            {**dict(block_out_channels=[32, 64, 128, 128], cross_attention_dim=64, attention_head_dim=8), **v}
            for v in VARIANTS.values()
        ],
    ],
    ids=["sd15", "sd15-inpaint-lcm", "sd2", *[f"tiny-{v}" for v in VARIANTS]],
)
def test_expected_shapes_equal_diffusers_model(cfg):
    """spec.expected_shapes computes shapes without diffusers; diffusers' own model is the oracle."""
    from unetkit.spec import expected_shapes

    model = meta_unet(**cfg)
    assert expected_shapes(model.config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_demo_default_config_is_complete():
    """`make demo` on a fresh machine writes its default from SD15_LCM alone: every LCM key, SD1.5 shapes."""
    from unetkit.demo import SD15_LCM
    from unetkit.keymap import KeyMap, Topology
    from unetkit.spec import build_model, expected_shapes

    shapes = expected_shapes(SD15_LCM)
    assert len(shapes) == 687 and "time_embedding.cond_proj.weight" in shapes
    KeyMap.for_topology(Topology.from_config(SD15_LCM))
    model = build_model(SD15_LCM)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
