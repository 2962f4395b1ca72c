"""What is in a file: format, layout, variant, inferred config, counts, dtypes, ignored keys, suspicious tensors,
the prediction type (and where it came from; or, asked for, a probe of the weights) and the file's metadata."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetkit.dtypes import short
from unetkit.prediction import EPSILON, V_PREDICTION
from unetkit.resolve import UNetSource, open_unet

if TYPE_CHECKING:
    import torch

#: the probe of A1111 (``is_using_v_parameterization_for_sd2``) and stable-diffusion.cpp: a constant 0.5 latent of
#: 8x8 at the last timestep, a constant 0.5 context of two tokens; v-prediction when mean(output - input) < -1
PROBE_TIMESTEP = 999
PROBE_VALUE = 0.5
PROBE_SIZE = 8
PROBE_TOKENS = 2
PROBE_THRESHOLD = -1.0


def inspect_file(
    path: str | Path,
    *,
    scan: bool = True,
    ema: bool = False,
    config: Mapping[str, Any] | str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    probe_prediction: bool = False,
) -> dict[str, Any]:
    """A JSON-ready description of ``path``. ``scan`` reads every tensor to find NaN/inf and all-zero tensors.
    ``probe_prediction``: also run the model once to guess its prediction type from the weights
    (:func:`probe_prediction`; loads the model, imports torch), reported apart from what the file says."""
    source = open_unet(path, ema=ema, config=config)
    ckpt = source.checkpoint
    dtypes: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    for entry in source.tensors.values():
        label = entry.qtype or (entry.code if ckpt.format == "gguf" else short(entry.code))
        row = dtypes[label]
        row["tensors"] += 1
        row["parameters"] += entry.numel
        row["bytes"] += entry.nbytes
    by_reason: dict[str, list[str]] = defaultdict(list)
    for key, reason in source.ignored.items():
        by_reason[reason].append(key)
    suspicious = []
    if scan:
        for name, entry in source.tensors.items():
            problem = _problem(entry.read())
            if problem:
                suspicious.append({"tensor": entry.name, "diffusers_name": name, "problem": problem})
            if progress:
                progress(entry.nbytes)
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "files": [str(f) for f in ckpt.files],
        "file_bytes": sum(f.stat().st_size for f in ckpt.files),
        "layout": source.spec.layout,
        "prefix": source.prefix,
        "variant": source.spec.variant,
        "family": source.spec.family,
        "config_source": source.spec.config_source,
        "assumptions": source.spec.assumptions,
        "config": source.spec.config,
        "keys_in_file": len(ckpt.entries) + len(ckpt.non_tensors),
        "unet_tensors": len(source.tensors),
        "parameters": sum(e.numel for e in source.tensors.values()),
        "bits_per_weight": 8
        * sum(e.nbytes for e in source.tensors.values())
        / max(1, sum(e.numel for e in source.tensors.values())),
        "gguf_flavor": gguf_flavor(source) if ckpt.format == "gguf" else None,
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1]["parameters"])),
        "ignored": [
            {"reason": r, "count": len(keys), "examples": keys[:3]}
            for r, keys in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
        ],
        "prediction": {**source.prediction.to_dict(), "summary": source.prediction.describe()},
        "prediction_probe": run_probe(source) if probe_prediction else None,
        "metadata": dict(ckpt.metadata),
        "scanned": scan,
        "suspicious": suspicious,
    }


def run_probe(source: UNetSource) -> dict[str, Any]:
    """:func:`probe_prediction`, set beside what the file says."""
    probe = probe_prediction(source)
    detected = source.prediction
    probe["file_says"] = detected.type
    probe["file_says_from"] = detected.source
    probe["agrees"] = probe["prediction_type"] == detected.type
    if probe["agrees"]:
        probe["note"] += f" It agrees with the file ({detected.source})."
    elif detected.from_default:
        probe["note"] += (
            f" Nothing in the file says the type ({detected.type} is the family default): the probe is the better "
            "guess; mark the file (e.g. convert a diffusers folder whose scheduler_config.json says it) to settle it."
        )
    else:
        probe["note"] += f" It disagrees with {detected.source}, which loaders read: the marker stands."
    return probe


def probe_prediction(source: UNetSource) -> dict[str, Any]:
    """Run the UNet once on a constant latent at the last timestep and tell v-prediction from epsilon by the mean
    of output - input, as A1111 (``is_using_v_parameterization_for_sd2``) and stable-diffusion.cpp do: a
    v-prediction model drives the output towards -x0, far below the input; an epsilon model predicts noise of mean
    about 0. A probe of the weights, not a marker: tuned for SD2 768-v against SD2 base, it can be wrong for
    others; the result says so. The model runs in float32 on the CPU (SDXL gets its family's ``added_cond_kwargs``;
    LCM a zero guidance embedding)."""
    import torch

    from unetkit.loading import load_unet

    model = load_unet(source, dtype="fp32")
    cfg: Any = model.config
    sample = torch.full((1, cfg.in_channels, PROBE_SIZE, PROBE_SIZE), PROBE_VALUE)
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": torch.full((1, PROBE_TOKENS, cfg.cross_attention_dim), PROBE_VALUE),
    }
    if cfg.time_cond_proj_dim:
        kwargs["timestep_cond"] = torch.zeros(1, cfg.time_cond_proj_dim)
    added = source.spec.model_family.added_cond_kwargs(cfg, 1, torch.Generator().manual_seed(0))
    if added:
        kwargs["added_cond_kwargs"] = added
    with torch.no_grad():
        out = model(sample, torch.tensor([PROBE_TIMESTEP]), **kwargs).sample
    mean = float((out.double() - PROBE_VALUE).mean())
    ptype = V_PREDICTION if mean < PROBE_THRESHOLD else EPSILON
    return {
        "method": "probe",
        "prediction_type": ptype,
        "mean_output_minus_input": mean,
        "threshold": PROBE_THRESHOLD,
        "timestep": PROBE_TIMESTEP,
        "inputs": f"latent {PROBE_VALUE} ({PROBE_SIZE}x{PROBE_SIZE}), context {PROBE_VALUE} ({PROBE_TOKENS} tokens)",
        "note": (
            f"A probe of the weights, not a marker: mean(output - input) = {mean:.3f} is "
            f"{'below' if mean < PROBE_THRESHOLD else 'not below'} {PROBE_THRESHOLD:g} at t={PROBE_TIMESTEP} "
            "(A1111's and stable-diffusion.cpp's test), so it looks like "
            f"{ptype}."
        ),
    }


def gguf_flavor(source) -> str:
    """Which producer's rules a GGUF file follows: what unetkit recorded, else read from names and qtypes."""
    recorded = source.checkpoint.metadata.get("unetkit.flavor")
    if recorded:
        return recorded
    if not source.prefix:
        return "comfy (no prefix" + (
            ", orig_shape reshapes)"
            if any(e.stored_shape and e.stored_shape != e.shape for e in source.tensors.values())
            else ")"
        )
    quantized = [e for e in source.tensors.values() if e.qtype]
    if quantized and all(len(e.shape) == 2 for e in quantized):
        return "diffusers-style (prefixed, only 2-D weights quantized)"
    return "sdcpp (prefixed, exact shapes)"


def _problem(t: torch.Tensor) -> str | None:
    import torch

    if not t.dtype.is_floating_point:
        return None
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        nan = int(torch.isnan(t).sum())
        inf = int((~finite).sum()) - nan
        return ", ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if p)
    if t.numel() and not bool(t.any()):
        return "all zero"
    return None


def summary_counts(report: Mapping[str, Any]) -> Counter[str]:
    """Ignored-key counts by reason (for one-line summaries)."""
    return Counter({row["reason"]: row["count"] for row in report["ignored"]})
