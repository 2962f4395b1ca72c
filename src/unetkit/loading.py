"""Any supported input -> a ready ``diffusers.UNet2DConditionModel``.

The model is built on the meta device (no memory, no random init) and filled with
``load_state_dict(strict=True, assign=True)`` after the key set and every shape have been checked, so a loaded
UNet has no meta tensor left and never needs ``to_empty()`` (which would wipe the loaded weights)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unetkit.dtypes import parse_dtype, short
from unetkit.errors import FormatError, KeyMapError, UnetkitError, list_some
from unetkit.formats.quantized_dir import MANIFEST, is_quantized_dir, read_quantized_dir
from unetkit.formats.safetensors_io import ALIGN
from unetkit.resolve import UNetSource, open_unet
from unetkit.spec import build_model

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

log = logging.getLogger(__name__)


def default_dtype(source: UNetSource) -> torch.dtype:
    """The floating dtype holding most of the parameters (fp32 for quantized or mixed files)."""
    if any(e.qtype is not None for e in source.tensors.values()):
        return torch.float32  # quantized storage decodes to float32
    counts: Counter[torch.dtype] = Counter()
    for entry in source.tensors.values():
        if entry.qtype is None and entry.dtype.is_floating_point:
            counts[entry.dtype] += entry.numel
        else:
            counts[torch.float32] += entry.numel
    return counts.most_common(1)[0][0] if counts else torch.float32


def load_unet(
    path: str | Path | UNetSource,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    ema: bool = False,
    config: Mapping[str, Any] | str | Path | None = None,
    align: bool = True,
    dequantize: str = "load",
    compute_dtype: str | torch.dtype | None = None,
) -> UNet2DConditionModel:
    """Load any SD1.x/2.x UNet file or folder that unetkit reads into a diffusers UNet, strictly.

    ``dtype``: None keeps the file's floating dtype (the one most parameters have); 'fp32'/'fp16'/'bf16' or a
    torch dtype converts. ``ema``: use the EMA weights of a full LDM checkpoint. ``config``: override the
    inferred diffusers config (dict, config.json or its folder). ``align``: copy tensors that are not 64-byte
    aligned in the file into aligned memory (default), so that the forward output depends only on the weight
    values; ``align=False`` memory-maps everything (faster for files from other writers; CPU kernels may then give
    different last bits than for the same weights elsewhere). Files unetkit writes are aligned: zero-copy either
    way. GGUF inputs: ``dequantize='load'`` decodes every weight once; ``'on-the-fly'`` keeps Linear and Conv2d
    weights quantized in memory and decodes them in forward (``compute_dtype``, default ``dtype``); both give the
    same output bit for bit. A folder written by ``unetkit quantize --method torchao:...|quanto:...`` (it holds
    ``unetkit_quant.json``) is rebuilt with its quantized weights as stored, never re-quantized. Raises
    ``KeyMapError`` naming every missing, unexpected or mis-shaped key; returns the model in eval mode.
    """
    if not isinstance(path, UNetSource) and is_quantized_dir(path):
        # a folder written by `unetkit quantize --method torchao:...|quanto:...`: rebuilt, never re-quantized
        if ema or config is not None or dequantize != "load" or compute_dtype is not None:
            raise UnetkitError(f"{path}: a quantized folder takes no ema/config/dequantize/compute_dtype options")
        return load_quantized(path, dtype=dtype, device=device)
    source = path if isinstance(path, UNetSource) else open_unet(path, ema=ema, config=config)
    target = parse_dtype(dtype) or default_dtype(source)
    device = torch.device(device)
    if compute_dtype is not None:
        target = parse_dtype(compute_dtype) or target
    if dequantize not in ("load", "on-the-fly"):
        raise UnetkitError(f"dequantize={dequantize!r}: use 'load' or 'on-the-fly'")
    model = build_model(source.spec.config, device="meta")
    state = {}
    swapped = _swap_gguf(model, source, device) if dequantize == "on-the-fly" else set()
    for name, entry in source.tensors.items():
        if name in swapped:
            continue
        if (
            align
            and entry.offset is not None
            and entry.offset % ALIGN
            and entry.dtype == target
            and device.type == "cpu"
        ):
            # Not 64-byte aligned in the file (most writers align to 8 only): a memory map would give misaligned
            # weights, and CPU kernels give different last bits on those (see formats/safetensors_io.py), so
            # read a copy into aligned memory. Aligned tensors (unetkit's own files) stay zero-copy.
            t = entry.read()
        else:
            t = entry.load()
        if t.dtype != target and t.dtype.is_floating_point:
            t = t.to(target)
        if t.device != device:
            t = t.to(device)
        elif align and t.data_ptr() % ALIGN:
            t = t.clone()
        state[name] = t
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in swapped]
    if missing or result.unexpected_keys:  # open_unet checked this already; a second line of defence
        raise KeyMapError(
            f"{source.path}: load failed: missing {list_some(missing)}; unexpected {list_some(result.unexpected_keys)}"
        )
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise KeyMapError(f"{source.path}: {len(on_meta)} tensor(s) left on the meta device: {list_some(on_meta)}")
    model.eval()
    log.info(
        "loaded %s (%s, %d tensors) as %s on %s", source.path, source.spec.variant, len(state), short(target), device
    )
    return model


def _swap_gguf(model, source: UNetSource, device: torch.device) -> set[str]:
    """Replace every Linear/Conv2d whose weight is GGUF-quantized by an on-the-fly module; return the tensor names
    now held by those modules (weights and their biases)."""
    from torch import nn

    from unetkit.quant.runtime.base import backend

    gguf: Any = backend("gguf")  # the GGUF backend's attach() is beyond the RuntimeBackend protocol
    done: set[str] = set()
    for name, entry in source.tensors.items():
        if entry.qtype is None or entry.raw is None or not name.endswith(".weight"):
            continue
        module_name = name[: -len(".weight")]
        module = model.get_submodule(module_name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        bias_entry = source.tensors.get(module_name + ".bias")
        bias = bias_entry.load().float().to(device) if bias_entry is not None else None
        gguf.attach(
            model,
            module_name,
            entry.raw().to(device),
            entry.qtype,
            entry.shape,
            entry.stored_shape or entry.shape,
            bias,
        )
        done.add(name)
        if bias_entry is not None:
            done.add(module_name + ".bias")
    return done


def load_quantized(
    path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> UNet2DConditionModel:
    """Reload a folder written by ``unetkit.save_quantized``; nothing is re-quantized: the backend rebuilds its
    modules from the stored integers and scales, so the same inputs give the same output bit for bit (with the
    library versions recorded in the manifest; a difference is logged)."""
    from unetkit.quant.runtime.base import QuantReport, library_versions, parse_method

    path = Path(path)
    manifest, config, tensors, weights = read_quantized_dir(path)
    mf = path / MANIFEST
    try:
        be, scheme = parse_method(manifest["method"], stored=True)
    except UnetkitError as e:
        raise FormatError(f"{mf}: {e}") from e
    be.check_available(scheme)
    stored = getattr(torch, str(manifest.get("dtype", "float32")), torch.float32)
    if dtype is not None and parse_dtype(dtype) != stored:
        raise UnetkitError(
            f"{path}: holds a {manifest['method']} UNet computed in {stored}; it cannot be loaded as "
            f"{dtype} (quantize a {dtype} UNet instead)"
        )
    if torch.device(device).type != "cpu":
        raise UnetkitError(f"{path}: quantized folders load on the CPU; move the model afterwards (.to({device!r}))")
    saved = manifest.get("versions", {})
    now = {**library_versions(), **be.versions()}
    diff = {k: (v, now.get(k)) for k, v in saved.items() if k != "unetkit" and now.get(k) != v}
    if diff:
        log.warning(
            "%s: written with other library versions (%s); outputs may differ in the last bits",
            mf,
            ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()),
        )
    report = QuantReport.from_dict(manifest["report"])
    model = build_model(config, device="meta")
    be.rebuild(model, scheme, report.decisions, tensors, manifest["backend_state"], str(weights))
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise KeyMapError(f"{weights}: {len(on_meta)} tensor(s) left on the meta device: {list_some(on_meta)}")
    model.eval()
    model.unetkit_quant_report = report  # what was done to it, for callers (not part of the state dict)
    log.info("loaded %s (%s, %d stored tensors)", path, manifest["method"], len(tensors))
    return model
