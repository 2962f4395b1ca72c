"""Runtime quantization backends (torchao, optimum-quanto): one small protocol, one registry, one report.

A runtime backend swaps weights of a live diffusers UNet for quantized ones (``nn.Module -> nn.Module``, in place).
Which modules it touches is decided here, by one pure function of (module name, module kind, globs), so that
every backend follows the same policy and every decision carries its reason:

  1. a user ``exclude`` glob keeps the module;
  2. else a user ``include`` glob quantizes it, even when a default exclusion names it (this is how a default is
     overridden, e.g. ``include=["*"]`` quantizes conv_in and conv_out too);
  3. else, when ``include`` was given, the module is kept (``include`` is an allowlist);
  4. else a default exclusion keeps it, with its reason: the model family's sensitive modules
     (``Family.sensitive``: conv_in, conv_out, the time embedding for SD) and the norms (``NORMS``);
  5. else it is quantized.

Globs match diffusers module names (``down_blocks.0.attentions.0.proj_in``) with the same rule as the GGUF
``--keep``/``--override`` globs: a pattern with ``*?[`` matches the whole name (fnmatch); a pattern without
wildcards matches any name containing it as dotted parts (``attn2.to_v`` matches ``...attn2.to_v``).
Only nn.Linear and nn.Conv2d weights are ever quantized; biases, norms and other parameters stay float and are
counted as kept in the report.

Importing this module never imports torchao or optimum.quanto; backends import them when they run.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from unetkit import families
from unetkit.errors import BackendUnavailable, QuantError
from unetkit.families.base import Family
from unetkit.globs import matches

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DConditionModel

#: (glob, reason): norms stay float whatever the family, unless an ``include`` glob names them
NORMS = ("*norm*", "default exclusion: normalization layers stay float")

#: backend name -> (pip package, extra) for the install hint
PACKAGES = {"torchao": ("torchao", "torchao"), "quanto": ("optimum-quanto", "quanto")}


# ----------------------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ModuleDecision:
    """What happened to one module that owns parameters."""

    name: str  # diffusers module name
    kind: str  # "Linear", "Conv2d 1x1", "Conv2d 3x3", "GroupNorm", ...
    params: int  # every parameter the module owns directly (weight + bias)
    quantized_params: int  # of which held quantized (the weight, when quantized)
    quantized: bool
    reason: str
    shape: tuple[int, ...] = ()  # the weight's shape

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModuleDecision:
        return cls(
            name=d["name"],
            kind=d["kind"],
            params=int(d["params"]),
            quantized_params=int(d["quantized_params"]),
            quantized=bool(d["quantized"]),
            reason=str(d["reason"]),
            shape=tuple(d.get("shape", ())),
        )


@dataclass
class QuantReport:
    """The result of ``unetkit.quantize``: the method, the library versions and every module's decision."""

    method: str
    backend: str
    versions: dict[str, str]
    decisions: list[ModuleDecision]
    include: list[str] | None = None
    exclude: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def coverage(self) -> dict[str, dict[str, int]]:
        """Per module kind: modules quantized/kept and parameters quantized/kept (biases count as kept)."""
        table: dict[str, dict[str, int]] = {}
        for d in self.decisions:
            row = table.setdefault(
                d.kind, {"modules_quantized": 0, "modules_kept": 0, "params_quantized": 0, "params_kept": 0}
            )
            row["modules_quantized" if d.quantized else "modules_kept"] += 1
            row["params_quantized"] += d.quantized_params
            row["params_kept"] += d.params - d.quantized_params
        return dict(sorted(table.items(), key=lambda kv: -(kv[1]["params_quantized"] + kv[1]["params_kept"])))

    @property
    def params_total(self) -> int:
        return sum(d.params for d in self.decisions)

    @property
    def params_quantized(self) -> int:
        return sum(d.quantized_params for d in self.decisions)

    def kept_reasons(self) -> dict[str, int]:
        """Why modules with a quantizable kind were kept: reason -> count."""
        out: dict[str, int] = {}
        for d in self.decisions:
            if not d.quantized and d.kind.startswith(("Linear", "Conv2d")):
                out[d.reason] = out.get(d.reason, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "backend": self.backend,
            "versions": dict(self.versions),
            "include": self.include,
            "exclude": self.exclude,
            "params_total": self.params_total,
            "params_quantized": self.params_quantized,
            "coverage": self.coverage(),
            "kept_reasons": self.kept_reasons(),
            "notes": list(self.notes),
            "decisions": [d.to_dict() for d in self.decisions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantReport:
        return cls(
            method=d["method"],
            backend=d["backend"],
            versions=dict(d.get("versions", {})),
            decisions=[ModuleDecision.from_dict(x) for x in d["decisions"]],
            include=d.get("include"),
            exclude=d.get("exclude"),
            notes=list(d.get("notes", [])),
        )


# ---------------------------------------------------------------------------------------------------------- policy


def module_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"Conv2d {kh}x{kw}"
    return type(module).__name__


def is_quantizable(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv2d)


def select(
    name: str, include: Sequence[str] | None, exclude: Sequence[str] | None, family: Family | None = None
) -> tuple[bool, str]:
    """(quantize?, reason) for a Linear/Conv2d module named ``name`` of a UNet of ``family``; see the module
    docstring for precedence."""
    for glob in exclude or ():
        if matches(name, glob):
            return False, f"excluded by '{glob}'"
    for glob in include or ():
        if matches(name, glob):
            return True, f"included by '{glob}'"
    if include:
        return False, "not matched by any include glob"
    why = family.sensitive_reason(name) if family is not None else None
    if why:
        return False, f"default exclusion: {why}"
    if matches(name, NORMS[0]):
        return False, NORMS[1]
    return True, ""


@dataclass(frozen=True)
class Candidate:
    """A module with parameters, and what the policy says about it (the backend may still keep it, with reason)."""

    name: str
    module: nn.Module
    kind: str
    want: bool
    reason: str

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters(recurse=False))

    def decision(self, quantized: bool, reason: str) -> ModuleDecision:
        w = getattr(self.module, "weight", None)
        shape = tuple(w.shape) if w is not None else ()
        qn = int(w.numel()) if (quantized and w is not None) else 0
        return ModuleDecision(self.name, self.kind, self.params, qn, quantized, reason, shape)


def plan_modules(unet: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[Candidate]:
    """Every module owning parameters, in ``named_modules`` order, with the policy's verdict."""
    config = getattr(unet, "config", None)
    family = families.for_config(dict(config)) if config is not None else None
    out = []
    for name, module in unet.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        kind = module_kind(module)
        if is_quantizable(module):
            want, reason = select(name, include, exclude, family)
        else:
            want, reason = False, f"{type(module).__name__}: only Linear and Conv2d weights are quantized"
        out.append(Candidate(name, module, kind, want, reason))
    return out


# ---------------------------------------------------------------------------------------------- backends, registry


class RuntimeBackend(Protocol):
    """A runtime quantization backend. ``apply`` swaps the weights of a live UNet in place; ``export`` turns the
    quantized modules into plain tensors plus a JSON state, and ``rebuild`` puts them back into a UNet built on the
    meta device, without quantizing anything again (the saved folder: ``formats/quantized_dir.py``)."""

    name: str  # "torchao", "quanto", "gguf"
    schemes: dict[str, str]  # scheme -> one-line description

    def describe(self) -> str: ...

    def check_available(self, scheme: str, unet: nn.Module | None = None) -> None:
        """Raise BackendUnavailable saying why and what would work, when ``scheme`` cannot run here."""

    def apply(self, unet: UNet2DConditionModel, scheme: str, candidates: list[Candidate]) -> list[ModuleDecision]: ...

    def export(self, unet: nn.Module, decisions: list[ModuleDecision]) -> tuple[dict[str, torch.Tensor], dict]: ...

    def rebuild(
        self,
        model: nn.Module,
        scheme: str,
        decisions: list[ModuleDecision],
        tensors: dict[str, torch.Tensor],
        state: dict,
        where: str,
    ) -> None: ...

    def versions(self) -> dict[str, str]: ...


#: The backend table: name -> (module, class). A backend module imports this one, never the reverse, and is
#: imported only when its backend is asked for, so torchao and optimum.quanto load only when used.
BACKENDS: dict[str, tuple[str, str]] = {
    "torchao": ("unetkit.quant.runtime.torchao_backend", "TorchAOBackend"),
    "quanto": ("unetkit.quant.runtime.quanto_backend", "QuantoBackend"),
    "gguf": ("unetkit.quant.runtime.gguf_backend", "GGUFBackend"),
}
#: backends that ``unetkit.quantize(unet, method)`` offers; GGUF methods write files (``unetkit.quantize_file``)
#: and the GGUF backend runs what a GGUF file holds (``load_unet(dequantize="on-the-fly")``)
QUANTIZE_METHODS = ("torchao", "quanto")


def backend(name: str) -> RuntimeBackend:
    if name not in BACKENDS:
        raise QuantError(f"unknown runtime backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    module, cls = BACKENDS[name]
    made: RuntimeBackend = getattr(importlib.import_module(module), cls)()
    return made


def known_methods() -> list[str]:
    """Every runtime method name ('torchao:int8-weight-only', ...) that ``quantize`` takes, whether or not it can
    run here."""
    return [f"{n}:{s}" for n in QUANTIZE_METHODS for s in backend(n).schemes]


def library_versions() -> dict[str, str]:
    """The versions a quantized UNet's numbers depend on, recorded with it."""
    import importlib.metadata as md

    import torch

    from unetkit._version import __version__

    out = {"unetkit": __version__, "torch": torch.__version__}
    for pkg in ("diffusers", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def parse_method(method: str, *, stored: bool = False) -> tuple[RuntimeBackend, str]:
    """'torchao:int8-dynamic' -> (backend, 'int8-dynamic'); an unknown method lists the known ones. ``stored``: the
    method recorded with a quantized UNet, which may be any backend's ('gguf:Q8_0' too)."""
    name, sep, scheme = method.strip().partition(":")
    names = tuple(BACKENDS) if stored else QUANTIZE_METHODS
    if not sep or name.lower() not in names:
        raise QuantError(f"unknown quantization method {method!r}; {_hint()}")
    be = backend(name.lower())
    wanted = scheme if name.lower() == "gguf" else scheme.lower()
    if wanted not in be.schemes:
        raise QuantError(f"unknown quantization method {method!r}; {_hint()}")
    return be, wanted


def _hint() -> str:
    return f"known runtime methods: {', '.join(known_methods())}; GGUF files: gguf:<recipe> (e.g. gguf:Q4_K_M)"


def require(module: str, backend_name: str) -> Any:
    """Import an optional package, or raise BackendUnavailable with the install hint."""
    top = module.split(".")[0]
    pkg, extra = PACKAGES[backend_name]
    try:
        importlib.import_module(top)  # the top-level package first, so that a blocked package is seen as missing
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(
            f"the {backend_name} backend needs the package {pkg!r}, which cannot be imported here ({e}); "
            f"install it with: pip install 'unetkit[{extra}]' (or pip install {pkg})"
        ) from e


@contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Lower the chatter of third-party loggers for a moment (e.g. torchao's import-time warnings about CUDA-only
    extensions that cannot load on a CPU machine and are not used here)."""
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)
