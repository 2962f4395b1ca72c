"""Verify a converted or quantized UNet against its reference: bit-identical or how far off, at which timestep,
after a sampling loop, and which layer is to blame; reports as JSON and self-contained HTML.

    report = unetkit.verify("v1-5.safetensors", "v1-5-Q4_K_M.gguf", quick=True, min_sqnr=20)
    print(report.text()); report.write_html("verify.html")
"""

from unetkit.verify.compare import PRESETS, compare_weights, verify
from unetkit.verify.html import render_html, write_html
from unetkit.verify.report import SCHEMA, SCHEMA_PATH, Report

__all__ = ["PRESETS", "Report", "SCHEMA", "SCHEMA_PATH", "compare_weights", "render_html", "verify", "write_html"]
