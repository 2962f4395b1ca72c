"""Per-tensor sensitivity to GGUF quantization, and quantization to a size or quality target (``gguf:auto``).

- :func:`analyze` (:mod:`.measure`): each weight tensor's predicted output noise for each candidate qtype, checked
  against real single-tensor runs, cached per source and settings.
- :func:`quantize_to_target` (:mod:`.target`): choose each tensor's qtype for a ``target_size``, ``target_bpw``
  or ``target_sqnr``, write the GGUF, measure it.
- :mod:`.html`: the pages of both.

    sens = unetkit.sensitivity.analyze("v1-5.safetensors")
    r = unetkit.sensitivity.quantize_to_target("v1-5.safetensors", "v1-5-auto.gguf", target_size="600MiB")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unetkit._lazy import lazy_attributes

_LAZY = {
    "Sensitivity": ".measure",
    "Settings": ".measure",
    "analyze": ".measure",
    "AutoResult": ".target",
    "parse_size": ".target",
    "quantize_to_target": ".target",
}

if TYPE_CHECKING:
    from unetkit.sensitivity.measure import Sensitivity, Settings, analyze
    from unetkit.sensitivity.target import AutoResult, parse_size, quantize_to_target

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
__all__ = list(_LAZY)
