"""What `verify` holds in memory, component by component, and an estimate of its peak before anything runs.

The design, for the case that decides it: a full-size SDXL (2.57 B parameters), an fp16 reference (5.1 GB on disk)
against a Q8_0 GGUF candidate, ``--quick``, on the CPU. Figures from :func:`estimate_memory` (the forward's own
activations simulated on the meta device, see :func:`forward_peak_bytes`):

==========================================  ===============  ========================================================
component                                   64x64 / 128x128  how
==========================================  ===============  ========================================================
runtime: Python, torch, diffusers, unetkit  0.55 / 0.55 GB   measured on a tiny UNet's verify (RUNTIME_BYTES)
reference weights, as stored (fp16)         5.13 / 5.13 GB   memory-mapped; cast to fp32 one layer at a time in
                                                             forward (``loading.cast_in_forward``), never as a whole
                                                             (that would be 10.3 GB)
candidate weights (Q8_0 blocks, rest fp32)  2.74 / 2.74 GB   packed blocks memory-mapped, decoded per layer in forward
per-layer scratch                           0.35 / 0.35 GB   the largest weight (a 1280x2560x3x3 convolution, 118 MB
                                                             in fp32): the reference's cast buffer, and the
                                                             candidate's decode buffer in each of blame's two threads
forward activations                         0.33 / 1.32 GB   the peak of one CFG call (batch 2): live tensors x 2
                                                             (:data:`KERNEL_FACTOR`)
blame, beyond that                          0.63 / 0.92 GB   both passes alive in lockstep (one sample each), the
                                                             candidate's layer on the reference's inputs, and one
                                                             comparison in float64; nothing stored
**peak (estimate)**                         9.7 / 11.0 GB    goal <= 20 GB (the VM has 24 GiB)
==========================================  ===============  ========================================================

What it was before this design: the reference loaded whole in its stored dtype computed in fp16 (on this CPU a
3x3 convolution runs hundreds of times slower in fp16; cast whole to fp32 instead it holds 10.3 GB), and blame kept
a float32 copy of every leaf module's output and first input for the candidate's pass: 5.9 GB per sample at 64x64
latents, 23 GB at 128x128 (1,333 leaf calls, summed on the meta device). Now blame runs both passes in lockstep
(:func:`unetkit.verification.blame.run_blame`) and stores nothing.

``unetkit.verification.estimate_memory(reference, candidate, size=...)`` reads only headers and configs and runs the
forward on the meta device (about 5 s for a full-size SDXL, no weights touched); ``benchmarks/bench_sdxl.py`` prints
it beside the measured peak. Checked against measured peaks (``bench_sdxl.py --size medium``: SDXL's topology at 0.3
width, fp16 0.61 GB against its Q8_0, --quick with blame): 1.69 GB estimated and 1.63 GB measured at 64x64, 2.19 GB
estimated and 2.31 GB measured at 128x128 (5 % low: the activations are the estimated part, the weights are exact);
a tiny SDXL in a fresh process: within 25 % (tests).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetkit import families
from unetkit.shapes import numel

GB = 1e9

#: Python, torch, diffusers, safetensors, the schedulers and unetkit's own modules, with torch's and oneDNN's
#: caches: measured 0.33 GB after the imports, 0.55-0.59 GB at the peak of a whole verify of a tiny UNet (whose
#: weights and activations are a few MB) in a fresh process on the 2-core VM
RUNTIME_BYTES = int(0.55 * GB)
#: a real CPU forward holds more than the tensors the meta device sees: oneDNN reorders convolution inputs, outputs
#: and weights into blocked layouts (copies), and the allocator rounds. Measured peak RSS added by one forward over
#: the simulated peak: 1.8x (SDXL topology at 0.3 width, 64x64 and 128x128, batch 2), 1.9x (tiny SDXL, 128x128)
KERNEL_FACTOR = 2.0
#: metrics.compare works in float64: both tensors, the error and two temporaries of it, per float32 element of
#: the compared tensor: 5 x 8 bytes = 10 x its float32 size
COMPARE_FACTOR = 10


@dataclass(frozen=True)
class Held:
    """One side of a verify as it sits in memory: its config, its weights as held (stored dtype, packed GGUF
    blocks, quantized tensors) and its per-layer scratch (one layer's weight cast or decoded, per thread)."""

    config: dict[str, Any]
    weight_bytes: int
    scratch_bytes: int = 0

    @classmethod
    def of(cls, side: str | Path | nn.Module, dtype: Any = None) -> Held:
        """``side``: a path verify would load (as ``verify`` loads it: fp16/bf16 computed in fp32 on the fly, GGUF
        on the fly) or a loaded model."""
        if isinstance(side, nn.Module):
            return cls._of_model(side)
        from unetkit.formats.quantized_dir import CONFIG, is_quantized_dir

        path = Path(side)
        if is_quantized_dir(path):
            from unetkit.formats.quantized_dir import WEIGHTS
            from unetkit.formats.validate import read_json_file
            from unetkit.spec import expected_shapes

            config = read_json_file(path / CONFIG, "the diffusers config")
            largest = max((numel(s) for k, s in expected_shapes(config).items() if k.endswith("weight")), default=0)
            # stored tensors are read into memory; torchao's 3x3 convolutions and quanto dequantize a weight in forward
            return cls(dict(config), (path / WEIGHTS).stat().st_size, 4 * largest)
        from unetkit.dtypes import parse_dtype
        from unetkit.loading import default_dtype
        from unetkit.resolve import open_unet

        source = open_unet(path)
        held = parse_dtype(dtype) or default_dtype(source)
        size = torch.tensor([], dtype=held).element_size()
        weights = largest_packed = largest_cast = 0
        for entry in source.tensors.values():
            if entry.qtype is not None:  # GGUF blocks, kept packed and decoded in forward into float32
                weights += entry.nbytes
                largest_packed = max(largest_packed, entry.numel)
            else:
                weights += entry.numel * (size if entry.dtype.is_floating_point else entry.dtype.itemsize)
                largest_cast = max(largest_cast, entry.numel)
        cast = held in (torch.float16, torch.bfloat16)  # computed in float32, cast layer by layer
        return cls(dict(source.spec.config), weights, 4 * largest_packed + (4 * largest_cast if cast else 0))

    @classmethod
    def _of_model(cls, model: nn.Module) -> Held:
        from unetkit.dtypes import compute_dtype
        from unetkit.metrics import weight_bytes

        config: Any = model.config
        declared = getattr(model, "unetkit_compute_dtype", None)
        largest = max((p.numel() for p in model.parameters()), default=0)
        scratch = largest * torch.tensor([], dtype=compute_dtype(model)).element_size() if declared else 0
        return cls(dict(config), weight_bytes(model), scratch)


@dataclass
class MemoryEstimate:
    """Bytes per component, the peak (``total``) and the settings it was made for."""

    components: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def to_dict(self) -> dict[str, Any]:
        return {"components": dict(self.components), "total": self.total, "settings": dict(self.settings)}

    def text(self) -> str:
        width = max(len(k) for k in self.components)
        rows = [f"{k:<{width}}  {v / GB:6.2f} GB" for k, v in self.components.items()]
        return "\n".join([*rows, f"{'peak (estimate)':<{width}}  {self.total / GB:6.2f} GB"])


def estimate_memory(
    reference: str | Path | nn.Module | Held,
    candidate: str | Path | nn.Module | Held,
    *,
    size: int = 64,
    batch: int = 1,
    cfg: bool | None = None,
    blame: bool = True,
    dtype: Any = None,
) -> MemoryEstimate:
    """The peak resident memory of ``verify(reference, candidate, size=size, batch=batch, blame=blame,
    dtype=dtype)``, by component (see the module docstring): the runtime, each side's weights as held, the
    per-layer scratch, the activations of one forward (``cfg``: the batch doubled by classifier-free guidance;
    None: as verify decides, for all but LCM UNets) and blame's two passes in lockstep; the larger of the last two
    counts, as they never overlap."""
    ref = reference if isinstance(reference, Held) else Held.of(reference, dtype)
    cand = candidate if isinstance(candidate, Held) else Held.of(candidate, dtype)
    if cfg is None:  # verify's default: classifier-free guidance, except for LCM's guidance embedding
        cfg = not ref.config.get("time_cond_proj_dim")
    threads = 2 if blame else 1  # blame runs the candidate's pass in a thread of its own, with its own scratch
    simulated, _ = forward_peak_bytes(ref.config, size, batch * (2 if cfg else 1))
    forward = int(KERNEL_FACTOR * simulated)
    components = {
        "runtime (Python, torch, diffusers, unetkit)": RUNTIME_BYTES,
        "reference weights, as held": ref.weight_bytes,
        "candidate weights, as held": cand.weight_bytes,
        "per-layer scratch (one weight cast or decoded, per thread)": ref.scratch_bytes + threads * cand.scratch_bytes,
        "forward activations (one call, the CFG batch)": forward,
    }
    if blame:
        one, largest = forward_peak_bytes(ref.config, size, 1)
        # both passes alive at once, one sample each; the candidate's layer on the reference's inputs; the comparison
        lockstep = int(2 * KERNEL_FACTOR * one) + largest + COMPARE_FACTOR * largest
        components["blame (two passes in lockstep, nothing stored)"] = max(0, lockstep - forward)
    settings = {
        "size": size,
        "batch": batch,
        "cfg": cfg,
        "blame": blame,
        "dtype": None if dtype is None else str(dtype),
    }
    return MemoryEstimate(components, settings)


def forward_peak_bytes(config: Mapping[str, Any], size: int, batch: int) -> tuple[int, int]:
    """(peak bytes of the tensors alive at once during one float32 forward at ``size`` x ``size`` latents and
    ``batch`` samples, bytes of the largest single tensor), simulated on the meta device: every op's output is
    counted from its creation until its last Python reference goes (views share their base's bytes).
    ``scaled_dot_product_attention`` is counted as torch's CPU flash kernel runs it (the output, no T x T
    attention map); the weights are not counted (they are the sides' own components), nor what kernels allocate
    inside (oneDNN's reorders: :data:`KERNEL_FACTOR`)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from unetkit.spec import build_model

    model = build_model(dict(config), device="meta")
    cfg: Any = model.config
    meta = torch.device("meta")
    inputs: dict[str, Any] = {
        "sample": torch.empty(batch, cfg.in_channels, size, size, device=meta),
        "timestep": torch.tensor([499], device=meta),
        "encoder_hidden_states": torch.empty(batch, 77, cfg.cross_attention_dim, device=meta),
    }
    if cfg.time_cond_proj_dim:
        inputs["timestep_cond"] = torch.empty(batch, cfg.time_cond_proj_dim, device=meta)
    added = families.for_config(dict(cfg)).added_cond_kwargs(cfg, batch, torch.Generator())
    if added:
        inputs["added_cond_kwargs"] = {k: v.to(meta) for k, v in added.items()}

    class Flash(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention:
                q, v = args[0], args[2]
                return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
            return func(*args, **kwargs)

    class Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.refs: dict[int, int] = {}
            self.sizes: dict[int, int] = {}
            self.live = self.peak = self.largest = 0

        def drop(self, key: int) -> None:
            self.refs[key] -= 1
            if not self.refs[key]:
                del self.refs[key]
                self.live -= self.sizes.pop(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = storage._cdata
                    if key not in self.refs:
                        self.refs[key] = 0
                        self.sizes[key] = storage.nbytes()
                        self.live += self.sizes[key]
                        self.peak = max(self.peak, self.live)
                        self.largest = max(self.largest, self.sizes[key])
                    self.refs[key] += 1
                    weakref.finalize(t, self.drop, key)
            return out

    live = Live()
    with torch.no_grad(), Flash(), live:
        out = model(**inputs).sample
        del out
    return live.peak, live.largest
