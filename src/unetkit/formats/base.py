"""What every reader returns: a lazy :class:`Checkpoint` of :class:`TensorEntry` objects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class TensorEntry:
    """One tensor of a file, not yet read. ``offset``/``nbytes`` locate its raw bytes when they are stored
    contiguously, little-endian, in ``file`` (safetensors): then a copy that does not change the bytes can copy
    the byte range instead of decoding the tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    loader: Callable[[], torch.Tensor] = field(repr=False)
    file: Path | None = None
    offset: int | None = None
    nbytes: int = 0
    #: storage type when the stored bytes are not a plain torch dtype (GGUF qtypes); None for plain tensors
    qtype: str | None = None

    def load(self) -> torch.Tensor:
        return self.loader()

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Checkpoint:
    """The tensors (lazily), metadata and origin of one input."""

    path: Path
    format: str  # "safetensors", "pickle", "diffusers-folder", "gguf"
    entries: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # a diffusers config.json beside the weights, when there is one
    files: tuple[Path, ...] = ()
    #: non-tensor objects found in the file (pickles), name -> short description; reported as ignored
    non_tensors: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)
