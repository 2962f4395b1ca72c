"""The prediction type of a UNet -- what its output means -- where a file says it, and how outputs keep it.

An SD UNet predicts the noise (``epsilon``) or the velocity (``v_prediction``); run with the other one it renders
noise (InvokeAI #7965, diffusers #9171, sd.cpp #325), and nothing in the weights' names or shapes tells them apart.
Files say it in one of these ways, read here in this order (the first that speaks decides; every other one that
disagrees is recorded in :attr:`Prediction.decisions`, never dropped silently):

1. marker tensors at the top level of a checkpoint, beside ``model.diffusion_model.*``, read as ComfyUI reads
   them: ``edm_mean`` + ``edm_std`` (Playground v2.5: EDM, epsilon), ``edm_vpred.sigma_max`` / ``.sigma_min``
   (CosXL: EDM v-prediction, the sigmas are values), ``v_pred`` (v-prediction; empty tensors) and ``ztsnr`` (zero
   terminal SNR). The tensors are kept byte for byte (:class:`Marker`): LDM outputs write them back unchanged,
   other outputs keep their bytes in the metadata key ``unetkit.prediction_markers``, which counts as the keys;
2. a diffusers folder's ``scheduler_config.json`` (``prediction_type``, ``rescale_betas_zero_snr``, EDM classes);
3. ``unetkit.prediction``: what an earlier unetkit run decided, and from what;
4. ``modelspec.prediction_type`` (SAI's model spec: "epsilon", "v", ...);
5. kohya's training record ``ss_v_parameterization`` / ``ss_zero_terminal_snr`` ("True" / "False");
6. ComfyUI's marker names used as metadata keys (``v_pred``, ``ztsnr``);
7. the family's default (SD2 768-v files carry no marker at all: ``inspect --probe-prediction`` runs the test
   A1111 and stable-diffusion.cpp use, and says it is a probe).

Torch-free: reading the prediction type costs what reading a header costs.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from unetkit.dtypes import BY_CODE
from unetkit.errors import FormatError
from unetkit.provenance import PREDICTION, PREDICTION_MARKERS, PREDICTION_TYPE
from unetkit.shapes import numel

EPSILON, V_PREDICTION = "epsilon", "v_prediction"
TYPES = (EPSILON, V_PREDICTION)

V_PRED, ZTSNR = "v_pred", "ztsnr"
EDM_VPRED_SIGMA_MAX, EDM_VPRED_SIGMA_MIN = "edm_vpred.sigma_max", "edm_vpred.sigma_min"
EDM_MEAN, EDM_STD = "edm_mean", "edm_std"
#: the marker tensors' exact (top-level) names
MARKER_KEYS = (V_PRED, ZTSNR, EDM_VPRED_SIGMA_MAX, EDM_VPRED_SIGMA_MIN, EDM_MEAN, EDM_STD)
#: markers are empty tensors or a few values (Playground's per-channel latent mean and std); a "marker" larger than
#: this is something else under a marker's name, and is refused rather than carried as metadata
MAX_MARKER_ELEMENTS = 1024

MODELSPEC = "modelspec.prediction_type"
KOHYA_V = "ss_v_parameterization"
KOHYA_ZSNR = "ss_zero_terminal_snr"
SCHEDULER_CONFIG = "scheduler_config.json"

#: the training noise schedule of every family unetkit reads (SD1.x, SD2.x and SDXL alike)
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
#: the EDM settings ComfyUI applies for each marker kind (sigma_min/max of CosXL come from its marker values)
EDM_DEFAULTS: dict[str, dict[str, float]] = {
    "edm": {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5},  # Playground v2.5
    "edm_vpred": {"sigma_min": 0.002, "sigma_max": 120.0, "sigma_data": 1.0},  # CosXL
}

_TRUE = ("true", "1", "yes", "")
_FALSE = ("false", "0", "no")
_SPELLINGS = {
    "epsilon": EPSILON, "eps": EPSILON, "epsilon_prediction": EPSILON, "noise": EPSILON,
    "v": V_PREDICTION, "v_prediction": V_PREDICTION, "v-prediction": V_PREDICTION, "vpred": V_PREDICTION,
    "v_pred": V_PREDICTION, "v-pred": V_PREDICTION, "velocity": V_PREDICTION,
}  # fmt: skip


@dataclass(frozen=True)
class Marker:
    """One marker tensor, as stored: its file dtype code, shape and raw little-endian bytes."""

    key: str
    code: str
    shape: tuple[int, ...]
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.code not in BY_CODE:
            raise FormatError(f"marker {self.key!r}: dtype {self.code!r} is not one unetkit knows")
        n = numel(self.shape)
        if n > MAX_MARKER_ELEMENTS:
            raise FormatError(
                f"marker {self.key!r} holds {n} values ({list(self.shape)}); prediction-type markers are empty or "
                f"hold a few values (at most {MAX_MARKER_ELEMENTS}): this is not one"
            )
        if len(self.data) != n * BY_CODE[self.code].itemsize:
            raise FormatError(
                f"marker {self.key!r}: {len(self.data)} bytes for {self.code} {list(self.shape)} "
                f"(expected {n * BY_CODE[self.code].itemsize})"
            )

    def values(self) -> list[float] | None:
        """The values as Python numbers (exact: every float16/bfloat16/float32 value is a double), or None for
        float8 codes."""
        n = numel(self.shape)
        if self.code == "BF16":
            halves = struct.unpack(f"<{n}H", self.data)
            return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
        fmt = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h", "I8": "b", "U8": "B"}
        fmt["BOOL"] = "?"
        if self.code not in fmt:
            return None
        return [float(v) for v in struct.unpack(f"<{n}{fmt[self.code]}", self.data)]

    def scalar(self) -> float | None:
        values = self.values()
        return values[0] if values and len(values) == 1 else None

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.code, "shape": list(self.shape), "hex": self.data.hex()}

    def describe(self) -> dict[str, Any]:
        """What inspect shows: dtype, shape and values (not the bytes)."""
        values = self.values()
        return {"dtype": self.code, "shape": list(self.shape), "values": [_json_number(v) for v in values or []]}

    @classmethod
    def from_json(cls, key: str, obj: Any, where: str) -> Marker:
        try:
            shape = tuple(int(d) for d in obj["shape"])
            if any(d < 0 for d in shape) or len(shape) > 8:
                raise ValueError("bad shape")
            return cls(key=key, code=str(obj["dtype"]), shape=shape, data=bytes.fromhex(obj["hex"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: marker {key!r} is malformed ({e}): {str(obj)[:200]}") from e

    @classmethod
    def empty(cls, key: str) -> Marker:
        """A marker as ComfyUI writes it on save: ``torch.tensor([])`` (float32, shape [0])."""
        return cls(key=key, code="F32", shape=(0,), data=b"")

    @classmethod
    def f32_scalar(cls, key: str, value: float) -> Marker:
        return cls(key=key, code="F32", shape=(), data=struct.pack("<f", value))


@dataclass(frozen=True)
class _Claim:
    """What one source says: a type (or None), zero terminal SNR (or None), EDM settings (or None)."""

    label: str
    type: str | None = None
    zsnr: bool | None = None
    edm: dict[str, Any] | None = None
    origin: str | None = None  # unetkit's record: where the recording run had it from
    from_default: bool = False  # unetkit's record: the recording run had no more than the family default
    rank: str = ""


@dataclass
class Prediction:
    """A UNet's prediction type, where it came from, and the markers that carry it (kept byte for byte)."""

    type: str
    source: str  # the key, metadata entry or file that decided it, or "family default (SDXL)"
    zero_terminal_snr: bool = False
    zero_terminal_snr_source: str | None = None
    edm: dict[str, Any] | None = None  # {"kind": "edm"|"edm_vpred", "sigma_min", "sigma_max", "sigma_data", ...}
    markers: dict[str, Marker] = field(default_factory=dict)
    markers_from: str | None = None  # "file" (tensors) or the metadata key they were restored from
    origin: str | None = None  # when an earlier unetkit run recorded it: what that run had it from
    decisions: list[str] = field(default_factory=list)  # conflicts and how they were decided
    from_default: bool = False  # nothing in the file says it (here or, per unetkit's record, in its source)

    @property
    def original_source(self) -> str:
        return self.origin or self.source

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "source": self.source,
            "origin": self.origin,
            "from_default": self.from_default,
            "zero_terminal_snr": self.zero_terminal_snr,
            "zero_terminal_snr_source": self.zero_terminal_snr_source,
            "edm": self.edm,
            "markers": {k: m.describe() for k, m in self.markers.items()},
            "markers_from": self.markers_from,
            "decisions": list(self.decisions),
        }

    def describe(self) -> str:
        """One line: 'v_prediction, zero terminal SNR (key v_pred; key ztsnr)'."""
        what = [self.type]
        if self.edm:
            what.append(f"EDM ({_edm_text(self.edm)})")
        if self.zero_terminal_snr:
            what.append("zero terminal SNR")
        return f"{', '.join(what)} (from {self.where()})"

    def where(self) -> str:
        """Where it came from: 'key v_pred', 'scheduler_config.json (prediction_type), originally key v_pred'."""
        where = self.source + (f", originally {self.origin}" if self.origin else "")
        if self.zero_terminal_snr and self.zero_terminal_snr_source not in (None, self.source):
            where += f"; zero terminal SNR from {self.zero_terminal_snr_source}"
        return where

    # ---------------------------------------------------------------------------------------------- outputs
    def metadata(self, *, with_markers: bool) -> dict[str, str]:
        """unetkit's record of it in an output's metadata. ``with_markers``: also the marker tensors' exact bytes
        (outputs that do not hold them as tensors: diffusers folders, GGUF files, quantized folders)."""
        record = {
            "type": self.type,
            "source": self.original_source,
            "from_default": self.from_default,
            "zero_terminal_snr": self.zero_terminal_snr,
            "edm": self.edm,
        }
        meta = {PREDICTION_TYPE: self.type, PREDICTION: json.dumps(record, sort_keys=True)}
        if with_markers and self.markers:
            meta[PREDICTION_MARKERS] = json.dumps({k: m.to_json() for k, m in self.markers.items()})
        return meta

    def scheduler_config(self) -> dict[str, Any]:
        """A diffusers scheduler config that samples this UNet right (``scheduler_config.json`` of diffusers
        outputs): Euler over SD's noise schedule, or diffusers' EDM Euler for EDM models. Any diffusers scheduler
        loads it (``from_pretrained(folder)`` / ``from_config``): each takes the keys it knows."""
        if self.edm:
            return {
                "_class_name": "EDMEulerScheduler",
                "num_train_timesteps": SD_SCHEDULE["num_train_timesteps"],
                "prediction_type": self.type,
                "sigma_min": self.edm["sigma_min"],
                "sigma_max": self.edm["sigma_max"],
                "sigma_data": self.edm["sigma_data"],
            }
        return {
            "_class_name": "EulerDiscreteScheduler",
            **SD_SCHEDULE,
            "prediction_type": self.type,
            # zero terminal SNR: the schedule rescaled to reach SNR 0, sampled from the last timestep (Lin et al.)
            "rescale_betas_zero_snr": self.zero_terminal_snr,
            "timestep_spacing": "trailing" if self.zero_terminal_snr else "leading",
            "steps_offset": 0 if self.zero_terminal_snr else 1,
        }

    def scheduler_config_json(self) -> str:
        """:meth:`scheduler_config` as the text of ``scheduler_config.json`` (diffusers' layout: indented JSON)."""
        return json.dumps(self.scheduler_config(), indent=2, sort_keys=True) + "\n"

    def ldm_markers(self) -> tuple[dict[str, Marker], list[str]]:
        """The marker tensors an LDM file of this UNet holds, and what was decided: the source's own markers byte
        for byte; when it had none but says v-prediction or zero terminal SNR elsewhere (a diffusers folder's
        scheduler config, metadata), the markers ComfyUI writes on save, so that LDM loaders see it."""
        if self.markers:
            return dict(self.markers), []
        out: dict[str, Marker] = {}
        notes: list[str] = []
        if self.edm and self.edm["kind"] == "edm_vpred":
            out[EDM_VPRED_SIGMA_MAX] = Marker.f32_scalar(EDM_VPRED_SIGMA_MAX, self.edm["sigma_max"])
            out[EDM_VPRED_SIGMA_MIN] = Marker.f32_scalar(EDM_VPRED_SIGMA_MIN, self.edm["sigma_min"])
        elif self.edm:
            notes.append(
                f"EDM ({self.source}) has no LDM marker to write: edm_mean/edm_std are the VAE latents' statistics, "
                "which a UNet folder does not hold; the prediction type stays in the metadata (unetkit.prediction)"
            )
        elif self.type == V_PREDICTION and not self.from_default:
            out[V_PRED] = Marker.empty(V_PRED)
        if self.zero_terminal_snr and not self.edm:
            out[ZTSNR] = Marker.empty(ZTSNR)
        if out:
            notes.append(f"wrote the marker key(s) {', '.join(out)} as ComfyUI does: the source says {self.describe()}")
        return out, notes


