"""LDM -> diffusers -> LDM is bit-exact (keys, dtypes, bytes) and the forward output is identical."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import VARIANTS, forward, inputs, save_ldm, tiny_unet
from unetkit import load_unet
from unetkit.conversion import convert


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ldm_diffusers_ldm_round_trip_is_bit_exact(variant, tmp_path):
    model = tiny_unet(variant)
    src = save_ldm(model, tmp_path / "in.safetensors")
    r1 = convert(src, tmp_path / "unet", to="diffusers")
    r2 = convert(tmp_path / "unet", tmp_path / "back.safetensors", to="ldm")
    assert r1.variant == r2.variant == variant
    assert r1.bytes_copied == r1.bytes_written and r2.bytes_copied == r2.bytes_written  # pure byte copies
    a, b = load_file(src), load_file(tmp_path / "back.safetensors")
    assert list(a) != [] and set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    args = inputs(model)
    expected = forward(model, args)
    for path in (src, tmp_path / "unet", tmp_path / "back.safetensors"):
        assert torch.equal(forward(load_unet(path), args), expected), path
    # the diffusers folder loads in diffusers itself, unchanged, with the same output
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert torch.equal(forward(theirs, args), expected)


def test_round_trip_without_prefix_and_fp16(tmp_path):
    model = tiny_unet("sd1.x-lcm")
    src = save_ldm(model, tmp_path / "in.safetensors", prefix="")
    convert(src, tmp_path / "unet", to="diffusers", dtype="fp16")
    convert(tmp_path / "unet", tmp_path / "back.safetensors", to="ldm", prefix=False)
    back = load_file(tmp_path / "back.safetensors")
    assert "time_embedding.cond_proj.weight" in back and "input_blocks.0.0.weight" in back
    ref = load_file(src)
    for k, v in ref.items():
        assert back[k].dtype == torch.float16 and torch.equal(back[k], v.half()), k


def test_metadata_records_provenance(tmp_path):
    import hashlib
    import json

    model = tiny_unet("sd1.x-lcm")
    src = save_ldm(model, tmp_path / "in.safetensors")
    convert(src, tmp_path / "out.safetensors", to="ldm")
    meta = safe_open(str(tmp_path / "out.safetensors"), "pt").metadata()
    assert meta["unetkit.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["unetkit.source_name"] == "in.safetensors"
    assert meta["unetkit.variant"] == "sd1.x-lcm"
    assert meta["unetkit.time_cond_proj_dim"] == "32"
    assert json.loads(meta["unetkit.config"])["time_cond_proj_dim"] == 32
    assert meta["unetkit.version"]


def test_output_tensors_are_64_byte_aligned(tmp_path):
    """Aligned files load zero-copy and give the same forward as freshly allocated weights."""
    from unetkit.formats.safetensors_io import read_safetensors

    model = tiny_unet()
    convert(save_ldm(model, tmp_path / "in.safetensors"), tmp_path / "out.safetensors", to="ldm")
    entries = read_safetensors(tmp_path / "out.safetensors").entries.values()
    sizes_ok = [e for e in entries if e.nbytes % 64 == 0]
    assert sizes_ok and all(e.offset % 64 == 0 for e in sizes_ok)


def test_input_is_never_modified(tmp_path):
    model = tiny_unet()
    src = save_ldm(model, tmp_path / "in.safetensors")
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    convert(src, tmp_path / "unet", to="diffusers")
    convert(src, tmp_path / "x.safetensors", to="ldm", dtype="bf16")
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before


def test_source_sha256_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import hashlib
    import os

    monkeypatch.setenv("UNETKIT_CACHE_DIR", str(tmp_path / "cache"))
    src = save_ldm(tiny_unet(), tmp_path / "in.safetensors")
    first = convert(src, tmp_path / "a.safetensors", to="ldm")
    second = convert(src, tmp_path / "b.safetensors", to="ldm")
    assert not first.source_sha256_cached and second.source_sha256_cached
    assert first.source_sha256 == second.source_sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    # same size, new bytes, new mtime: hashed again, never the stale digest
    data = bytearray(src.read_bytes())
    data[-1] ^= 0xFF
    src.write_bytes(bytes(data))
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = convert(src, tmp_path / "c.safetensors", to="ldm")
    assert not third.source_sha256_cached
    assert third.source_sha256 == hashlib.sha256(bytes(data)).hexdigest() != first.source_sha256
    monkeypatch.setenv("UNETKIT_HASH_CACHE", "0")
    assert not convert(src, tmp_path / "d.safetensors", to="ldm").source_sha256_cached
