"""GGUF files: every flavor writes, reads back and runs; files shaped like other producers' load; bad files fail
with a clear FormatError."""

import hashlib
import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from helpers import forward, inputs, ldm_state, save_ldm, tiny_unet
from unetkit import load_unet, open_unet
from unetkit.errors import FormatError, QuantError
from unetkit.formats.gguf import read_gguf
from unetkit.gguf_export import quantize_file
from unetkit.quant.gguf import quantize


def sqnr(ref, x):
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum()))


@pytest.fixture(scope="module", params=["sd1.x", "sd1.x-lcm"])
def src(request, tmp_path_factory):
    model = tiny_unet(request.param)
    path = save_ldm(model, tmp_path_factory.mktemp("src") / "in.safetensors")
    return model, path


@pytest.mark.parametrize("flavor", ["comfy", "sdcpp", "diffusers"])
def test_each_flavor_writes_reads_and_runs(src, flavor, tmp_path):
    model, path = src
    out = tmp_path / "m.gguf"
    r = quantize_file(path, out, "gguf:Q8_0", flavor=flavor)
    assert r.tensors == len(model.state_dict()) and out.stat().st_size == r.file_bytes
    # the source hash, computed while the tensors were written, is patched into the header
    meta = read_gguf(out).metadata
    assert meta["unetkit.source_sha256"] == r.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    source = open_unet(out)
    assert source.spec.variant == r.variant
    names = list(source.checkpoint.entries)
    assert all(n.startswith("model.diffusion_model.") for n in names) == (flavor != "comfy")
    if model.config.time_cond_proj_dim:  # LCM's cond_proj is kept in every flavor
        assert "time_embedding.cond_proj.weight" in source.tensors
    qtypes = {source.tensors[k].qtype for k in source.tensors}
    conv_q = source.tensors["down_blocks.0.resnets.0.conv1.weight"].qtype
    assert conv_q == ("Q8_0" if flavor == "comfy" else None)  # only comfy can quantize 3x3 convs (reshape)
    assert "Q8_0" in qtypes
    args = inputs(model)
    a = forward(load_unet(out, dequantize="load"), args)
    b = forward(load_unet(out, dequantize="on-the-fly"), args)
    assert torch.equal(a, b)
    assert sqnr(forward(model, args), a) > 25


def test_on_the_fly_keeps_weights_packed(src, tmp_path):
    _, path = src
    quantize_file(path, tmp_path / "m.gguf", "gguf:Q4_K_M")
    unet = load_unet(tmp_path / "m.gguf", dequantize="on-the-fly")
    from unetkit.quant.runtime.gguf_backend import GGUFConv2d, GGUFLinear

    kinds = {type(m) for m in unet.modules()}
    assert GGUFLinear in kinds and GGUFConv2d in kinds


