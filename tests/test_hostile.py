"""Damaged and hostile files get one clear error (a UnetkitError naming the file and the object), never a
traceback, a hang, a silent misread or a read outside the model folder. One test per case class."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import save_ldm, tiny_unet
from unetkit.conversion import convert
from unetkit.errors import FormatError, ModelDetectionError, UnetkitError
from unetkit.formats import read
from unetkit.resolve import open_unet


def safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


# ------------------------------------------------------------------------------------------------- safetensors


def test_duplicate_key_in_a_safetensors_header(tmp_path):
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    p = write(tmp_path / "dup.safetensors", safetensors_bytes(f'{{"w":{entry},"w":{entry}}}'.encode(), b"\0" * 4))
    with pytest.raises(FormatError, match="'w' twice"):
        read(p)


def test_overlapping_tensors_in_a_safetensors_header(tmp_path):
    head = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    p = write(tmp_path / "o.safetensors", safetensors_bytes(json.dumps(head).encode(), b"\0" * 12))
    with pytest.raises(FormatError, match="overlap"):
        read(p)


def test_deeply_nested_json_is_an_error_not_a_recursion_error(tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    p = write(tmp_path / "deep.safetensors", safetensors_bytes(b'{"__metadata__":' + deep + b"}"))
    with pytest.raises(FormatError, match="nested too deeply|deeper"):
        read(p)


def test_millions_of_empty_tensors_are_refused_before_parsing(tmp_path):
    one = b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    body = b",".join(one % i for i in range(250_000))
    p = write(tmp_path / "many.safetensors", safetensors_bytes(b"{" + body + b"}"))
    with pytest.raises(FormatError, match="over 200000 tensors"):
        read(p)


def test_a_fifo_is_refused_not_read_forever(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        read(fifo)


def test_a_link_to_a_device_is_refused(tmp_path):
    link = tmp_path / "x.ckpt"
    link.symlink_to("/dev/zero")
    with pytest.raises(FormatError, match="not a regular file"):
        read(link)


# ---------------------------------------------------------------------------------------------------- configs


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    src = save_ldm(tiny_unet(), d / "m.safetensors")
    convert(src, d / "unet", to="diffusers")
    return d


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "unet"
    shutil.copytree(folder / "unet", out)
    return out


@pytest.mark.parametrize("content", ["[1, 2]", "{}", '{"block_out_channels": "wide"}', "[" * 5000 + "]" * 5000])
def test_bad_config_json_is_a_clear_error(folder, tmp_path, content):
    unet = copy_folder(folder, tmp_path)
    (unet / "config.json").write_text(content)
    with pytest.raises(UnetkitError, match="config"):
        open_unet(unet)


@pytest.mark.parametrize("content", ["[1, 2]", "{}", "[" * 5000 + "]" * 5000])
def test_bad_user_config_is_a_clear_error(folder, tmp_path, content):
    (tmp_path / "c.json").write_text(content)
    with pytest.raises(UnetkitError, match="config"):
        open_unet(folder / "m.safetensors", config=tmp_path / "c.json")


def test_config_json_that_disagrees_with_the_stored_config_is_refused(folder, tmp_path):
    unet = copy_folder(folder, tmp_path)
    cfg = json.loads((unet / "config.json").read_text())
    cfg["attention_head_dim"] = 4
    (unet / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDetectionError, match=r"attention_head_dim: config.json has 4, the weights' metadata 8"):
        open_unet(unet)


# ------------------------------------------------------------------------------------------------ shard indexes


def sharded(folder: Path, tmp_path: Path) -> tuple[Path, dict]:
    """The tiny UNet as two shards with an index, as diffusers writes big models."""
    unet = copy_folder(folder, tmp_path)
    src = read(unet / "diffusion_pytorch_model.safetensors")
    names = list(src.entries)
    halves = {"part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2 :]}
    for shard, keys in halves.items():
        save_file({k: src.entries[k].load().clone() for k in keys}, str(unet / shard), metadata=dict(src.metadata))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return unet, weight_map


def test_a_sharded_folder_reads(folder, tmp_path):
    unet, _ = sharded(folder, tmp_path)
    assert len(open_unet(unet).tensors) == len(read(folder / "m.safetensors").entries)


@pytest.mark.parametrize("bad", ["/etc/hostname", "../outside.safetensors", "sub/../../outside.safetensors"])
def test_a_shard_path_outside_the_folder_is_refused(folder, tmp_path, bad):
    unet, weight_map = sharded(folder, tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "outside.safetensors"))
    weight_map[next(iter(weight_map))] = bad
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FormatError, match="outside its folder"):
        read(unet)


def test_an_index_that_maps_a_key_to_the_wrong_shard_is_refused(folder, tmp_path):
    unet, weight_map = sharded(folder, tmp_path)
    key = next(iter(weight_map))
    weight_map[key] = "part-2.safetensors"
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FormatError, match="index and the shards disagree"):
        read(unet)


def test_an_index_that_misses_a_key_is_refused(folder, tmp_path):
    unet, weight_map = sharded(folder, tmp_path)
    del weight_map[next(iter(weight_map))]
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FormatError, match="does not list it"):
        read(unet)


# ---------------------------------------------------------------------------------------------------------- GGUF


def gguf_bytes(
    tensors: list[tuple[str, tuple[int, ...], int, int]],
    kv: dict | None = None,
    data: int = 4096,
) -> bytes:
    """A minimal GGUF v3 file: (name, ggml dims, type id, offset) per tensor, KVs as uint32 or uint32 arrays."""

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv or {}))
    for key, value in (kv or {}).items():
        if isinstance(value, list):
            out += string(key) + struct.pack("<IIQ", 9, 4, len(value)) + struct.pack(f"<{len(value)}I", *value)
        else:
            out += string(key) + struct.pack("<II", 4, value)
    for name, dims, type_id, offset in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", type_id, offset)
    out += b"\0" * (-len(out) % 32)
    return out + b"\0" * data


def test_gguf_well_formed_file_reads(tmp_path):
    p = write(tmp_path / "ok.gguf", gguf_bytes([("a", (32,), 0, 0), ("b", (32,), 0, 128)]))
    assert set(read(p).entries) == {"a", "b"}


def test_gguf_unaligned_offset_is_refused(tmp_path):
    p = write(tmp_path / "u.gguf", gguf_bytes([("a", (32,), 0, 0), ("b", (32,), 0, 130)]))
    with pytest.raises(FormatError, match="not aligned to 32"):
        read(p)


def test_gguf_two_tensors_on_one_offset_are_refused(tmp_path):
    p = write(tmp_path / "s.gguf", gguf_bytes([("a", (32,), 0, 0), ("b", (32,), 0, 0)]))
    with pytest.raises(FormatError, match="overlap"):
        read(p)


def test_gguf_alignment_zero_is_refused(tmp_path):
    p = write(tmp_path / "z.gguf", gguf_bytes([("a", (32,), 0, 0)], kv={"general.alignment": 0}))
    with pytest.raises(FormatError, match="general.alignment"):
        read(p)


def test_gguf_scalar_orig_shape_is_refused(tmp_path):
    p = write(tmp_path / "o.gguf", gguf_bytes([("a", (32,), 0, 0)], kv={"comfy.gguf.orig_shape.a": 7}))
    with pytest.raises(FormatError, match="orig_shape"):
        read(p)


def test_gguf_huge_array_count_is_refused_without_allocating(tmp_path):
    raw = bytearray(gguf_bytes([], kv={"big": [1, 2, 3]}))
    at = raw.index(b"big") + 3 + 8  # the array's element count, after its type and element type
    raw[at : at + 8] = struct.pack("<Q", 10**12)
    p = write(tmp_path / "big.gguf", bytes(raw))
    with pytest.raises(FormatError, match="array length"):
        read(p)


def test_a_weight_retyped_to_integers_is_refused(folder, tmp_path):
    raw = bytearray((folder / "m.safetensors").read_bytes())
    (hlen,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + hlen])
    name = next(k for k, v in head.items() if k != "__metadata__" and v["dtype"] == "F32")
    head[name]["dtype"] = "I32"  # the same byte count
    new = json.dumps(head, separators=(",", ":")).encode()
    new += b" " * (hlen - len(new))
    assert len(new) == hlen
    p = write(tmp_path / "i32.safetensors", bytes(raw[:8]) + new + bytes(raw[8 + hlen :]))
    with pytest.raises(UnetkitError, match=rf"stored as integers.*{name}"):
        open_unet(p)


def test_gguf_too_many_kv_entries_is_refused(tmp_path):
    raw = bytearray(gguf_bytes([]))
    raw[16:24] = struct.pack("<Q", 1 << 17)  # the KV count
    raw += b"\0" * (24 << 17)  # room enough that only the bound refuses it
    p = write(tmp_path / "kv.gguf", bytes(raw))
    with pytest.raises(FormatError, match="KV count"):
        read(p)


# ------------------------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["--min-sqnr", "nan"], "min_sqnr=nan"),
        (["--guidance", "nan"], "guidance=nan"),
        (["--timesteps", "100000"], "timesteps=100000"),
        (["--steps", "0"], "steps=0"),
        (["--size", "12"], "size=12"),
        (["--min-sqnr", "abc"], "invalid float value: 'abc'"),
    ],
)
def test_bad_verify_arguments_are_one_line_before_any_work(folder, argv, phrase, capsys):
    from unetkit.cli.app import main

    try:
        code = main(["verify", str(folder / "m.safetensors"), str(folder / "m.safetensors"), *argv, "-q"])
    except SystemExit as e:  # argparse's own type errors exit from inside the parser
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and phrase in err and len(err.strip().splitlines()) == 1


def test_verify_of_two_families_is_an_input_error_not_a_failed_verification(folder, tmp_path, capsys):
    from unetkit.cli.app import main

    sd2 = save_ldm(tiny_unet("sd2.x"), tmp_path / "sd2.safetensors")
    assert main(["verify", str(folder / "m.safetensors"), str(sd2), "-q"]) == 2
    assert "different architectures (family: SD1.x vs SD2.x" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- what a file really is


@pytest.mark.parametrize("prefix", ["unet.", ""])
def test_a_peft_lora_is_named_as_a_lora(tmp_path, prefix):
    base = f"{prefix}down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    sd = {f"{base}.lora_A.weight": torch.zeros(4, 32), f"{base}.lora_B.weight": torch.zeros(32, 4)}
    save_file(sd, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelDetectionError, match="this is a LoRA"):
        open_unet(tmp_path / "lora.safetensors")


def test_a_diffusers_controlnet_is_named_as_a_controlnet(tmp_path):
    sd = {
        "conv_in.weight": torch.zeros(32, 4, 3, 3),
        "controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3),
        "controlnet_down_blocks.0.weight": torch.zeros(32, 32, 1, 1),
        "down_blocks.0.resnets.0.conv1.weight": torch.zeros(32, 32, 3, 3),
    }
    save_file(sd, str(tmp_path / "cn.safetensors"))
    with pytest.raises(ModelDetectionError, match="this is a ControlNet"):
        open_unet(tmp_path / "cn.safetensors")


def test_random_bytes_named_ckpt_are_not_called_a_code_running_pickle(tmp_path):
    p = write(tmp_path / "r.ckpt", bytes(range(256)) * 20)
    with pytest.raises(FormatError, match="neither a zip archive nor a pickle"):
        read(p)


def test_a_pickle_with_an_int_key_is_a_clear_error(tmp_path):
    torch.save({1: torch.zeros(2), "w": torch.zeros(1)}, tmp_path / "k.ckpt")
    with pytest.raises(FormatError, match="key 1 of type int"):
        read(tmp_path / "k.ckpt")


def test_a_zip_checkpoint_with_a_short_data_entry_is_refused(tmp_path):
    import zipfile

    torch.save({"w": torch.zeros(1000)}, tmp_path / "ok.ckpt")
    with zipfile.ZipFile(tmp_path / "ok.ckpt") as zin, zipfile.ZipFile(tmp_path / "short.ckpt", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data[:100] if info.filename.endswith("/data/0") else data)
    with pytest.raises(FormatError, match="not a readable PyTorch checkpoint"):
        read(tmp_path / "short.ckpt")


def test_a_damaged_type_id_in_unetkit_s_own_gguf_is_refused(folder, tmp_path):
    from unetkit.formats.gguf import read_header
    from unetkit.gguf_export import quantize_file

    out = quantize_file(folder / "m.safetensors", tmp_path / "q.gguf", "gguf:Q8_0").output
    raw = bytearray(Path(out).read_bytes())
    _, infos = read_header(Path(out))
    bias = next(i for i in infos if i.name == "out.2.bias")  # a 1-D F32 tensor
    name = bias.name.encode()
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", raw, type_at)[0] == 0  # F32
    struct.pack_into("<I", raw, type_at, 1)  # F16: half the bytes, still inside the file
    p = write(tmp_path / "damaged.gguf", bytes(raw))
    with pytest.raises(FormatError, match="stored as F16, but the file records F32"):
        read(p)


def test_gguf_array_of_a_million_empty_strings_is_refused_fast(tmp_path):
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    key = b"tokens"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 8, 1_000_000) + struct.pack("<Q", 0) * 1_000_000
    p = write(tmp_path / "s.gguf", head + body)
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match="array length"):
        read(p)
    assert time.perf_counter() - t0 < 2


def test_a_recorded_config_that_disagrees_with_the_tensors_is_refused(folder, tmp_path):
    unet = copy_folder(folder, tmp_path)
    from unetkit.formats.safetensors_io import read_header

    weights = unet / "diffusion_pytorch_model.safetensors"
    raw = bytearray(weights.read_bytes())
    hlen, head = read_header(weights)
    stored = json.loads(head["__metadata__"]["unetkit.config"])
    stored["block_out_channels"] = [32, 64, 128, 256]  # the last level wider than the tensors
    head["__metadata__"]["unetkit.config"] = json.dumps(stored)
    new = json.dumps(head, separators=(",", ":")).encode()
    assert len(new) <= hlen
    weights.write_bytes(bytes(raw[:8]) + new + b" " * (hlen - len(new)) + bytes(raw[8 + hlen :]))
    cfg = json.loads((unet / "config.json").read_text())
    cfg["block_out_channels"] = stored["block_out_channels"]  # config.json agrees with the stored config
    (unet / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnetkitError, match="wrong shape"):
        open_unet(unet)
