"""Bad inputs: each a clear unetkit error that names the file and the tensor, and no output left behind."""

import json
import os
import pickle

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from helpers import ldm_state, no_temp_files, save_ldm, tiny_unet
from unetkit import convert, load_unet
from unetkit.cli.app import main
from unetkit.errors import FormatError, KeyMapError, ModelDetectionError, OutputError, OutputExistsError


@pytest.fixture(scope="module")
def model():
    return tiny_unet("sd1.x")


def assert_cli_error(argv, capsys, *needles, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line, no traceback
    for n in needles:
        assert n in err, err
    return err


def test_truncated_safetensors(model, tmp_path, capsys):
    path = save_ldm(model, tmp_path / "t.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(FormatError, match="truncated"):
        load_unet(path)
    out = tmp_path / "out"
    assert_cli_error(["convert", str(path), str(out), "--to", "diffusers"], capsys, "t.safetensors", "truncated")
    assert not out.exists() and no_temp_files(tmp_path)


def test_garbage_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\xff" * 100)
    with pytest.raises(FormatError, match="x.safetensors"):
        load_unet(path)


def test_not_a_unet(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(
        {
            "encoder.down.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3),
            "decoder.up.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3),
        },
        str(path),
    )
    with pytest.raises(ModelDetectionError, match="not a UNet.*looks like a VAE"):
        load_unet(path)


def test_an_sdxl_shape_unetkit_does_not_know_is_a_clear_error(tmp_path):
    """SDXL is read (tests/test_sdxl.py); an add embedding that is not 1280 text channels + time ids of 256 is not
    SDXL's, and a deep stack without any add embedding is no family's."""
    with torch.device("meta"):
        xl = UNet2DConditionModel(
            block_out_channels=(32, 64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2),
            cross_attention_dim=64,
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
        )
    sd = {k: torch.zeros(v.shape) for k, v in xl.state_dict().items()}
    path = tmp_path / "xl.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelDetectionError, match="SDXL add embedding.*projection_class_embeddings_input_dim=80"):
        load_unet(path)
    del sd["add_embedding.linear_1.weight"], sd["add_embedding.linear_1.bias"]
    del sd["add_embedding.linear_2.weight"], sd["add_embedding.linear_2.bias"]
    save_file(sd, str(path))
    with pytest.raises(ModelDetectionError, match="transformer depths"):  # the structure alone is refused too
        load_unet(path)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    with pytest.raises(FormatError, match="refused.*never executes"):
        load_unet(path)
    assert not (tmp_path / "pwned_marker").exists()
    torch.save({"state_dict": {"a": Evil()}}, tmp_path / "evil2.ckpt")  # zip-format pickle too
    with pytest.raises(FormatError, match="refused"):
        load_unet(tmp_path / "evil2.ckpt")
    assert not (tmp_path / "pwned_marker").exists()


def test_missing_key(model, tmp_path, capsys):
    sd = ldm_state(model)
    del sd["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"]
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    with pytest.raises(
        KeyMapError,
        match=r"1 missing key\(s\): model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    ):
        load_unet(path)
    assert_cli_error(["convert", str(path), str(tmp_path / "o.safetensors"), "--to", "ldm"], capsys, "missing")
    assert not (tmp_path / "o.safetensors").exists() and no_temp_files(tmp_path)


def test_unknown_extra_key(model, tmp_path):
    path = save_ldm(
        model, tmp_path / "u.safetensors", extra={"model.diffusion_model.input_blocks.1.2.weight": torch.zeros(3)}
    )
    with pytest.raises(KeyMapError, match=r"1 unknown key\(s\): model.diffusion_model.input_blocks.1.2.weight"):
        load_unet(path)


def test_wrong_shape(model, tmp_path):
    sd = ldm_state(model)
    sd["model.diffusion_model.middle_block.1.proj_out.bias"] = torch.zeros(7)
    path = tmp_path / "s.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KeyMapError, match=r"middle_block.1.proj_out.bias: expected \[128\], found \[7\]"):
        load_unet(path)


def test_config_that_disagrees_with_the_weights(model, tmp_path):
    path = save_ldm(model, tmp_path / "c.safetensors")
    cfg = dict(model.config)
    cfg["cross_attention_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyMapError, match="wrong shape"):
        load_unet(path, config=tmp_path / "config.json")


def test_existing_output_needs_force(model, tmp_path, capsys):
    src = save_ldm(model, tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="--force"):
        convert(src, out, to="ldm")
    assert_cli_error(["convert", str(src), str(out), "--to", "ldm"], capsys, "already exists", "--force")
    assert out.read_bytes() == b"precious"
    assert main(["-q", "convert", str(src), str(out), "--to", "ldm", "--force"]) == 0
    assert out.read_bytes() != b"precious" and no_temp_files(tmp_path)
    with pytest.raises(OutputExistsError, match="is the input"):
        convert(src, src, to="ldm", force=True)


def test_failure_midway_leaves_nothing(model, tmp_path, monkeypatch):
    import unetkit.formats.safetensors_io as sio

    src = save_ldm(model, tmp_path / "in.safetensors")

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(sio, "_copy_range", boom)
    with pytest.raises(OutputError, match=r"out: cannot write the output: disk full"):  # one line, not a traceback
        convert(src, tmp_path / "out", to="diffusers")
    assert not (tmp_path / "out").exists() and no_temp_files(tmp_path)


def test_ema_requested_but_absent(model, tmp_path):
    with pytest.raises(KeyMapError, match="no LDM EMA weights"):
        load_unet(save_ldm(model, tmp_path / "e.safetensors"), ema=True)


def test_unsupported_input_channels(tmp_path):
    m = UNet2DConditionModel(block_out_channels=[32, 64, 128, 128], cross_attention_dim=64, in_channels=6)
    path = save_ldm(m, tmp_path / "six.safetensors")
    with pytest.raises(ModelDetectionError, match="6 input channels"):
        load_unet(path)
