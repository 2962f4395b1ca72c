"""Layout conversion, streamed: one tensor at a time from input to output, byte ranges copied when unchanged.

A layout conversion is a pure rename (the key map), so with ``dtype='keep'`` every output tensor holds exactly
the input's bytes. Nothing about the model is lost on the way: the source's own metadata is carried into the
output's (``provenance.metadata_for``), and so is the prediction type (``unetkit.prediction``): an LDM output holds
the source's marker tensors byte for byte (whatever ``dtype`` says: they are not weights), or the ComfyUI markers
when the source says v-prediction another way; a diffusers folder records it in ``scheduler_config.json`` (where
diffusers users look for it) and in its weights' metadata, marker bytes included, so that the way back restores
them exactly."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetkit.dtypes import BY_CODE, parse_code, short
from unetkit.errors import UnetkitError
from unetkit.formats.atomic import atomic_output, check_output
from unetkit.formats.base import TensorEntry
from unetkit.formats.hashing import FileHasher
from unetkit.formats.safetensors_io import OutTensor, aligned_order, write_safetensors
from unetkit.prediction import SCHEDULER_CONFIG
from unetkit.provenance import DTYPE, LDM_PREFIX, SOURCE_SHA256, metadata_for
from unetkit.resolve import UNetSource, open_unet
from unetkit.spec import diffusers_config_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TARGETS = ("diffusers", "ldm")


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
    prediction: dict[str, Any] = field(default_factory=dict)  # Prediction.to_dict() of the source
    notes: list[str] = field(default_factory=list)  # what was decided on the way (prediction markers, metadata)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert(
    src: str | Path,
    out: str | Path,
    to: str = "diffusers",
    dtype: Any = "keep",
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
    target = parse_code(dtype)  # a file code: 'keep' needs no torch, and byte copies never import it
    hasher = FileHasher(source.checkpoint.files)
    tensors, copied, changed = _plan(source, to, target, prefix)
    notes = list(source.prediction.decisions)
    if to == "ldm":
        markers, marker_notes = source.prediction.ldm_markers()
        marker_tensors = [OutTensor(name=m.key, shape=m.shape, code=m.code, data=m.data) for m in markers.values()]
        tensors = aligned_order(tensors + marker_tensors)
        notes += marker_notes
    total = sum(t.nbytes for t in tensors)
    meta = metadata_for(
        source.spec,
        source.path,
        layout=to,
        extra={DTYPE: short(target) if target else "keep"},
        carried=source.source_metadata,
        prediction=source.prediction,
        markers_in_metadata=to == "diffusers",
    )
    for note in notes[len(source.prediction.decisions) :]:
        log.info("%s: %s", out, note)

    def final_meta() -> dict[str, str]:
        return {**meta, SOURCE_SHA256: hasher.result()}

    if on_start:
        on_start(total)
    hasher.start()
    if to == "diffusers":
        with atomic_output(out, force=force, directory=True) as tmp:
            (tmp / "config.json").write_text(diffusers_config_json(source.spec.config))
            (tmp / SCHEDULER_CONFIG).write_text(source.prediction.scheduler_config_json())
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
        prediction=source.prediction.to_dict(),
        notes=notes,
        seconds=time.perf_counter() - t0,
    )


def output_name(source: UNetSource, diffusers_name: str, to: str, prefix: bool) -> str:
    if to == "diffusers":
        return diffusers_name
    return (LDM_PREFIX if prefix else "") + source.ldm_name(diffusers_name)


def _plan(source: UNetSource, to: str, target: str | None, prefix: bool) -> tuple[list[OutTensor], int, int]:
    tensors: list[OutTensor] = []
    copied = changed = 0
    for name, entry in source.tensors.items():
        code = target if (target is not None and entry.floating) else entry.code  # quantized entries decode to F32
        out = OutTensor(name=output_name(source, name, to, prefix), shape=tuple(entry.shape), code=code)
        if entry.qtype is None and code == entry.code and entry.file is not None and entry.offset is not None:
            out.src_file, out.src_offset = entry.file, entry.offset
            copied += out.nbytes
        else:
            out.load = _loader(entry, code)
            changed += code != entry.code
        tensors.append(out)
    return aligned_order(tensors), copied, changed


def _loader(entry: TensorEntry, code: str) -> Callable[[], torch.Tensor]:
    return lambda: entry.read().to(BY_CODE[code].torch)
