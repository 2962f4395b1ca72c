"""unetkit: read, convert, quantize and verify Stable Diffusion 1.x/2.x UNet checkpoints."""

from __future__ import annotations

__version__ = "0.1.0"

from unetkit.errors import (  # noqa: E402
    BackendUnavailable,
    FormatError,
    KeyMapError,
    ModelDetectionError,
    OutputExistsError,
    QuantError,
    UnetkitError,
    VerificationFailed,
)

__all__ = [
    "__version__",
    "BackendUnavailable",
    "FormatError",
    "KeyMapError",
    "ModelDetectionError",
    "OutputExistsError",
    "QuantError",
    "UnetkitError",
    "VerificationFailed",
]
