"""What a benchmark variant is: ``PATH`` or ``PATH@METHOD``, checked before anything is loaded.

METHOD is one of

  on-the-fly, load              how a GGUF file is dequantized (``load_unet(dequantize=...)``); a GGUF path without
                                a method is benchmarked on-the-fly, the memory-saving runtime;
  torchao:<scheme>, quanto:<q>  a runtime quantization applied after loading (``unetkit.quantize(unet, method)``).

A path may itself contain '@' (``runs@2024/unet.safetensors``): the text is split at its LAST '@' only when what
follows is a known method, so such a path stays a path. Everything a variant needs is checked here, up front, so
that a typo in the fifth variant does not surface after four slow benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unetkit.errors import UnetkitError

#: GGUF dequantize modes, with what each one means (``load_unet(dequantize=...)``)
GGUF_MODES: dict[str, str] = {
    "on-the-fly": "GGUF: keep Linear/Conv2d weights packed, decode them in forward (default for .gguf)",
    "load": "GGUF: decode every weight once while loading",
}
#: the method recorded for a variant without one that is not a GGUF file: weights used as stored
AS_STORED = "as-stored"


@dataclass(frozen=True)
class Variant:
    """One thing to benchmark: the text the user gave, the path, and the method (never empty)."""

    text: str
    path: Path
    method: str  # "as-stored", "on-the-fly", "load", or a runtime method "torchao:...", "quanto:..."
    is_gguf: bool

    @property
    def dequantize(self) -> str:
        """The ``load_unet(dequantize=...)`` mode: the GGUF mode, 'load' for everything else (a GGUF file under a
        runtime method is decoded at load and then re-quantized by the runtime backend)."""
        return self.method if self.method in GGUF_MODES else "load"

    @property
    def runtime_method(self) -> str | None:
        """The torchao:/quanto: method applied after loading, if any."""
        return None if self.method in GGUF_MODES or self.method == AS_STORED else self.method

    def to_dict(self) -> dict[str, object]:
        return {"text": self.text, "path": str(self.path), "method": self.method, "is_gguf": self.is_gguf}

    @classmethod
    def from_dict(cls, d: dict) -> Variant:
        return cls(text=str(d["text"]), path=Path(d["path"]), method=str(d["method"]), is_gguf=bool(d["is_gguf"]))


def runtime_methods() -> list[str]:
    """torchao:/quanto: method names (importing neither package)."""
    from unetkit.quant.runtime.base import known_methods

    return known_methods()


def valid_methods() -> list[str]:
    return [*GGUF_MODES, *runtime_methods()]


def methods_hint() -> str:
    return (
        f"valid methods: {', '.join(GGUF_MODES)} (GGUF files only), {', '.join(runtime_methods())}; "
        "write VARIANT as PATH or PATH@METHOD"
    )


def _canonical(method: str) -> str | None:
    """The known method ``method`` names (case-insensitive), or None."""
    m = method.strip().lower()
    return m if m in valid_methods() else None


def parse_variant(text: str | Path) -> Variant:
    """``PATH`` or ``PATH@METHOD`` -> a checked Variant.

    Raises ``UnetkitError`` naming the variant when the path does not exist, the method is unknown (listing the
    valid ones), a GGUF mode is asked of a file that is not GGUF, or a runtime method is asked of a folder that is
    already runtime-quantized; ``BackendUnavailable`` when the runtime method cannot run here.
    """
    from unetkit.formats import sniff
    from unetkit.formats.quantized_dir import is_quantized_dir

    text = str(text)
    head, at, tail = text.rpartition("@")
    method = _canonical(tail) if at else None
    if method is not None:
        path = Path(head)
    elif Path(text).exists():
        path = Path(text)  # a path that happens to contain '@'
    elif at and Path(head).exists():
        raise UnetkitError(f"variant {text!r}: unknown method {tail!r}; {methods_hint()}")
    else:
        raise UnetkitError(
            f"variant {text!r}: no such file or folder {text!r}"
            + (f" (nor {head!r}, and {tail!r} is not a method)" if at else "")
            + f"; {methods_hint()}"
        )
    if not path.exists():
        raise UnetkitError(f"variant {text!r}: no such file or folder {str(path)!r}")
    try:
        is_gguf = path.is_file() and sniff(path) == "gguf"
    except UnetkitError as e:
        raise type(e)(f"variant {text!r}: {e}") from e
    if method is None:
        method = "on-the-fly" if is_gguf else AS_STORED
    if method in GGUF_MODES and not is_gguf:
        raise UnetkitError(
            f"variant {text!r}: {method!r} is a GGUF dequantize mode and {str(path)!r} is not a "
            f"GGUF file; benchmark it without a method, or with a runtime method "
            f"({', '.join(runtime_methods())})"
        )
    variant = Variant(text=text, path=path, method=method, is_gguf=is_gguf)
    if variant.runtime_method is not None:
        if is_quantized_dir(path):
            raise UnetkitError(
                f"variant {text!r}: {str(path)!r} is runtime-quantized already; benchmark it without a method"
            )
        from unetkit.quant.runtime.base import parse_method

        be, scheme = parse_method(variant.runtime_method)
        try:
            be.check_available(scheme)
        except UnetkitError as e:
            raise type(e)(f"variant {text!r}: {e}") from e
    return variant
