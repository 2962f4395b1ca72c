"""The source's own metadata (modelspec.*, kohya's ss_* record, anything else; unicode and long values) is carried
into every output form next to unetkit's provenance, which never overwrites it silently; inspect shows it."""

import json

import pytest
import torch

from helpers import ldm_state, tiny_unet
from unetkit import open_unet
from unetkit.cli.app import main
from unetkit.conversion import convert
from unetkit.errors import FormatError
from unetkit.formats.gguf import read_gguf
from unetkit.formats.safetensors_io import read_header
from unetkit.gguf_export import quantize_file
from unetkit.inspection import inspect_file
from unetkit.sample import write_ldm_checkpoint

TAGS = {f"tag_{i} ünïcödé": i for i in range(6000)}
SOURCE_META = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-v1",
    "modelspec.title": "Ünïcödé ✓ 日本語のモデル 🙂",
    "modelspec.author": 'Zoë "quoted" O\'Brien',
    "modelspec.license": "CreativeML Open RAIL-M",
    "modelspec.trigger_phrase": "masterpiece, best quality,\n\tnewline and tab",
    "modelspec.description": "",
    "ss_training_comment": "café " * 10,
    "ss_tag_frequency": json.dumps({"dataset": TAGS}, ensure_ascii=False),  # about 150 kB
    "ss_v_parameterization": "False",
    "format": "pt",
}


def st_meta(path):
    return read_header(path)[1].get("__metadata__", {})


def carried(meta):
    """The source's own keys of an output's metadata (unetkit's are its provenance)."""
    return {k: v for k, v in meta.items() if not k.startswith("unetkit.")}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    assert len(SOURCE_META["ss_tag_frequency"]) > 100_000
    d = tmp_path_factory.mktemp("meta")
    return write_ldm_checkpoint(d / "m.safetensors", metadata=SOURCE_META)


