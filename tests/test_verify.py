"""unetkit verify: bit-identical round trips, measured error, per-layer blame, JSON schema and HTML report."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

import unetkit
from helpers import save_ldm, tiny_unet
from unetkit.cli.app import main
from unetkit.gguf_export import quantize_file
from unetkit.verification import SCHEMA_PATH, verify

#: tiny models run in milliseconds: small settings keep each test around a second
TINY = dict(timesteps=3, steps=3, size=16)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    model = tiny_unet("sd1.x")
    return model, save_ldm(model, tmp_path_factory.mktemp("plain") / "unet.safetensors")


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    model = tiny_unet("sd1.x-lcm")
    return model, save_ldm(model, tmp_path_factory.mktemp("lcm") / "lcm.safetensors")


def _validate(report_dict: dict) -> None:
    import jsonschema  # a test dependency (pyproject [test])

    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(report_dict, schema)


def test_layout_round_trip_is_bit_identical(plain, tmp_path):
    _, ldm = plain
    unetkit.convert(ldm, tmp_path / "diffusers", to="diffusers")
    unetkit.convert(tmp_path / "diffusers", tmp_path / "back.safetensors", to="ldm")
    for cand in (tmp_path / "diffusers", tmp_path / "back.safetensors"):
        r = verify(ldm, cand, **TINY)
        assert r.settings["exact_mode"] and r.passed
        assert r.summary["verdict"] == "bit-identical"
        assert r.exact["bit_identical"] and r.exact["first_tensor"] is None and r.exact["first_output"] is None
        assert r.exact["tensors_compared"] == len(plain[0].state_dict())
        assert all(t["identical"] for t in r.timesteps) and r.sampling["final"]["identical"]
        assert r.blame["differing"] == 0 and r.blame["blamed"] is None and r.blame["first_divergence"] is None
        _validate(r.to_dict())


def test_perturbed_layer_fails_and_is_blamed_first(plain):
    model, _ = plain
    cand = copy.deepcopy(model)
    target = "down_blocks.1.resnets.0.conv1"
    with torch.no_grad():
        w = cand.get_submodule(target).weight
        w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5)))
    r = verify(model, cand, **TINY)
    assert not r.passed and r.summary["verdict"] == "not bit-identical"
    assert r.exact["first_tensor"]["name"] == target + ".weight"
    assert r.exact["first_output"] is not None
    assert r.blame["blamed"] == target and r.blame["blamed_block"] == "down_blocks.1"
    assert r.blame["ranking"][0]["module"] == target
    # every module before it in the network computes exactly what the reference does
    first = r.blame["first_divergence"]
    assert first == target
    assert target in r.summary["reason"]
    _validate(r.to_dict())


def test_lcm_without_cond_proj_is_blamed_on_time_embedding(lcm):
    model, _ = lcm
    cand = copy.deepcopy(model)
    with torch.no_grad():
        cand.time_embedding.cond_proj.weight.zero_()
    r = verify(model, cand, **TINY)
    assert r.settings["scheduler"] == "lcm" and r.settings["lcm_guidance_embedding"] and not r.settings["cfg"]
    assert not r.passed
    assert r.exact["first_tensor"]["name"] == "time_embedding.cond_proj.weight"
    assert r.blame["blamed_block"] == "time_embedding"
    assert r.blame["blamed"] == "time_embedding.cond_proj"
    # measured without exact mode, the error shows at every timestep: the guidance embedding no longer arrives
    m = verify(model, cand, exact=False, blame=False, **TINY)
    assert m.exact is None and m.summary["verdict"] == "measured"
    assert not any(t["identical"] for t in m.timesteps) and m.worst_sqnr_db < 100


def test_q8_passes_a_threshold_that_q2_k_fails(plain, tmp_path):
    _, ldm = plain
    quantize_file(ldm, tmp_path / "q8.gguf", "gguf:Q8_0")
    quantize_file(ldm, tmp_path / "q2.gguf", "gguf:Q2_K")
    q8 = verify(ldm, tmp_path / "q8.gguf", min_sqnr=20, **TINY)
    q2 = verify(ldm, tmp_path / "q2.gguf", min_sqnr=20, **TINY)
    assert q8.candidate.quantized and not q8.settings["exact_mode"]
    assert q8.passed and q8.summary["verdict"] == "passed", q8.summary
    assert not q2.passed and q2.summary["verdict"] == "below threshold", q2.summary
    assert q8.worst_sqnr_db > q2.worst_sqnr_db + 10
    # the Q2_K layers are what blame finds; conv_in, kept at F16 by the recipe, is far better than the worst
    assert q2.blame["differing"] > 0 and q2.blame["blamed_block"] not in ("conv_in", "conv_out", "time_embedding")
    conv_in = next(b for b in q2.blame["blocks"] if b["block"] == "conv_in")
    assert conv_in["worst_local_sqnr_db"] > 50 > q2.blame["ranking"][0]["local"]["sqnr_db"] + 20
    _validate(q2.to_dict())


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "lcm"])
def test_every_scheduler_runs_its_loop(plain, scheduler):
    model, _ = plain
    cand = copy.deepcopy(model).to(torch.bfloat16).to(torch.float32)  # a lossy candidate
    r = verify(model, cand, scheduler=scheduler, exact=False, blame=False, **TINY)
    assert r.sampling["scheduler"] == scheduler and len(r.sampling["per_step"]) == TINY["steps"]
    assert 20 < r.sampling["final"]["sqnr_db"] < 200
    assert r.settings["cfg"] == (scheduler != "lcm")
    assert r.summary["verdict"] == "measured" and r.passed


def test_json_and_html_reports(plain, tmp_path):
    model, ldm = plain
    cand = copy.deepcopy(model)
    with torch.no_grad():
        cand.up_blocks[2].attentions[0].transformer_blocks[0].attn2.to_v.weight.mul_(1.1)
    r = verify(model, cand, min_sqnr=60, **TINY)
    r.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    _validate(data)
    assert data["schema"] == "unetkit.verify/1" and data["summary"]["passed"] is False
    r.write_html(tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page), "external reference in the HTML"
    assert "http://" not in page and "https://" not in page
    pngs = re.findall(r"data:image/png;base64,", page)
    assert len(pngs) >= 4  # SQNR per timestep, sampling, latents, error per layer
    assert "up_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v" in page
    # reports are outputs too: no silent overwrite
    with pytest.raises(unetkit.OutputExistsError):
        r.write_html(tmp_path / "r.html")


def test_vae_and_prompt_embeds(plain, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    model, _ = plain
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    )
    vae.save_pretrained(tmp_path / "vae")
    g = torch.Generator().manual_seed(3)
    save_file(
        {"prompt_embeds": torch.randn(77, 64, generator=g), "negative_prompt_embeds": torch.randn(77, 64, generator=g)},
        str(tmp_path / "emb.safetensors"),
    )
    cand = copy.deepcopy(model).half().float()
    r = verify(
        model, cand, vae=tmp_path / "vae", prompt_embeds=tmp_path / "emb.safetensors", exact=False, blame=False, **TINY
    )
    assert r.settings["prompt_embeds"].endswith("emb.safetensors")
    assert r.images is not None and r.images["psnr_db"] > 20 and not r.images["identical"]
    _validate(r.to_dict())
    page = r.write_html(tmp_path / "v.html").read_text()
    assert "decoded images" in page
    with pytest.raises(unetkit.UnetkitError, match="prompt_embeds has shape"):
        save_file({"prompt_embeds": torch.zeros(77, 32)}, str(tmp_path / "bad.safetensors"))
        verify(model, cand, prompt_embeds=tmp_path / "bad.safetensors", **TINY)


def test_cli_exit_codes_and_json(plain, tmp_path, capsys):
    model, ldm = plain
    unetkit.convert(ldm, tmp_path / "diffusers", to="diffusers")
    args = ["-q", "verify", str(ldm), str(tmp_path / "diffusers"), "--timesteps", "2", "--steps", "2", "--size", "16"]
    assert main([*args, "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["verdict"] == "bit-identical"
    _validate(data)
    # a different model in the same architecture: not bit-identical -> exit 1 with the first differing tensor named
    other = save_ldm(tiny_unet("sd1.x", seed=1), tmp_path / "other.safetensors")
    code = main(
        [
            "-q",
            "verify",
            str(ldm),
            str(other),
            "--timesteps",
            "1",
            "--steps",
            "1",
            "--size",
            "16",
            "--no-blame",
            "--html",
            str(tmp_path / "r.html"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and "NOT BIT-IDENTICAL" in captured.out and "first differing tensor" in captured.err
    assert (tmp_path / "r.html").is_file()
    # bad input: one line, exit 2
    assert main(["-q", "verify", str(ldm), str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "Traceback" not in err
    # an existing report is not overwritten without --force, and that is found before any work
    assert main([*args, "--html", str(tmp_path / "r.html")]) == 2
    assert "--force" in capsys.readouterr().err


def test_different_architectures_are_refused(plain, lcm):
    with pytest.raises(unetkit.UnetkitError, match="different architectures"):
        verify(plain[0], lcm[0], **TINY)
