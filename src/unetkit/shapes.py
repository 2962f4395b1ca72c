"""Shape arithmetic on Python ints: no numpy (whose int64 products wrap around: dims (2**62, 4) give 0 elements)."""

from __future__ import annotations

import math
from collections.abc import Iterable


def numel(shape: Iterable[int]) -> int:
    """The number of elements of ``shape`` (1 for a 0-d shape), exact however large."""
    return math.prod(int(d) for d in shape)
