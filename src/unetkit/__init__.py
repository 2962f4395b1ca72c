"""unetkit: read, convert, quantize and verify Stable Diffusion UNet checkpoints.

The public API, as lazy attributes (PEP 562): ``import unetkit`` imports neither torch nor diffusers; each name is
imported from its module on first use. The verbs live in modules whose names are not those of the functions
(``unetkit.conversion.convert``, ``unetkit.verification.verify``), so no function shadows its module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unetkit._lazy import lazy_attributes
from unetkit._version import __version__
from unetkit.errors import (
    BackendUnavailable,
    FormatError,
    KeyMapError,
    ModelDetectionError,
    OutputExistsError,
    QuantError,
    UnetkitError,
    VerificationFailed,
)

#: public name -> the module that defines it
_LAZY = {
    "BatchResult": "unetkit.batch",
    "load_plan": "unetkit.batch",
    "run_batch": "unetkit.batch",
    "BenchRecord": "unetkit.benchmarking",
    "bench": "unetkit.benchmarking",
    "ConvertResult": "unetkit.conversion",
    "convert": "unetkit.conversion",
    "inspect_file": "unetkit.inspection",
    "load_unet": "unetkit.loading",
    "quantize": "unetkit.quantization",
    "save_quantized": "unetkit.quantization",
    "quantize_file": "unetkit.gguf_export",
    "UNetSource": "unetkit.resolve",
    "open_unet": "unetkit.resolve",
    "UNetSpec": "unetkit.spec",
    "Report": "unetkit.verification",
    "verify": "unetkit.verification",
}

if TYPE_CHECKING:
    from unetkit.batch import BatchResult, load_plan, run_batch
    from unetkit.benchmarking import BenchRecord, bench
    from unetkit.conversion import ConvertResult, convert
    from unetkit.gguf_export import quantize_file
    from unetkit.inspection import inspect_file
    from unetkit.loading import load_unet
    from unetkit.quantization import quantize, save_quantized
    from unetkit.resolve import UNetSource, open_unet
    from unetkit.spec import UNetSpec
    from unetkit.verification import Report, verify


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)

__all__ = [
    "__version__",
    *_LAZY,
    "BackendUnavailable",
    "FormatError",
    "KeyMapError",
    "ModelDetectionError",
    "OutputExistsError",
    "QuantError",
    "UnetkitError",
    "VerificationFailed",
]
