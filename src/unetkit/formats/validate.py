"""Header validation, one rule per concern, shared by every reader: JSON that is bounded in size and depth and has
no duplicate keys; byte ranges that are disjoint and aligned; paths that stay inside their folder; inputs that are
regular files. Each rule raises a ``FormatError`` naming the file and the object, never a deep traceback."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from unetkit.errors import FormatError

MAX_JSON_DEPTH = 64  # a UNet config nests 3 deep, a safetensors header 3, a shard index 2
MAX_CONFIG_BYTES = 16 << 20


def load_json(raw: bytes | str, where: str, *, expect: type | None = dict, what: str = "JSON") -> Any:
    """Parse ``raw``; refuse duplicate keys (a later entry would silently win), nesting deeper than
    ``MAX_JSON_DEPTH``, and a top-level value that is not ``expect``."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise FormatError(f"{where}: {what} has the key {key!r} twice; the file is damaged or was edited")
            out[key] = value
        return out

    try:
        obj = json.loads(raw, object_pairs_hook=pairs)
    except RecursionError:
        raise FormatError(f"{where}: {what} is nested too deeply to be what it claims") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise FormatError(f"{where}: {what} is not valid JSON ({e})") from e
    if _depth(obj) > MAX_JSON_DEPTH:
        raise FormatError(f"{where}: {what} nests deeper than {MAX_JSON_DEPTH} levels")
    if expect is not None and not isinstance(obj, expect):
        raise FormatError(
            f"{where}: {what} should be a JSON {expect.__name__ if expect is not dict else 'object'}, "
            f"found {type(obj).__name__}"
        )
    return obj


def read_json_file(path: Path, what: str, *, expect: type | None = dict, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """A small JSON file (config.json, a shard index, a manifest), checked as :func:`load_json` does."""
    regular_file(path, what)
    size = path.stat().st_size
    if size > max_bytes:
        raise FormatError(f"{path}: {what} of {size} bytes is larger than any real one ({max_bytes} bytes at most)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read {what} ({e.strerror or e})") from e
    return load_json(raw, str(path), expect=expect, what=what)


def _depth(obj: Any) -> int:
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def regular_file(path: Path, what: str = "file") -> None:
    """Refuse what is not a regular file (a FIFO would hang the reader, /dev/zero would never end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise FormatError(f"{path}: cannot read the {what} ({e.strerror or e})") from e
    if not stat.S_ISREG(mode):
        raise FormatError(f"{path}: the {what} is not a regular file (a device, FIFO or socket); give a file")


def check_ranges(ranges: Iterable[tuple[str, int, int]], where: str, alignment: int = 1) -> None:
    """Tensor byte ranges ``(name, begin, end)`` must start aligned and must not overlap (two tensors sharing
    bytes is no file any writer produces)."""
    ordered = sorted(ranges, key=lambda r: (r[1], r[2]))
    for name, begin, _ in ordered:
        if alignment > 1 and begin % alignment:
            raise FormatError(
                f"{where}: tensor {name!r} starts at data offset {begin}, not aligned to {alignment} "
                "bytes as the format requires"
            )
    for (a, a_begin, a_end), (b, b_begin, b_end) in zip(ordered, ordered[1:]):
        if b_begin < a_end and b_end > b_begin and a_end > a_begin:
            raise FormatError(
                f"{where}: tensors {a!r} (bytes {a_begin}..{a_end}) and {b!r} (bytes {b_begin}..{b_end})"
                " overlap; the header is damaged"
            )


def confined(folder: Path, name: str, where: str) -> Path:
    """``folder / name`` for a file named inside ``folder`` (a shard in an index): absolute paths and paths that
    climb out with ``..`` are refused, so a folder never makes unetkit read files elsewhere."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not name:
        raise FormatError(
            f"{where}: names the file {name!r}, outside its folder; shard names must be plain "
            "file names in the same folder"
        )
    full = folder / p
    try:
        inside = full.resolve().is_relative_to(folder.resolve())
    except OSError:
        inside = False
    if not inside:
        raise FormatError(f"{where}: {name!r} leads outside {folder} (a symbolic link?); refused")
    return full
