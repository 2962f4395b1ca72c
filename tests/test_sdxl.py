"""SDXL, read in every form people have it, from names and shapes alone (no Hub): full single-file checkpoints with
their text encoders and VAE, UNet-only files under any prefix, diffusers folders. Base, refiner and inpainting.
(Round trips and forwards of every tiny variant, SDXL included, are in test_roundtrip.py; the key table against
diffusers' own converter in test_keymap.py; GGUF in test_sdxl_gguf.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from helpers import forward, inputs, ldm_state, save_ldm, tiny_config, tiny_unet
from unetkit import load_unet
from unetkit.cli.app import main
from unetkit.conversion import convert
from unetkit.errors import KeyMapError, ModelDetectionError
from unetkit.resolve import open_unet

XL = ("sdxl", "sdxl-refiner", "sdxl-inpainting")

#: what a full SDXL checkpoint holds beside the UNet (one key of each part is enough to be recognised)
FULL_CHECKPOINT_EXTRAS = {
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(4).reshape(1, 4),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(8),
    "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
    "first_stage_model.decoder.conv_out.bias": torch.zeros(3),
}


@pytest.fixture(scope="module")
def xl_models():
    return {v: tiny_unet(v) for v in XL}


@pytest.mark.parametrize("variant", XL)
def test_a_full_single_file_checkpoint_is_read_with_its_encoders_ignored(variant, xl_models, tmp_path):
    model = xl_models[variant]
    path = save_ldm(model, tmp_path / "full.safetensors", extra=FULL_CHECKPOINT_EXTRAS)
    src = open_unet(path)
    assert src.spec.family == "sdxl" and src.spec.variant == variant
    assert set(src.ignored) == set(FULL_CHECKPOINT_EXTRAS)
    assert all("text encoder" in src.ignored[k] for k in FULL_CHECKPOINT_EXTRAS if k.startswith("conditioner."))
    assert all("VAE" in src.ignored[k] for k in FULL_CHECKPOINT_EXTRAS if k.startswith("first_stage_model."))
    args = inputs(model)
    assert torch.equal(forward(load_unet(path), args), forward(model, args))


@pytest.mark.parametrize("form", ["ldm-no-prefix", "diffusers-names", "diffusers-unet-prefix", "diffusers-folder"])
def test_unet_only_files_under_every_prefix(form, xl_models, tmp_path):
    model = xl_models["sdxl"]
    if form == "ldm-no-prefix":
        path = save_ldm(model, tmp_path / "u.safetensors", prefix="")
    elif form == "diffusers-folder":
        model.save_pretrained(tmp_path / "unet")
        path = tmp_path / "unet"
    else:
        prefix = "unet." if form == "diffusers-unet-prefix" else ""
        path = tmp_path / "u.safetensors"
        save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    src = open_unet(path)
    assert (src.spec.family, src.spec.variant) == ("sdxl", "sdxl")
    assert src.spec.layout == ("ldm" if form.startswith("ldm") else "diffusers")
    assert src.spec.config["projection_class_embeddings_input_dim"] == 2816
    assert src.spec.config["transformer_layers_per_block"] == [1, 2, 3]
    args = inputs(model)
    assert torch.equal(forward(load_unet(path), args), forward(model, args))


def test_diffusers_to_ldm_to_diffusers_is_bit_exact(xl_models, tmp_path):
    model = xl_models["sdxl-refiner"]
    model.save_pretrained(tmp_path / "unet")
    convert(tmp_path / "unet", tmp_path / "x.safetensors", to="ldm")
    assert "model.diffusion_model.label_emb.0.0.weight" in load_file(tmp_path / "x.safetensors")
    convert(tmp_path / "x.safetensors", tmp_path / "back", to="diffusers")
    a = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "back" / "diffusion_pytorch_model.safetensors")
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    args = inputs(model)
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "back")
    assert torch.equal(forward(theirs, args), forward(model, args))


def test_inferred_config_is_sdxls_own(xl_models, tmp_path):
    """From names and shapes alone (no stored config): what diffusers' SDXL configs say, with the assumptions."""
    src = open_unet(save_ldm(xl_models["sdxl"], tmp_path / "u.safetensors"))
    cfg = src.spec.config
    assert src.spec.config_source == "inferred"
    assert cfg["addition_embed_type"] == "text_time" and cfg["addition_time_embed_dim"] == 256
    assert cfg["use_linear_projection"] is True and cfg["cross_attention_dim"] == 64
    assert cfg["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert cfg["sample_size"] == 128
    assert any("addition_time_embed_dim=256" in a for a in src.spec.assumptions)
    refiner = open_unet(save_ldm(xl_models["sdxl-refiner"], tmp_path / "r.safetensors")).spec.config
    assert refiner["transformer_layers_per_block"] == 2  # one depth everywhere: one int, as the refiner's config


def test_inspect_names_the_variant(xl_models, tmp_path, capsys):
    path = save_ldm(xl_models["sdxl-refiner"], tmp_path / "r.safetensors")
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == "sdxl-refiner" and info["family"] == "sdxl"
    assert info["config"]["projection_class_embeddings_input_dim"] == 2560


def test_a_damaged_sdxl_file_names_the_key(xl_models, tmp_path):
    sd = ldm_state(xl_models["sdxl"])
    del sd["model.diffusion_model.label_emb.0.2.bias"]
    sd["model.diffusion_model.label_emb.0.1.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyMapError) as e:
        open_unet(tmp_path / "bad.safetensors")
    assert "label_emb.0.2.bias" in str(e.value) and "label_emb.0.1.weight" in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "bad.safetensors"))


def test_an_add_embedding_with_conv_projections_is_no_family(tmp_path):
    cfg = {**tiny_config("sdxl"), "use_linear_projection": False}
    with torch.device("meta"):
        shapes = UNet2DConditionModel(**cfg).state_dict()
    save_file({k: torch.zeros(v.shape) for k, v in shapes.items()}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ModelDetectionError, match="1x1-conv"):
        open_unet(tmp_path / "odd.safetensors")
