"""diffusers folders: a UNet folder (``config.json`` + weights) or a pipeline folder (its ``unet/``).

Weights are looked for in this order: ``diffusion_pytorch_model.safetensors``, ``….fp16.safetensors``, a sharded
``….safetensors.index.json``, then the ``.bin`` pickles (read with ``weights_only=True``).

A scheduler config says how the UNet is sampled, its prediction type included: the UNet folder's own
``scheduler_config.json`` (unetkit writes one there; diffusers' ``from_pretrained`` of the UNet reads only
``config.json`` and is not affected) or, in a pipeline folder, ``scheduler/scheduler_config.json``."""

from __future__ import annotations

from pathlib import Path

from unetkit.errors import FormatError, list_some
from unetkit.formats.base import Checkpoint
from unetkit.formats.safetensors_io import read_safetensors
from unetkit.formats.validate import confined, read_json_file

SCHEDULER_CONFIG = "scheduler_config.json"
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
    config = read_json_file(folder / "config.json", "the diffusers config")
    weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FormatError(f"{folder}: no weights found; looked for {', '.join(WEIGHT_NAMES)}")
    weight_map = _weight_map(weights) if weights.name.endswith(".index.json") else None
    files = list(dict.fromkeys(weight_map.values())) if weight_map is not None else [weights]
    merged = Checkpoint(path=path, format="diffusers-folder", entries={}, config=config, files=tuple(files))
    merged.scheduler_config = read_scheduler_config(path, folder)
    for f in files:
        part = read_safetensors(f) if f.suffix == ".safetensors" else _read_pickle(f)
        for name, entry in part.entries.items():
            if weight_map is not None and weight_map.get(name) != f:
                where = f"maps it to {weight_map[name].name!r}" if name in weight_map else "does not list it"
                raise FormatError(
                    f"{weights}: tensor {name!r} is in the shard {f.name!r}, but the index {where}; "
                    "the index and the shards disagree"
                )
            if name in merged.entries:
                raise FormatError(
                    f"{f}: tensor {name!r} also appears in {merged.entries[name].file or 'another shard'}"
                )
            merged.entries[name] = entry
        merged.metadata.update(part.metadata)
        merged.non_tensors.update(part.non_tensors)
    if weight_map is not None:
        absent = [k for k in weight_map if k not in merged.entries]
        if absent:
            raise FormatError(
                f"{weights}: {len(absent)} tensor(s) listed in the index are in no shard: {list_some(absent)}"
            )
    return merged


def read_scheduler_config(path: Path, folder: Path) -> tuple[Path, dict] | None:
    """The scheduler config that goes with the UNet in ``folder`` (``path`` is what was opened: the folder, or the
    pipeline folder holding it), or None: the folder's own, else its pipeline's (``folder`` opened as the ``unet/``
    of a pipeline counts too). A damaged one is an error, as a damaged config.json is."""
    pipeline = path if folder != path else folder.parent if (folder.parent / "model_index.json").is_file() else None
    candidates = [folder / SCHEDULER_CONFIG]
    if pipeline is not None:
        candidates.append(pipeline / "scheduler" / SCHEDULER_CONFIG)
    for candidate in candidates:
        if candidate.is_file():
            return candidate, read_json_file(candidate, "the scheduler config")
    return None


def _weight_map(index: Path) -> dict[str, Path]:
    """tensor name -> shard file, every shard confined to the index's folder and present."""
    weight_map = read_json_file(index, "the shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index}: not a valid shard index: 'weight_map' must map tensor names to shard files")
    shards: dict[str, Path] = {}
    for name in dict.fromkeys(weight_map.values()):
        f = confined(index.parent, name, str(index))
        if not f.is_file():
            raise FormatError(f"{index}: shard {name!r} is listed but missing from {index.parent}")
        shards[name] = f
    return {k: shards[v] for k, v in weight_map.items()}


def _read_pickle(path: Path) -> Checkpoint:
    from unetkit.formats.pickle_io import read_pickle  # torch.load: imported only for .bin folders

    return read_pickle(path)
