"""Layout conversion, streamed: one tensor at a time from input to output, byte ranges copied when unchanged.

A layout conversion is a pure rename (the key map), so with ``dtype='keep'`` every output tensor holds exactly
the input's bytes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import unetkit
from unetkit.dtypes import parse_dtype, short
from unetkit.errors import UnetkitError
from unetkit.formats.atomic import atomic_output, check_output
from unetkit.formats.base import TensorEntry
from unetkit.formats.hashing import FileHasher
from unetkit.formats.safetensors_io import OutTensor, aligned_order, write_safetensors
from unetkit.resolve import METADATA_CONFIG_KEY, UNetSource, open_unet
from unetkit.spec import diffusers_config_json

LDM_PREFIX = "model.diffusion_model."
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TARGETS = ("diffusers", "ldm")
SHA_PLACEHOLDER = "0" * 64


@dataclass
class ConvertResult:
    output: str
    to: str
    variant: str
    tensors: int
    bytes_written: int
    bytes_copied: int  # of which copied as raw byte ranges
    tensors_converted: int  # tensors whose dtype changed
    dtype: str
    source_sha256: str
    source_sha256_cached: bool = False  # remembered from an earlier run on the unchanged file (see formats.hashing)
    ignored: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert(
    src: str | Path,
    out: str | Path,
    to: str = "diffusers",
    dtype: str | torch.dtype | None = "keep",
    *,
    prefix: bool = True,
    force: bool = False,
    ema: bool = False,
    config: Mapping[str, Any] | str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ConvertResult:
    """Convert ``src`` (any input unetkit reads) to ``out``.

    ``to='diffusers'``: a UNet folder (config.json + diffusion_pytorch_model.safetensors) that
    ``UNet2DConditionModel.from_pretrained`` loads as is. ``to='ldm'``: one safetensors file with LDM names, under
    ``model.diffusion_model.`` unless ``prefix=False``. ``dtype``: 'keep' or fp32/fp16/bf16. The output is
    written under a temporary name and renamed at the end; an existing ``out`` needs ``force=True``.
    ``progress(nbytes)`` is called after each tensor; ``on_start(total_bytes)`` once before the first.
    """
    t0 = time.perf_counter()
    if to not in TARGETS:
        raise UnetkitError(f"unknown target layout {to!r}; use 'diffusers' or 'ldm'")
    src, out = Path(src), Path(out)
    check_output(out, force, inputs=(src,))
    source = open_unet(src, ema=ema, config=config)
    target = parse_dtype(dtype)
    hasher = FileHasher(source.checkpoint.files)
    tensors, copied, changed = _plan(source, to, target, prefix)
    total = sum(t.nbytes for t in tensors)
    meta = metadata_for(source, layout=to, extra={"unetkit.dtype": short(target) if target else "keep"})
    meta["unetkit.source_sha256"] = SHA_PLACEHOLDER

    def final_meta() -> dict[str, str]:
        return {**meta, "unetkit.source_sha256": hasher.result()}

    if on_start:
        on_start(total)
    hasher.start()
    if to == "diffusers":
        with atomic_output(out, force=force, directory=True) as tmp:
            (tmp / "config.json").write_text(diffusers_config_json(source.spec.config))
            write_safetensors(tmp / DIFFUSERS_WEIGHTS, tensors, meta, progress, final_meta)
    else:
        with atomic_output(out, force=force) as tmp:
            write_safetensors(tmp, tensors, meta, progress, final_meta)
    return ConvertResult(
        output=str(out),
        to=to,
        variant=source.spec.variant,
        tensors=len(tensors),
        bytes_written=total,
        bytes_copied=copied,
        tensors_converted=changed,
        dtype=short(target) if target else "keep",
        source_sha256=hasher.result(),
        source_sha256_cached=hasher.cached,
        ignored=dict(source.ignored),
        seconds=time.perf_counter() - t0,
    )


def output_name(source: UNetSource, diffusers_name: str, to: str, prefix: bool) -> str:
    if to == "diffusers":
        return diffusers_name
    return (LDM_PREFIX if prefix else "") + source.ldm_name(diffusers_name)


def _plan(source: UNetSource, to: str, target: torch.dtype | None, prefix: bool):
    tensors: list[OutTensor] = []
    copied = changed = 0
    for name, entry in source.tensors.items():
        dtype = target if (target is not None and entry.dtype.is_floating_point) else entry.dtype
        if entry.qtype is not None and target is None:
            dtype = torch.float32  # quantized storage is decoded; 'keep' means float32 then
        out = OutTensor(name=output_name(source, name, to, prefix), shape=tuple(entry.shape), dtype=dtype)
        if entry.qtype is None and dtype == entry.dtype and entry.file is not None and entry.offset is not None:
            out.src_file, out.src_offset = entry.file, entry.offset
            copied += out.nbytes
        else:
            out.load = _loader(entry, dtype)
            changed += dtype != entry.dtype
        tensors.append(out)
    return aligned_order(tensors), copied, changed


def _loader(entry: TensorEntry, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: entry.read().to(dtype)


def metadata_for(source: UNetSource, layout: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The provenance every unetkit output carries (safetensors and GGUF alike)."""
    meta = {
        "format": "pt",
        "unetkit.version": unetkit.__version__,
        "unetkit.source_name": source.path.name,
        "unetkit.variant": source.spec.variant,
        "unetkit.layout": layout,
        METADATA_CONFIG_KEY: json.dumps(source.spec.config, sort_keys=True),
    }
    if source.spec.time_cond_proj_dim:
        meta["unetkit.time_cond_proj_dim"] = str(source.spec.time_cond_proj_dim)
    meta.update(extra or {})
    return meta
