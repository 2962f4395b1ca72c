"""GGUF files from every producer: ComfyUI-GGUF, stable-diffusion.cpp, diffusers-style and unetkit's own.

The header (magic, version, every KV and tensor info) is parsed here by a bounded reader of our own, with neither
numpy nor torch: ``inspect --no-scan`` of a GGUF costs what reading its header costs, and a damaged file gets an
error that names the tensor or key. Counts, string lengths and array lengths are checked against the bytes that
are left before anything is allocated. Tensor data is memory-mapped (copy-on-write: the file never changes) when
a tensor is first loaded. Shapes are reported in torch order (GGUF stores them reversed). ComfyUI-GGUF's reshaped
tensors (rows of 256 with the real shape in ``comfy.gguf.orig_shape.<name>``) come back in their real shape.

Writing goes through gguf-py's ``GGUFWriter``.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetkit.errors import FormatError, QuantError
from unetkit.formats.base import Checkpoint, TensorEntry
from unetkit.formats.validate import check_ranges, load_json, regular_file
from unetkit.provenance import DECISIONS, LDM_PREFIX
from unetkit.quant.gguf.qtypes import QType, qtype_by_id
from unetkit.shapes import numel

if TYPE_CHECKING:
    import torch

MAGIC = b"GGUF"
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
PLAIN = ("F32", "F16", "BF16")  # ggml types stored as plain little-endian floats (same code as unetkit.dtypes)

# GGUF KV value types, named as gguf-py's GGUFValueType (the test suite checks the numbers against it); gguf-py is not
# imported here because it imports numpy, which would double the cost of a header-only inspect.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALAR_FORMATS = {
    UINT8: "B",
    INT8: "b",
    UINT16: "H",
    INT16: "h",
    UINT32: "I",
    INT32: "i",
    FLOAT32: "f",
    BOOL: "?",
    UINT64: "Q",
    INT64: "q",
    FLOAT64: "d",
}

#: bounds on what a header may claim, checked before anything is allocated
MAX_STRING = 16 << 20
MAX_ARRAY = 1 << 16  # UNet files hold arrays of up to 4 (orig_shape); tokenizers are not read here
MAX_ENTRIES = 1 << 16  # KVs and tensors: an SDXL UNet has about 1,700 tensors and as many KVs


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order
    qtype: QType
    offset: int  # absolute, in the file
    nbytes: int


class _Cursor:
    """Reads little-endian values from the memory-mapped header; every read is checked against the file's end."""

    def __init__(self, path: Path, data: Any, size: int):
        self.path, self.data, self.size = path, data, size
        self.pos = 0

    def take(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        if self.pos + n > self.size:
            raise FormatError(f"{self.path}: truncated GGUF header while reading {what} at byte {self.pos}")
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += n
        return value

    def count(self, what: str, item_bytes: int, limit: int) -> int:
        """A count read from the header, refused when the rest of the file cannot hold that many items."""
        n: int = self.take("Q", what)
        if n > limit or n * item_bytes > self.size - self.pos:
            raise FormatError(
                f"{self.path}: corrupt GGUF header: {what} is {n}, but the {self.size - self.pos} bytes left "
                f"cannot hold that many (limit {limit})"
            )
        return n

    def string(self, what: str) -> str:
        n = self.count(what + " length", 1, MAX_STRING)
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.path}: GGUF header: {what} is not valid UTF-8 ({e})") from e

    def value(self, vtype: int, key: str, nested: bool = False) -> Any:
        if vtype in SCALAR_FORMATS:
            return self.take(SCALAR_FORMATS[vtype], f"value of {key!r}")
        if vtype == STRING:
            return self.string(f"value of {key!r}")
        if vtype == ARRAY and not nested:
            sub = self.take("I", f"array type of {key!r}")
            if sub in SCALAR_FORMATS:
                fmt = SCALAR_FORMATS[sub]
                n = self.count(f"array length of {key!r}", struct.calcsize(fmt), MAX_ARRAY)
                values = list(struct.unpack_from(f"<{n}{fmt}", self.data, self.pos))
                self.pos += n * struct.calcsize(fmt)
                return values
            if sub == STRING:
                n = self.count(f"array length of {key!r}", 8, MAX_ARRAY)
                return [self.string(f"item of {key!r}") for _ in range(n)]
            raise FormatError(f"{self.path}: KV {key!r} is an array of GGUF value type {sub}, which is not supported")
        raise FormatError(f"{self.path}: KV {key!r} has unknown GGUF value type {vtype}")


