"""Block codecs, one per qtype: ``CODECS[name]`` has ``quantize_blocks`` / ``dequantize_blocks``.

* :mod:`.base`     — the codec interface and the bit-exact arithmetic helpers they share;
* :mod:`.floats`   — F32, F16, BF16;
* :mod:`.legacy`   — Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 (32-element blocks);
* :mod:`.kquants`  — Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-element super-blocks).
"""

from __future__ import annotations

from unetkit.quant.gguf.codecs.base import Codec
from unetkit.quant.gguf.codecs.floats import BF16Codec, F16Codec, F32Codec
from unetkit.quant.gguf.codecs.kquants import Q2_KCodec, Q3_KCodec, Q4_KCodec, Q5_KCodec, Q6_KCodec
from unetkit.quant.gguf.codecs.legacy import Q4_0Codec, Q4_1Codec, Q5_0Codec, Q5_1Codec, Q8_0Codec
from unetkit.quant.gguf.qtypes import QType, as_qtype

__all__ = ["Codec", "CODECS", "get_codec"]

CODECS: dict[str, type[Codec]] = {
    c.qtype.name: c
    for c in (
        F32Codec,
        F16Codec,
        BF16Codec,
        Q8_0Codec,
        Q5_0Codec,
        Q5_1Codec,
        Q4_0Codec,
        Q4_1Codec,
        Q2_KCodec,
        Q3_KCodec,
        Q4_KCodec,
        Q5_KCodec,
        Q6_KCodec,
    )
}


def get_codec(qtype: QType | str | int) -> type[Codec]:
    """The codec class of ``qtype`` (a :class:`QType`, name or ggml id)."""
    return CODECS[as_qtype(qtype).name]