def test_decisions_are_explicit(src, tmp_path):
    _, path = src
    r = quantize_file(
        path, tmp_path / "m.gguf", "gguf:Q4_K_M", flavor="sdcpp", override=["attn2.to_k=Q8_0"], keep=["out.*"]
    )
    by = {d["name"]: d for d in r.decisions}
    assert by["input_blocks.0.0.weight"]["qtype"] == "F16" and "sensitive" in by["input_blocks.0.0.weight"]["reason"]
    assert by["out.0.weight"]["qtype"] == "F32"
    assert by["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]["qtype"] == "Q8_0"
    assert (
        by["input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight"]["qtype"] == "Q6_K"
        or "requested" in by["input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight"]["reason"]
    )
    conv = by["input_blocks.1.0.in_layers.2.weight"]
    assert conv["qtype"] == "F16" and "block size" in conv["reason"]  # sdcpp needs exact shapes


def test_diffusers_flavor_loads_in_diffusers_itself(tmp_path):
    from diffusers import GGUFQuantizationConfig, UNet2DConditionModel

    from unetkit import convert

    model = tiny_unet("sd1.x")
    path = save_ldm(model, tmp_path / "in.safetensors")
    quantize_file(path, tmp_path / "d.gguf", "gguf:Q8_0", flavor="diffusers")
    convert(path, tmp_path / "cfg", to="diffusers")  # a local config: diffusers must not reach the Hub
    theirs = UNet2DConditionModel.from_single_file(
        str(tmp_path / "d.gguf"),
        config=str(tmp_path / "cfg"),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32,
    )
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    ours = load_unet(tmp_path / "d.gguf", dequantize="on-the-fly")
    mine = load_unet(tmp_path / "d.gguf", dequantize="load").state_dict()
    quantized = 0
    for k, v in theirs.state_dict().items():
        if hasattr(v, "quant_type"):
            # diffusers decodes GGUF blocks to fp16 (even with compute_dtype=float32): its weights are exactly
            # ggml's decode (ours) rounded to fp16
            assert torch.equal(dequantize_gguf_tensor(v).float(), mine[k].half().float()), k
            quantized += 1
    assert quantized > 100
    args = inputs(model)
    a, b = forward(theirs, args), forward(ours, args)
    assert sqnr(b, a) > 60


def write_foreign(path, tensors, kv=None, arch="sd1"):
    """A GGUF file written by gguf-py directly, following another producer's documented rules."""
    w = GGUFWriter(str(path), arch or "x")
    if arch is None:
        w.kv_data[0].pop("general.architecture")
    for k, v in (kv or {}).items():
        w.add_array(k, v)
    for name, arr, qt in tensors:
        if qt is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_comfyui_gguf_shaped_file_loads(tmp_path):
    """ComfyUI-GGUF: no prefix, 1-D and <=1024-element tensors F32, conv_in/conv_out/time_embed F16, others Q8_0,
    reshaped to rows of 256 with comfy.gguf.orig_shape when the last dim does not fit."""
    model = tiny_unet("sd1.x")
    tensors, kv = [], {}
    for name, t in ldm_state(model, prefix="").items():
        if t.ndim == 1 or t.numel() <= 1024:
            tensors.append((name, t.float().numpy(), None))
        elif name.startswith(("time_embed.", "input_blocks.0.0.", "out.2.")):
            tensors.append((name, t.half().numpy(), None))
        elif t.shape[-1] % 32 == 0:
            tensors.append((name, quantize(t, "Q8_0").numpy(), GGMLQuantizationType.Q8_0))
        else:
            flat = t.reshape(-1, 256)
            tensors.append((name, quantize(flat, "Q8_0").numpy(), GGMLQuantizationType.Q8_0))
            kv[f"comfy.gguf.orig_shape.{name}"] = list(t.shape)
    write_foreign(tmp_path / "comfy.gguf", tensors, kv)
    args = inputs(model)
    assert sqnr(forward(model, args), forward(load_unet(tmp_path / "comfy.gguf", dequantize="on-the-fly"), args)) > 25
    write_foreign(tmp_path / "noarch.gguf", tensors, kv, arch=None)  # no architecture key: read too
    assert load_unet(tmp_path / "noarch.gguf") is not None


def test_stable_diffusion_cpp_shaped_file_loads(tmp_path):
    """stable-diffusion.cpp: prefixed names, exact shapes, Q8_0 for any tensor whose last dim fits the block --
    norm weights included -- except biases, time_embed and embedding names; convs stay in the source type."""
    model = tiny_unet("sd1.x")
    tensors = []
    for name, t in ldm_state(model).items():
        fits = t.shape[-1] % 32 == 0 and not name.endswith(".bias") and "time_embed." not in name
        if fits:
            tensors.append((name, quantize(t, "Q8_0").numpy(), GGMLQuantizationType.Q8_0))
        else:
            tensors.append((name, t.float().numpy(), None))
    write_foreign(tmp_path / "sdcpp.gguf", tensors, arch=None)
    src = open_unet(tmp_path / "sdcpp.gguf")
    assert src.tensors["down_blocks.0.resnets.0.norm1.weight"].qtype == "Q8_0"  # a quantized 1-D norm weight
    args = inputs(model)
    assert sqnr(forward(model, args), forward(load_unet(tmp_path / "sdcpp.gguf", dequantize="on-the-fly"), args)) > 25


def test_convert_gguf_to_diffusers_dequantizes(src, tmp_path):
    from unetkit import convert

    model, path = src
    quantize_file(path, tmp_path / "m.gguf", "gguf:Q8_0")
    r = convert(tmp_path / "m.gguf", tmp_path / "unet", to="diffusers", dtype="fp16")
    assert r.tensors == len(model.state_dict())
    assert load_unet(tmp_path / "unet").dtype == torch.float16


# ---- bad files -------------------------------------------------------------------------------------------------


def gguf_bytes(tensors, n_dims_override=None):
    """A minimal GGUF v3 file by hand: no KV, the given (name, dims (ggml order), type, data) tensors."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 0)
    infos, data, off = b"", b"", 0
    for name, dims, qtype, payload in tensors:
        nb = name.encode()
        infos += struct.pack("<Q", len(nb)) + nb + struct.pack("<I", n_dims_override or len(dims))
        infos += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", qtype, off)
        data += payload + b"\0" * (-len(payload) % 32)
        off = len(data)
    body = head + infos
    return body + b"\0" * (-len(body) % 32) + data


def test_bad_gguf_files(tmp_path):
    good = gguf_bytes([("w", [32, 2], 0, np.zeros(64, np.float32).tobytes())])
    cases = {
        "magic": (b"GGUX" + good[4:], "not a GGUF file"),
        "truncated header": (good[:30], "truncated"),
        "data past end": (good[:-100], "truncated"),
        "unknown qtype": (gguf_bytes([("w", [32, 2], 99, b"\0" * 64)]), "unknown ggml type 99"),
        "5 dims": (gguf_bytes([("w", [32, 1, 1, 1, 2], 0, np.zeros(64, np.float32).tobytes())]), "5 dimensions"),
        "row does not fit": (gguf_bytes([("w", [20, 2], 8, b"\0" * 68)]), "does not fit the Q8_0 block"),
    }
    for label, (blob, message) in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.gguf"
        path.write_bytes(blob)
        with pytest.raises(FormatError, match=message):
            read_gguf(path)
    (tmp_path / "ok.gguf").write_bytes(good)
    assert read_gguf(tmp_path / "ok.gguf").entries["w"].shape == (2, 32)


def test_unknown_recipe_and_flavor(src, tmp_path):
    _, path = src
    with pytest.raises(QuantError, match="known: F32"):
        quantize_file(path, tmp_path / "x.gguf", "gguf:Q7_K")
    with pytest.raises(QuantError, match="flavor"):
        quantize_file(path, tmp_path / "x.gguf", "gguf:Q8_0", flavor="llama")


def test_inspect_gguf_shows_flavor_qtypes_and_bits(src, tmp_path):
    from unetkit.inspection import inspect_file

    _, path = src
    quantize_file(path, tmp_path / "m.gguf", "gguf:Q4_K_M", flavor="comfy")
    info = inspect_file(tmp_path / "m.gguf", scan=False)
    assert info["format"] == "gguf" and info["gguf_flavor"] == "comfy"
    assert {"Q4_K", "F16", "F32"} <= set(info["dtypes"])
    assert 4 < info["bits_per_weight"] < 16
    from unetkit.inspection import gguf_flavor

    src_ = open_unet(tmp_path / "m.gguf")
    src_.checkpoint.metadata.pop("unetkit.flavor")  # a file from another producer: read from names and shapes
    assert gguf_flavor(src_).startswith("comfy (no prefix, orig_shape")


@pytest.mark.parametrize("ahead_bytes", [None, 0])
def test_encoder_processes_write_the_same_bytes(tmp_path, monkeypatch, ahead_bytes):
    """Tensors encoded in worker processes are written in order: the file is byte-identical to one process, with
    the default look-ahead and with none (each job submitted only when the writer asks for it)."""
    from unetkit.gguf_export import _EncoderPool

    if ahead_bytes is not None:
        monkeypatch.setattr(_EncoderPool, "AHEAD_BYTES", ahead_bytes)
    path = save_ldm(tiny_unet("sd1.x-lcm"), tmp_path / "in.safetensors")
    quantize_file(path, tmp_path / "one.gguf", "gguf:Q4_K_M", workers=0)
    quantize_file(path, tmp_path / "two.gguf", "gguf:Q4_K_M", workers=2)
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "two.gguf").read_bytes()


def test_own_gguf_constants_agree_with_gguf_py():
    """unetkit keeps its own GGUF numbers (the KV value types in formats/gguf.py, the qtype table in
    quant/gguf/qtypes.py) so that reading a header needs no gguf-py; they must be gguf-py's numbers."""
    import gguf

    from unetkit.formats import gguf as fmt
    from unetkit.quant.gguf.qtypes import QTYPES

    value_types = [
        "UINT8",
        "INT8",
        "UINT16",
        "INT16",
        "UINT32",
        "INT32",
        "FLOAT32",
        "BOOL",
        "STRING",
        "ARRAY",
        "UINT64",
        "INT64",
        "FLOAT64",
    ]
    for name in value_types:
        assert getattr(fmt, name) == gguf.GGUFValueType[name].value, name
    assert len(QTYPES) == len({q.name for q in QTYPES}) == len({q.ggml_id for q in QTYPES})
    for q in QTYPES:
        enum = gguf.GGMLQuantizationType[q.name]
        assert q.ggml_id == enum.value, q.name
        assert (q.block_size, q.type_size) == gguf.GGML_QUANT_SIZES[enum], q.name
