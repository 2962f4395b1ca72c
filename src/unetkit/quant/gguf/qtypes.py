"""The one table of GGML quantization types that unetkit can encode and decode.

Vocabulary (as in ggml): a tensor row is cut into *blocks* of ``block_size`` consecutive elements; each block is stored
in ``type_size`` bytes. A row of ``n`` elements therefore takes ``n // block_size * type_size`` bytes
(:func:`row_bytes`). ``ggml_id`` is the ``ggml_type`` number written into GGUF tensor infos (the same numbering as
gguf-py's ``GGMLQuantizationType``). ``exact_encoder`` says whether :func:`unetkit.quant.gguf.quantize` produces
exactly the bytes of ggml's reference encoder (``quantize_row_*_ref`` / ``ggml_quantize_chunk`` without an importance
matrix); every type in this table does, and the test-suite checks it against bytes produced by ggml itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from unetkit.errors import QuantError, list_some
from unetkit.shapes import numel

__all__ = [
    "QType",
    "QTYPES",
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q5_0",
    "Q5_1",
    "Q4_0",
    "Q4_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "QK_K",
    "qtype_by_name",
    "qtype_by_id",
    "as_qtype",
    "row_bytes",
    "n_bytes",
]

QK_K = 256
"""Elements per K-quant super-block."""


@dataclass(frozen=True)
class QType:
    """One GGML tensor type: its name, ggml id and block geometry."""

    name: str
    ggml_id: int
    block_size: int
    type_size: int
    exact_encoder: bool
    is_float: bool = False

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per element, block headers included (Q4_K: 4.5, Q8_0: 8.5)."""
        return self.type_size * 8 / self.block_size

    def __str__(self) -> str:
        return self.name


# fmt: off
#              name    ggml_id  block_size  type_size                 exact_encoder
F32  = QType("F32",    0,       1,          4,                        True, is_float=True)
F16  = QType("F16",    1,       1,          2,                        True, is_float=True)
BF16 = QType("BF16",   30,      1,          2,                        True, is_float=True)
Q8_0 = QType("Q8_0",   8,       32,         2 + 32,                   True)
Q5_0 = QType("Q5_0",   6,       32,         2 + 4 + 16,               True)
Q5_1 = QType("Q5_1",   7,       32,         2 + 2 + 4 + 16,           True)
Q4_0 = QType("Q4_0",   2,       32,         2 + 16,                   True)
Q4_1 = QType("Q4_1",   3,       32,         2 + 2 + 16,               True)
Q2_K = QType("Q2_K",   10,      QK_K,       16 + 64 + 2 + 2,          True)   # 84
Q3_K = QType("Q3_K",   11,      QK_K,       32 + 64 + 12 + 2,         True)   # 110
Q4_K = QType("Q4_K",   12,      QK_K,       2 + 2 + 12 + 128,         True)   # 144
Q5_K = QType("Q5_K",   13,      QK_K,       2 + 2 + 12 + 32 + 128,    True)   # 176
Q6_K = QType("Q6_K",   14,      QK_K,       128 + 64 + 16 + 2,        True)   # 210
# fmt: on

QTYPES: tuple[QType, ...] = (F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)

_BY_NAME = {q.name.upper(): q for q in QTYPES}
_BY_ID = {q.ggml_id: q for q in QTYPES}


def qtype_by_name(name: str) -> QType:
    """The qtype called ``name`` (case-insensitive: ``"q4_k"`` and ``"Q4_K"`` are the same)."""
    if isinstance(name, QType):
        return name
    key = str(name).strip().upper()
    try:
        return _BY_NAME[key]
    except KeyError:
        raise QuantError(
            f"unknown GGUF qtype {name!r}; known qtypes: {list_some([q.name for q in QTYPES], limit=len(QTYPES))}"
        ) from None


def qtype_by_id(ggml_id: int) -> QType:
    """The qtype with ggml type number ``ggml_id`` (``GGMLQuantizationType`` value)."""
    try:
        return _BY_ID[int(ggml_id)]
    except (KeyError, TypeError, ValueError):
        known = ", ".join(f"{q.name}={q.ggml_id}" for q in QTYPES)
        raise QuantError(f"unsupported ggml type id {ggml_id!r}; unetkit handles: {known}") from None


def as_qtype(qtype: QType | str | int) -> QType:
    """Accept a :class:`QType`, a name or a ggml type id (an ``IntEnum`` such as gguf-py's works too)."""
    if isinstance(qtype, QType):
        return qtype
    if isinstance(qtype, str):
        return qtype_by_name(qtype)
    if isinstance(qtype, int):  # includes IntEnum members
        return qtype_by_id(qtype)
    raise QuantError(f"expected a qtype name, id or QType, got {type(qtype).__name__} {qtype!r}")


def row_bytes(qtype: QType | str | int, n_elements: int) -> int:
    """Bytes taken by ``n_elements`` consecutive elements (one row) stored as ``qtype``."""
    q = as_qtype(qtype)
    n = int(n_elements)
    if n < 0 or n % q.block_size:
        raise QuantError(
            f"a row of {n} elements cannot be stored as {q.name}: its block size is {q.block_size} "
            f"elements, and {n} is not a multiple of it"
        )
    return n // q.block_size * q.type_size


def n_bytes(qtype: QType | str | int, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes taken by a whole tensor of ``shape`` (rows along the last dim) stored as ``qtype``."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        shape = (1,)
    rows = numel(shape[:-1])
    return rows * row_bytes(qtype, shape[-1])
