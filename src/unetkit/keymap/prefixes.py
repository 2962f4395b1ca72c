"""Which names in a file belong to the UNet, under which prefix, and which are deliberately ignored (and why).

A full single-file checkpoint carries the UNet under ``model.diffusion_model.`` beside the VAE, the text encoder,
an optional EMA copy, the training wrapper's noise-schedule buffers and, at the top level, the prediction-type
markers (``v_pred``, ``ztsnr``, ``edm_vpred.*``, ``edm_*``; see ``unetkit.prediction``). Every key ends up in
exactly one place: a UNet key (prefix stripped), a marker (kept as the model's own: not a weight, not ignored), an
ignored key with its reason, or an unknown key that the caller reports."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from unetkit.prediction import MARKER_KEYS
from unetkit.provenance import LDM_PREFIX

#: The prefixes a UNet's own names are found under, most specific first.
UNET_PREFIXES = (LDM_PREFIX, "unet.")
EMA_PREFIX = "model_ema."
EMA_UNET_PREFIX = "model_ema.diffusion_model"  # LitEma strips the dots: model_ema.diffusion_modelinput_blocks00weight

#: Key prefixes that are not UNet weights, with the reason shown to the user.
IGNORED_PREFIXES = (
    ("first_stage_model.", "VAE weights (first_stage_model.*), not part of the UNet"),
    ("cond_stage_model.", "text encoder weights (cond_stage_model.*), not part of the UNet"),
    ("conditioner.", "text encoder weights (conditioner.*), not part of the UNet"),
    ("embedding_manager.", "textual-inversion embedding manager, not part of the UNet"),
    (EMA_PREFIX, "EMA copy of the weights (model_ema.*); load it instead with ema=True / --ema"),
)

#: Exact keys of the LDM training wrapper: the noise schedule, recomputed by any diffusers scheduler.
SCHEDULE_BUFFERS = frozenset(
    {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
        "logvar", "lvlb_weights", "model_ema.num_updates", "model_ema.decay",
    }
)  # fmt: skip
SCHEDULE_REASON = "noise-schedule buffer of the LDM training wrapper (a diffusers scheduler recomputes it)"


@dataclass
class KeySplit:
    """The result of sorting a file's keys."""

    prefix: str  # the prefix the UNet keys were found under ('' for none)
    unet: dict[str, str] = field(default_factory=dict)  # stripped name -> raw file key
    ignored: dict[str, str] = field(default_factory=dict)  # raw file key -> reason
    ema: dict[str, str] = field(default_factory=dict)  # dot-less EMA name -> raw file key
    markers: dict[str, str] = field(default_factory=dict)  # prediction-type marker name -> raw file key


def split_keys(keys: Iterable[str]) -> KeySplit:
    keys = list(keys)
    prefix = next((p for p in UNET_PREFIXES if any(k.startswith(p) for k in keys)), "")
    split = KeySplit(prefix=prefix)
    for key in keys:
        if key in SCHEDULE_BUFFERS:
            split.ignored[key] = SCHEDULE_REASON
            continue
        if key in MARKER_KEYS:
            split.markers[key] = key
            continue
        if key.startswith(EMA_UNET_PREFIX):
            split.ema[key[len(EMA_UNET_PREFIX) :]] = key
        if prefix and key.startswith(prefix):
            split.unet[key[len(prefix) :]] = key
            continue
        reason = next((r for p, r in IGNORED_PREFIXES if key.startswith(p)), None)
        if reason is not None:
            split.ignored[key] = reason
        elif prefix:
            split.unet[key] = key  # a stray key beside prefixed ones: kept so the key map reports it as unknown
        else:
            split.unet[key] = key
    return split


def dotless(name: str) -> str:
    """LitEma's parameter naming: the LDM name with every dot removed."""
    return name.replace(".", "")
