"""torchao runtime quantization: Linear weights through ``torchao.quantize_``, Conv2d weights through the same
torchao tensors held as 2-D matrices.

torchao's configs only touch nn.Linear, and 68.5 % of SD1.5's parameters are Conv2d weights. A convolution weight
(out, in, kh, kw) is a matrix (out, in*kh*kw) once flattened, so each one is quantized by torchao's own machinery
(``quantize_`` on a throw-away nn.Linear holding the flattened weight: same config, same tensor subclass, per-output-
channel scales) and held by :class:`TorchAOConv2d`:

- 1x1 convolutions (stride 1, no padding) ARE matrix products over channels: the forward runs ``F.linear`` on the
  channels-last view, so int8-dynamic really takes torchao's int8 x int8 linear path (activations quantized per
  pixel, the same per-token scheme as for Linear);
- 3x3 (and any other) convolutions dequantize the torchao tensor in forward and call ``F.conv2d``: weight-only
  semantics. torchao has no quantized convolution kernel, so under int8-dynamic their activations stay float; the
  decision says so.

Saving decomposes every torchao tensor into plain tensors plus a JSON description with torchao's own safetensors
helpers (``torchao.prototype.safetensors``), and loading rebuilds the same subclass from them: nothing is
re-quantized on load.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unetkit.errors import BackendUnavailable, FormatError, KeyMapError, list_some
from unetkit.quant.runtime.base import Candidate, ModuleDecision, quiet_loggers, require

#: scheme -> (torchao config class name, description)
SCHEMES = {
    "int8-weight-only": "int8 weights (per output channel), float activations",
    "int8-dynamic": "int8 weights and per-token dynamic int8 activations (Linear, 1x1 Conv2d); 3x3 Conv2d weight-only",
    "float8-weight-only": "float8 e4m3 weights (per output channel), float activations",
    "int4-weight-only": "int4 weights, groups of 128 (CUDA sm80+ only: tinygemm kernel)",
}
INT4_GROUP = 128


def _import_torchao() -> Any:
    # torchao warns at import about CUDA-only extensions it cannot load on a CPU machine; they are not used here.
    with quiet_loggers("torchao", "torch.utils._pytree"):
        require("torchao", "torchao")
        return require("torchao.quantization", "torchao")


def _config(scheme: str) -> Any:
    q = _import_torchao()
    # set_inductor_config=False: quantizing must not change torch._inductor's global settings as a side effect
    if scheme == "int8-weight-only":
        return q.Int8WeightOnlyConfig(set_inductor_config=False)
    if scheme == "int8-dynamic":
        return q.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if scheme == "float8-weight-only":
        return q.Float8WeightOnlyConfig(set_inductor_config=False)
    if scheme == "int4-weight-only":
        return q.Int4WeightOnlyConfig(
            group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )
    raise KeyError(scheme)


def _is_torchao_tensor(t: torch.Tensor) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(t, TorchAOBaseTensor)


class TorchAOConv2d(nn.Module):
    """A Conv2d whose weight is a torchao-quantized 2-D tensor (out, in/groups*kh*kw)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError("TorchAOConv2d supports numeric zero padding only")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight: nn.Parameter | None = None
        self.bias = conv.bias

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        kh, kw = self.kernel_size
        return (self.out_channels, self.in_channels // self.groups, kh, kw)

    @property
    def as_linear(self) -> bool:
        """True when the convolution is exactly a matrix product over channels."""
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and self.groups == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.weight is None:
            raise RuntimeError("TorchAOConv2d has no weight yet")  # set right after construction; a bug otherwise
        if self.as_linear:
            y = F.linear(x.permute(0, 2, 3, 1), self.weight, bias)
            return y.permute(0, 3, 1, 2).contiguous()
        w = self.weight.dequantize().reshape(self.weight_shape).to(x.dtype)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        kind = type(self.weight).__name__ if self.weight is not None else "unset"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, weight={kind}"
        )


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


