"""The GGUF on-the-fly backend behind the runtime-backend interface: apply (encode a live UNet's Linear and Conv2d
weights with the bit-exact codecs), export and rebuild through a quantized folder, bit for bit."""

from __future__ import annotations

import torch

import unetkit
from helpers import forward, inputs, tiny_unet
from unetkit.metrics import compare
from unetkit.quant.runtime.base import QuantReport, backend, library_versions, plan_modules
from unetkit.quant.runtime.gguf_backend import GGUFConv2d, GGUFLinear, GGUFWeight


def _quantized(qtype: str = "Q8_0"):
    unet = tiny_unet("sd1.x-lcm")
    be = backend("gguf")
    with torch.no_grad():
        decisions = be.apply(unet, qtype, plan_modules(unet, None, None))
    report = QuantReport(method=f"gguf:{qtype}", backend="gguf", versions=library_versions(), decisions=decisions)
    unet.unetkit_quant_report = report
    return unet, report


def test_apply_swaps_linear_and_conv_and_keeps_the_family_sensitive_modules():
    ref = tiny_unet("sd1.x-lcm")
    unet, report = _quantized()
    kinds = {type(m) for m in unet.modules()}
    assert GGUFLinear in kinds and GGUFConv2d in kinds
    by = {d.name: d for d in report.decisions}
    for kept in ("conv_in", "conv_out", "time_embedding.cond_proj", "time_embedding.linear_1"):
        assert not by[kept].quantized and "sensitive layer" in by[kept].reason
    assert by["down_blocks.0.resnets.0.conv1"].quantized  # a 3x3 conv, stored as rows of 256
    args = inputs(ref)
    err = compare(forward(ref, args), forward(unet, args))
    assert err.sqnr_db > 25.0, err


def test_export_and_rebuild_through_a_folder_are_bit_exact(tmp_path):
    unet, report = _quantized("Q4_K")
    out = unetkit.save_quantized(unet, tmp_path / "q")
    back = unetkit.load_unet(out)
    assert sum(isinstance(m, GGUFWeight) for m in back.modules()) == sum(d.quantized for d in report.decisions)
    args = inputs(unet)
    assert torch.equal(forward(unet, args), forward(back, args))
    assert back.unetkit_quant_report.method == "gguf:Q4_K"
