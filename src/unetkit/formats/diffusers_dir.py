"""diffusers folders: a UNet folder (``config.json`` + weights) or a pipeline folder (its ``unet/``).

Weights are looked for in this order: ``diffusion_pytorch_model.safetensors``, ``….fp16.safetensors``, a sharded
``….safetensors.index.json``, then the ``.bin`` pickles (read with ``weights_only=True``)."""

from __future__ import annotations

import json
from pathlib import Path

from unetkit.errors import FormatError
from unetkit.formats.base import Checkpoint
from unetkit.formats.safetensors_io import read_safetensors

WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "diffusion_pytorch_model.bin.index.json",
)


def unet_folder(path: Path) -> Path:
    """The folder holding the UNet: ``path`` itself, or ``path/unet`` for a pipeline folder."""
    if (path / "model_index.json").is_file() or (not (path / "config.json").is_file() and (path / "unet").is_dir()):
        if not (path / "unet" / "config.json").is_file():
            raise FormatError(f"{path}: a pipeline folder without unet/config.json")
        return path / "unet"
    if not (path / "config.json").is_file():
        raise FormatError(
            f"{path}: a folder without config.json or model_index.json: expected a diffusers UNet folder "
            "(config.json + diffusion_pytorch_model.safetensors) or a pipeline folder with unet/"
        )
    return path


def read_diffusers_folder(path: Path) -> Checkpoint:
    path = Path(path)
    folder = unet_folder(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{folder / 'config.json'}: unreadable config ({e})") from e
    weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FormatError(f"{folder}: no weights found; looked for {', '.join(WEIGHT_NAMES)}")
    files = _shards(weights) if weights.name.endswith(".index.json") else [weights]
    merged = Checkpoint(path=path, format="diffusers-folder", entries={}, config=config, files=tuple(files))
    for f in files:
        part = read_safetensors(f) if f.suffix == ".safetensors" else _read_pickle(f)
        for name, entry in part.entries.items():
            if name in merged.entries:
                raise FormatError(
                    f"{f}: tensor {name!r} also appears in {merged.entries[name].file or 'another shard'}"
                )
            merged.entries[name] = entry
        merged.metadata.update(part.metadata)
        merged.non_tensors.update(part.non_tensors)
    return merged


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise FormatError(f"{index}: not a valid shard index ({e})") from e
    files = []
    for name in dict.fromkeys(weight_map.values()):
        f = index.parent / name
        if not f.is_file():
            raise FormatError(f"{index}: shard {name!r} is listed but missing from {index.parent}")
        files.append(f)
    return files


def _read_pickle(path: Path) -> Checkpoint:
    from unetkit.formats.pickle_io import read_pickle  # torch.load: imported only for .bin folders

    return read_pickle(path)
