"""Seeded sample UNets and example inputs: the one builder the tests, ``make demo`` and the benchmarks share.

* :func:`unet_config` -- a complete diffusers config for a variant (``sd1.x``, ``sd1.x-inpainting``, ``sd1.x-pix2pix``,
  ``sd1.x-lcm``, ``sd2.x``, ``sdxl``, ``sdxl-inpainting``, ``sdxl-refiner``) at ``tiny`` size (the family's topology
  with channels 32, 64, 128(, 128): the exact key names of the real thing, built in milliseconds) or ``full`` size
  (the real architecture: 860M parameters for SD1.x, 2.57B for SDXL).
* :func:`build_unet` -- a ``UNet2DConditionModel`` with seeded random weights (every weight random: diffusers
  zero-inits some layers, random ones make tests sharper). On ``device="meta"`` it costs nothing.
* :func:`write_ldm_checkpoint` -- the same weights written as an original (LDM) single-file ``.safetensors``,
  streamed tensor by tensor: a full-size file never needs the whole model in memory.
* :func:`example_inputs` -- seeded keyword arguments for ``unet(**inputs)``.

The weights: one ``torch.Generator`` seeded with ``seed`` draws every parameter in the model's parameter order,
``scale * randn`` (norm weights ``1 + scale * randn``; ``scale`` 0.05 at tiny size, 0.02 at full size: see
:data:`SCALE`), in float32, then cast to ``dtype``. So ``write_ldm_checkpoint(p, v, s, seed, dtype)`` holds exactly
``build_unet(v, s, seed, dtype=dtype)``'s weights.

Importing this module imports neither torch nor diffusers (``import unetkit`` stays torch-free).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetkit.errors import UnetkitError
from unetkit.provenance import LDM_PREFIX

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DConditionModel

SIZES = ("tiny", "full")

#: per size: the config every variant starts from (only what differs from diffusers' defaults)
BASE: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=[32, 64, 128, 128], cross_attention_dim=64, attention_head_dim=8, sample_size=64),
    "full": dict(
        block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8, sample_size=64
    ),
}

#: what every SDXL-shaped variant changes (the widths, depths and context come per size)
_SDXL: dict[str, Any] = dict(
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled text + 6 time ids x 256
    sample_size=128,
    upcast_attention=False,
)
_REFINER: dict[str, Any] = dict(
    _SDXL,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    projection_class_embeddings_input_dim=2560,  # 1280 pooled text + 5 time ids x 256
)
#: the SDXL base at each size: tiny keeps its topology (three levels, no attention in the first, stacks of 2 and 3
#: standing in for 2 and 10, the add embedding's real 2816 inputs), heads as SDXL's 64-channel rule gives
_XL_TINY: dict[str, Any] = dict(
    _SDXL,
    block_out_channels=[32, 64, 128],
    attention_head_dim=[1, 1, 2],
    transformer_layers_per_block=[1, 2, 3],
    cross_attention_dim=64,
)
_XL_FULL: dict[str, Any] = dict(
    _SDXL,
    block_out_channels=[320, 640, 1280],
    attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048,
)

#: per size: variant name -> what it changes in BASE
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "sd1.x": {},
        "sd1.x-inpainting": {"in_channels": 9},
        "sd1.x-pix2pix": {"in_channels": 8},
        "sd1.x-lcm": {"time_cond_proj_dim": 32},
        "sd2.x": {
            "use_linear_projection": True,
            "cross_attention_dim": 96,
            "attention_head_dim": [1, 1, 2, 2],
            "sample_size": 96,
            "upcast_attention": False,
        },
        "sdxl": _XL_TINY,
        "sdxl-inpainting": {**_XL_TINY, "in_channels": 9},
        "sdxl-refiner": {**_REFINER, "block_out_channels": [32, 64, 128, 128], "attention_head_dim": [1, 1, 2, 2],
                         "transformer_layers_per_block": 2, "cross_attention_dim": 80},
    },
    "full": {
        "sd1.x": {},
        "sd1.x-inpainting": {"in_channels": 9},
        "sd1.x-pix2pix": {"in_channels": 8},
        "sd1.x-lcm": {"time_cond_proj_dim": 256},
        "sd2.x": {
            "use_linear_projection": True,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "sample_size": 96,
            "upcast_attention": False,
        },
        "sdxl": _XL_FULL,
        "sdxl-inpainting": {**_XL_FULL, "in_channels": 9},
        "sdxl-refiner": {**_REFINER, "block_out_channels": [384, 768, 1536, 1536],
                         "attention_head_dim": [6, 12, 24, 24], "transformer_layers_per_block": 4,
                         "cross_attention_dim": 1280},
    },
}  # fmt: skip

#: diffusers' defaults for the keys above, written out so that a config is complete without diffusers
_DEFAULTS: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    norm_num_groups=32,
    use_linear_projection=False,
    upcast_attention=False,
    time_cond_proj_dim=None,
)

#: per size: the default scale of the random weights (norm weights are 1 + scale * randn). Random weights far above
#: 1/sqrt(fan_in) make a deep UNet amplify any perturbation: at full size (fan-in up to 11520), measured on the demo's
#: LCM UNet at 16x16 latents, Q8_0's output SQNR is 33 dB with 0.02 and 26 dB with 0.05 (Q4_K_M: 11 dB and 7 dB).
#: Full size keeps 0.02, the scale the demo and the benchmarks used before this builder; tiny keeps the tests' 0.05.
SCALE: dict[str, float] = {"tiny": 0.05, "full": 0.02}


def variant_overrides(variant: str, size: str = "tiny") -> dict[str, Any]:
    """The minimal config of ``variant`` at ``size``: BASE updated with the variant's changes (a fresh dict)."""
    if size not in SIZES:
        raise UnetkitError(f"unknown sample size {size!r}; choose one of {', '.join(SIZES)}")
    if variant not in VARIANTS[size]:
        raise UnetkitError(f"unknown sample variant {variant!r}; choose one of {', '.join(VARIANTS[size])}")
    return {**_copy(BASE[size]), **_copy(VARIANTS[size][variant])}