def detect(
    markers: Mapping[str, Marker],
    metadata: Mapping[str, str],
    *,
    default: str,
    family: str,
    scheduler_config: Mapping[str, Any] | None = None,
    scheduler_label: str = SCHEDULER_CONFIG,
    where: str = "",
) -> Prediction:
    """The prediction type from a file's marker tensors, its metadata and its folder's scheduler config, in the
    order of the module docstring; ``default`` is the family's (``family`` its title)."""
    markers_from = "file" if markers else None
    kept = dict(markers)
    decisions: list[str] = []
    if not kept and metadata.get(PREDICTION_MARKERS):
        kept = _stored_markers(metadata[PREDICTION_MARKERS], where)
        markers_from = f"metadata {PREDICTION_MARKERS}" if kept else None
    elif kept and metadata.get(PREDICTION_MARKERS):
        stored = _stored_markers(metadata[PREDICTION_MARKERS], where)
        if stored != kept:
            decisions.append(
                f"the marker tensors ({', '.join(kept)}) differ from the ones recorded in metadata "
                f"{PREDICTION_MARKERS} ({', '.join(stored) or 'none'}): the tensors win"
            )
    claims: list[_Claim] = []
    suffix = "" if markers_from in (None, "file") else f" (kept in metadata {PREDICTION_MARKERS})"
    claims += _marker_claims(kept, suffix, decisions)
    if scheduler_config is not None:
        claims += _scheduler_claims(scheduler_config, scheduler_label, decisions)
    claims += _metadata_claims(metadata, where, decisions)
    default_claim = _Claim(f"family default ({family})", type=default, zsnr=False, rank="default")
    claims.append(default_claim)

    winner = next(c for c in claims if c.type is not None)
    for c in claims:
        if c.type is not None and c.type != winner.type and c.rank != "default":
            decisions.append(f"{c.label} gives {c.type}, {winner.label} gives {winner.type}: {_why(winner, c)}")
    zsnr_claim = next((c for c in claims if c.zsnr is not None), default_claim)
    for c in claims:
        if c.zsnr is not None and c.zsnr != zsnr_claim.zsnr and c.rank != "default":
            decisions.append(
                f"{c.label} gives zero terminal SNR {'on' if c.zsnr else 'off'}, {zsnr_claim.label} gives "
                f"{'on' if zsnr_claim.zsnr else 'off'}: {_why(zsnr_claim, c)}"
            )
    if zsnr_claim.zsnr and winner.type == EPSILON and not winner.edm:
        decisions.append(
            f"zero terminal SNR ({zsnr_claim.label}) with epsilon prediction: at SNR 0 a noise prediction cannot "
            "give the image; kept as recorded (ComfyUI reads ztsnr only beside v_pred)"
        )
    # unetkit's own record agreeing with the winner (a folder unetkit wrote: its scheduler_config.json and the
    # record say the same) tells where the type came from originally
    record = next((c for c in claims if c.rank == "record"), None)
    origin, from_default = None, winner.rank == "default"
    if record is not None and record.type == winner.type and winner.rank in ("scheduler", "record"):
        origin, from_default = record.origin, record.from_default
    return Prediction(
        type=winner.type or default,
        source=winner.label,
        zero_terminal_snr=bool(zsnr_claim.zsnr),
        zero_terminal_snr_source=zsnr_claim.label if zsnr_claim.zsnr else None,
        edm=winner.edm,
        markers=kept,
        markers_from=markers_from,
        origin=origin,
        decisions=decisions,
        from_default=from_default,
    )


