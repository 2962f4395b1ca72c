"""PyTorch pickles (.ckpt / .pt / .pth / .bin), read with ``torch.load(weights_only=True)`` only.

A pickle that needs to run code to load is refused, never executed. Weights nested under ``state_dict`` (Lightning
checkpoints) are unwrapped; other top-level objects (``global_step``, optimizer state, ...) are reported."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import torch

from unetkit import dtypes
from unetkit.errors import FormatError, UnetkitError
from unetkit.formats.base import Checkpoint, TensorEntry
from unetkit.formats.validate import regular_file

NESTED_KEYS = ("state_dict", "model", "module")


def read_pickle(path: Path) -> Checkpoint:
    path = Path(path)
    regular_file(path, "PyTorch checkpoint")
    try:
        mmap = zipfile.is_zipfile(path)  # torch can memory-map only the zip format (torch >= 1.6 files)
    except zipfile.BadZipFile as e:  # is_zipfile itself raises on some damaged end records
        raise FormatError(f"{path}: not a readable PyTorch checkpoint (a damaged zip archive: {e})") from e
    with open(path, "rb") as f:
        head = f.read(2)
    if not mmap and not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise FormatError(
            f"{path}: not a PyTorch checkpoint: neither a zip archive nor a pickle (first bytes "
            f"{head!r}); the file is damaged, or not what its name says"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler says the same for a pickle that would run code and for a damaged one
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(
            f"{path}: refused: this pickle needs to run code to load, or is damaged ({first}). unetkit loads "
            "pickles with torch.load(weights_only=True) and never executes pickled code. Use a .safetensors "
            "release of this model, or re-save the weights as a plain state dict where you trust the file."
        ) from e
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        IndexError,
        KeyError,
        TypeError,
        AttributeError,
        struct.error,
        MemoryError,
    ) as e:  # what torch's weights-only unpickler raises on damage
        raise FormatError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    non_tensors: dict[str, str] = {}
    for _ in range(3):  # unwrap nesting such as {"state_dict": {...}, "global_step": 10}
        if not isinstance(obj, dict):
            break
        nested = next((k for k in NESTED_KEYS if isinstance(obj.get(k), dict) and _has_tensors(obj[k])), None)
        if nested is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        for k, v in obj.items():
            if k != nested:
                non_tensors[k] = f"top-level {type(v).__name__} beside '{nested}'"
        obj = obj[nested]
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    entries = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise FormatError(
                f"{path}: the state dict has a key {name!r} of type {type(name).__name__}; tensor names are strings"
            )
        if isinstance(value, torch.Tensor):
            try:
                code = dtypes.lookup(value.dtype).code
            except UnetkitError as e:
                raise FormatError(f"{path}: tensor {name!r}: {e}") from e
            entries[name] = TensorEntry(
                name=name, shape=tuple(value.shape), code=code, loader=_const(value), nbytes=value.nbytes
            )
        else:
            non_tensors[str(name)] = f"non-tensor {type(value).__name__}"
    return Checkpoint(path=path, format="pickle", entries=entries, files=(path,), non_tensors=non_tensors)


def _has_tensors(d: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in d.values())


def _const(t: torch.Tensor):
    return lambda: t
