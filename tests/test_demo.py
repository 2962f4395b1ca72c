"""unetkit.sample (the one builder of seeded UNets: tests, `make demo`, benchmarks), verify's exact_fast, and the
demo itself, end to end on a tiny LCM checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import ldm_state, tiny_unet
from unetkit.sample import (
    SCALE,
    VARIANTS,
    build_unet,
    sd_schedule_buffers,
    unet_config,
    variant_overrides,
    write_ldm_checkpoint,
)
from unetkit.verification import SCHEMA_PATH, verify


def test_importing_sample_imports_no_torch():
    code = "import sys, unetkit, unetkit.sample; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("variant", list(VARIANTS["full"]))
def test_full_size_configs_are_complete_and_cost_nothing_on_meta(variant):
    from unetkit.keymap import KeyMap, Topology
    from unetkit.spec import expected_shapes, variant_of

    cfg = unet_config(variant, "full")
    model = build_unet(variant, "full", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(KeyMap.for_topology(Topology.from_config(cfg)).diffusers_to_ldm) == set(model.state_dict())
    assert variant_of(cfg) == variant
    widths = {"sdxl": [320, 640, 1280], "sdxl-inpainting": [320, 640, 1280], "sdxl-refiner": [384, 768, 1536, 1536]}
    assert list(model.config.block_out_channels) == widths.get(variant, [320, 640, 1280, 1280])


def test_full_size_parameter_counts():
    def count(variant):
        return sum(p.numel() for p in build_unet(variant, "full", device="meta").parameters())

    assert count("sd1.x") == 859_520_964
    assert count("sd1.x-lcm") == 859_520_964 + 256 * 320
    assert unet_config("sd2.x", "full")["attention_head_dim"] == [5, 10, 20, 20]


def test_configs_are_fresh_copies():
    cfg = unet_config("sd2.x", "tiny")
    cfg["attention_head_dim"].append(99)
    assert unet_config("sd2.x", "tiny")["attention_head_dim"] == [1, 1, 2, 2]
    assert variant_overrides("sd2.x")["attention_head_dim"] == [1, 1, 2, 2]


@pytest.mark.parametrize("variant", ["sd1.x-lcm", "sd2.x"])
@pytest.mark.parametrize("writer", ["unetkit", "safetensors"])
def test_checkpoint_holds_exactly_the_built_weights(tmp_path, variant, writer):
    """The streamed file (drawn ahead on a thread, small tensors moved to the end) equals build_unet's weights."""
    path = write_ldm_checkpoint(
        tmp_path / "m.safetensors", variant, "tiny", seed=3, dtype="fp16", extra_buffers=sd_schedule_buffers(),
        writer=writer,
    )  # fmt: skip
    got = load_file(str(path))
    want = ldm_state(build_unet(variant, "tiny", seed=3, dtype=torch.float16))
    assert set(got) == set(want) | {"betas", "alphas_cumprod"}
    assert all(torch.equal(got[k], v) and got[k].dtype == torch.float16 for k, v in want.items())
    assert got["betas"].dtype == torch.float32 and got["betas"].shape == (1000,)
    assert not list(tmp_path.glob("*.partial"))


def test_tests_tiny_unet_is_the_builders():
    a, b = tiny_unet("sd1.x-lcm", seed=2), build_unet("sd1.x-lcm", "tiny", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    norm = b.down_blocks[0].resnets[0].norm1.weight.detach()
    assert abs(float(norm.mean()) - 1) < 0.05 and abs(float(b.conv_in.weight.detach().std()) - SCALE["tiny"]) < 0.01
    assert not b.training


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import unetkit.sample as sample

    def broken(seed, scale):
        def draw(name, shape):
            raise RuntimeError("boom")

        return draw

    monkeypatch.setattr(sample, "_draws", broken)
    with pytest.raises(RuntimeError, match="boom"):
        write_ldm_checkpoint(tmp_path / "m.safetensors", "sd1.x", "tiny")
    assert not list(tmp_path.iterdir())


def test_exact_fast_verify(tmp_path):
    import copy

    import jsonschema

    model = tiny_unet("sd1.x")
    r = verify(model, copy.deepcopy(model), size=16, exact_fast=True)
    assert r.passed and r.summary["verdict"] == "bit-identical"
    assert r.settings["exact_fast"] and r.settings["unet_calls"] == 2 and len(r.timesteps) == 1
    assert r.sampling is None and r.blame is None and r.exact["first_output"] is None
    jsonschema.validate(r.to_dict(), json.loads(SCHEMA_PATH.read_text()))
    r.write_html(tmp_path / "r.html")
    # a differing weight runs the full comparison, blame included
    cand = copy.deepcopy(model)
    with torch.no_grad():
        cand.conv_in.weight[0, 0, 0, 0] += 0.1
    full = verify(model, cand, timesteps=2, steps=2, size=16, exact_fast=True)
    assert not full.passed and "exact_fast" not in full.settings
    assert full.sampling is not None and full.blame["blamed"] == "conv_in"


def test_demo_runs_end_to_end_on_a_tiny_checkpoint(tmp_path, capsys):
    from unetkit.demo import main

    src = write_ldm_checkpoint(tmp_path / "tiny_lcm.safetensors", "sd1.x-lcm", "tiny", seed=1, dtype="fp16")
    assert main([str(src), "--out", str(tmp_path / "out"), "--size", "8"]) == 0
    text = capsys.readouterr().out
    assert "RESULT: all checks bit-exact" in text
    for n in range(10):
        assert f"== {n}. " in text
    assert text.count("bit-identical       (weights + one forward") == 2
    assert text.count("measured") >= 2  # the GGUF files at least; torchao/quanto when installed
    assert (tmp_path / "out" / "verify_report.html").stat().st_size > 10_000


def test_demo_runs_every_step_on_a_tiny_sdxl_checkpoint(tmp_path, capsys):
    """`make demo CKPT=sdxl.safetensors`: every step on an SDXL file (fp16, as SDXL checkpoints ship), the float
    models held in fp16 and computed in fp32."""
    from unetkit.demo import main

    src = write_ldm_checkpoint(tmp_path / "tiny_sdxl.safetensors", "sdxl", "tiny", seed=1, dtype="fp16")
    assert main([str(src), "--out", str(tmp_path / "out"), "--size", "8"]) == 0
    text = capsys.readouterr().out
    assert "variant sdxl" in text and "RESULT: all checks bit-exact" in text
    for n in range(10):
        assert f"== {n}. " in text
    assert text.count("bit-identical       (weights + one forward") == 2
    # diffusers' from_single_file, given the local config, loads the UNet-only SDXL file and agrees bit for bit
    step6 = text.split("== 6. ")[1].split("== 7. ")[0]
    assert "bit-identical: True" in step6
    assert text.count("measured") >= 2
    assert (tmp_path / "out" / "verify_report.html").stat().st_size > 10_000