def test_diffusers_and_back(src, tmp_path):
    convert(src, tmp_path / "unet", to="diffusers")
    meta = st_meta(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert carried(meta) == SOURCE_META
    assert open_unet(tmp_path / "unet").source_metadata == meta
    convert(tmp_path / "unet", tmp_path / "back.safetensors", to="ldm")
    assert carried(st_meta(tmp_path / "back.safetensors")) == SOURCE_META


def test_ldm_fp16(src, tmp_path):
    convert(src, tmp_path / "h.safetensors", to="ldm", dtype="fp16", prefix=False)
    meta = st_meta(tmp_path / "h.safetensors")
    assert carried(meta) == SOURCE_META and meta["unetkit.dtype"] == "fp16"


@pytest.mark.parametrize("flavor", ["comfy", "sdcpp", "diffusers"])
def test_every_gguf_flavor_and_back(src, flavor, tmp_path):
    out = tmp_path / "m.gguf"
    quantize_file(src, out, "gguf:Q8_0", flavor=flavor)
    meta = read_gguf(out).metadata
    # as string KVs; no safetensors "format" key in a GGUF (the way back writes it again)
    assert {k: v for k, v in SOURCE_META.items() if k != "format"} == {
        k: v for k, v in meta.items() if not k.startswith(("unetkit.", "general."))
    }
    assert meta["unetkit.flavor"] == flavor
    convert(out, tmp_path / "back.safetensors", to="ldm")
    assert carried(st_meta(tmp_path / "back.safetensors")) == SOURCE_META


def test_quantized_folder(src, tmp_path):
    from unetkit.quantization import quantize_to_dir

    quantize_to_dir(src, tmp_path / "q", "quanto:qint8")
    meta = st_meta(tmp_path / "q" / "unetkit_quant.safetensors")
    assert carried(meta) == SOURCE_META
    assert meta["unetkit.method"] == "quanto:qint8" and len(meta["unetkit.source_sha256"]) == 64
    assert json.loads((tmp_path / "q" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"


def test_inspect_shows_it(src, capsys):
    info = inspect_file(src, scan=False)
    assert carried(info["metadata"]) == SOURCE_META
    assert main(["inspect", str(src), "--no-scan", "--json"]) == 0
    assert carried(json.loads(capsys.readouterr().out)["metadata"]) == SOURCE_META
    assert main(["-q", "inspect", str(src), "--no-scan"]) == 0
    out = capsys.readouterr().out
    assert "modelspec.title" in out and SOURCE_META["modelspec.title"] in out
    assert "ss_tag_frequency" in out and "characters)" in out  # long values shortened in text, whole in --json


def test_an_earlier_runs_provenance_goes_to_the_history(src, tmp_path):
    """unetkit's keys describe this run only: a source written by unetkit has its keys kept, in order, under
    unetkit.history, never confused with (or overwritten by) this run's."""
    convert(src, tmp_path / "unet", to="diffusers")
    quantize_file(tmp_path / "unet", tmp_path / "m.gguf", "gguf:Q8_0")
    convert(tmp_path / "m.gguf", tmp_path / "back.safetensors", to="ldm")
    meta = st_meta(tmp_path / "back.safetensors")
    history = json.loads(meta["unetkit.history"])
    assert [h.get("unetkit.layout") for h in history] == [None, "diffusers", "ldm"]
    assert history[0] == {"unetkit.sample": "variant=sd1.x size=tiny seed=0 scale=0.05"}
    assert history[1]["unetkit.source_name"] == "m.safetensors" and history[2]["unetkit.method"] == "gguf:Q8_0"
    assert "unetkit.config" not in history[1]  # re-read and written again by each run
    assert meta["unetkit.source_name"] == "m.gguf" and "unetkit.method" not in meta and "unetkit.decisions" not in meta
    assert carried(meta) == SOURCE_META


def test_reserved_keys_are_displaced_with_their_values_not_dropped(tmp_path):
    src = write_ldm_checkpoint(
        tmp_path / "m.safetensors", metadata={"format": "np", "general.architecture": "something", "x": "y"}
    )
    convert(src, tmp_path / "o.safetensors", to="ldm")
    meta = st_meta(tmp_path / "o.safetensors")
    assert meta["format"] == "pt" and json.loads(meta["unetkit.displaced"]) == {"format": "np"}
    assert meta["general.architecture"] == "something" and meta["x"] == "y"
    quantize_file(src, tmp_path / "m.gguf", "gguf:Q8_0")
    g = read_gguf(tmp_path / "m.gguf").metadata
    assert g["general.architecture"] == "sd1" and g["x"] == "y"
    assert json.loads(g["unetkit.displaced"]) == {"format": "np", "general.architecture": "something"}
    convert(tmp_path / "m.gguf", tmp_path / "back.safetensors", to="ldm")  # back where a safetensors file holds them
    back = st_meta(tmp_path / "back.safetensors")
    assert back["general.architecture"] == "something" and json.loads(back["unetkit.displaced"]) == {"format": "np"}


def test_a_value_gguf_cannot_hold_is_an_error_before_any_work(tmp_path):
    src = write_ldm_checkpoint(tmp_path / "m.safetensors", metadata={"ss_bad": "lone surrogate \ud800"})
    assert st_meta(src)["ss_bad"] == "lone surrogate \ud800"  # JSON metadata can hold it; UTF-8 cannot
    with pytest.raises(FormatError, match="'ss_bad' cannot be written to GGUF.*UTF-8"):
        quantize_file(src, tmp_path / "m.gguf", "gguf:Q8_0")
    assert not (tmp_path / "m.gguf").exists()
    convert(src, tmp_path / "o.safetensors", to="ldm")  # safetensors holds it (escaped JSON)
    assert st_meta(tmp_path / "o.safetensors")["ss_bad"] == "lone surrogate \ud800"


def test_pickles_have_none(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": ldm_state(tiny_unet())}, ckpt)
    assert open_unet(ckpt).source_metadata == {}
    convert(ckpt, tmp_path / "o.safetensors", to="ldm")
    assert carried(st_meta(tmp_path / "o.safetensors")) == {"format": "pt"}
