"""What ComfyUI-GGUF's own pipeline writes for each tensor of an SD UNet, from names, shapes and the source dtype
alone: a model of a third-party tool (no weights, no I/O), to size its files and to hold ours against them.

The pipeline (city96/ComfyUI-GGUF ``tools/``, read at commit 795e451, 2025-12; its rules for SD1/SDXL have not
changed since 2024-10) has two steps:

1. ``tools/convert.py`` writes an F16 GGUF (BF16 when the source is BF16). From an F32 or BF16 source, 1-D tensors
   and tensors of at most 1024 elements are written as F32 instead. SD1/SDXL tensors of 2+ dims with at least 512
   elements, a size that is a multiple of 256 and a last dim that is not are stored as rows of 256, their real shape
   in ``comfy.gguf.orig_shape.<name>`` (an INT32 array). Names are the source's, prefix stripped.
2. ``llama-quantize`` from llama.cpp b3962 with ``tools/lcpp.patch`` turns that file into a quantized one. A tensor
   is quantized when its name ends in ``weight``, it is stored with exactly 2 dims (the patch leaves 3-D/4-D tensors
   of image models alone), and for SD1/SDXL its name contains none of ``class_embedding.``, ``time_embedding.``,
   ``add_embedding.``, ``time_embed.``, ``label_emb.``, ``conv_in.``, ``conv_out.`` and is not
   ``input_blocks.0.0.weight`` or ``out.2.weight``; every other tensor keeps its step-1 type. A quantized tensor
   takes the ftype's base type, upgraded by ``img_tensor_get_type``: ``.to_v.weight`` (Q2_K: Q3_K; Q3_K_M: Q5_K for
   the first two, then Q4_K; Q4_K_M, Q5_K_M: Q6_K; Q4_K_S: Q5_K for the first four) and ``.ff.net.2.weight``
   (Q3_K_M: Q4_K; Q4_K_S: Q5_K; Q4_K_M, Q5_K_M: Q6_K; Q4_0: Q4_1; Q5_0: Q5_1); a K-quant whose stored row is not
   a multiple of 256 falls back to F16. The KVs of step 1 are copied.

unetkit's policy (``policy.py``) uses the same upgrade table, so for the comfy flavor the two differ only where
unetkit chooses otherwise on purpose: 1-D tensors always F32 (ComfyUI-GGUF: the source's type when it is F16),
tensors kept high-precision always F16 (ComfyUI-GGUF: the step-1 type), rows of 256 only where the qtype's block
does not fit the real last dim (ComfyUI-GGUF reshapes in step 1, whatever the qtype: the same bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from unetkit.errors import QuantError
from unetkit.quant.gguf.qtypes import qtype_by_name
from unetkit.shapes import numel

SOURCE_TYPES = ("F32", "F16", "BF16")
QUANTIZATION_THRESHOLD = 1024  # convert.py: at most this many elements stay F32 (F32/BF16 source)
REARRANGE_THRESHOLD = 512  # convert.py: reshaped to rows of 256 from this many elements
ROW = 256
ARCHITECTURES = ("sd1", "sdxl")  # what convert.py writes as general.architecture for SD UNets

#: llama-quantize ftype -> base qtype (``default_type`` in llama_model_quantize_internal), for the ftypes an image
#: model accepts that unetkit has recipes for
BASE = {
    "Q8_0": "Q8_0",
    "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K",
    "Q5_K_S": "Q5_K",
    "Q5_1": "Q5_1",
    "Q5_0": "Q5_0",
    "Q4_K_M": "Q4_K",
    "Q4_K_S": "Q4_K",
    "Q4_1": "Q4_1",
    "Q4_0": "Q4_0",
    "Q3_K_M": "Q3_K",
    "Q2_K": "Q2_K",
}
#: never quantized by the patched llama-quantize for LLM_ARCH_SD1/SDXL (substrings, then exact names)
KEEP_SUBSTRINGS = (
    "class_embedding.",
    "time_embedding.",
    "add_embedding.",
    "time_embed.",
    "label_emb.",
    "conv_in.",
    "conv_out.",
)
KEEP_NAMES = ("input_blocks.0.0.weight", "out.2.weight")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FF_OUT_UPGRADES = {
    "Q3_K_M": "Q4_K",
    "Q4_K_S": "Q5_K",
    "Q4_K_M": "Q6_K",
    "Q5_K_M": "Q6_K",
    "Q4_0": "Q4_1",
    "Q5_0": "Q5_1",
}


@dataclass(frozen=True)
class ComfyDecision:
    name: str
    qtype: str
    shape: tuple[int, ...]  # the real shape
    stored_shape: tuple[int, ...]  # the shape in the file
    reason: str


def convert_step(name: str, shape: Sequence[int], source: str = "F16") -> ComfyDecision:
    """Step 1, ``tools/convert.py``: the type and stored shape of one tensor of an SD1/SDXL UNet."""
    if source not in SOURCE_TYPES:
        raise QuantError(f"source dtype {source!r}: convert.py reads {', '.join(SOURCE_TYPES)}")
    shape = tuple(int(d) for d in shape)
    n = numel(shape)
    qtype, why = ("BF16", "BF16 source") if source == "BF16" else ("F16", "convert.py writes F16")
    if source in ("F32", "BF16") and (len(shape) == 1 or n <= QUANTIZATION_THRESHOLD):
        qtype, why = "F32", "1-D or at most 1024 elements, from an F32/BF16 source"
    stored = shape
    if len(shape) > 1 and n >= REARRANGE_THRESHOLD and n % ROW == 0 and shape[-1] % ROW:
        stored = (n // ROW, ROW)
        why += "; rows of 256 (comfy.gguf.orig_shape)"
    return ComfyDecision(name, qtype, shape, stored, why)


def plan(tensors: Sequence[tuple[str, Sequence[int]]], recipe: str, source: str = "F16") -> list[ComfyDecision]:
    """Both steps for every (name, shape) of an SD1/SDXL UNet (LDM names without prefix), in file order (the
    ``first N`` upgrades count in that order). ``recipe``: F16 (step 1 only), BF16 (a BF16 source, step 1 only)
    or an llama-quantize ftype from :data:`BASE`. A tensor llama-quantize would abort on (a legacy quant whose
    stored row does not fit the block) raises QuantError."""
    key = recipe.upper().removeprefix("GGUF:")
    if key not in BASE and key not in ("F16", "BF16"):
        raise QuantError(f"ComfyUI-GGUF recipe {recipe!r}: known are F16, BF16, {', '.join(BASE)}")
    out: list[ComfyDecision] = []
    to_v_seen = 0
    for name, shape in tensors:
        step1 = convert_step(name, shape, "BF16" if key == "BF16" else source)
        if key not in BASE:
            out.append(step1)
            continue
        kept = _not_quantized(name, step1.stored_shape)
        if kept:
            out.append(ComfyDecision(name, step1.qtype, step1.shape, step1.stored_shape, f"{step1.reason}; {kept}"))
            continue
        qtype, why = BASE[key], f"llama-quantize {key}"
        if ".to_v.weight" in name:
            up = _to_v(key, to_v_seen)
            to_v_seen += 1
            if up:
                qtype, why = up, f"{why}: to_v -> {up}"
        elif ".ff.net.2.weight" in name and key in FF_OUT_UPGRADES:
            qtype = FF_OUT_UPGRADES[key]
            why += f": ff.net.2 -> {qtype}"
        row = step1.stored_shape[-1]
        if qtype in K_QUANTS and row % ROW:
            qtype, why = "F16", f"{why}; row of {row} not a multiple of 256: F16 fallback"
        elif row % qtype_by_name(qtype).block_size:
            raise QuantError(
                f"{name}: llama-quantize would abort: {qtype} on a stored row of {row} elements "
                f"(stored shape {list(step1.stored_shape)})"
            )
        out.append(ComfyDecision(name, qtype, step1.shape, step1.stored_shape, why))
    return out


def _not_quantized(name: str, stored_shape: tuple[int, ...]) -> str | None:
    """Why llama-quantize (patched) leaves this tensor as step 1 wrote it, or None."""
    if not name.endswith("weight"):
        return "not a weight: not quantized"
    if len(_ggml_dims(stored_shape)) != 2:
        return f"stored with {len(_ggml_dims(stored_shape))} dims: the patch quantizes 2-D tensors only"
    if any(s in name for s in KEEP_SUBSTRINGS) or name in KEEP_NAMES:
        return "kept by the patch (SD1/SDXL embeddings, conv_in, conv_out)"
    return None


def _ggml_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dims ggml counts (``ggml_n_dims``): trailing ones of its reversed shape dropped, at least one."""
    dims = list(reversed(shape))
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def _to_v(ftype: str, seen: int) -> str | None:
    if ftype == "Q2_K":
        return "Q3_K"
    if ftype == "Q3_K_M":
        return "Q5_K" if seen < 2 else "Q4_K"
    if ftype in ("Q4_K_M", "Q5_K_M"):
        return "Q6_K"
    if ftype == "Q4_K_S" and seen < 4:
        return "Q5_K"
    return None
