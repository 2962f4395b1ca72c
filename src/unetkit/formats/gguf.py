"""GGUF files from every producer: ComfyUI-GGUF, stable-diffusion.cpp, diffusers-style and unetkit's own.

The header is walked here first (magic, version, every KV and tensor info, bounds), so that a damaged file gets an
error that names the tensor; then gguf-py's ``GGUFReader`` decodes the KV values and memory-maps the data.
Tensor shapes are reported in torch order (GGUF stores them reversed). ComfyUI-GGUF's reshaped tensors (rows of 256
with the real shape in ``comfy.gguf.orig_shape.<name>``) come back in their real shape."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetkit.errors import FormatError, QuantError
from unetkit.formats.base import Checkpoint, TensorEntry

MAGIC = b"GGUF"
MAX_DIMS = 4
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
# GGUF KV value types: id -> struct format (None: string / array)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _Cursor:
    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        with open(path, "rb") as f:
            self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        self.pos = 0

    def take(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        if self.pos + n > len(self.data):
            raise FormatError(f"{self.path}: truncated GGUF header while reading {what} at byte {self.pos}")
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.take("Q", what + " length")
        if n > 1 << 20 or self.pos + n > len(self.data):
            raise FormatError(f"{self.path}: truncated or corrupt GGUF header: {what} claims {n} bytes")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_value(self, vtype: int, key: str) -> None:
        if vtype in _SCALAR:
            self.take(_SCALAR[vtype], f"value of {key!r}")
        elif vtype == _STRING:
            self.string(f"value of {key!r}")
        elif vtype == _ARRAY:
            sub = self.take("I", f"array type of {key!r}")
            count = self.take("Q", f"array length of {key!r}")
            if sub in _SCALAR:
                n = struct.calcsize("<" + _SCALAR[sub]) * count
                if self.pos + n > len(self.data):
                    raise FormatError(f"{self.path}: truncated GGUF header in array {key!r}")
                self.pos += n
            else:
                for _ in range(count):
                    self.skip_value(sub, key)
        else:
            raise FormatError(f"{self.path}: KV {key!r} has unknown GGUF value type {vtype}")


def check_gguf(path: Path) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Validate the header and return (name, torch-order shape, ggml type id, absolute data offset) per tensor."""
    from unetkit.quant.gguf import qtype_by_id

    cur = _Cursor(path)
    if cur.data[:4] != MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic {cur.data[:4]!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.take("I", "version")
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.take("Q", "tensor count")
    n_kv = cur.take("Q", "KV count")
    alignment = 32
    for _ in range(n_kv):
        key = cur.string("KV key")
        vtype = cur.take("I", f"type of {key!r}")
        if key == "general.alignment" and vtype == 4:
            alignment = cur.take("I", "general.alignment")
        else:
            cur.skip_value(vtype, key)
    infos = []
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        n_dims = cur.take("I", f"dimension count of {name!r}")
        if n_dims > MAX_DIMS or n_dims == 0:
            raise FormatError(f"{path}: tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        dims = [cur.take("Q", f"dims of {name!r}") for _ in range(n_dims)]
        type_id = cur.take("I", f"type of {name!r}")
        offset = cur.take("Q", f"offset of {name!r}")
        infos.append((name, tuple(reversed(dims)), type_id, offset))
    data_start = cur.pos + (-cur.pos % alignment)
    out = []
    for name, shape, type_id, offset in infos:
        try:
            q = qtype_by_id(type_id)
        except QuantError as e:
            raise FormatError(f"{path}: tensor {name!r} has unknown ggml type {type_id}: {e}") from e
        if shape[-1] % q.block_size:
            raise FormatError(
                f"{path}: tensor {name!r} ({q.name}, shape {list(shape)}): its row of {shape[-1]} elements does not "
                f"fit the {q.name} block size of {q.block_size}"
            )
        n = int(np.prod(shape)) // q.block_size * q.type_size
        if data_start + offset + n > cur.size:
            raise FormatError(
                f"{path}: tensor {name!r} needs bytes {data_start + offset}..{data_start + offset + n} but the file "
                f"ends at {cur.size}: the file is truncated"
            )
        out.append((name, shape, type_id, data_start + offset))
    return out


def read_gguf(path: Path) -> Checkpoint:
    from gguf import GGUFReader

    from unetkit.quant.gguf import dequantize, qtype_by_id

    path = Path(path)
    infos = check_gguf(path)
    try:
        reader = GGUFReader(path, mode="c")  # copy-on-write: writable tensors, the file never changes
    except (ValueError, KeyError, IndexError) as e:
        raise FormatError(f"{path}: gguf-py could not read the file: {e}") from e
    metadata: dict[str, str] = {}
    orig_shapes: dict[str, tuple[int, ...]] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except (ValueError, IndexError) as e:  # kept, with why, rather than dropped without a word
            metadata[key] = f"<not decodable by gguf-py: {e}>"
            continue
        if key.startswith(ORIG_SHAPE_KEY):
            orig_shapes[key[len(ORIG_SHAPE_KEY) :]] = tuple(int(x) for x in value)
        else:
            metadata[key] = value if isinstance(value, str) else str(value)
    data = {t.name: t for t in reader.tensors}
    entries: dict[str, TensorEntry] = {}
    for name, stored_shape, type_id, offset in infos:
        q = qtype_by_id(type_id)
        shape = orig_shapes.get(name, stored_shape)
        if int(np.prod(shape)) != int(np.prod(stored_shape)):
            raise FormatError(
                f"{path}: {ORIG_SHAPE_KEY}{name} = {list(shape)} does not hold the {int(np.prod(stored_shape))} "
                f"elements of the stored tensor {list(stored_shape)}"
            )
        raw = data[name].data
        nbytes = int(raw.nbytes)
        if q.name in PLAIN:
            entries[name] = TensorEntry(name=name, shape=shape, dtype=PLAIN[q.name], file=path, offset=offset,
                                        nbytes=nbytes, loader=_plain(raw, PLAIN[q.name], shape))
        else:
            entries[name] = TensorEntry(name=name, shape=shape, dtype=torch.float32, nbytes=nbytes, qtype=q.name,
                                        loader=_dequant(raw, q.name, stored_shape, shape, dequantize),
                                        raw=_raw(raw, stored_shape, q.name), stored_shape=stored_shape)
    return Checkpoint(path=path, format="gguf", entries=entries, metadata=metadata, files=(path,))


def _plain(raw: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]):
    def load() -> torch.Tensor:
        t = torch.frombuffer(memoryview(raw).cast("B"), dtype=torch.uint8) if raw.nbytes else torch.empty(0, dtype=torch.uint8)
        return t.view(dtype).reshape(shape)

    return load


def _raw(raw: np.ndarray, stored_shape: tuple[int, ...], qtype: str):
    def load() -> torch.Tensor:
        t = torch.frombuffer(memoryview(raw.reshape(-1)).cast("B"), dtype=torch.uint8)
        rows = int(np.prod(stored_shape[:-1])) if len(stored_shape) > 1 else 1
        return t.reshape(rows, -1)

    return load


def _dequant(raw: np.ndarray, qtype: str, stored_shape: tuple[int, ...], shape: tuple[int, ...], dequantize):
    def load() -> torch.Tensor:
        packed = torch.frombuffer(memoryview(raw.reshape(-1)).cast("B"), dtype=torch.uint8)
        return dequantize(packed, qtype, stored_shape).reshape(shape)

    return load


class GGUFOut:
    """One tensor to write: its qtype, stored shape (torch order) and a callable giving its bytes as a numpy
    array (uint8 rows for quantized types and BF16; float32/float16 arrays for F32/F16)."""

    def __init__(self, name: str, qtype: str, stored_shape: tuple[int, ...], produce):
        from unetkit.quant.gguf import n_bytes

        self.name, self.qtype, self.stored_shape, self.produce = name, qtype, tuple(stored_shape), produce
        self.nbytes = n_bytes(qtype, self.stored_shape)


def write_gguf(path: Path, tensors: list[GGUFOut], kv: dict[str, Any], arch: str = "sd1", progress=None,
               final_kv: Callable[[], dict[str, str]] | None = None) -> None:
    """Stream ``tensors`` into a GGUF file with gguf-py's writer, one tensor produced and written at a time.
    ``kv`` values: str, int, float, bool, or a list of ints (written as an INT32 array). ``final_kv()``, called
    after the last tensor, gives string values known only then (a hash computed meanwhile); each replaces, in
    place, the placeholder of the same length that ``kv`` holds under that key."""
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_quantization_version(2)
    for key, value in kv.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, (list, tuple)):
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        else:
            writer.add_string(key, str(value))
    for t in tensors:
        if t.qtype in ("F32", "F16"):
            writer.add_tensor_info(t.name, t.stored_shape, np.dtype(np.float32 if t.qtype == "F32" else np.float16),
                                   t.nbytes)
        else:
            rows = int(np.prod(t.stored_shape[:-1])) if len(t.stored_shape) > 1 else 1
            byte_shape = (*t.stored_shape[:-1], t.nbytes // max(rows, 1))
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes,
                                   raw_dtype=GGMLQuantizationType[t.qtype])
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        arr = t.produce()
        if arr.nbytes != t.nbytes:
            raise FormatError(f"{path}: internal error: tensor {t.name!r} produced {arr.nbytes} bytes, expected {t.nbytes}")
        writer.write_tensor_data(arr)
        if progress:
            progress(t.nbytes)
    writer.close()
    if final_kv is not None:
        patch_strings(path, final_kv())


def patch_strings(path: Path, values: dict[str, str], search_bytes: int = 64 << 20) -> None:
    """Overwrite string KV values in a written GGUF header, in place; each new value has its placeholder's length."""
    with open(path, "r+b") as fh:
        head = fh.read(search_bytes)
        for key, value in values.items():
            k = key.encode()
            v = value.encode()
            marker = struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(v))  # 8 = GGUF string type
            at = head.find(marker)
            if at < 0:
                raise FormatError(f"{path}: internal error: no string placeholder of {len(v)} bytes for {key!r}")
            fh.seek(at + len(marker))
            fh.write(v)
