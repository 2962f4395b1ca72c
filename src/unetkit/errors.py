"""The whole exception hierarchy of unetkit.

Every message says what happened, to which object (file, tensor, qtype), what was expected and what was found,
and how to fix it when there is a fix. The CLI prints ``UnetkitError`` as one line on stderr and exits 2
(``VerificationFailed`` exits 1); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class UnetkitError(Exception):
    """Base class of every error unetkit raises on purpose."""

    exit_code = 2


class FormatError(UnetkitError):
    """A file cannot be read or written: bad bytes, truncated data, unsupported container, unsafe pickle."""


class KeyMapError(UnetkitError):
    """Tensor names do not fit the key map: unknown, missing, duplicated or mis-shaped keys."""


class ModelDetectionError(KeyMapError):
    """The tensors are not an SD1.x/SD2.x UNet (or not one unetkit supports); says what was seen instead."""


class QuantError(UnetkitError):
    """A quantization cannot be applied: bad input values, a shape that does not fit a block, an unknown qtype."""


class BackendUnavailable(UnetkitError):
    """A runtime backend cannot run here: missing package or missing hardware. Says what would work."""


class VerificationFailed(UnetkitError):
    """A verification ran and its result is below the requested bar."""

    exit_code = 1


class OutputExistsError(UnetkitError):
    """The output path exists and overwriting was not asked for, or the output would overwrite an input."""


class OutputError(UnetkitError):
    """An output cannot be written (full disk, read-only mount, missing folder): where, the OS's reason."""


def list_some(items: Iterable[object], limit: int = 10) -> str:
    """Format a list for an error message: the first ``limit`` items and how many more there are."""
    items = list(items)
    shown = ", ".join(repr(x) if not isinstance(x, str) else x for x in items[:limit])
    more = len(items) - limit
    return f"{shown} (+{more} more)" if more > 0 else shown
