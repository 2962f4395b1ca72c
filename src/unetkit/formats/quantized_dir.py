"""A runtime-quantized UNet on disk: the folder that ``unetkit.load_unet`` reloads without re-quantizing.

    OUT/
      config.json                  the diffusers UNet config (what save_config writes)
      unetkit_quant.safetensors    every tensor as a plain tensor: float ones under their diffusers names,
                                   quantized ones decomposed by the backend (torchao: <module>._weight_qdata,
                                   ._weight_scale, ...; quanto: <module>.weight._data, ._scale, ...; gguf: the
                                   packed blocks as uint8)
      unetkit_quant.json           the manifest: format version, method, library versions, the name, dtype and
                                   shape of every stored tensor, the backend's rebuild state and every module's
                                   decision (the QuantReport)
      scheduler_config.json        how to sample the UNet, its prediction type included (when the source is
                                   known: ``quantize_to_dir``); the weights' metadata also carries the source's own

The weights file has its own name on purpose: the folder is not loadable by diffusers' ``from_pretrained`` (its
modules are quantized ones), and nothing should mistake it for a plain diffusers folder.

This module does the folder's file I/O and checks, and nothing else: turning modules into tensors and back is the
backends' job (``quant/runtime``), saving and loading a model the verbs' (``quantization.save_quantized``,
``loading.load_unet``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetkit import dtypes
from unetkit.errors import FormatError, KeyMapError, UnetkitError, list_some
from unetkit.formats.atomic import atomic_output
from unetkit.formats.validate import confined, read_json_file

if TYPE_CHECKING:
    import torch

MANIFEST = "unetkit_quant.json"
WEIGHTS = "unetkit_quant.safetensors"
CONFIG = "config.json"
FORMAT = "unetkit-runtime-quant"
FORMAT_VERSION = 1
REQUIRED = ("method", "tensors", "report", "backend_state")


def is_quantized_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def write_quantized_dir(
    out: str | Path,
    config_json: str,
    tensors: Mapping[str, torch.Tensor],
    manifest: Mapping[str, Any],
    metadata: Mapping[str, str],
    *,
    force: bool = False,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write the folder atomically (an existing ``out`` needs ``force``). ``manifest`` gets the format, the
    weights file's name and the dtype and shape of every tensor added. ``extra_files``: name -> text, written
    beside (``scheduler_config.json``); a name of the folder's own files is refused."""
    out = Path(out)
    codes = {}
    for name, t in tensors.items():
        try:
            codes[name] = dtypes.lookup(t.dtype).code
        except UnetkitError as e:
            raise FormatError(f"{out / WEIGHTS}: tensor {name!r}: {e}") from e
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **manifest,
        "weights": WEIGHTS,
        "tensors": {k: {"dtype": codes[k], "shape": list(v.shape)} for k, v in tensors.items()},
    }
    # safetensors' own writer: quanto stores 0-d scales (input_scale, output_scale). Alignment in the file does not
    # matter here: the reader copies every tensor into fresh (aligned) memory.
    from safetensors.torch import save_file

    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    extra = dict(extra_files or {})
    clash = [n for n in extra if n in (CONFIG, WEIGHTS, MANIFEST) or Path(n).name != n]
    if clash:
        raise FormatError(f"{out}: internal error: extra files {clash} would replace the folder's own")
    with atomic_output(out, force=force, directory=True) as tmp:
        (tmp / CONFIG).write_text(config_json)
        for name, text in extra.items():
            (tmp / name).write_text(text)
        save_file(plain, str(tmp / WEIGHTS), metadata=dict(metadata))
        (tmp / MANIFEST).write_text(json.dumps(body, indent=1, default=str) + "\n")
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a quantized folder, checked: format, version, the keys every manifest has."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise FormatError(
            f"{path}: not a unetkit quantized folder: {MANIFEST} is missing (write one with "
            "`unetkit quantize IN OUT --method torchao:...|quanto:...`)"
        )
    manifest = read_json_file(mf, "the quantization manifest", expect=None)
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if found != FORMAT:
        raise FormatError(f"{mf}: not a unetkit quantization manifest (format {found!r}, expected {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatError(
            f"{mf}: format version {version!r} is newer than this unetkit reads ({FORMAT_VERSION}); upgrade unetkit"
        )
    for key in REQUIRED:
        if key not in manifest:
            raise FormatError(f"{mf}: the manifest has no {key!r}")
    return manifest


def read_quantized_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor], Path]:
    """(manifest, config, tensors, weights file) of a folder written by :func:`write_quantized_dir`. The stored
    tensor set is checked against the manifest (missing, extra, mis-shaped or mis-typed tensors are errors naming the
    file and the tensor); tensors are fresh, 64-byte aligned copies."""
    from unetkit.formats.safetensors_io import read_safetensors

    path = Path(path)
    manifest = read_manifest(path)
    config = read_json_file(path / CONFIG, "the diffusers config")
    weights = confined(path, str(manifest.get("weights", WEIGHTS)), str(path / MANIFEST))
    if not weights.is_file():
        raise FormatError(f"{weights}: the weights file named by {MANIFEST} is missing")
    ckpt = read_safetensors(weights)
    _check_tensors(ckpt.entries, manifest["tensors"], weights)
    # fresh, 64-byte aligned copies (0-d tensors through the library: TensorEntry.read needs a dimension)
    tensors = {name: (e.read() if e.shape else e.load().clone()) for name, e in ckpt.entries.items()}
    return manifest, config, tensors, weights


def _check_tensors(entries: Mapping[str, Any], expected: dict[str, dict], weights: Path) -> None:
    missing = [k for k in expected if k not in entries]
    extra = [k for k in entries if k not in expected]
    if missing or extra:
        raise KeyMapError(
            f"{weights}: stored tensors do not match {MANIFEST}: missing {list_some(missing) or 'none'}; "
            f"unexpected {list_some(extra) or 'none'}"
        )
    for name, want in expected.items():
        e = entries[name]
        if list(e.shape) != list(want.get("shape", [])) or e.code != want.get("dtype"):
            raise KeyMapError(
                f"{weights}: tensor {name!r}: expected {want.get('dtype')} {want.get('shape')}, "
                f"found {e.code} {list(e.shape)}"
            )
