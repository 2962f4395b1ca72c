"""From a path to a checked UNet: every tensor of the file mapped to its diffusers name or ignored with a reason.

This is the one place where formats (bytes), the key map (names) and the spec (config) meet; ``convert``,
``load_unet`` and ``inspect`` all start here, so all three see the same keys, the same errors and the same config.
It is also where what the file says about the model beyond its weights is gathered, for every output to keep:
the prediction type with its marker tensors (``unetkit.prediction``) and the source's own metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unetkit import families, formats, prediction
from unetkit.errors import KeyMapError, ModelDetectionError, UnetkitError, list_some
from unetkit.formats.base import Checkpoint, TensorEntry
from unetkit.formats.validate import load_json, read_json_file
from unetkit.keymap import KeyMap, Topology
from unetkit.keymap.prefixes import EMA_PREFIX, dotless, split_keys
from unetkit.prediction import Marker, Prediction
from unetkit.provenance import CONFIG, GGUF_CONTAINER_KEYS
from unetkit.shapes import numel
from unetkit.spec import UNetSpec, clean_config, detect_layout, expected_shapes, infer_config

log = logging.getLogger(__name__)


@dataclass
class UNetSource:
    """A readable UNet: its tensors under diffusers names (in file order), the spec, what was ignored, and what
    the file says about the model beyond its weights, which every output keeps: the prediction type (with the
    marker tensors that carry it, byte for byte) and the source's own metadata."""

    checkpoint: Checkpoint
    spec: UNetSpec
    keymap: KeyMap
    tensors: dict[str, TensorEntry]  # diffusers name -> entry
    ignored: dict[str, str]  # raw file key -> reason
    prefix: str  # prefix the UNet keys had in the file
    prediction: Prediction  # epsilon / v_prediction, where it came from, the markers (see unetkit.prediction)
    #: the metadata outputs carry: the file's own (safetensors __metadata__, a diffusers folder's weights metadata,
    #: a GGUF's KVs less the ones that describe the GGUF container); pickles have none
    source_metadata: dict[str, str]

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    def ldm_name(self, diffusers_name: str) -> str:
        name = self.keymap.to_ldm(diffusers_name)
        assert name is not None  # every tensor came through the same map
        return name


def open_unet(
    path: str | Path,
    *,
    ema: bool = False,
    config: Mapping[str, Any] | str | Path | None = None,
) -> UNetSource:
    """Read ``path`` (any supported format) and check it is a complete SD1.x/2.x UNet.

    ``ema``: take the EMA copy (``model_ema.*``) of a full LDM checkpoint instead of the live weights.
    ``config``: a diffusers UNet config (dict or path to config.json) to use instead of the inferred one.
    """
    ckpt = formats.read(path)
    where = f"{ckpt.path}: "
    try:
        return _resolve(ckpt, ema=ema, user_config=_load_config(config))
    except UnetkitError as e:
        if str(e).startswith(str(ckpt.path)):
            raise
        raise type(e)(where + str(e)) from e