_RANKS = ("keys", "scheduler", "record", "modelspec", "kohya", "metadata-markers", "default")


def _why(winner: _Claim, loser: _Claim) -> str:
    if winner.rank == "keys":
        return "the marker keys win (they are what LDM loaders such as ComfyUI read)"
    if winner.rank == "scheduler":
        return "the folder's scheduler_config.json wins (it is what diffusers samples with)"
    return f"{winner.label} ranks first (order: {', '.join(_RANKS)})"


def _marker_claims(markers: Mapping[str, Marker], suffix: str, decisions: list[str]) -> list[_Claim]:
    """The marker tensors, read in ComfyUI's order (model_type of its SDXL config): EDM first, then v_pred."""
    claims = []
    zsnr = ZTSNR in markers
    if EDM_MEAN in markers or EDM_STD in markers:
        if EDM_MEAN in markers and EDM_STD in markers:
            edm = {"kind": "edm", **EDM_DEFAULTS["edm"]}
            edm["latents_mean"] = markers[EDM_MEAN].values()
            edm["latents_std"] = markers[EDM_STD].values()
            claims.append(_Claim(f"keys {EDM_MEAN}, {EDM_STD}{suffix}", type=EPSILON, edm=edm, rank="keys"))
        else:
            one = EDM_MEAN if EDM_MEAN in markers else EDM_STD
            decisions.append(f"key {one} without its pair: not read as EDM (ComfyUI needs both); kept as it is")
    if EDM_VPRED_SIGMA_MAX in markers:
        edm = {"kind": "edm_vpred", **EDM_DEFAULTS["edm_vpred"]}
        for key, name in ((EDM_VPRED_SIGMA_MAX, "sigma_max"), (EDM_VPRED_SIGMA_MIN, "sigma_min")):
            if key in markers:
                value = markers[key].scalar()
                if value is None or not math.isfinite(value):
                    raise FormatError(f"marker {key!r} must hold one finite value, found {markers[key].describe()}")
                edm[name] = value
        keys = [k for k in (EDM_VPRED_SIGMA_MAX, EDM_VPRED_SIGMA_MIN) if k in markers]
        claims.append(_Claim(f"key{'s' if len(keys) > 1 else ''} {', '.join(keys)}{suffix}", V_PREDICTION, edm=edm))
    elif EDM_VPRED_SIGMA_MIN in markers:
        decisions.append(f"key {EDM_VPRED_SIGMA_MIN} without {EDM_VPRED_SIGMA_MAX}: not read as EDM (as ComfyUI)")
    if V_PRED in markers:
        claims.append(_Claim(f"key {V_PRED}{suffix}", type=V_PREDICTION, rank="keys"))
    if len({c.type for c in claims}) > 1:
        decisions.append(
            f"marker keys of two kinds ({'; '.join(c.label for c in claims)}): {claims[0].label} is read first, "
            "as ComfyUI does"
        )
    claims = [_Claim(c.label, c.type, None, c.edm, rank="keys") for c in claims[:1]]
    if zsnr:
        claims.append(_Claim(f"key {ZTSNR}{suffix}", zsnr=True, rank="keys"))
    return claims