class TorchAOBackend:
    name = "torchao"
    schemes = SCHEMES

    def describe(self) -> str:
        return "torchao: " + "; ".join(f"{k}: {v}" for k, v in SCHEMES.items())

    def versions(self) -> dict[str, str]:
        import importlib.metadata as md

        return {"torchao": md.version("torchao")}

    def check_available(self, scheme: str, unet: nn.Module | None = None) -> None:
        _import_torchao()
        if scheme == "int4-weight-only":
            # torchao 0.18's int4 weight-only formats: 'plain'/'preshuffled' need the mslk package (CUDA kernels),
            # 'plain_int32' supports no CPU, 'tile_packed_to_4d' (tinygemm) needs CUDA sm80+ and bf16 weights.
            why = (
                "torchao:int4-weight-only needs a CUDA GPU (compute capability 8.0+, tinygemm kernel) with the "
                "UNet in bf16; torchao 0.18 has no CPU int4 weight format"
            )
            alt = "on CPU use quanto:qint4 (4-bit weights, groups of up to 128) or a GGUF file (gguf:Q4_K_M)"
            if not torch.cuda.is_available():
                raise BackendUnavailable(f"{why}; this machine has no CUDA device; {alt}")
            major, minor = torch.cuda.get_device_capability()
            if major < 8:
                raise BackendUnavailable(f"{why}; this GPU is sm{major}{minor}; {alt}")
            p = next(unet.parameters(), None) if unet is not None else None
            if p is not None and (p.device.type != "cuda" or p.dtype != torch.bfloat16):
                raise BackendUnavailable(
                    f"{why}; the UNet is {p.dtype} on {p.device}: "
                    "load it with load_unet(path, dtype='bf16', device='cuda') first"
                )

    # ------------------------------------------------------------------------------------------------------ apply

    def apply(self, unet: nn.Module, scheme: str, candidates: list[Candidate]) -> list[ModuleDecision]:
        self.check_available(scheme, unet)
        config = _config(scheme)
        q = _import_torchao()
        decisions = []
        for c in candidates:
            if not c.want:
                decisions.append(c.decision(False, c.reason))
                continue
            if isinstance(c.module, nn.Linear):
                q.quantize_(c.module, config, filter_fn=lambda m, fqn: True)  # the module itself, in place
                ok = _is_torchao_tensor(c.module.weight)
                decisions.append(c.decision(ok, _reason(scheme, c.kind, ok, "linear", c.reason)))
            else:
                conv: Any = c.module  # an nn.Conv2d
                holder = nn.Linear(1, 1, bias=False, device="meta")
                holder.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1), requires_grad=False)
                q.quantize_(holder, config, filter_fn=lambda m, fqn: True)
                ok = _is_torchao_tensor(holder.weight)
                if ok:
                    new = TorchAOConv2d(conv)
                    new.weight = holder.weight
                    _set_child(unet, c.name, new)
                    path = "linear" if new.as_linear else "dequant-conv"
                else:
                    path = ""
                decisions.append(c.decision(ok, _reason(scheme, c.kind, ok, path, c.reason)))
        return decisions

    # ----------------------------------------------------------------------------------------------- save / load

    def export(self, unet: nn.Module, decisions: list[ModuleDecision]) -> tuple[dict[str, torch.Tensor], dict]:
        """Plain tensors to write, and the JSON state needed to rebuild the torchao tensors."""
        st = _safetensors_helpers()
        plain: dict[str, torch.Tensor] = {}
        quantized: dict[str, torch.Tensor] = {}
        for name, t in unet.state_dict().items():
            (quantized if _is_torchao_tensor(t) else plain)[name] = t
        expected = {d.name + ".weight" for d in decisions if d.quantized}
        if set(quantized) != expected:  # a bug, not a user error
            raise RuntimeError(f"torchao tensors {sorted(set(quantized) ^ expected)[:5]} disagree with the decisions")
        data, meta = st.flatten_tensor_state_dict(quantized) if quantized else ({}, {})
        meta.pop("tensor_names", None)
        overlap = set(data) & set(plain)
        if overlap:
            raise RuntimeError(f"flattened torchao names collide with state-dict names: {sorted(overlap)[:5]}")
        return {**plain, **{k: v.contiguous() for k, v in data.items()}}, {"tensor_subclasses": meta}

    def rebuild(
        self,
        model: nn.Module,
        scheme: str,
        decisions: list[ModuleDecision],
        tensors: dict[str, torch.Tensor],
        state: dict,
        where: str,
    ) -> None:
        """Fill ``model`` (built on meta from config.json) with the stored tensors; nothing is re-quantized."""
        _import_torchao()
        st = _safetensors_helpers()
        subclasses: dict[str, str] = dict(state.get("tensor_subclasses", {}))
        quantized = [d for d in decisions if d.quantized]
        names = [d.name + ".weight" for d in quantized]
        if set(subclasses) != set(names):
            raise FormatError(
                f"{where}: backend_state.tensor_subclasses does not match the quantized modules: "
                f"{list_some(sorted(set(subclasses) ^ set(names)))}"
            )
        flat: dict[str, torch.Tensor] = {}
        for n in names:
            module_name, _, leaf = n.rpartition(".")
            prefix = f"{module_name}._{leaf}_"
            flat.update({k: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]})
        try:
            rebuilt, left = st.unflatten_tensor_state_dict(flat, {**subclasses, "tensor_names": json.dumps(names)})
        except (ValueError, TypeError, KeyError) as e:
            raise FormatError(f"{where}: torchao could not rebuild its tensors: {e}") from e
        missing = [n for n in names if n not in rebuilt]
        if missing or left:
            raise KeyMapError(
                f"{where}: torchao tensors incomplete: missing {list_some(missing)}; unused {list_some(sorted(left))}"
            )
        for d, n in zip(quantized, names):
            module: Any = model.get_submodule(d.name)
            w = rebuilt[n]
            if isinstance(module, nn.Conv2d):
                new = TorchAOConv2d(module)
                want = [module.out_channels, module.weight.shape[1:].numel()]
                if list(w.shape) != want:
                    raise KeyMapError(f"{where}: tensor {n!r}: expected shape {want}, got {list(w.shape)}")
                _set_child(model, d.name, new)
                module = new
            elif tuple(w.shape) != tuple(module.weight.shape):
                raise KeyMapError(
                    f"{where}: tensor {n!r}: expected shape {list(module.weight.shape)}, got {list(w.shape)}"
                )
            module.weight = nn.Parameter(w, requires_grad=False)
        result = model.load_state_dict(tensors, strict=False, assign=True)
        missing = [k for k in result.missing_keys if k not in set(names)]
        if missing or result.unexpected_keys:
            raise KeyMapError(
                f"{where}: missing tensors {list_some(missing)}; unexpected tensors {list_some(result.unexpected_keys)}"
            )


def _safetensors_helpers() -> Any:
    try:
        return require("torchao.prototype.safetensors.safetensors_support", "torchao")
    except BackendUnavailable as e:
        raise BackendUnavailable(f"{e}; this torchao has no safetensors helpers (torchao>=0.14 has them)") from e


def _reason(scheme: str, kind: str, ok: bool, path: str, policy_reason: str) -> str:
    if not ok:
        return f"torchao {scheme} left this weight unquantized (shape not supported by the config)"
    head = policy_reason + "; " if policy_reason else ""
    if kind == "Linear":
        return head + "torchao linear"
    if path == "linear":
        return head + "1x1 conv run as torchao linear over channels"
    if scheme == "int8-dynamic":
        return head + (
            "torchao int8 weight, dequantized for F.conv2d: activations stay float (torchao has no "
            "quantized convolution kernel)"
        )
    return head + "torchao weight, dequantized for F.conv2d (weight-only)"
