"""What every reader returns: a lazy :class:`Checkpoint` of :class:`TensorEntry` objects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetkit import dtypes
from unetkit.shapes import numel

if TYPE_CHECKING:
    import torch


@dataclass
class TensorEntry:
    """One tensor of a file, not yet read. ``offset``/``nbytes`` locate its raw bytes when they are stored
    contiguously, little-endian, in ``file`` (safetensors): then a copy that does not change the bytes can copy
    the byte range instead of decoding the tensor."""

    name: str
    shape: tuple[int, ...]
    code: str  # the stored dtype's file code ("F32", "F16", ...; see unetkit.dtypes); quantized tensors: "F32"
    loader: Callable[[], torch.Tensor] = field(repr=False)
    file: Path | None = None
    offset: int | None = None
    nbytes: int = 0
    #: storage type when the stored bytes are not a plain torch dtype (GGUF qtypes); None for plain tensors
    qtype: str | None = None
    #: quantized tensors: the stored bytes as uint8 (rows, row_bytes), and the stored (maybe reshaped) shape
    raw: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    stored_shape: tuple[int, ...] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the tensor as loaded (imports torch)."""
        return dtypes.BY_CODE[self.code].torch

    @property
    def floating(self) -> bool:
        return dtypes.BY_CODE[self.code].floating

    def load(self) -> torch.Tensor:
        """The tensor, memory-mapped where the format allows (no copy; pages stay mapped while referenced)."""
        return self.loader()

    def read(self) -> torch.Tensor:
        """A fresh copy in newly allocated (64-byte aligned) memory, read straight from the file when the bytes
        are located there, so that no memory map grows the resident set: streaming code uses this."""
        if self.file is None or self.offset is None or self.qtype is not None:
            return self.loader().clone()
        return read_range(self.file, self.offset, self.shape, self.dtype, self.name)

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclass
class Checkpoint:
    """The tensors (lazily), metadata and origin of one input."""

    path: Path
    format: str  # "safetensors", "pickle", "diffusers-folder", "gguf"
    entries: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # a diffusers config.json beside the weights, when there is one
    #: a diffusers scheduler config found with the weights (path, content): the folder's scheduler_config.json
    #: (unetkit writes one), or a pipeline's scheduler/scheduler_config.json; read for the prediction type
    scheduler_config: tuple[Path, dict[str, Any]] | None = None
    files: tuple[Path, ...] = ()
    #: non-tensor objects found in the file (pickles), name -> short description; reported as ignored
    non_tensors: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)


def read_range(file: Path | str, offset: int, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> torch.Tensor:
    """The tensor stored contiguously at ``offset`` in ``file``, read with one ``readinto`` into fresh
    (64-byte aligned) memory: no memory map grows the resident set."""
    import torch

    out = torch.empty(shape, dtype=dtype)
    if out.numel():
        # numpy arrays are buffers; numpy's stubs do not say so to mypy
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
        with open(file, "rb", buffering=0) as f:
            f.seek(offset)
            got = f.readinto(view)
        if got != len(view):
            raise OSError(f"{file}: short read of tensor {name!r} ({got} of {len(view)} bytes)")
    return out