def _scheduler_claims(config: Mapping[str, Any], label: str, decisions: list[str]) -> list[_Claim]:
    ptype = config.get("prediction_type")
    kind = str(config.get("_class_name", ""))
    edm: dict[str, Any] | None = None
    if kind.startswith("EDM"):
        edm = _checked_edm("edm_vpred" if ptype == V_PREDICTION else "edm", config, label, decisions)
    if ptype is not None and ptype not in TYPES:
        decisions.append(f"{label}: prediction_type {ptype!r} is not one unetkit handles (epsilon, v_prediction)")
        ptype = None
    zsnr = config.get("rescale_betas_zero_snr")
    return [
        _Claim(
            f"{label} (prediction_type)" if ptype else label,
            type=ptype,
            zsnr=zsnr if isinstance(zsnr, bool) else None,
            edm=edm if ptype else None,
            rank="scheduler",
        )
    ]


def _metadata_claims(metadata: Mapping[str, str], where: str, decisions: list[str]) -> list[_Claim]:
    claims = []
    raw = metadata.get(PREDICTION)
    if raw:
        record = _json(raw, where, PREDICTION)
        if not isinstance(record, dict) or record.get("type") not in TYPES:
            decisions.append(f"metadata {PREDICTION} is not a record unetkit reads ({raw[:80]!r}); ignored")
        else:
            raw_edm = record.get("edm")
            edm = None
            if isinstance(raw_edm, dict) and raw_edm.get("kind") in EDM_DEFAULTS:
                edm = _checked_edm(raw_edm["kind"], raw_edm, f"metadata {PREDICTION}", decisions)
                for key in ("latents_mean", "latents_std"):
                    values = raw_edm.get(key)
                    if isinstance(values, list) and all(_number(v) is not None for v in values):
                        edm[key] = [_number(v) for v in values]
            elif raw_edm is not None:
                decisions.append(f"metadata {PREDICTION}: its edm entry is not one unetkit reads; ignored")
            zsnr = record.get("zero_terminal_snr")
            claims.append(
                _Claim(
                    f"metadata {PREDICTION}",
                    type=record["type"],
                    zsnr=zsnr if isinstance(zsnr, bool) else None,
                    edm=edm,
                    origin=str(record.get("source") or "") or None,
                    from_default=record.get("from_default") is True,
                    rank="record",
                )
            )
    elif metadata.get(PREDICTION_TYPE):
        value = metadata[PREDICTION_TYPE]
        if value in TYPES:
            claims.append(_Claim(f"metadata {PREDICTION_TYPE}", type=value, rank="record"))
        else:
            decisions.append(f"metadata {PREDICTION_TYPE}={value!r} is not a prediction type; ignored")
    if MODELSPEC in metadata:
        value = metadata[MODELSPEC]
        ptype = _SPELLINGS.get(value.strip().lower())
        if ptype is None:
            decisions.append(f"metadata {MODELSPEC}={value!r} is not a prediction type unetkit knows; ignored")
        else:
            claims.append(_Claim(f"metadata {MODELSPEC}={value!r}", type=ptype, rank="modelspec"))
    for key, is_zsnr in ((KOHYA_V, False), (KOHYA_ZSNR, True), (V_PRED, False), (ZTSNR, True)):
        if key not in metadata:
            continue
        flag = _flag(metadata[key])
        rank = "kohya" if key.startswith("ss_") else "metadata-markers"
        if flag is None:
            decisions.append(f"metadata {key}={metadata[key][:40]!r} is neither true nor false; ignored")
        elif is_zsnr:
            claims.append(_Claim(f"metadata {key}={metadata[key]!r}", zsnr=flag, rank=rank))
        elif rank == "kohya":
            claims.append(_Claim(f"metadata {key}={metadata[key]!r}", V_PREDICTION if flag else EPSILON, rank=rank))
        elif flag:  # ComfyUI's marker name as a metadata key: present means v-prediction
            claims.append(_Claim(f"metadata {key}", V_PREDICTION, rank=rank))
    order = {r: i for i, r in enumerate(_RANKS)}
    return sorted(claims, key=lambda c: order[c.rank])


