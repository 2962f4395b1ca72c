"""The one dtype table: the file code (safetensors and GGUF spell it ``F16``), the short name users type and reports
show (``fp16``), the torch dtype, the item size. Importing it imports no torch: header-only commands (inspect
``--no-scan``, convert ``--dtype keep``) work on codes, and the torch dtype is looked up when a tensor is touched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unetkit.errors import UnetkitError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    code: str  # safetensors / GGUF name: "F32"
    short: str  # what users type and reports show: "fp32"
    torch_name: str  # attribute of the torch module: "float32"
    itemsize: int
    floating: bool

    @property
    def torch(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.torch_name)
        return dtype


# fmt: off
TABLE: tuple[DType, ...] = (
    DType("F64",     "fp64",    "float64",       8, True),
    DType("F32",     "fp32",    "float32",       4, True),
    DType("F16",     "fp16",    "float16",       2, True),
    DType("BF16",    "bf16",    "bfloat16",      2, True),
    DType("F8_E4M3", "fp8e4m3", "float8_e4m3fn", 1, True),
    DType("F8_E5M2", "fp8e5m2", "float8_e5m2",   1, True),
    DType("I64",     "int64",   "int64",         8, False),
    DType("I32",     "int32",   "int32",         4, False),
    DType("I16",     "int16",   "int16",         2, False),
    DType("I8",      "int8",    "int8",          1, False),
    DType("U8",      "uint8",   "uint8",         1, False),
    DType("BOOL",    "bool",    "bool",          1, False),
)
# fmt: on
BY_CODE: dict[str, DType] = {d.code: d for d in TABLE}
_BY_TORCH_NAME: dict[str, DType] = {d.torch_name: d for d in TABLE}
#: the names users may ask for a cast to (CLI --dtype and the API's dtype=): floating types only
USER_NAMES: dict[str, str] = {
    "fp32": "F32", "float32": "F32", "f32": "F32",
    "fp16": "F16", "float16": "F16", "f16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
}  # fmt: skip


def lookup(dtype: Any) -> DType:
    """The table row of a file code (``"F16"``) or a torch dtype."""
    if isinstance(dtype, str) and dtype in BY_CODE:
        return BY_CODE[dtype]
    row = _BY_TORCH_NAME.get(str(dtype).removeprefix("torch."))
    if row is None:
        raise UnetkitError(f"dtype {dtype} has no safetensors/GGUF code; supported: {', '.join(BY_CODE)}")
    return row


def parse_code(value: Any) -> str | None:
    """A requested cast as a file code, without importing torch: ``None``/'keep' -> None, 'fp16' -> 'F16';
    a torch dtype is accepted too."""
    if value is None or value == "keep":
        return None
    if isinstance(value, str):
        code = USER_NAMES.get(value.lower())
        if code is None:
            raise UnetkitError(f"unknown dtype {value!r}; use one of keep, fp32, fp16, bf16")
        return code
    return lookup(value).code


def parse_dtype(value: Any) -> torch.dtype | None:
    """``None``/'keep' -> None (keep what the file stores); 'fp16', torch.float16, ... -> the torch dtype."""
    code = parse_code(value)
    return BY_CODE[code].torch if code is not None else None


def short(dtype: Any) -> str:
    """'fp16' for torch.float16 or 'F16'; unknown dtypes by their torch name."""
    try:
        return lookup(dtype).short
    except UnetkitError:
        return str(dtype).removeprefix("torch.")


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype a (possibly quantized) model computes in: that of its first plain floating parameter. Quantized
    weights are tensor subclasses (torchao, quanto) or integer buffers (GGUF); biases and norms stay plain. A model
    whose weights are cast layer by layer in forward (``unetkit.loading.cast_in_forward``) says so itself."""
    import torch

    declared = getattr(model, "unetkit_compute_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    for p in model.parameters():
        if type(p.data) is torch.Tensor and p.dtype.is_floating_point:
            dtype: torch.dtype = p.dtype
            return dtype
    return torch.float32
