"""What is in a file: format, layout, variant, inferred config, counts, dtypes, ignored keys, suspicious tensors."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetkit.dtypes import short
from unetkit.resolve import open_unet

if TYPE_CHECKING:
    import torch


def inspect_file(
    path: str | Path,
    *,
    scan: bool = True,
    ema: bool = False,
    config: Mapping[str, Any] | str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """A JSON-ready description of ``path``. ``scan`` reads every tensor to find NaN/inf and all-zero tensors."""
    source = open_unet(path, ema=ema, config=config)
    ckpt = source.checkpoint
    dtypes: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    for entry in source.tensors.values():
        label = entry.qtype or (entry.code if ckpt.format == "gguf" else short(entry.code))
        row = dtypes[label]
        row["tensors"] += 1
        row["parameters"] += entry.numel
        row["bytes"] += entry.nbytes
    by_reason: dict[str, list[str]] = defaultdict(list)
    for key, reason in source.ignored.items():
        by_reason[reason].append(key)
    suspicious = []
    if scan:
        for name, entry in source.tensors.items():
            problem = _problem(entry.read())
            if problem:
                suspicious.append({"tensor": entry.name, "diffusers_name": name, "problem": problem})
            if progress:
                progress(entry.nbytes)
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "files": [str(f) for f in ckpt.files],
        "file_bytes": sum(f.stat().st_size for f in ckpt.files),
        "layout": source.spec.layout,
        "prefix": source.prefix,
        "variant": source.spec.variant,
        "family": source.spec.family,
        "config_source": source.spec.config_source,
        "assumptions": source.spec.assumptions,
        "config": source.spec.config,
        "keys_in_file": len(ckpt.entries) + len(ckpt.non_tensors),
        "unet_tensors": len(source.tensors),
        "parameters": sum(e.numel for e in source.tensors.values()),
        "bits_per_weight": 8
        * sum(e.nbytes for e in source.tensors.values())
        / max(1, sum(e.numel for e in source.tensors.values())),
        "gguf_flavor": gguf_flavor(source) if ckpt.format == "gguf" else None,
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1]["parameters"])),
        "ignored": [
            {"reason": r, "count": len(keys), "examples": keys[:3]}
            for r, keys in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
        ],
        "metadata": dict(ckpt.metadata),
        "scanned": scan,
        "suspicious": suspicious,
    }


def gguf_flavor(source) -> str:
    """Which producer's rules a GGUF file follows: what unetkit recorded, else read from names and qtypes."""
    recorded = source.checkpoint.metadata.get("unetkit.flavor")
    if recorded:
        return recorded
    if not source.prefix:
        return "comfy (no prefix" + (
            ", orig_shape reshapes)"
            if any(e.stored_shape and e.stored_shape != e.shape for e in source.tensors.values())
            else ")"
        )
    quantized = [e for e in source.tensors.values() if e.qtype]
    if quantized and all(len(e.shape) == 2 for e in quantized):
        return "diffusers-style (prefixed, only 2-D weights quantized)"
    return "sdcpp (prefixed, exact shapes)"


def _problem(t: torch.Tensor) -> str | None:
    import torch

    if not t.dtype.is_floating_point:
        return None
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        nan = int(torch.isnan(t).sum())
        inf = int((~finite).sum()) - nan
        return ", ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if p)
    if t.numel() and not bool(t.any()):
        return "all zero"
    return None


def summary_counts(report: Mapping[str, Any]) -> Counter[str]:
    """Ignored-key counts by reason (for one-line summaries)."""
    return Counter({row["reason"]: row["count"] for row in report["ignored"]})