def _stored_markers(raw: str, where: str) -> dict[str, Marker]:
    obj = _json(raw, where, PREDICTION_MARKERS)
    if not isinstance(obj, dict):
        raise FormatError(f"{where}metadata {PREDICTION_MARKERS} must be a JSON object, found {type(obj).__name__}")
    unknown = [k for k in obj if k not in MARKER_KEYS]
    if unknown:
        raise FormatError(f"{where}metadata {PREDICTION_MARKERS} names keys that are no markers: {unknown[:5]}")
    return {k: Marker.from_json(k, v, f"{where}metadata {PREDICTION_MARKERS}") for k, v in obj.items()}


def _json(raw: str, where: str, key: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{where}metadata {key} is not valid JSON ({e})") from e


def _flag(value: str) -> bool | None:
    v = value.strip().lower()
    return True if v in _TRUE else False if v in _FALSE else None


def _json_number(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


def _checked_edm(kind: str, given: Mapping[str, Any], label: str, decisions: list[str]) -> dict[str, Any]:
    """EDM settings of ``kind`` from ``given`` (a scheduler config or unetkit's record): each sigma a finite
    positive float32 number, else the kind's default, said in ``decisions``."""
    edm: dict[str, Any] = {"kind": kind}
    for name, default in EDM_DEFAULTS[kind].items():
        value = given.get(name, default)
        number = _number(value)
        if number is None or not 0 < number < 3e38:
            decisions.append(f"{label}: {name}={value!r} is not a sigma; {default:g} (the {kind} default) is used")
            number = default
        edm[name] = number
    return edm


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (not a number, a bool, NaN, infinite, or an int beyond floats)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _edm_text(edm: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={edm[k]:g}" for k in ("sigma_min", "sigma_max", "sigma_data") if k in edm)
