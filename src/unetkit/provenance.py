"""What every unetkit output records about its source: one set of metadata keys, one ``metadata_for``.

Every writer (safetensors and diffusers folders in ``conversion``, GGUF files in ``gguf_export``, quantized folders
in ``quantization``) takes its metadata from here, so the keys and their value types cannot drift apart: every
value is a string (safetensors metadata holds strings only; GGUF stores them as string KVs).

An output's metadata is the source's own metadata, carried whole (``modelspec.*`` title, author, license, trigger
words; kohya's ``ss_*`` training record; anything else), plus unetkit's keys, which are all namespaced
``unetkit.*`` and describe this run only:

* the source's own ``unetkit.*`` keys (it is an earlier unetkit output) describe the run that made it. They are
  not carried as they are, where this run's keys would overwrite them or be confused with them: they become one
  entry of ``unetkit.history`` (a JSON list of the earlier runs' keys, oldest first; the source's history is
  extended). ``unetkit.config`` is left out of the entry: this run reads it and writes it again;
* a source key that the output's container reserves (safetensors' ``format``, which unetkit sets to "pt", when the
  source says something else; GGUF's ``general.architecture`` / ``general.alignment`` / ``general.file_type`` /
  ``general.quantization_version`` and ComfyUI-GGUF's ``comfy.gguf.orig_shape.*``) is not overwritten silently
  either: it is kept, with its value, in ``unetkit.displaced`` (a JSON object), and put back as it was by a later
  output whose container can hold it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetkit._version import __version__

if TYPE_CHECKING:
    from unetkit.prediction import Prediction
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
HISTORY = "unetkit.history"  # JSON list: the unetkit.* keys of each earlier unetkit run, oldest first
DISPLACED = "unetkit.displaced"  # JSON object: source keys the output's container reserves, with their values
PREDICTION_TYPE = "unetkit.prediction_type"  # "epsilon" | "v_prediction"
PREDICTION = "unetkit.prediction"  # JSON: type, source, from_default, zero_terminal_snr, edm (see unetkit.prediction)
PREDICTION_MARKERS = "unetkit.prediction_markers"  # JSON: each marker tensor's dtype, shape and bytes (hex)
BATCH_JOB = "unetkit.batch_job"  # JSON: the batch job (verb and options) that made this output (see unetkit.batch)
UNETKIT_PREFIX = "unetkit."

#: safetensors' metadata convention: "pt" for torch tensors (what unetkit writes)
FORMAT = "format"
#: GGUF keys that describe the container, not the model: written by the GGUF writer, never carried from a source
GGUF_CONTAINER_KEYS = frozenset(
    {"general.architecture", "general.alignment", "general.file_type", "general.quantization_version"}
)
GGUF_ORIG_SHAPE = "comfy.gguf.orig_shape."

#: written first and patched in place once the source's sha256 (computed while writing) is known: same length
SHA_PLACEHOLDER = "0" * 64

_RECORDED: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("unetkit_recorded", default=())


@contextmanager
def recording(keys: Mapping[str, str]) -> Iterator[None]:
    """Every output written inside this block also records ``keys`` (``unetkit.*`` names) with this run's own:
    the batch runner stamps each output with its job (``unetkit.batch_job``) this way, whichever verb writes it."""
    bad = [k for k in keys if not k.startswith(UNETKIT_PREFIX)]
    if bad:
        raise ValueError(f"recorded keys must be {UNETKIT_PREFIX}* names, not {bad}")
    token = _RECORDED.set(tuple({**dict(_RECORDED.get()), **keys}.items()))
    try:
        yield
    finally:
        _RECORDED.reset(token)


def metadata_for(
    spec: UNetSpec,
    source: str | Path,
    layout: str,
    extra: Mapping[str, str] | None = None,
    *,
    carried: Mapping[str, str] | None = None,
    prediction: Prediction | None = None,
    markers_in_metadata: bool = True,
    container: str = "safetensors",
) -> dict[str, str]:
    """The metadata of an output made from ``source`` (its file name is kept) whose UNet is ``spec``: the format
    key (safetensors), unetkit's keys (this run's provenance, ``extra``, the prediction type), then the source's
    own metadata ``carried`` (see the module docstring for its ``unetkit.*`` and reserved keys). The source hash is
    the placeholder: writers patch it in at the end. ``prediction``: recorded as ``unetkit.prediction_type`` and
    ``unetkit.prediction``, plus the marker tensors' bytes when ``markers_in_metadata`` (outputs that do not hold
    them as tensors). ``container``: "safetensors" or "gguf" (no ``format`` key; GGUF's reserved keys)."""
    own = {
        VERSION: __version__,
        SOURCE_NAME: Path(source).name,
        FAMILY: spec.family,
        VARIANT: spec.variant,
        LAYOUT: layout,
        CONFIG: json.dumps(spec.config, sort_keys=True),
        SOURCE_SHA256: SHA_PLACEHOLDER,
    }
    if spec.time_cond_proj_dim:
        own[TIME_COND_PROJ_DIM] = str(spec.time_cond_proj_dim)
    if prediction is not None:
        own.update(prediction.metadata(with_markers=markers_in_metadata))
    for key, value in {**dict(_RECORDED.get()), **(extra or {})}.items():
        own[key] = str(value)
    theirs, history, displaced = carry(carried or {}, container)
    if history:
        own[HISTORY] = json.dumps(history, ensure_ascii=False)
    if displaced:
        own[DISPLACED] = json.dumps(displaced, ensure_ascii=False)
    head = {FORMAT: "pt"} if container == "safetensors" else {}
    return {**head, **own, **theirs}


def carry(source_meta: Mapping[str, str], container: str = "safetensors") -> tuple[dict[str, str], list, dict]:
    """Split a source's metadata into (the keys carried as they are, the run history with the source's own
    ``unetkit.*`` keys appended as one entry, the keys the output container reserves with their values)."""
    theirs: dict[str, str] = {}
    earlier: dict[str, str] = {}
    displaced: dict[str, str] = {}

    def place(key: str, value: str) -> None:
        if key == FORMAT:
            if value != "pt":  # "pt" is what unetkit writes (safetensors) or needs no key (GGUF)
                displaced[key] = value
        elif container == "gguf" and (key in GGUF_CONTAINER_KEYS or key.startswith(GGUF_ORIG_SHAPE)):
            displaced[key] = value
        else:
            theirs[key] = value

    for key, value in source_meta.items():
        if key.startswith(UNETKIT_PREFIX):
            earlier[key] = value
        else:
            place(key, value)
    # keys an earlier run displaced go back where this output's container allows them (a source key never lost)
    for key, value in _json_object(earlier.get(DISPLACED)).items():
        if isinstance(value, str) and key not in theirs and not key.startswith(UNETKIT_PREFIX):
            place(key, value)
    history: list[Any] = []
    raw = earlier.pop(HISTORY, None)
    if raw is not None:
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):
            parsed = None
        # a history that is not a list of runs is kept as it was found, as one entry
        history = parsed if isinstance(parsed, list) else [{HISTORY: raw}]
    earlier.pop(CONFIG, None)
    if earlier:
        history.append(earlier)
    return theirs, history, displaced


def _json_object(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}
