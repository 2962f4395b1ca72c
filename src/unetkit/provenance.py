"""What every unetkit output records about its source: one set of metadata keys, one ``metadata_for``.

Every writer (safetensors and diffusers folders in ``conversion``, GGUF files in ``gguf_export``, quantized folders
in ``formats.quantized_dir``) takes its provenance from here, so the keys and their value types cannot drift apart:
every value is a string (safetensors metadata holds strings only; GGUF stores them as string KVs).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from unetkit._version import __version__

if TYPE_CHECKING:
    from unetkit.spec import UNetSpec

#: the prefix of UNet names in an original (LDM/CompVis) single-file checkpoint
LDM_PREFIX = "model.diffusion_model."

VERSION = "unetkit.version"
SOURCE_NAME = "unetkit.source_name"
SOURCE_SHA256 = "unetkit.source_sha256"
VARIANT = "unetkit.variant"
FAMILY = "unetkit.family"
LAYOUT = "unetkit.layout"
CONFIG = "unetkit.config"  # the complete diffusers config, JSON: read back first by ``resolve``
TIME_COND_PROJ_DIM = "unetkit.time_cond_proj_dim"
DTYPE = "unetkit.dtype"
METHOD = "unetkit.method"
FLAVOR = "unetkit.flavor"
DECISIONS = "unetkit.decisions"

#: written first and patched in place once the source's sha256 (computed while writing) is known: same length
SHA_PLACEHOLDER = "0" * 64


def metadata_for(
    spec: UNetSpec,
    source: str | Path,
    layout: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The provenance of an output made from ``source`` (its file name is kept) whose UNet is ``spec``.
    The source hash is the placeholder: writers patch it in at the end."""
    meta = {
        "format": "pt",
        VERSION: __version__,
        SOURCE_NAME: Path(source).name,
        FAMILY: spec.family,
        VARIANT: spec.variant,
        LAYOUT: layout,
        CONFIG: json.dumps(spec.config, sort_keys=True),
        SOURCE_SHA256: SHA_PLACEHOLDER,
    }
    if spec.time_cond_proj_dim:
        meta[TIME_COND_PROJ_DIM] = str(spec.time_cond_proj_dim)
    for key, value in (extra or {}).items():
        meta[key] = str(value)
    return meta
