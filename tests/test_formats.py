"""Every input flavor the SD1.5 ecosystem produces loads, strictly, with ignored keys reported."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import forward, inputs, keymap_for, ldm_state, save_ldm, tiny_unet
from unetkit import load_unet
from unetkit.inspection import inspect_file
from unetkit.resolve import open_unet


@pytest.fixture(scope="module")
def model():
    return tiny_unet("sd1.x-lcm")


@pytest.fixture(scope="module")
def expected(model):
    return forward(model, inputs(model))


def check(model, expected, path, **kw):
    unet = load_unet(path, **kw)
    assert not any(p.is_meta for p in unet.parameters())
    assert torch.equal(forward(unet, inputs(model)), expected)
    return unet


def full_checkpoint_state(model):
    sd = ldm_state(model)
    sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    sd["model_ema.num_updates"] = torch.tensor(5)
    return sd


def test_full_single_file_checkpoint(model, expected, tmp_path):
    path = tmp_path / "full.safetensors"
    save_file(full_checkpoint_state(model), str(path))
    check(model, expected, path)
    src = open_unet(path)
    assert src.prefix == "model.diffusion_model."
    assert set(src.ignored) == {
        "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "alphas_cumprod",
        "model_ema.num_updates",
    }
    assert "VAE" in src.ignored["first_stage_model.encoder.conv_in.weight"]


@pytest.mark.parametrize("prefix", ["", "unet.", "model.diffusion_model."])
def test_unet_only_files_with_any_prefix(model, expected, tmp_path, prefix):
    path = save_ldm(model, tmp_path / "u.safetensors", prefix=prefix)
    check(model, expected, path)
    assert open_unet(path).prefix == prefix


def test_lcm_alias_name_is_accepted(model, expected, tmp_path):
    sd = ldm_state(model)
    sd["model.diffusion_model.time_embed.cond_proj.weight"] = sd.pop(
        "model.diffusion_model.time_embedding.cond_proj.weight"
    )
    save_file(sd, str(tmp_path / "alias.safetensors"))
    check(model, expected, tmp_path / "alias.safetensors")


def test_ckpt_with_nested_state_dict(model, expected, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": full_checkpoint_state(model), "global_step": 1234, "epoch": 3}, path)
    check(model, expected, path)
    src = open_unet(path)
    assert "global_step" in src.ignored and "epoch" in src.ignored


def test_plain_pt_of_diffusers_names(model, expected, tmp_path):
    path = tmp_path / "unet.pt"
    torch.save(model.state_dict(), path)
    check(model, expected, path)
    assert open_unet(path).spec.layout == "diffusers"


def test_legacy_non_zip_pickle(model, expected, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": ldm_state(model)}, path, _use_new_zipfile_serialization=False)
    check(model, expected, path)


def test_diffusers_folder_variants(model, expected, tmp_path):
    model.save_pretrained(tmp_path / "plain")
    check(model, expected, tmp_path / "plain")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    check(model, expected, tmp_path / "sharded")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    check(model, expected, tmp_path / "bin")
    copy.deepcopy(model).half().save_pretrained(tmp_path / "fp16", variant="fp16")
    unet = load_unet(tmp_path / "fp16")
    assert unet.dtype == torch.float16


def test_pipeline_folder_takes_its_unet(model, expected, tmp_path):
    pipe = tmp_path / "pipe"
    model.save_pretrained(pipe / "unet")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    check(model, expected, pipe)


def test_ema_extraction(model, tmp_path):
    live = tiny_unet("sd1.x-lcm", seed=7)  # different weights under model.diffusion_model.*
    sd = ldm_state(live)
    km = keymap_for(model)
    for k, v in model.state_dict().items():  # the EMA copy holds `model`'s weights, LitEma-named
        sd["model_ema.diffusion_model" + km.to_ldm(k).replace(".", "")] = v.clone()
    sd["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": sd}, path)
    args = inputs(model)
    assert torch.equal(forward(load_unet(path, ema=True), args), forward(model, args))
    assert torch.equal(forward(load_unet(path), args), forward(live, args))
    assert any("EMA" in r for r in open_unet(path).ignored.values())


def test_load_dtype_and_config_override(model, tmp_path):
    path = save_ldm(model, tmp_path / "u.safetensors")
    assert load_unet(path, dtype="fp16").dtype == torch.float16
    assert load_unet(path, dtype=torch.bfloat16).dtype == torch.bfloat16
    cfg = dict(model.config)
    cfg["norm_num_groups"] = 16  # weights cannot show this; a given config wins
    assert load_unet(path, config=cfg).config.norm_num_groups == 16


def test_inspect_reports_everything(model, tmp_path):
    sd = full_checkpoint_state(model)
    sd["model.diffusion_model.out.2.bias"] = torch.zeros_like(sd["model.diffusion_model.out.2.bias"])
    sd["model.diffusion_model.out.0.weight"][3] = float("nan")
    path = tmp_path / "full.safetensors"
    save_file(sd, str(path))
    info = inspect_file(path)
    assert info["variant"] == "sd1.x-lcm" and info["layout"] == "ldm" and info["format"] == "safetensors"
    assert info["unet_tensors"] == 687 and info["keys_in_file"] == 691
    assert info["dtypes"]["fp32"]["tensors"] == 687
    assert {s["tensor"]: s["problem"] for s in info["suspicious"]} == {
        "model.diffusion_model.out.2.bias": "all zero",
        "model.diffusion_model.out.0.weight": "1 NaN",
    }
    assert sum(row["count"] for row in info["ignored"]) == 4
    assert any("norm_num_groups" in a for a in info["assumptions"])


def test_stable_diffusion_pipeline_accepts_the_loaded_unet(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    model = tiny_unet("sd1.x")
    unet = load_unet(save_ldm(model, tmp_path / "u.safetensors"))
    vae = AutoencoderKL(
        block_out_channels=[32],
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 7, 64, generator=g)
    out = pipe(
        prompt_embeds=emb,
        negative_prompt_embeds=torch.zeros_like(emb),
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=g,
    ).images
    assert out.shape == (1, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(out)).all())


def test_align_false_is_zero_copy_with_equal_values(model, tmp_path):
    path = save_ldm(model, tmp_path / "u.safetensors")  # written by safetensors: 8-byte aligned
    a, b = load_unet(path), load_unet(path, align=False)
    assert all(p.data_ptr() % 64 == 0 for p in a.parameters())
    assert any(p.data_ptr() % 64 for p in b.parameters())  # memory-mapped where the file put it
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
