"""Bytes <-> tensors. Knows nothing of key layouts or policies."""

from __future__ import annotations

from pathlib import Path

from unetkit.errors import FormatError
from unetkit.formats.base import Checkpoint, TensorEntry
from unetkit.formats.validate import regular_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def sniff(path: Path) -> str:
    """The container format of ``path``, from its first bytes (the suffix is only a hint)."""
    path = Path(path)
    if path.is_dir():
        return "diffusers-folder"
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    regular_file(path, "input")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"GGUF":
        return "gguf"
    # safetensors first: its 8-byte little-endian header length may well start with 0x80, like a pickle
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pickle"
    if path.suffix == ".safetensors":
        return "safetensors"  # let the reader say what is wrong
    if path.suffix in PICKLE_SUFFIXES:
        return "pickle"
    raise FormatError(
        f"{path}: unrecognised file (first bytes {head[:8]!r}); expected .safetensors, a PyTorch pickle "
        "(.ckpt/.pt/.bin), .gguf, or a diffusers folder"
    )


def read(path: str | Path) -> Checkpoint:
    """Open any supported input lazily."""
    path = Path(path)
    kind = sniff(path)
    if kind == "safetensors":
        from unetkit.formats.safetensors_io import read_safetensors

        return read_safetensors(path)
    if kind == "pickle":
        from unetkit.formats.pickle_io import read_pickle

        return read_pickle(path)
    if kind == "diffusers-folder":
        from unetkit.formats.diffusers_dir import read_diffusers_folder

        return read_diffusers_folder(path)
    from unetkit.formats.gguf import read_gguf

    return read_gguf(path)


__all__ = ["Checkpoint", "FormatError", "TensorEntry", "read", "sniff"]