def _resolve(ckpt: Checkpoint, *, ema: bool, user_config: dict[str, Any] | None) -> UNetSource:
    split = split_keys(ckpt.entries)
    layout = detect_layout(split.unet, all_keys=ckpt.entries)
    names_topo = Topology.from_ldm_names(split.unet) if layout == "ldm" else Topology.from_diffusers_names(split.unet)
    keymap = KeyMap.for_topology(names_topo)
    ignored = {k: r for k, r in split.ignored.items()}
    ignored.update({k: r for k, r in ckpt.non_tensors.items()})
    raw_by_name = dict(split.unet)  # stripped name -> raw key

    if ema:
        if layout != "ldm" or not split.ema:
            raise KeyMapError("ema=True, but the file has no LDM EMA weights (model_ema.diffusion_model*)")
        by_dotless = {dotless(ldm): ldm for ldm in keymap.ldm_to_diffusers}
        if len(by_dotless) != len(keymap.ldm_to_diffusers):
            raise KeyMapError("internal: two LDM names collide without dots; EMA names would be ambiguous")
        stray = [raw for d, raw in split.ema.items() if d not in by_dotless]
        if stray:
            raise KeyMapError(f"{len(stray)} EMA key(s) match no UNet key: {list_some(stray)}")
        for raw in raw_by_name.values():
            ignored[raw] = "live weights replaced by the EMA copy (ema=True)"
        raw_by_name = {by_dotless[d]: raw for d, raw in split.ema.items()}
        for raw in split.ema.values():
            ignored.pop(raw, None)
    else:
        for raw in split.ema.values():
            ignored.setdefault(raw, "EMA copy of the weights; load it instead with ema=True / --ema")

    # Map names with the topology the names show, infer or take a config, then map again with the topology the
    # config implies, so that a missing or extra tensor is reported as such rather than as a different model.
    shapes = {}
    for name, raw in raw_by_name.items():
        d = keymap.lookup(name, layout)
        if d is not None:
            shapes[d] = ckpt.entries[raw].shape
    source = "inferred"
    config = None
    stored = _metadata_config(ckpt)
    folder = _checked_config(ckpt.config, f"{ckpt.path}: config.json") if ckpt.config is not None else None
    if stored is not None and folder is not None and user_config is None:
        _check_agree(stored, folder, ckpt)
    for candidate, label in ((user_config, "user"), (stored, "file metadata"), (folder, "config.json")):
        if candidate is not None:
            config, source = clean_config(candidate), label
            break
    assumptions: list[str] = []
    if config is None:
        family, config, assumptions = infer_config(names_topo, shapes)
    else:
        family = families.for_config(config)
    variant = family.variant(config)
    topo = Topology.from_config(config)
    topo.check_supported()
    family.check_topology(topo)
    if topo != names_topo:
        keymap = KeyMap.for_topology(topo)

    tensors: dict[str, TensorEntry] = {}
    unknown: list[str] = []
    dupes: list[str] = []
    for name, raw in raw_by_name.items():
        d = keymap.lookup(name, layout)
        if d is None:
            unknown.append(raw)
        elif d in tensors:
            dupes.append(f"{raw} (also given as {tensors[d].name})")
        else:
            tensors[d] = ckpt.entries[raw]
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in tensors]
    wrong = [
        f"{tensors[k].name}: expected {list(s)}, found {list(tensors[k].shape)}"
        for k, s in expected.items()
        if k in tensors and tuple(tensors[k].shape) != s
    ]
    # every UNet weight is a float (or GGUF blocks that decode to one): an integer tensor of the same byte count
    # is a damaged header that would otherwise load as integers and run
    not_float = [f"{e.name} ({e.code})" for e in tensors.values() if not e.floating]
    problems = []
    if not_float:
        problems.append(
            f"{len(not_float)} tensor(s) stored as integers, where UNet weights are floats: {list_some(not_float, 5)}"
        )
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s): {list_some(unknown)}")
    if dupes:
        problems.append(f"{len(dupes)} duplicated key(s): {list_some(dupes)}")
    if missing:
        missing_raw = [_raw_name(keymap, k, layout, split.prefix) for k in missing]
        problems.append(f"{len(missing)} missing key(s): {list_some(missing_raw)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {list_some(wrong, 5)}")
    if problems:
        raise KeyMapError(f"does not match the {variant} UNet described by the {source} config: " + "; ".join(problems))
    spec = UNetSpec(
        layout=layout,
        family=family.name,
        variant=variant,
        config=config,
        config_source=source,
        topology=topo,
        assumptions=assumptions,
    )
    order = {name: i for i, name in enumerate(expected)}
    if ckpt.format != "safetensors":
        tensors = dict(sorted(tensors.items(), key=lambda kv: order[kv[0]]))
    for raw, reason in ignored.items():
        log.info("ignored %s: %s", raw, reason)
    markers = {key: _marker(key, ckpt.entries[raw]) for key, raw in split.markers.items()}
    sched = ckpt.scheduler_config
    pred = prediction.detect(
        markers,
        ckpt.metadata,
        default=family.prediction_type,
        family=family.title,
        scheduler_config=sched[1] if sched else None,
        scheduler_label=str(sched[0]) if sched else prediction.SCHEDULER_CONFIG,
    )
    for decision in pred.decisions:
        log.warning("%s: prediction type: %s", ckpt.path, decision)
    return UNetSource(
        checkpoint=ckpt,
        spec=spec,
        keymap=keymap,
        tensors=tensors,
        ignored=ignored,
        prefix=split.prefix,
        prediction=pred,
        source_metadata=source_metadata(ckpt),
    )


