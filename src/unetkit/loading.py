"""Any supported input -> a ready ``diffusers.UNet2DConditionModel``.

The model is built on the meta device (no memory, no random init) and filled with
``load_state_dict(strict=True, assign=True)`` after the key set and every shape have been checked, so a loaded
UNet has no meta tensor left and never needs ``to_empty()`` (which would wipe the loaded weights)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unetkit.dtypes import parse_dtype, short
from unetkit.errors import FormatError, KeyMapError, UnetkitError, list_some
from unetkit.formats.quantized_dir import MANIFEST, is_quantized_dir, read_quantized_dir
from unetkit.formats.safetensors_io import ALIGN
from unetkit.quant.runtime import scratch
from unetkit.resolve import UNetSource, open_unet
from unetkit.spec import build_model

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

log = logging.getLogger(__name__)


def default_dtype(source: UNetSource) -> torch.dtype:
    """The floating dtype holding most of the parameters (fp32 for quantized or mixed files)."""
    if any(e.qtype is not None for e in source.tensors.values()):
        return torch.float32  # quantized storage decodes to float32
    counts: Counter[torch.dtype] = Counter()
    for entry in source.tensors.values():
        if entry.qtype is None and entry.dtype.is_floating_point:
            counts[entry.dtype] += entry.numel
        else:
            counts[torch.float32] += entry.numel
    return counts.most_common(1)[0][0] if counts else torch.float32


def load_unet(
    path: str | Path | UNetSource,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    ema: bool = False,
    config: Mapping[str, Any] | str | Path | None = None,
    align: bool = True,
    dequantize: str = "load",
    compute_dtype: str | torch.dtype | None = None,
) -> UNet2DConditionModel:
    """Load any SD1.x/2.x/SDXL UNet file or folder that unetkit reads into a diffusers UNet, strictly.

    ``dtype``: None keeps the file's floating dtype (the one most parameters have); 'fp32'/'fp16'/'bf16' or a
    torch dtype converts. ``ema``: use the EMA weights of a full LDM checkpoint. ``config``: override the
    inferred diffusers config (dict, config.json or its folder). ``align``: copy tensors that are not 64-byte
    aligned in the file into aligned memory (default), so that the forward output depends only on the weight
    values; ``align=False`` memory-maps everything (faster for files from other writers; CPU kernels may then give
    different last bits than for the same weights elsewhere). Files unetkit writes are aligned: zero-copy either
    way. GGUF inputs: ``dequantize='load'`` decodes every weight once; ``'on-the-fly'`` keeps Linear and Conv2d
    weights quantized in memory and decodes them in forward (``compute_dtype``, default ``dtype``); both give the
    same output bit for bit. Float inputs: ``compute_dtype`` other than the stored dtype casts every weight at load
    (``'load'``), or with ``'on-the-fly'`` keeps the weights as stored (``dtype``) and casts each layer's weights
    just for its forward (:func:`cast_in_forward`: an fp16 SDXL computed in fp32 holds 5.1 GB, not 10.3 GB); both
    give the same output bit for bit. A folder written by ``unetkit quantize --method torchao:...|quanto:...`` (it holds
    ``unetkit_quant.json``) is rebuilt with its quantized weights as stored, never re-quantized. Raises
    ``KeyMapError`` naming every missing, unexpected or mis-shaped key; returns the model in eval mode.
    """
    if not isinstance(path, UNetSource) and is_quantized_dir(path):
        # a folder written by `unetkit quantize --method torchao:...|quanto:...`: rebuilt, never re-quantized
        if ema or config is not None or dequantize != "load" or compute_dtype is not None:
            raise UnetkitError(f"{path}: a quantized folder takes no ema/config/dequantize/compute_dtype options")
        return load_quantized(path, dtype=dtype, device=device)
    source = path if isinstance(path, UNetSource) else open_unet(path, ema=ema, config=config)
    asked = parse_dtype(compute_dtype) if compute_dtype is not None else None
    packed = any(e.qtype is not None for e in source.tensors.values())  # GGUF: decoded to the compute dtype
    stored = parse_dtype(dtype) or (asked if packed and asked else default_dtype(source))
    device = torch.device(device)
    compute = asked or stored
    if dequantize not in ("load", "on-the-fly"):
        raise UnetkitError(f"dequantize={dequantize!r}: use 'load' or 'on-the-fly'")
    if not stored.is_floating_point or not compute.is_floating_point:
        raise UnetkitError(f"dtype={dtype!r}, compute_dtype={compute_dtype!r}: use a floating dtype")
    # on the fly, float weights stay as stored and are cast layer by layer in forward (cast_in_forward)
    lazy_cast = dequantize == "on-the-fly" and compute != stored
    target = stored if lazy_cast else compute
    model = build_model(source.spec.config, device="meta")
    state = {}
    swapped = _swap_gguf(model, source, device) if dequantize == "on-the-fly" else set()
    for name, entry in source.tensors.items():
        if name in swapped:
            continue
        if (
            align
            and entry.offset is not None
            and entry.offset % ALIGN
            and entry.dtype == target
            and device.type == "cpu"
        ):
            # Not 64-byte aligned in the file (most writers align to 8 only): a memory map would give misaligned
            # weights, and CPU kernels give different last bits on those (see formats/safetensors_io.py), so
            # read a copy into aligned memory. Aligned tensors (unetkit's own files) stay zero-copy.
            t = entry.read()
        else:
            t = entry.load()
        if t.dtype != target and t.dtype.is_floating_point:
            t = t.to(target)
        if t.device != device:
            t = t.to(device)
        elif align and t.data_ptr() % ALIGN:
            t = t.clone()
        state[name] = t
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in swapped]
    if missing or result.unexpected_keys:  # open_unet checked this already; a second line of defence
        raise KeyMapError(
            f"{source.path}: load failed: missing {list_some(missing)}; unexpected {list_some(result.unexpected_keys)}"
        )
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise KeyMapError(f"{source.path}: {len(on_meta)} tensor(s) left on the meta device: {list_some(on_meta)}")
    if lazy_cast:
        cast_in_forward(model, compute)
    model.eval()
    log.info(
        "loaded %s (%s, %d tensors) as %s on %s%s",
        source.path,
        source.spec.variant,
        len(state),
        short(target),
        device,
        f", computed in {short(compute)}" if lazy_cast else "",
    )
    return model


def _swap_gguf(model, source: UNetSource, device: torch.device) -> set[str]:
    """Replace every Linear/Conv2d whose weight is GGUF-quantized by an on-the-fly module; return the tensor names
    now held by those modules (weights and their biases)."""
    from torch import nn

    from unetkit.quant.runtime.base import backend

    gguf: Any = backend("gguf")  # the GGUF backend's attach() is beyond the RuntimeBackend protocol
    done: set[str] = set()
    for name, entry in source.tensors.items():
        if entry.qtype is None or entry.raw is None or not name.endswith(".weight"):
            continue
        module_name = name[: -len(".weight")]
        module = model.get_submodule(module_name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        bias_entry = source.tensors.get(module_name + ".bias")
        bias = bias_entry.load().float().to(device) if bias_entry is not None else None
        gguf.attach(
            model,
            module_name,
            entry.raw().to(device),
            entry.qtype,
            entry.shape,
            entry.stored_shape or entry.shape,
            bias,
        )
        done.add(name)
        if bias_entry is not None:
            done.add(module_name + ".bias")
    return done


# ------------------------------------------------------------------------------------ weights cast in forward

#: the attribute that says a model computes in another dtype than its parameters are held in
#: (``unetkit.dtypes.compute_dtype`` reads it)
COMPUTE_DTYPE_ATTR = "unetkit_compute_dtype"


def cast_in_forward(model: torch.nn.Module, dtype: str | torch.dtype) -> Callable[[], None]:
    """Run ``model`` in ``dtype`` while its floating parameters stay as they are held (fp16 or bf16, often
    memory-mapped from the file): each module that owns parameters gets them cast to ``dtype`` just before its
    forward and put back just after (forward pre-hook and hook, the latter also on an exception). Returns a
    function that removes the hooks again.

    Names, dtypes and the state dict are those of the stored weights (an exact comparison compares the stored bits),
    the module tree is unchanged (per-layer blame sees the same leaves), and the output equals that of the model
    cast to ``dtype`` as a whole, bit for bit: the cast values are the same and every op gets them in aligned memory
    (the start of an allocation). Memory: the weights as held plus one layer's cast weight (a per-thread buffer,
    reused layer after layer and dropped at the end of each forward; for a full-size SDXL the largest weight is a
    1280 x 2560 x 3 x 3 convolution, 118 MB in fp32). Cost: one cast of every weight per forward (measured on the
    2-core VM, SDXL's full widths with one transformer per stack, 641 M parameters, batch 2 at 64x64: 14.7 s against
    12.4 s for the model cast whole; relatively less at larger latents). Why: on a CPU without AVX-512 FP16, torch's
    half-precision convolutions are hundreds of times slower than fp32 ones (a 640-channel 3x3 convolution on a
    64x64 map: 208 s in fp16, 0.27 s in fp32 on the 2-core VM), and an fp16 reference cast whole to fp32 would
    double its memory. :func:`unetkit.dtypes.compute_dtype` reports ``dtype``: feed inputs in it (a layer fed
    another floating dtype, as a pipeline feeds ``unet.dtype``, casts its inputs to ``dtype`` first).

    The per-module state assumes a module is not run by two threads at the same time."""
    target = parse_dtype(dtype) or torch.float32
    saved: dict[tuple[int, int], dict[str, torch.nn.Parameter]] = {}

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        params: dict[str, Any] = module._parameters  # plain tensors go in for the forward
        held = {k: p for k, p in params.items() if p is not None and p.is_floating_point() and p.dtype != target}
        if not held:
            return None
        leaf = next(iter(module.children()), None) is None  # a leaf: nothing else casts while it runs
        largest = max(held, key=lambda k: held[k].numel())
        for k, p in held.items():
            if leaf and k == largest:  # the weight: into the reused buffer (fresh pages per layer cost page faults)
                n = p.numel()
                cast = scratch.buffer(n, target, p.device)[:n].view(p.shape)
                cast.copy_(p.detach())
            else:
                cast = p.detach().to(target)
            params[k] = cast  # a plain tensor for the duration of the forward (no Parameter bookkeeping)
        saved[(id(module), threading.get_ident())] = held
        # inputs in another floating dtype (a pipeline casts its latents to unet.dtype, the stored one) are cast
        # too: the layer computes in the target dtype whatever it is fed
        if any(_other_float(a, target) for a in (*args, *kwargs.values())):
            return tuple(_as(a, target) for a in args), {k: _as(v, target) for k, v in kwargs.items()}
        return None

    def post(module: torch.nn.Module, args: Any, output: Any) -> None:
        held = saved.pop((id(module), threading.get_ident()), None)
        if held:
            module._parameters.update(held)

    handles = []
    for module in model.modules():
        if any(p.is_floating_point() for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, always_call=True))
    handles.append(model.register_forward_hook(scratch.release, always_call=True))
    setattr(model, COMPUTE_DTYPE_ATTR, target)

    def remove() -> None:
        for h in handles:
            h.remove()
        handles.clear()
        if getattr(model, COMPUTE_DTYPE_ATTR, None) is target:
            delattr(model, COMPUTE_DTYPE_ATTR)
        if getattr(model, _REMOVE_ATTR, None) is remove:
            delattr(model, _REMOVE_ATTR)
        scratch.release()

    setattr(model, _REMOVE_ATTR, remove)
    return remove


#: where cast_in_forward keeps the function that removes its hooks (for :func:`cast_whole`)
_REMOVE_ATTR = "_unetkit_cast_remove"


def cast_whole(model: torch.nn.Module) -> torch.nn.Module:
    """A model set up by :func:`cast_in_forward`, cast to its compute dtype as a whole and its hooks removed (for
    what needs the weights themselves in that dtype: runtime quantization); other models are returned as they
    are."""
    remove = getattr(model, _REMOVE_ATTR, None)
    target = getattr(model, COMPUTE_DTYPE_ATTR, None)
    if remove is None or target is None:
        return model
    remove()
    return model.to(target)


def _other_float(x: Any, dtype: torch.dtype) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype


def _as(x: Any, dtype: torch.dtype) -> Any:
    return x.to(dtype) if _other_float(x, dtype) else x


def load_quantized(
    path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> UNet2DConditionModel:
    """Reload a folder written by ``unetkit.save_quantized``; nothing is re-quantized: the backend rebuilds its
    modules from the stored integers and scales, so the same inputs give the same output bit for bit (with the
    library versions recorded in the manifest; a difference is logged)."""
    from unetkit.quant.runtime.base import QuantReport, library_versions, parse_method

    path = Path(path)
    manifest, config, tensors, weights = read_quantized_dir(path)
    mf = path / MANIFEST
    try:
        be, scheme = parse_method(manifest["method"], stored=True)
    except UnetkitError as e:
        raise FormatError(f"{mf}: {e}") from e
    be.check_available(scheme)
    stored = getattr(torch, str(manifest.get("dtype", "float32")), torch.float32)
    if dtype is not None and parse_dtype(dtype) != stored:
        raise UnetkitError(
            f"{path}: holds a {manifest['method']} UNet computed in {stored}; it cannot be loaded as "
            f"{dtype} (quantize a {dtype} UNet instead)"
        )
    if torch.device(device).type != "cpu":
        raise UnetkitError(f"{path}: quantized folders load on the CPU; move the model afterwards (.to({device!r}))")
    saved = manifest.get("versions", {})
    now = {**library_versions(), **be.versions()}
    diff = {k: (v, now.get(k)) for k, v in saved.items() if k != "unetkit" and now.get(k) != v}
    if diff:
        log.warning(
            "%s: written with other library versions (%s); outputs may differ in the last bits",
            mf,
            ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()),
        )
    report = QuantReport.from_dict(manifest["report"])
    model = build_model(config, device="meta")
    be.rebuild(model, scheme, report.decisions, tensors, manifest["backend_state"], str(weights))
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise KeyMapError(f"{weights}: {len(on_meta)} tensor(s) left on the meta device: {list_some(on_meta)}")
    model.eval()
    model.unetkit_quant_report = report  # what was done to it, for callers (not part of the state dict)
    log.info("loaded %s (%s, %d stored tensors)", path, manifest["method"], len(tensors))
    return model
