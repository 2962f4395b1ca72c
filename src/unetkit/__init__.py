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

from unetkit.bench import BenchRecord, bench  # noqa: E402  (``unetkit.bench`` is the function)
from unetkit.convert import ConvertResult, convert  # noqa: E402
from unetkit.inspect import inspect_file  # noqa: E402
from unetkit.load import load_unet  # noqa: E402
from unetkit.quantize import quantize, save_quantized  # noqa: E402  (``unetkit.quantize`` is the function)
from unetkit.resolve import UNetSource, open_unet  # noqa: E402
from unetkit.spec import UNetSpec  # noqa: E402
from unetkit.verify import Report, verify  # noqa: E402  (``unetkit.verify`` is the function)

__all__ = [
    "__version__",
    "BenchRecord",
    "ConvertResult",
    "Report",
    "UNetSource",
    "UNetSpec",
    "bench",
    "convert",
    "inspect_file",
    "load_unet",
    "open_unet",
    "quantize",
    "save_quantized",
    "verify",
    "BackendUnavailable",
    "FormatError",
    "KeyMapError",
    "ModelDetectionError",
    "OutputExistsError",
    "QuantError",
    "UnetkitError",
    "VerificationFailed",
]
