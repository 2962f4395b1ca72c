"""Runtime quantization of a live diffusers UNet (torchao, optimum-quanto), and its saved folder.

GGUF files are written by :mod:`unetkit.gguf_export`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unetkit.errors import UnetkitError
from unetkit.formats.atomic import check_output
from unetkit.quant.gguf.policy import GGUF_METHOD

if TYPE_CHECKING:
    from unetkit.resolve import UNetSource


def quantize(unet, method: str, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None):
    """Quantize a live diffusers UNet in place with a runtime backend; returns ``(unet, QuantReport)``.

    ``method``: torchao:int8-weight-only, torchao:int8-dynamic, torchao:float8-weight-only,
    torchao:int4-weight-only (CUDA only), quanto:qint8, quanto:qint4, quanto:qint2, quanto:qfloat8.
    ``include``/``exclude``: globs on diffusers module names. Precedence: ``exclude`` keeps a module; else
    ``include`` quantizes it, even one of the default exclusions (conv_in, conv_out, time_embedding incl. LCM's
    cond_proj, norms); else, when ``include`` was given, the module is kept; else the default exclusions apply.
    Every Linear and Conv2d (1x1 and 3x3) is a candidate; the report lists each module's decision and reason and
    the coverage per module kind. A method that cannot run here raises ``BackendUnavailable`` saying why and what
    would work; an unknown one raises ``QuantError`` listing the known ones. Save the result with
    :func:`save_quantized`; ``unetkit.load_unet(folder)`` reloads it without re-quantizing.
    GGUF methods (``gguf:<recipe>``) write files: use :func:`quantize_file`.
    """
    from unetkit.quant.runtime.base import QuantReport, library_versions, parse_method, plan_modules

    if method.lower().startswith(GGUF_METHOD):
        raise UnetkitError(
            f"{method}: GGUF methods write a file; use unetkit.quantize_file(src, out, "
            f"method={method!r}) or `unetkit quantize IN OUT.gguf --method {method}`"
        )
    if getattr(unet, "unetkit_quant_report", None) is not None:
        raise UnetkitError(
            f"this UNet is quantized already ({unet.unetkit_quant_report.method}); quantize a float UNet"
        )
    be, scheme = parse_method(method)
    # weights held in fp16 and computed in fp32 layer by layer (load_unet(..., dequantize="on-the-fly",
    # compute_dtype="fp32")): quantized from fp32 weights, so that the quantized UNet computes in fp32 too
    from unetkit.loading import cast_whole

    unet = cast_whole(unet)
    be.check_available(scheme, unet)
    include = [include] if isinstance(include, str) else (list(include) if include is not None else None)
    exclude = [exclude] if isinstance(exclude, str) else (list(exclude) if exclude is not None else None)
    candidates = plan_modules(unet, include, exclude)
    with torch.no_grad():
        decisions = be.apply(unet, scheme, candidates)
    report = QuantReport(
        method=f"{be.name}:{scheme}",
        backend=be.name,
        versions={**library_versions(), **be.versions()},
        decisions=decisions,
        include=include,
        exclude=exclude,
    )
    unet.unetkit_quant_report = report
    return unet, report


def save_quantized(
    unet, out: str | Path, report=None, *, force: bool = False, source: UNetSource | None = None, source_sha256=None
) -> Path:
    """Write a UNet quantized by :func:`quantize` to the folder ``out`` (config.json, unetkit_quant.safetensors,
    unetkit_quant.json; see ``formats/quantized_dir.py``), atomically (an existing ``out`` needs ``force``);
    ``unetkit.load_unet(out)`` reloads it. ``source``: the ``open_unet`` of the file the UNet was loaded from:
    its metadata is carried into the weights file's, and its prediction type recorded there and in a
    ``scheduler_config.json`` (as ``convert --to diffusers`` does); ``source_sha256`` (a callable or a string)
    replaces the source hash placeholder."""
    from unetkit.dtypes import compute_dtype, short
    from unetkit.formats.quantized_dir import write_quantized_dir
    from unetkit.provenance import DTYPE, METHOD, SOURCE_SHA256, VERSION, metadata_for
    from unetkit.quant.runtime.base import parse_method
    from unetkit.spec import diffusers_config_json

    report = report if report is not None else getattr(unet, "unetkit_quant_report", None)
    if report is None:
        raise UnetkitError("this UNet was not quantized by unetkit.quantize: nothing to save as a quantized folder")
    be, scheme = parse_method(report.method, stored=True)
    tensors, state = be.export(unet, report.decisions)
    manifest = {
        "method": report.method,
        "backend": be.name,
        "scheme": scheme,
        "dtype": str(compute_dtype(unet)).removeprefix("torch."),
        "versions": report.versions,
        "backend_state": state,
        "report": report.to_dict(),
    }
    extra_files = {}
    if source is None:
        meta = {"format": "pt", METHOD: report.method, VERSION: report.versions.get("unetkit", "")}
    else:
        meta = metadata_for(
            source.spec,
            source.path,
            layout="diffusers",
            extra={METHOD: report.method, DTYPE: short(manifest["dtype"])},
            carried=source.source_metadata,
            prediction=source.prediction,
            markers_in_metadata=True,
        )
        sha = source_sha256() if callable(source_sha256) else source_sha256
        if sha:
            meta[SOURCE_SHA256] = sha
        else:
            del meta[SOURCE_SHA256]
        from unetkit.prediction import SCHEDULER_CONFIG

        extra_files[SCHEDULER_CONFIG] = source.prediction.scheduler_config_json()
    return write_quantized_dir(
        out, diffusers_config_json(dict(unet.config)), tensors, manifest, meta, force=force, extra_files=extra_files
    )


def quantize_to_dir(
    src: str | Path,
    out: str | Path,
    method: str,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    force: bool = False,
    ema: bool = False,
    config: Mapping[str, Any] | str | Path | None = None,
):
    """``unetkit quantize IN OUT --method torchao:...|quanto:...``: load ``src`` (any input unetkit reads),
    quantize it, write the folder ``out``. Returns the QuantReport."""
    from unetkit.formats.hashing import FileHasher
    from unetkit.loading import load_unet
    from unetkit.quant.runtime.base import parse_method
    from unetkit.resolve import open_unet

    src, out = Path(src), Path(out)
    check_output(out, force, inputs=(src,))
    be, scheme = parse_method(method)
    be.check_available(scheme)  # before the (slow) load
    source = open_unet(src, ema=ema, config=config)
    hasher = FileHasher(source.checkpoint.files)
    hasher.start()  # on the other core, while the model loads and quantizes
    unet = load_unet(source)
    unet, report = quantize(unet, method, include=include, exclude=exclude)
    save_quantized(unet, out, report, force=force, source=source, source_sha256=hasher.result)
    return report