def source_metadata(ckpt: Checkpoint) -> dict[str, str]:
    """The metadata of ``ckpt`` that outputs carry: all of it, less a GGUF's container keys (architecture,
    alignment, file type, quantization version: they describe that file, and each output writes its own)."""
    if ckpt.format == "gguf":
        return {k: v for k, v in ckpt.metadata.items() if k not in GGUF_CONTAINER_KEYS}
    return dict(ckpt.metadata)


def _marker(key: str, entry: TensorEntry) -> Marker:
    """A marker tensor's exact bytes: read from the file where they lie (no torch), else from the loaded tensor
    (pickles, which imported torch to be read at all)."""
    if entry.qtype is not None:
        raise KeyMapError(f"prediction marker {key!r} is stored as {entry.qtype}; markers are plain tensors")
    if numel(entry.shape) > prediction.MAX_MARKER_ELEMENTS:
        raise KeyMapError(
            f"key {key!r} has the name of a prediction-type marker but holds {numel(entry.shape)} values "
            f"{list(entry.shape)}; markers are empty or hold a few values"
        )
    if entry.file is not None and entry.offset is not None:
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            data = f.read(entry.nbytes)
    else:
        import torch

        t = entry.load().detach().contiguous().reshape(-1)
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return Marker(key=key, code=entry.code, shape=tuple(entry.shape), data=data)


def prediction_of(path: str | Path) -> Prediction:
    """The prediction type of any input ``load_unet`` reads, without loading it: a file or folder through
    :func:`open_unet`; a quantized folder from its weights' metadata and its scheduler_config.json."""
    from unetkit.formats.quantized_dir import is_quantized_dir

    if not is_quantized_dir(path):
        return open_unet(path).prediction
    from unetkit.formats.diffusers_dir import SCHEDULER_CONFIG
    from unetkit.formats.quantized_dir import MANIFEST, WEIGHTS, read_manifest
    from unetkit.formats.safetensors_io import read_header
    from unetkit.formats.validate import confined

    folder = Path(path)
    manifest = read_manifest(folder)
    config = _checked_config(read_json_file(folder / "config.json", "the diffusers config"), str(folder))
    _, header = read_header(confined(folder, str(manifest.get("weights", WEIGHTS)), str(folder / MANIFEST)))
    sched_file = folder / SCHEDULER_CONFIG
    sched = read_json_file(sched_file, "the scheduler config") if sched_file.is_file() else None
    family = families.for_config(config)
    return prediction.detect(
        {},
        header.get("__metadata__") or {},
        default=family.prediction_type,
        family=family.title,
        scheduler_config=sched,
        scheduler_label=str(sched_file),
    )


def _raw_name(keymap: KeyMap, diffusers_key: str, layout: str, prefix: str) -> str:
    name = keymap.to_ldm(diffusers_key) if layout == "ldm" else diffusers_key
    return f"{prefix}{name}"


def _metadata_config(ckpt: Checkpoint) -> dict[str, Any] | None:
    raw = ckpt.metadata.get(CONFIG)
    if not raw:
        return None
    where = f"{ckpt.path}: metadata {CONFIG}"
    return _checked_config(load_json(raw, where, what="the stored config"), where)


