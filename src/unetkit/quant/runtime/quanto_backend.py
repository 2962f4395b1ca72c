"""optimum-quanto runtime quantization: quanto swaps nn.Linear and nn.Conv2d for its QLinear/QConv2d natively.

Weights only (activations stay float): ``quantize(unet, weights=qtype, include=[exact names])`` then ``freeze``.
Saving uses quanto's own state-dict form (plain tensors ``<module>.weight._data``, ``._scale``, ``._shift`` ...) and
loading uses ``optimum.quanto.requantize`` with the stored ``quantization_map``: the stored integers and scales are
loaded as they are, nothing is re-quantized.

Known limit (optimum-quanto 0.2.7): qint4/qint2 models fail under ``torch.inference_mode()`` ("Cannot set
version_counter for inference tensor"); run them under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unetkit.errors import KeyMapError, list_some
from unetkit.quant.runtime.base import Candidate, ModuleDecision, require

SCHEMES = {
    "qint8": "int8 weights (per output channel), float activations",
    "qint4": "int4 weights in groups of up to 128 (per output channel when no group fits), float activations",
    "qint2": "int2 weights in groups of up to 128, float activations (very lossy)",
    "qfloat8": "float8 e4m3 weights (per output channel), float activations",
}


def _quanto() -> Any:
    return require("optimum.quanto", "quanto")


class QuantoBackend:
    name = "quanto"
    schemes = SCHEMES

    def describe(self) -> str:
        return "optimum-quanto: " + "; ".join(f"{k}: {v}" for k, v in SCHEMES.items())

    def versions(self) -> dict[str, str]:
        import importlib.metadata as md

        return {"optimum-quanto": md.version("optimum-quanto")}

    def check_available(self, scheme: str, unet: nn.Module | None = None) -> None:
        _quanto()

    def apply(self, unet: nn.Module, scheme: str, candidates: list[Candidate]) -> list[ModuleDecision]:
        q = _quanto()
        names = [c.name for c in candidates if c.want]
        modules = {c.name: c.module for c in candidates}
        if names:
            # include: exact names. quanto matches them with fnmatch; diffusers names hold no glob characters.
            q.quantize(unet, weights=scheme, include=names)
            q.freeze(unet)
        decisions = []
        for c in candidates:
            if not c.want:
                decisions.append(c.decision(False, c.reason))
                continue
            new = unet.get_submodule(c.name)
            ok = new is not modules[c.name] and isinstance(getattr(new, "weight", None), q.QTensor)
            reason = (c.reason + "; " if c.reason else "") + (
                f"quanto {type(new).__name__}" if ok else "quanto has no quantized module for it"
            )
            group = getattr(new, "weight_group_size", None)
            if ok and scheme in ("qint4", "qint2"):
                reason += f", groups of {group}" if group else ", per output channel (no group size fits)"
            # quanto replaces the module: build the decision from the new one (same weight shape and bias)
            decisions.append(Candidate(c.name, new if ok else c.module, c.kind, True, "").decision(ok, reason))
        return decisions

    def export(self, unet: nn.Module, decisions: list[ModuleDecision]) -> tuple[dict[str, torch.Tensor], dict]:
        q = _quanto()
        tensors = {}
        for k, v in unet.state_dict().items():
            if type(v) is not torch.Tensor:  # quanto's state dict is plain tensors; anything else is a bug
                raise RuntimeError(f"quanto state dict entry {k!r} is a {type(v).__name__}, not a plain tensor")
            tensors[k] = v.contiguous()
        return tensors, {"quantization_map": q.quantization_map(unet)}

    def rebuild(
        self,
        model: nn.Module,
        scheme: str,
        decisions: list[ModuleDecision],
        tensors: dict[str, torch.Tensor],
        state: dict,
        where: str,
    ) -> None:
        q = _quanto()
        qmap = dict(state.get("quantization_map", {}))
        expected = {d.name for d in decisions if d.quantized}
        if set(qmap) != expected:
            raise KeyMapError(
                f"{where}: quantization_map disagrees with the quantized modules: "
                f"{list_some(sorted(set(qmap) ^ expected))}"
            )
        q.requantize(model, tensors, qmap, device=torch.device("cpu"))
        # requantize loads with strict=False: check every tensor landed, and nothing is left uninitialised
        have = model.state_dict()
        missing = [k for k in have if k not in tensors]
        unexpected = [k for k in tensors if k not in have]
        shapes = [k for k in tensors if k in have and tuple(have[k].shape) != tuple(tensors[k].shape)]
        if missing or unexpected or shapes:
            raise KeyMapError(
                f"{where}: missing tensors {list_some(missing)}; unexpected {list_some(unexpected)}; "
                f"mis-shaped {list_some(shapes)}"
            )
