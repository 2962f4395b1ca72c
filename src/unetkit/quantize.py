"""Quantize a UNet file into a GGUF file for ComfyUI-GGUF, stable-diffusion.cpp or diffusers, streamed.

Every tensor gets a decision from the pure policy (``quant.policy``); one tensor at a time is read, encoded and
written; the decisions ride along in the file's metadata and in the returned summary."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import unetkit
from unetkit.errors import UnetkitError
from unetkit.formats.atomic import atomic_output, check_output
from unetkit.formats.base import TensorEntry
from unetkit.formats.gguf import ORIG_SHAPE_KEY, GGUFOut, write_gguf
from unetkit.formats.hashing import FileHasher
from unetkit.quant.policy import Decision, Recipe, plan
from unetkit.convert import SHA_PLACEHOLDER
from unetkit.resolve import METADATA_CONFIG_KEY, open_unet

LDM_PREFIX = "model.diffusion_model."
GGUF_METHOD = "gguf:"


@dataclass
class QuantizeResult:
    output: str
    method: str
    flavor: str
    variant: str
    tensors: int
    parameters: int
    file_bytes: int
    bits_per_weight: float
    by_qtype: dict[str, dict[str, int]]
    decisions: list[dict[str, Any]] = field(default_factory=list)
    source_sha256: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantize_file(
    src: str | Path,
    out: str | Path,
    method: str = "gguf:Q8_0",
    *,
    flavor: str = "comfy",
    keep: Sequence[str] = (),
    override: Sequence[str] = (),
    force: bool = False,
    ema: bool = False,
    config: Mapping[str, Any] | str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> QuantizeResult:
    """Quantize ``src`` (any input unetkit reads) to the GGUF file ``out``.

    ``method``: ``gguf:<recipe>`` with recipe F16, BF16, Q8_0, Q6_K, Q5_0, Q5_1, Q4_0, Q4_1, Q5_K_M, Q5_K_S,
    Q4_K_M, Q4_K_S, Q3_K_M or Q2_K. ``flavor``: comfy (default), sdcpp or diffusers (see ``quant.policy``).
    ``keep``: globs kept at high precision; ``override``: 'GLOB=QTYPE' strings.
    """
    t0 = time.perf_counter()
    if not method.lower().startswith(GGUF_METHOD):
        raise UnetkitError(f"unknown method {method!r}; GGUF methods are gguf:<recipe>, e.g. gguf:Q4_K_M")
    recipe = Recipe.parse(method[len(GGUF_METHOD) :], flavor, keep, override)
    src, out = Path(src), Path(out)
    check_output(out, force, inputs=(src,))
    source = open_unet(src, ema=ema, config=config)
    ldm_names = {d: source.ldm_name(d) for d in source.tensors}
    decisions = plan([(ldm_names[d], e.shape) for d, e in source.tensors.items()], recipe)
    prefix = "" if recipe.flavor == "comfy" else LDM_PREFIX
    tensors, kv = [], {}
    for (d, entry), dec in zip(source.tensors.items(), decisions):
        written = prefix + dec.name
        tensors.append(GGUFOut(written, dec.qtype, dec.stored_shape, _producer(entry, dec, written)))
        if dec.stored_shape != dec.shape:
            kv[ORIG_SHAPE_KEY + written] = list(dec.shape)
    hasher = FileHasher(source.checkpoint.files)
    meta = {
        "unetkit.version": unetkit.__version__,
        "unetkit.method": f"gguf:{recipe.name}",
        "unetkit.flavor": recipe.flavor,
        "unetkit.variant": source.spec.variant,
        "unetkit.source_name": source.path.name,
        METADATA_CONFIG_KEY: json.dumps(source.spec.config, sort_keys=True),
        "unetkit.decisions": json.dumps({d.name: [d.qtype, d.reason] for d in decisions}),
    }
    if source.spec.time_cond_proj_dim:
        meta["unetkit.time_cond_proj_dim"] = int(source.spec.time_cond_proj_dim)
    total = sum(t.nbytes for t in tensors)
    if on_start:
        on_start(total)
    # the header is written first; the source hash, computed meanwhile on the other core, is patched in at the end
    meta["unetkit.source_sha256"] = SHA_PLACEHOLDER
    hasher.start()
    with atomic_output(out, force=force) as tmp:
        write_gguf(tmp, tensors, {**meta, **kv}, arch="sd1", progress=progress,
                   final_kv=lambda: {"unetkit.source_sha256": hasher.result()})
    return summarize(out, recipe, source.spec.variant, decisions, tensors, hasher.result(),
                     time.perf_counter() - t0)


def _producer(entry: TensorEntry, dec: Decision, written: str) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        from unetkit.quant.gguf import quantize

        t = entry.read() if entry.offset is not None else entry.load()
        if dec.qtype == "F32":
            return t.to(torch.float32).contiguous().numpy()
        if dec.qtype == "F16":
            return t.to(torch.float16).contiguous().numpy()
        return quantize(t.to(torch.float32).reshape(dec.stored_shape), dec.qtype, name=written).numpy()

    return produce


def summarize(out: Path, recipe: Recipe, variant: str, decisions: list[Decision], tensors: list[GGUFOut],
              sha: str, seconds: float) -> QuantizeResult:
    by_qtype: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    params = 0
    for dec, t in zip(decisions, tensors):
        n = int(np.prod(dec.shape))
        row = by_qtype[dec.qtype]
        row["tensors"] += 1
        row["parameters"] += n
        row["bytes"] += t.nbytes
        params += n
    data_bytes = sum(t.nbytes for t in tensors)
    return QuantizeResult(
        output=str(out), method=f"gguf:{recipe.name}", flavor=recipe.flavor, variant=variant, tensors=len(tensors),
        parameters=params, file_bytes=out.stat().st_size, bits_per_weight=8 * data_bytes / max(params, 1),
        by_qtype=dict(sorted(by_qtype.items(), key=lambda kv: -kv[1]["parameters"])),
        decisions=[d.to_dict() for d in decisions], source_sha256=sha, seconds=seconds,
    )