def read_header(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Parse and validate the header: (every KV, decoded; every tensor's info with its absolute data offset)."""
    path = Path(path)
    regular_file(path, "GGUF file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 24:
            raise FormatError(f"{path}: {size} bytes is too short for a GGUF file")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(path, data, size)
    finally:
        data.close()


def _parse(path: Path, data: Any, size: int) -> tuple[dict[str, Any], list[TensorInfo]]:
    cur = _Cursor(path, data, size)
    if data[:4] != MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic {bytes(data[:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.take("I", "version")
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.count("tensor count", 24, MAX_ENTRIES)  # a tensor info takes at least 24 bytes
    n_kv = cur.count("KV count", 12, MAX_ENTRIES)  # a KV takes at least 12 bytes
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("KV key")
        vtype = cur.take("I", f"type of {key!r}")
        if key in kv:
            raise FormatError(f"{path}: GGUF header: KV {key!r} appears twice")
        kv[key] = cur.value(vtype, key)
    alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"{path}: general.alignment = {alignment!r}; it must be a positive power of two")
    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        n_dims = cur.take("I", f"dimension count of {name!r}")
        if n_dims > MAX_DIMS or n_dims == 0:
            raise FormatError(f"{path}: tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        dims = [cur.take("Q", f"dims of {name!r}") for _ in range(n_dims)]
        type_id = cur.take("I", f"type of {name!r}")
        offset = cur.take("Q", f"offset of {name!r}")
        raw_infos.append((name, tuple(reversed(dims)), type_id, offset))
    data_start = cur.pos + (-cur.pos % alignment)
    infos: list[TensorInfo] = []
    seen: set[str] = set()
    for name, shape, type_id, offset in raw_infos:
        if name in seen:
            raise FormatError(f"{path}: tensor {name!r} appears twice in the GGUF header")
        seen.add(name)
        try:
            q = qtype_by_id(type_id)
        except QuantError as e:
            raise FormatError(f"{path}: tensor {name!r} has unknown ggml type {type_id}: {e}") from e
        if shape[-1] % q.block_size:
            raise FormatError(
                f"{path}: tensor {name!r} ({q.name}, shape {list(shape)}): its row of {shape[-1]} elements does not "
                f"fit the {q.name} block size of {q.block_size}"
            )
        n = numel(shape) // q.block_size * q.type_size
        begin = data_start + offset
        if begin + n > size:
            raise FormatError(
                f"{path}: tensor {name!r} needs bytes {begin}..{begin + n} but the file ends at {size}: the file is "
                "truncated"
            )
        infos.append(TensorInfo(name, shape, q, begin, n))
    # ggml refuses both: tensor data starts aligned, and no two tensors share bytes
    check_ranges(
        ((i.name, i.offset - data_start, i.offset - data_start + i.nbytes) for i in infos), str(path), alignment
    )
    return kv, infos


def read_gguf(path: Path) -> Checkpoint:
    path = Path(path)
    kv, infos = read_header(path)
    metadata: dict[str, str] = {}
    orig_shapes: dict[str, tuple[int, ...]] = {}
    for key, value in kv.items():
        if key.startswith(ORIG_SHAPE_KEY):
            if not isinstance(value, list) or not all(isinstance(x, int) and x >= 0 for x in value):
                raise FormatError(f"{path}: {key} = {value!r}; expected a list of dimensions")
            orig_shapes[key[len(ORIG_SHAPE_KEY) :]] = tuple(value)
        else:
            metadata[key] = value if isinstance(value, str) else str(value)
    _check_recorded_types(path, metadata, infos)
    data = _LazyMap(path)
    entries: dict[str, TensorEntry] = {}
    for info in infos:
        shape = orig_shapes.get(info.name, info.shape)
        if numel(shape) != numel(info.shape):
            raise FormatError(
                f"{path}: {ORIG_SHAPE_KEY}{info.name} = {list(shape)} does not hold the {numel(info.shape)} "
                f"elements of the stored tensor {list(info.shape)}"
            )
        q = info.qtype.name
        if q in PLAIN:
            entries[info.name] = TensorEntry(
                name=info.name,
                shape=shape,
                code=q,
                file=path,
                offset=info.offset,
                nbytes=info.nbytes,
                loader=_plain(data, info, shape),
            )
        else:
            entries[info.name] = TensorEntry(
                name=info.name,
                shape=shape,
                code="F32",
                nbytes=info.nbytes,
                qtype=q,
                loader=_dequant(data, info, shape),
                raw=_raw(data, info),
                stored_shape=info.shape,
            )
    return Checkpoint(path=path, format="gguf", entries=entries, metadata=metadata, files=(path,))


def _check_recorded_types(path: Path, metadata: dict[str, str], infos: list[TensorInfo]) -> None:
    """unetkit's own files record every tensor's qtype (``unetkit.decisions``): a tensor info whose type id says
    otherwise was damaged after writing (a norm bias read as Q5_1 decodes to values near 4000), so it is refused."""
    raw = metadata.get(DECISIONS)
    if raw is None:
        return
    decisions = load_json(raw, str(path), what=DECISIONS)
    for info in infos:
        recorded = decisions.get(info.name.removeprefix(LDM_PREFIX))
        if isinstance(recorded, list) and recorded and recorded[0] != info.qtype.name:
            raise FormatError(
                f"{path}: tensor {info.name!r} is stored as {info.qtype.name}, but the file records {recorded[0]} "
                f"for it ({DECISIONS}): its type id was damaged after writing"
            )


class _LazyMap:
    """The file, memory-mapped copy-on-write when the first tensor is loaded (torch wants a writable buffer; nothing
    is ever written back to the file)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: mmap.mmap | None = None

    def bytes(self, info: TensorInfo) -> torch.Tensor:
        import torch

        if self.data is None:
            with open(self.path, "rb") as f:
                self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if not info.nbytes:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.data, dtype=torch.uint8, count=info.nbytes, offset=info.offset)


def _plain(data: _LazyMap, info: TensorInfo, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    from unetkit.dtypes import BY_CODE

    def load() -> torch.Tensor:
        return data.bytes(info).view(BY_CODE[info.qtype.name].torch).reshape(shape)

    return load


def _raw(data: _LazyMap, info: TensorInfo) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        rows = numel(info.shape[:-1])
        return data.bytes(info).reshape(rows, -1)

    return load


def _dequant(data: _LazyMap, info: TensorInfo, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        from unetkit.quant.gguf import dequantize

        return dequantize(data.bytes(info), info.qtype.name, info.shape).reshape(shape)

    return load


class GGUFOut:
    """One tensor to write: its qtype, stored shape (torch order) and a callable giving its bytes as a numpy
    array (uint8 rows for quantized types and BF16; float32/float16 arrays for F32/F16)."""

    def __init__(self, name: str, qtype: str, stored_shape: tuple[int, ...], produce):
        from unetkit.quant.gguf.qtypes import n_bytes

        self.name, self.qtype, self.stored_shape, self.produce = name, qtype, tuple(stored_shape), produce
        self.nbytes = n_bytes(qtype, self.stored_shape)


def write_gguf(
    path: Path,
    tensors: list[GGUFOut],
    kv: dict[str, Any],
    arch: str = "sd1",
    progress=None,
    final_kv: Callable[[], dict[str, str]] | None = None,
) -> None:
    """Stream ``tensors`` into a GGUF file with gguf-py's writer, one tensor produced and written at a time.
    ``kv`` values: str, int, float, bool, or a list of ints (written as an INT32 array). ``final_kv()``, called
    after the last tensor, gives string values known only then (a hash computed meanwhile); each replaces, in
    place, the placeholder of the same length that ``kv`` holds under that key."""
    import numpy as np
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
            # add_key_value, not add_string: gguf-py's add_string drops empty strings without a word
            writer.add_key_value(key, check_string_kv(key, str(value), path), GGUFValueType.STRING)
    for t in tensors:
        if t.qtype in ("F32", "F16"):
            writer.add_tensor_info(
                t.name, t.stored_shape, np.dtype(np.float32 if t.qtype == "F32" else np.float16), t.nbytes
            )
        else:
            rows = numel(t.stored_shape[:-1])
            byte_shape = (*t.stored_shape[:-1], t.nbytes // max(rows, 1))
            writer.add_tensor_info(
                t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=GGMLQuantizationType[t.qtype]
            )
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        arr = t.produce()
        if arr.nbytes != t.nbytes:
            raise FormatError(
                f"{path}: internal error: tensor {t.name!r} produced {arr.nbytes} bytes, expected {t.nbytes}"
            )
        writer.write_tensor_data(arr)
        if progress:
            progress(t.nbytes)
    writer.close()
    if final_kv is not None:
        patch_strings(path, final_kv())


def check_string_kv(key: str, value: str, where: str | Path) -> str:
    """``value`` if a GGUF file can hold it as a string KV that readers (this one included) read back; else a
    FormatError naming the key: GGUF strings are UTF-8 (a lone surrogate, which JSON metadata can carry, is not)
    and this reader takes strings of at most ``MAX_STRING`` bytes."""
    for what, text in (("key", key), ("value", value)):
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise FormatError(
                f"{where}: metadata {key!r} cannot be written to GGUF: its {what} is not valid UTF-8 ({e.reason} at "
                f"character {e.start}); GGUF strings are UTF-8"
            ) from None
        if size > MAX_STRING:
            raise FormatError(
                f"{where}: metadata {key!r} cannot be written to GGUF: its {what} has {size} bytes, over the "
                f"{MAX_STRING} a GGUF reader takes"
            )
    return value


def file_bytes(tensors: Iterable[tuple[str, str, tuple[int, ...]]], kv: Mapping[str, Any], alignment: int = 0) -> int:
    """The exact size of a GGUF v3 file holding ``tensors`` ((name, qtype, stored shape), torch order) and ``kv``
    (typed as :func:`write_gguf` types them: bool, int as UINT32, float as FLOAT32, a list as an INT32 array,
    anything else as a string; put ``general.architecture`` and the other KVs the writer adds in ``kv``): the
    header, padded to the alignment, then each tensor's data, padded to the alignment (as gguf-py and ggml write
    it). From names and shapes alone: sizes a file before anything is encoded."""
    from unetkit.quant.gguf.qtypes import n_bytes

    alignment = alignment or int(kv.get("general.alignment", DEFAULT_ALIGNMENT))
    head = 4 + 4 + 8 + 8
    for key, value in kv.items():
        head += 8 + len(key.encode()) + 4
        if isinstance(value, bool):
            head += 1
        elif isinstance(value, (int, float)):
            head += 4
        elif isinstance(value, (list, tuple)):
            head += 4 + 8 + 4 * len(value)
        else:
            head += 8 + len(str(value).encode())
    data = 0
    for name, qtype, shape in tensors:
        head += 8 + len(name.encode()) + 4 + 8 * len(shape) + 4 + 8
        data += _pad(n_bytes(qtype, shape), alignment)
    return _pad(head, alignment) + data


def _pad(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def patch_strings(path: Path, values: dict[str, str], search_bytes: int = 64 << 20) -> None:
    """Overwrite string KV values in a written GGUF header, in place; each new value has its placeholder's length."""
    with open(path, "r+b") as fh:
        head = fh.read(search_bytes)
        for key, value in values.items():
            k = key.encode()
            v = value.encode()
            marker = struct.pack("<Q", len(k)) + k + struct.pack("<IQ", STRING, len(v))
            at = head.find(marker)
            if at < 0:
                raise FormatError(f"{path}: internal error: no string placeholder of {len(v)} bytes for {key!r}")
            fh.seek(at + len(marker))
            fh.write(v)