def _load_config(config: Mapping[str, Any] | str | Path | None) -> dict[str, Any] | None:
    if config is None:
        return None
    if isinstance(config, Mapping):
        return _checked_config(dict(config), "the given config")
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    return _checked_config(read_json_file(p, "the given config (--config)", expect=None), str(p))


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _int_or_list(v: Any) -> bool:
    return _pos_int(v) or (isinstance(v, (list, tuple)) and bool(v) and all(_pos_int(x) for x in v))


#: the config fields unetkit reads, and what each must be (a value of another kind is an error naming the field)
CONFIG_FIELDS: dict[str, tuple[str, Any]] = {
    "in_channels": ("a positive integer", _pos_int),
    "out_channels": ("a positive integer", _pos_int),
    "layers_per_block": ("a positive integer", _pos_int),
    "cross_attention_dim": ("a positive integer", _pos_int),
    "conv_in_kernel": ("a positive integer", _pos_int),
    "conv_out_kernel": ("a positive integer", _pos_int),
    "transformer_layers_per_block": ("a positive integer or a list of them", _int_or_list),
    "attention_head_dim": ("a positive integer or a list of them", _int_or_list),
    "num_attention_heads": ("a positive integer or a list of them", lambda v: v is None or _int_or_list(v)),
    "time_embedding_dim": ("a positive integer or null", lambda v: v is None or _pos_int(v)),
    "time_cond_proj_dim": ("a positive integer or null", lambda v: v is None or _pos_int(v)),
    "use_linear_projection": ("true or false", lambda v: isinstance(v, bool)),
    "mid_block_type": ("a block type name or null", lambda v: v is None or isinstance(v, str)),
}


def _checked_config(config: Any, where: str) -> dict[str, Any]:
    """A diffusers UNet config as far as unetkit reads it: an object whose block_out_channels are positive ints,
    whose block type lists match them, and whose other fields are of the kind ``CONFIG_FIELDS`` says."""
    if not isinstance(config, dict):
        raise ModelDetectionError(f"{where}: a UNet config must be a JSON object, found {type(config).__name__}")
    channels = config.get("block_out_channels")
    if not isinstance(channels, (list, tuple)) or not channels or not all(_pos_int(c) for c in channels):
        raise ModelDetectionError(
            f"{where}: block_out_channels must be a list of positive integers, found "
            f"{channels!r}; is this a diffusers UNet config?"
        )
    problems = []
    for key in ("down_block_types", "up_block_types"):
        value = config.get(key)
        if not (
            isinstance(value, (list, tuple)) and len(value) == len(channels) and all(isinstance(t, str) for t in value)
        ):
            problems.append(f"{key} must list {len(channels)} block type names, found {value!r}")
    for key, (what, ok) in CONFIG_FIELDS.items():
        if key in config and not ok(config[key]):
            problems.append(f"{key} must be {what}, found {config[key]!r}")
    for key in ("transformer_layers_per_block", "attention_head_dim", "num_attention_heads"):
        value = config.get(key)
        if isinstance(value, (list, tuple)) and len(value) != len(channels):
            problems.append(f"{key} lists {len(value)} values for {len(channels)} blocks")
    if problems:
        raise ModelDetectionError(f"{where}: " + "; ".join(problems))
    return config


def _check_agree(stored: dict[str, Any], folder: dict[str, Any], ckpt: Checkpoint) -> None:
    """A folder's config.json and the config unetkit stored in its weights must agree on every key both have: an
    edit of config.json that the metadata would silently override builds a different model than diffusers does."""
    a, b = clean_config(stored), clean_config(folder)
    differ = [
        f"{k}: config.json has {b[k]!r}, the weights' metadata {a[k]!r}"
        for k in sorted(a.keys() & b.keys())
        if a[k] != b[k]
    ]
    if differ:
        raise ModelDetectionError(
            f"{ckpt.path}: config.json disagrees with the config recorded in the weights ({CONFIG}): "
            f"{list_some(differ, 5)}. Restore config.json, or pass the config you mean with --config"
        )


__all__ = ["EMA_PREFIX", "UNetSource", "open_unet", "prediction_of"]