def unet_config(variant: str = "sd1.x", size: str = "tiny") -> dict[str, Any]:
    """A complete ``UNet2DConditionModel`` config (init arguments) for ``variant`` at ``size`` ("tiny" | "full"):
    enough on its own for :func:`unetkit.spec.expected_shapes` and the key map, before any model exists."""
    return {**_copy(_DEFAULTS), **variant_overrides(variant, size)}


def build_unet(
    variant: str = "sd1.x",
    size: str = "tiny",
    seed: int = 0,
    device: Any = "cpu",
    dtype: Any = None,
    scale: float | None = None,
) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` (eval mode) of ``variant`` at ``size`` with seeded random weights (see the module
    docstring; ``scale`` defaults to ``SCALE[size]``), cast to ``dtype`` (torch dtype or 'fp16'/'bf16'/'fp32';
    default float32). ``device="meta"`` gives the structure only, no weights, at no cost. Leaves torch's global
    random state alone."""
    import torch

    from unetkit.spec import build_model

    # from the minimal config: diffusers fills in its own defaults, so model.config is exactly what
    # UNet2DConditionModel(**variant_overrides(...)) has (tuples where diffusers' defaults are tuples)
    model = build_model(variant_overrides(variant, size), device="meta")
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:  # none in SD1.x/2.x UNets: to_empty would leave them undefined
        raise UnetkitError(f"build_unet: unexpected buffers {buffers[:3]}; their values would be undefined")
    if str(device) != "meta":
        model = model.to_empty(device=device)
        draws = _draws(seed, SCALE[size] if scale is None else scale)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(draws(name, tuple(p.shape)))
    target = _torch_dtype(dtype)
    if target is not None:
        model = model.to(target)
    return model.eval()


def ldm_tensor_names(variant: str = "sd1.x", size: str = "tiny", prefix: str = LDM_PREFIX) -> dict[str, str]:
    """diffusers name -> LDM name (with ``prefix``), in the model's parameter order (the order weights are drawn in)."""
    from unetkit.keymap import KeyMap, Topology

    keymap = KeyMap.for_topology(Topology.from_config(unet_config(variant, size)))
    names = {}
    for name in _parameter_shapes(variant_overrides(variant, size)):
        ldm = keymap.to_ldm(name)
        if ldm is None:  # the key map covers every parameter of these variants (tested); say so if one ever is not
            raise UnetkitError(f"no LDM name for {name!r} ({variant}, {size})")
        names[name] = prefix + ldm
    return names


def write_ldm_checkpoint(
    path: str | Path,
    variant: str = "sd1.x",
    size: str = "tiny",
    seed: int = 0,
    dtype: Any = "fp32",
    prefix: str = LDM_PREFIX,
    extra_buffers: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
    writer: str = "unetkit",
    scale: float | None = None,
) -> Path:
    """Write ``build_unet(variant, size, seed, dtype=dtype, scale=scale)``'s weights as an original single-file
    checkpoint: LDM names under ``prefix`` (``model.diffusion_model.``; "" for a prefix-free UNet file), plus
    ``extra_buffers`` (name -> tensor, written as they are: e.g. :func:`sd_schedule_buffers`, as full checkpoints
    carry them).

    ``writer="unetkit"`` streams one tensor at a time (64-byte aligned, as unetkit writes; a full-size file needs
    no model in memory). ``writer="safetensors"`` hands a whole state dict to the safetensors library (8-byte
    aligned, as real downloaded files are; holds every tensor in memory). The file appears atomically."""
    import torch

    path = Path(path)
    target = _torch_dtype(dtype) or torch.float32
    shapes = _parameter_shapes(variant_overrides(variant, size))
    names = ldm_tensor_names(variant, size, prefix)
    extra = dict(extra_buffers or {})
    scale = SCALE[size] if scale is None else scale
    sample = f"variant={variant} size={size} seed={seed} scale={scale:g}"
    meta = {"format": "pt", "unetkit.sample": sample, **(metadata or {})}
    if writer not in ("unetkit", "safetensors"):
        raise UnetkitError(f"unknown writer {writer!r}; choose 'unetkit' or 'safetensors'")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        if writer == "safetensors":
            from safetensors.torch import save_file

            draws = _draws(seed, scale)
            state = {names[n]: draws(n, s).to(target) for n, s in shapes.items()}
            state.update({k: v.contiguous() for k, v in extra.items()})
            save_file(state, str(tmp), metadata=meta)
        else:
            from unetkit.dtypes import lookup
            from unetkit.formats.safetensors_io import OutTensor, aligned_order, write_safetensors

            stream = _InOrder(list(shapes.items()), _draws(seed, scale))
            code = lookup(target).code

            def drawn(i: int) -> Callable[[], torch.Tensor]:
                return lambda: stream.get(i).to(target)

            def given(v: torch.Tensor) -> Callable[[], torch.Tensor]:
                return lambda: v.contiguous()

            tensors = [OutTensor(names[n], s, code, load=drawn(i)) for i, (n, s) in enumerate(shapes.items())]
            tensors += [OutTensor(k, tuple(v.shape), lookup(v.dtype).code, load=given(v)) for k, v in extra.items()]
            try:
                write_safetensors(tmp, aligned_order(tensors), meta)
            finally:
                stream.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def sd_schedule_buffers() -> dict[str, torch.Tensor]:
    """The noise-schedule buffers a full SD1.x checkpoint carries (``betas``, ``alphas_cumprod``; float32, 1000):
    SD's scaled-linear schedule. unetkit lists them as ignored, with the reason."""
    import torch

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float()}


def example_inputs(
    unet: Any, size: int = 64, tokens: int = 77, seed: int = 0, timestep: int = 499, batch: int = 1
) -> dict[str, Any]:
    """Keyword arguments for ``unet(**inputs)``, from its config: ``sample`` (batch, in_channels, size, size),
    ``timestep``, ``encoder_hidden_states`` (batch, tokens, cross_attention_dim), ``timestep_cond`` when the UNet
    has LCM's ``time_cond_proj_dim``, and ``added_cond_kwargs`` when its family needs them. Same seed, same
    tensors."""
    import torch

    from unetkit import families

    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    args: dict[str, Any] = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
        "timestep": torch.tensor([timestep] * batch),
        "encoder_hidden_states": torch.randn(batch, tokens, cfg.cross_attention_dim, generator=g),
    }
    if cfg.time_cond_proj_dim:
        args["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, generator=g)
    added = families.for_config(dict(cfg)).added_cond_kwargs(cfg, batch, g)
    if added:
        args["added_cond_kwargs"] = added
    return args


# --------------------------------------------------------------------------------------------------------------------


def _copy(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in cfg.items()}


def _torch_dtype(dtype: Any) -> torch.dtype | None:
    from unetkit.dtypes import parse_dtype

    return parse_dtype(dtype)


def _parameter_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter's diffusers name and shape in the model's own parameter order (a meta model: no memory)."""
    from unetkit.spec import build_model

    return {name: tuple(p.shape) for name, p in build_model(cfg, device="meta").named_parameters()}


def _draws(seed: int, scale: float) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """``draw(name, shape)``: the next parameter's float32 values from one generator seeded with ``seed``. Calls
    must come in parameter order."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def draw(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        # in place, the same float32 operations as ``base + scale * randn`` (adding 0.0 changes no value)
        t = torch.randn(shape, generator=g).mul_(scale)
        return t.add_(1.0) if (name.endswith("weight") and "norm" in name) else t

    return draw


class _InOrder:
    """Parameter ``i``'s values for a writer that asks for them one at a time, drawn ahead on a thread (so drawing,
    on one core, overlaps the writer's casting and file writes) up to ``ahead`` bytes. The generator only runs
    forward: a parameter the writer skips (it moves a few small tensors to the end) is held until it is asked for,
    and drawing continues past the limit while the writer waits for a parameter not drawn yet."""

    def __init__(
        self,
        shapes: list[tuple[str, tuple[int, ...]]],
        draw: Callable[[str, tuple[int, ...]], Any],
        ahead: int = 256 << 20,
    ):
        import threading

        self.shapes, self.draw, self.ahead = shapes, draw, ahead
        self.held: dict[int, Any] = {}
        self.held_bytes = self.next = 0
        self.wanted = -1  # the parameter the writer waits for, if not drawn yet
        self.error: BaseException | None = None
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="unetkit-sample-draw", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.closed and self.held_bytes >= self.ahead and self.wanted < self.next:
                        self.cond.wait()
                    if self.closed or self.next >= len(self.shapes):
                        return
                    i = self.next
                name, shape = self.shapes[i]
                t = self.draw(name, shape)  # outside the lock: torch releases the GIL while it draws
                with self.cond:
                    self.held[i] = t
                    self.held_bytes += t.numel() * t.element_size()
                    self.next = i + 1
                    self.cond.notify_all()
        except BaseException as e:  # handed to the writer, which raises it
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def get(self, i: int) -> Any:
        with self.cond:
            self.wanted = i
            self.cond.notify_all()
            while i not in self.held:
                if self.error is not None:
                    raise self.error
                if i < self.next or self.closed:  # drawn and handed out already, or closed: it will never come
                    raise UnetkitError(f"internal error: parameter {i} asked for twice or after close")
                self.cond.wait()
            t = self.held.pop(i)
            self.held_bytes -= t.numel() * t.element_size()
            self.wanted = -1
            self.cond.notify_all()
            return t

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.held.clear()
            self.cond.notify_all()
        self.thread.join()
