"""GGML/GGUF quantization: the qtype table, the codecs (bit-exact with ggml), the recipe policy.

::

    from unetkit.quant.gguf import quantize, dequantize
    packed = quantize(weight, "Q4_K", name="input_blocks.1.1.proj_in.weight")   # uint8 (*lead, row_bytes)
    weight2 = dequantize(packed, "Q4_K", weight.shape)                          # float32, weight.shape

  qtypes.py        the one table of ggml types: name, ggml id, block_size, type_size (no torch)
  codecs/          one codec per type family: legacy (Q8_0, Q4_0, ...), K-quants, floats; fused numba kernels
  tensor_codec.py  quantize()/dequantize() of whole tensors: chunking, checks, dispatch to the codecs
  policy.py        the recipe policy: a pure function (name, shape, recipe, flavor) -> Decision
  comfy_reference.py  a model of ComfyUI-GGUF's own pipeline (convert.py + patched llama-quantize): its qtype for
                   each tensor from names and shapes, to size its files and compare ours with them

Names are lazy (PEP 562): importing the policy or the qtype table does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unetkit._lazy import lazy_attributes

_LAZY = {
    **{n: ".tensor_codec" for n in ("quantize", "dequantize", "get_codec", "CODECS", "Codec")},
    **{n: ".qtypes" for n in ("QType", "QTYPES", "qtype_by_name", "qtype_by_id", "as_qtype", "row_bytes", "n_bytes")},
}

if TYPE_CHECKING:
    from unetkit.quant.gguf.qtypes import QTYPES, QType, as_qtype, n_bytes, qtype_by_id, qtype_by_name, row_bytes
    from unetkit.quant.gguf.tensor_codec import CODECS, Codec, dequantize, get_codec, quantize

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
__all__ = list(_LAZY)
