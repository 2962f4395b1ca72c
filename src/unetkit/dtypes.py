"""Names of the dtypes users ask for, in one place."""

from __future__ import annotations

import torch

from unetkit.errors import UnetkitError

BY_NAME: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "f32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``None``/'keep' -> None (keep what the file stores); 'fp16', torch.float16, ... -> the torch dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "keep":
        return None
    try:
        return BY_NAME[value.lower()]
    except KeyError:
        raise UnetkitError(f"unknown dtype {value!r}; use one of keep, fp32, fp16, bf16") from None


def short(dtype: torch.dtype) -> str:
    return SHORT.get(dtype, str(dtype).removeprefix("torch."))


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a (possibly quantized) model computes in: that of its first plain floating parameter. Quantized
    weights are tensor subclasses (torchao, quanto) or integer buffers (GGUF); biases and norms stay plain."""
    for p in model.parameters():
        if type(p.data) is torch.Tensor and p.dtype.is_floating_point:
            return p.dtype
    return torch.float32
