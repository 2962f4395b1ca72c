"""A runtime-quantized UNet on disk: a folder that ``unetkit.load_unet`` reloads without re-quantizing.

    OUT/
      config.json                  the diffusers UNet config (what save_config writes)
      unetkit_quant.safetensors    every tensor as a plain tensor: float ones under their diffusers names,
                                   quantized ones decomposed by the backend (torchao: <module>._weight_qdata,
                                   ._weight_scale, ...; quanto: <module>.weight._data, ._scale, ...)
      unetkit_quant.json           the manifest: format version, method, library versions, the name, dtype and
                                   shape of every stored tensor, the backend's rebuild state and every module's
                                   decision (the QuantReport)

The weights file has its own name on purpose: the folder is not loadable by diffusers' ``from_pretrained`` (its
modules are quantized ones), and nothing should mistake it for a plain diffusers folder.

On load the stored tensor set is checked against the manifest first (missing, extra, mis-shaped or mis-typed
tensors are errors naming the file and the tensor), then the model is built on the meta device from config.json
and the backend puts its quantized tensors back from the stored integers and scales. The same inputs then give
the same output bit for bit, with the same library versions (recorded in the manifest; a difference is logged).

This module does the folder's file I/O; ``quant/runtime`` backends only turn modules into tensors and back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import unetkit
from unetkit.dtypes import compute_dtype
from unetkit.errors import FormatError, KeyMapError, UnetkitError, list_some
from unetkit.quant.runtime.base import QuantReport, parse_method

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

log = logging.getLogger(__name__)

MANIFEST = "unetkit_quant.json"
WEIGHTS = "unetkit_quant.safetensors"
CONFIG = "config.json"
FORMAT = "unetkit-runtime-quant"
FORMAT_VERSION = 1


def is_quantized_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"unetkit": unetkit.__version__, "torch": torch.__version__}
    for pkg in ("diffusers", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out



def save_quantized(unet: UNet2DConditionModel, report: QuantReport, out: str | Path, *, force: bool = False) -> Path:
    """Write the quantized ``unet`` (as returned by ``unetkit.quantize``) and its report to the folder ``out``,
    atomically (an existing ``out`` needs ``force``)."""
    from unetkit.formats.atomic import atomic_output
    from unetkit.dtypes import lookup
    from unetkit.spec import diffusers_config_json

    out = Path(out)
    be, scheme = parse_method(report.method)
    tensors, state = be.export(unet, report.decisions)
    codes = {}
    for name, t in tensors.items():
        try:
            codes[name] = lookup(t.dtype).code
        except UnetkitError as e:
            raise FormatError(f"{out / WEIGHTS}: tensor {name!r}: {e}") from e
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": report.method,
        "backend": be.name,
        "scheme": scheme,
        "dtype": str(compute_dtype(unet)).removeprefix("torch."),
        "versions": report.versions,
        "weights": WEIGHTS,
        "tensors": {k: {"dtype": codes[k], "shape": list(v.shape)} for k, v in tensors.items()},
        "backend_state": state,
        "report": report.to_dict(),
    }
    # safetensors' own writer: quanto stores 0-d scales (input_scale, output_scale). Alignment in the file does not
    # matter here: the loader copies every tensor into fresh (aligned) memory before rebuilding.
    from safetensors.torch import save_file

    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    with atomic_output(out, force=force, directory=True) as tmp:
        (tmp / CONFIG).write_text(diffusers_config_json(dict(unet.config)))
        save_file(plain, str(tmp / WEIGHTS),
                  metadata={"format": "pt", "unetkit.method": report.method, "unetkit.version": unetkit.__version__})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a quantized folder, checked: format, version, method."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise FormatError(f"{path}: not a unetkit quantized folder: {MANIFEST} is missing (write one with "
                          "`unetkit quantize IN OUT --method torchao:...|quanto:...`)")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{mf}: unreadable manifest ({e})") from e
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if found != FORMAT:
        raise FormatError(f"{mf}: not a unetkit quantization manifest (format {found!r}, expected {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatError(f"{mf}: format version {version!r} is newer than this unetkit reads ({FORMAT_VERSION}); "
                          "upgrade unetkit")
    for key in ("method", "tensors", "report", "backend_state"):
        if key not in manifest:
            raise FormatError(f"{mf}: the manifest has no {key!r}")
    try:
        parse_method(manifest["method"])
    except UnetkitError as e:
        raise FormatError(f"{mf}: {e}") from e
    return manifest


def load_quantized(path: str | Path, dtype: str | torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """Reload a folder written by :func:`save_quantized`; nothing is re-quantized."""
    from unetkit.dtypes import parse_dtype
    from unetkit.formats.safetensors_io import read_safetensors
    from unetkit.spec import build_model

    path = Path(path)
    manifest = read_manifest(path)
    mf = path / MANIFEST
    be, scheme = parse_method(manifest["method"])
    be.check_available(scheme)
    stored = getattr(torch, str(manifest.get("dtype", "float32")), torch.float32)
    if dtype is not None and parse_dtype(dtype) != stored:
        raise UnetkitError(f"{path}: holds a {manifest['method']} UNet computed in {stored}; it cannot be loaded as "
                           f"{dtype} (quantize a {dtype} UNet instead)")
    if torch.device(device).type != "cpu":
        raise UnetkitError(f"{path}: quantized folders load on the CPU; move the model afterwards (.to({device!r}))")
    _check_versions(manifest, mf)
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{path / CONFIG}: missing or unreadable diffusers config ({e})") from e
    weights = path / manifest.get("weights", WEIGHTS)
    if not weights.is_file():
        raise FormatError(f"{weights}: the weights file named by {MANIFEST} is missing")
    ckpt = read_safetensors(weights)
    _check_tensors(ckpt.entries, manifest["tensors"], weights)
    report = QuantReport.from_dict(manifest["report"])
    # fresh, 64-byte aligned copies (0-d tensors through the library: TensorEntry.read needs a dimension)
    tensors = {name: (e.read() if e.shape else e.load().clone()) for name, e in ckpt.entries.items()}
    model = build_model(config, device="meta")
    be.rebuild(model, scheme, report.decisions, tensors, manifest["backend_state"], str(weights))
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise KeyMapError(f"{weights}: {len(on_meta)} tensor(s) left on the meta device: {list_some(on_meta)}")
    model.eval()
    model.unetkit_quant_report = report  # what was done to it, for callers (not part of the state dict)
    log.info("loaded %s (%s, %d stored tensors)", path, manifest["method"], len(ckpt.entries))
    return model


def _check_tensors(entries: dict, expected: dict[str, dict], weights: Path) -> None:
    missing = [k for k in expected if k not in entries]
    extra = [k for k in entries if k not in expected]
    if missing or extra:
        raise KeyMapError(f"{weights}: stored tensors do not match {MANIFEST}: missing {list_some(missing) or 'none'}; "
                          f"unexpected {list_some(extra) or 'none'}")
    for name, want in expected.items():
        e = entries[name]
        if list(e.shape) != list(want.get("shape", [])) or e.code != want.get("dtype"):
            raise KeyMapError(f"{weights}: tensor {name!r}: expected {want.get('dtype')} {want.get('shape')}, "
                              f"found {e.code} {list(e.shape)}")


def _check_versions(manifest: dict, mf: Path) -> None:
    saved = manifest.get("versions", {})
    be, _ = parse_method(manifest["method"])
    now = {**library_versions(), **be.versions()}
    diff = {k: (v, now.get(k)) for k, v in saved.items() if k != "unetkit" and now.get(k) != v}
    if diff:
        log.warning("%s: written with other library versions (%s); outputs may differ in the last bits", mf,
                    ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()))
