"""Verify a converted or quantized UNet against its reference: bit-identical or how far off, at which timestep,
after a sampling loop, and which layer is to blame; reports as JSON and self-contained HTML.

    report = unetkit.verify("v1-5.safetensors", "v1-5-Q4_K_M.gguf", quick=True, min_sqnr=20)
    print(report.text()); report.write_html("verify.html")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unetkit._lazy import lazy_attributes

_LAZY = {
    "PRESETS": ".presets",
    "estimate_memory": ".memory",
    "MemoryEstimate": ".memory",
    "verify": ".compare",
    "compare_weights": ".compare",
    "render_html": ".html",
    "write_html": ".html",
    "Report": ".report",
    "SCHEMA": ".report",
    "SCHEMA_PATH": ".report",
}

if TYPE_CHECKING:
    from unetkit.verification.compare import compare_weights, verify
    from unetkit.verification.html import render_html, write_html
    from unetkit.verification.memory import MemoryEstimate, estimate_memory
    from unetkit.verification.presets import PRESETS
    from unetkit.verification.report import SCHEMA, SCHEMA_PATH, Report

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
__all__ = list(_LAZY)
