"""Per-tensor sensitivity: the output error each weight tensor adds when it is stored as each GGUF qtype.

The method: estimate every (tensor, qtype) pair, then check the estimate on a sample by running it.

1. **Calibration.** verify's seeded inputs: latents, text embeddings, the family's ``added_cond_kwargs``, LCM's
   guidance embedding, or ``prompt_embeds`` from a file. ``timesteps`` timesteps are spread over the schedule. The
   output is the guided noise prediction that verify compares (a CFG batch, ``guidance``), at a small latent
   (``size``, default 32).
2. **Output sensitivity of every weight.** For a probe ``v`` drawn from N(0, I) in the output's shape, the
   gradient ``g = d(v . Y)/dW`` gives ``E_v[(g . dW)^2] = |J dW|^2``: the output error that a weight perturbation
   ``dW`` causes, to first order (``J`` is the output's Jacobian in the weights). The diagonal ``E_v[g_i^2]`` is
   averaged over ``probes`` probes and summed over each run of 32 weights (a block of every GGUF type). It is
   kept per timestep (``F``, 1/32 of the weights in size). Weight gradients are formed in per-module hooks from the
   module's input and output gradient, one module at a time. No weight-sized gradient ever exists, and the
   weights themselves need no gradient.
3. **Prediction.** Each tensor is quantized and decoded with unetkit's codecs (ggml's bytes). The predicted output
   noise is ``sum over runs of mean(F_run) * |dW_run|^2``, per timestep. Quantization errors of different weights
   are zero-mean and independent, so the off-diagonal terms vanish in expectation, and the errors of different
   tensors add up (:mod:`unetkit.quant.gguf.auto`).
4. **Check.** A seeded sample of single-tensor quantizations is run for real: the weight is replaced by its
   decoded value and the calibration forwards are run. The measured output noise is set beside the prediction,
   with the Pearson correlation of the log noise, the Spearman rank correlation and the median ratio.

The result is cached per (source sha256, settings, method version) under ``$UNETKIT_CACHE_DIR/sensitivity``, so
a second target is chosen without measuring again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetkit._version import __version__
from unetkit.errors import UnetkitError
from unetkit.quant.gguf.auto import LADDER, LEGACY
from unetkit.quant.gguf.qtypes import qtype_by_name
from unetkit.shapes import numel

log = logging.getLogger(__name__)
METHOD_VERSION = 1  # bump when the numbers a cached result holds would change
RUN = 32  # weights per run of the sensitivity map F: the block of the legacy types, a sub-block of the K-quants
Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass(frozen=True)
class Settings:
    """What a sensitivity result depends on besides the weights (part of the cache key)."""

    size: int = 32  # latent side
    timesteps: int = 4
    probes: int = 4  # random output directions per timestep
    seed: int = 0
    guidance: float | None = None  # None: verify's default for the scheduler
    scheduler: str | None = None  # None: lcm for LCM UNets, else ddim (verify's choice)
    prompt_embeds: str | None = None
    check: int = 8  # single-tensor quantizations run for real to check the prediction

    def key(self, sha256: str) -> str:
        embeds = _file_sha(self.prompt_embeds) if self.prompt_embeds else None
        blob = json.dumps([sha256, asdict(self), embeds, METHOD_VERSION, LADDER, LEGACY], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class TensorSensitivity:
    name: str  # LDM name, without prefix
    param: str  # the diffusers parameter name
    shape: list[int]
    noise: dict[str, list[float]]  # qtype -> predicted output noise per calibration timestep

    def total(self, qtype: str) -> float | None:
        per_t = self.noise.get(qtype)
        return None if per_t is None else float(sum(per_t))


@dataclass
class Sensitivity:
    source: str
    sha256: str
    variant: str
    settings: dict[str, Any]
    timesteps: list[int]
    signal: list[float]  # |Y_t|^2 of the reference's calibration outputs
    tensors: list[TensorSensitivity]
    check: dict[str, Any]  # predicted against measured on a sample
    seconds: dict[str, float]
    version: str = __version__
    cached: bool = False
    notes: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, TensorSensitivity]:
        return {t.name: t for t in self.tensors}

    def sqnr_db(self, noise: float) -> float:
        """The output SQNR (dB, over the calibration set) for a total predicted noise."""
        total = sum(self.signal)
        return math.inf if noise <= 0 else 10 * math.log10(total / noise)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Sensitivity:
        d = dict(d)
        d["tensors"] = [TensorSensitivity(**t) for t in d["tensors"]]
        return Sensitivity(**d)


def analyze(
    src: str | Path,
    settings: Settings | None = None,
    *,
    cache: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Sensitivity:
    """The sensitivity of every weight tensor of ``src`` (any input unetkit reads) to every candidate qtype (see
    the module's docstring). ``cache``: reuse, and store, the result under ``$UNETKIT_CACHE_DIR/sensitivity``.
    ``workers``: encoder processes for step 3 (default: one per core for a big UNet)."""
    from unetkit.formats.hashing import FileHasher, cache_dir
    from unetkit.resolve import open_unet

    settings = settings or Settings()
    _check_settings(settings)
    source = open_unet(src)
    sha = FileHasher(source.checkpoint.files).result()
    key = settings.key(sha)
    path = cache_dir() / "sensitivity" / f"{key}.json"
    if cache and path.is_file():
        try:
            found = Sensitivity.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as e:
            log.warning("sensitivity cache entry %s is damaged (%s): measuring again", path, e)
            found = None
        if found is not None and found.sha256 == sha:
            found.cached = True
            found.source = str(src)
            return found
    result = _measure(source, sha, settings, workers, progress)
    if cache:
        _store(path, result)
    return result


def _check_settings(s: Settings) -> None:
    from unetkit.verification.presets import check_settings

    check_settings(timesteps=s.timesteps, size=s.size, guidance=s.guidance)
    if not 1 <= s.probes <= 256:
        raise UnetkitError(f"probes={s.probes} (1 to 256)")
    if not 0 <= s.check <= 256:
        raise UnetkitError(f"check={s.check} (0 to 256 single-tensor runs)")


def _store(path: Path, result: Sensitivity) -> None:
    from unetkit.formats.atomic import atomic_output

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, force=True) as tmp:
            Path(tmp).write_text(json.dumps(result.to_dict()))
    except (OSError, UnetkitError) as e:  # a cache that cannot be written only costs the next run its time
        log.warning("could not store the sensitivity result in %s (%s): the next run measures again", path, e)


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# the measurement


@dataclass
class Calibration:
    """The calibration set: verify's inputs, the noised latents per timestep, and the reference's outputs."""

    inputs: Any
    timesteps: list[int]
    latents: list[torch.Tensor]
    outputs: list[torch.Tensor] = field(default_factory=list)

    def run(self, model: nn.Module) -> list[torch.Tensor]:
        from unetkit.verification.compare import predict

        with torch.no_grad():
            return [predict(model, self.inputs, x, t) for x, t in zip(self.latents, self.timesteps)]


def calibration(model: nn.Module, settings: Settings) -> Calibration:
    """verify's seeded inputs at ``settings.size``, noised to each of ``settings.timesteps`` timesteps."""
    from unetkit.verification.inputs import DEFAULT_GUIDANCE, make_inputs, make_scheduler, spread_timesteps

    cfg: Any = model.config
    scheduler = settings.scheduler or ("lcm" if cfg.time_cond_proj_dim else "ddim")
    guidance = DEFAULT_GUIDANCE[scheduler] if settings.guidance is None else settings.guidance
    inputs = make_inputs(
        cfg,
        size=settings.size,
        batch=1,
        seed=settings.seed,
        scheduler=scheduler,
        guidance=guidance,
        prompt_embeds=settings.prompt_embeds,
    )
    sched = make_scheduler("ddim")
    ts = spread_timesteps(settings.timesteps, sched.config.num_train_timesteps)
    latents = [sched.add_noise(inputs.x0, inputs.noise, torch.tensor([t])) for t in ts]
    return Calibration(inputs, ts, latents)


def _measure(source: Any, sha: str, settings: Settings, workers: int | None, progress: Progress | None) -> Sensitivity:
    from unetkit.loading import load_unet
    from unetkit.verification.compare import ticker

    t0 = time.perf_counter()
    model = load_unet(source, dtype="fp32")
    model.requires_grad_(False)
    targets = _targets(source, model)
    calib = calibration(model, settings)
    n_t = len(calib.timesteps)
    tick = ticker(n_t * (1 + settings.probes) + len(targets) + settings.check, progress)

    fmap = _sensitivity_map(model, targets, calib, settings, tick)
    t1 = time.perf_counter()
    weights = {name: param for name, (param, _) in targets.items()}
    noise = _predict_all(weights, fmap, workers, tick)
    t2 = time.perf_counter()
    tensors = [TensorSensitivity(name, targets[name][1], list(weights[name].shape), noise[name]) for name in targets]
    check = _check(model, weights, {t.name: t for t in tensors}, calib, settings, tick)
    t3 = time.perf_counter()
    return Sensitivity(
        source=str(source.path),
        sha256=sha,
        variant=source.spec.variant,
        settings=asdict(settings),
        timesteps=calib.timesteps,
        signal=[float(y.double().pow(2).sum()) for y in calib.outputs],
        tensors=tensors,
        check=check,
        seconds={"sensitivity_map": t1 - t0, "predict": t2 - t1, "check": t3 - t2, "total": t3 - t0},
    )


def _targets(source: Any, model: nn.Module) -> dict[str, tuple[torch.Tensor, str]]:
    """The weight tensors a GGUF file may quantize (2-D and up), LDM name -> (parameter, diffusers name), in the
    source's order. Each must be the weight of a Linear or a Conv2d: the hooks form its gradient."""
    params = dict(model.named_parameters())
    out: dict[str, tuple[torch.Tensor, str]] = {}
    for d in source.tensors:
        p = params.get(d)
        if p is None or p.dim() < 2:
            continue
        module_name, _, attr = d.rpartition(".")
        module = model.get_submodule(module_name)
        if attr != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise UnetkitError(
                f"sensitivity: {d} ({type(module).__name__}.{attr}) is not the weight of a Linear or Conv2d; "
                "its gradient cannot be formed"
            )
        out[source.ldm_name(d)] = (p, d)
    return out


def _sensitivity_map(
    model: nn.Module,
    targets: dict[str, tuple[torch.Tensor, str]],
    calib: Calibration,
    settings: Settings,
    tick: Callable[..., None],
) -> dict[str, torch.Tensor]:
    """F per tensor: (timesteps, runs of 32) float32, the diagonal of E_v[g g^T] summed per run."""
    from torch.nn.grad import conv2d_weight

    from unetkit.verification.compare import predict

    n_t = len(calib.timesteps)
    fmap = {name: torch.zeros(n_t, _runs(p.numel())) for name, (p, _) in targets.items()}
    by_module = {id(model.get_submodule(d.rpartition(".")[0])): name for name, (_, d) in targets.items()}
    inputs: dict[int, torch.Tensor] = {}
    state = {"t": 0}
    g = torch.Generator().manual_seed(settings.seed + 7919)

    def grad_hook(module: nn.Module, name: str):
        def hook(grad_out: torch.Tensor) -> None:
            x = inputs[id(module)]
            if isinstance(module, nn.Linear):
                gw = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            else:
                assert isinstance(module, nn.Conv2d)
                gw = conv2d_weight(
                    x, module.weight.shape, grad_out, module.stride, module.padding, module.dilation, module.groups
                )
            fmap[name][state["t"]] += _run_sums(gw.pow_(2)).div_(settings.probes)

        return hook

    def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
        # an input that depends on no latent (the text embeddings of to_k/to_v, the time embedding's sinusoids)
        # becomes a leaf that needs a gradient, so that the module's output gradient is formed all the same
        if args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True), *args[1:])
        return None

    def forward_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        name = by_module.get(id(module))
        if name is None or not out.requires_grad:
            return
        inputs[id(module)] = args[0].detach()
        out.register_hook(grad_hook(module, name))

    modules = [m for m in model.modules() if id(m) in by_module]
    handles = [m.register_forward_pre_hook(pre_hook) for m in modules]
    handles += [m.register_forward_hook(forward_hook) for m in modules]
    try:
        for k, (x, t) in enumerate(zip(calib.latents, calib.timesteps)):
            state["t"] = k
            with torch.enable_grad():
                xg = x.clone().requires_grad_(True)
                y = predict(model, calib.inputs, xg, t)
                calib.outputs.append(y.detach().clone())
                tick(f"timestep {t}: forward")
                for p in range(settings.probes):
                    v = torch.randn(y.shape, generator=g)
                    y.backward(v, retain_graph=p + 1 < settings.probes)
                    tick(f"timestep {t}: probe {p + 1}/{settings.probes}")
            inputs.clear()
    finally:
        for h in handles:
            h.remove()
    return fmap


def _runs(n: int) -> int:
    return -(-n // RUN)


def _run_sums(t: torch.Tensor) -> torch.Tensor:
    """Sums over consecutive runs of 32 elements of ``t`` flattened (the last run zero-padded)."""
    flat = t.reshape(-1)
    pad = -flat.numel() % RUN
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, RUN).sum(1)


def qtypes_for(shape: tuple[int, ...]) -> list[str]:
    """The qtypes measured for a tensor: the K-quant ladder where its size is whole 256-blocks, Q8_0 and F16;
    the legacy types too where some flavor could store it only with them (last dim not a multiple of 256)."""
    n = numel(shape)
    out = []
    for q in (*LADDER, *LEGACY):
        block = qtype_by_name(q).block_size
        if n % block:
            continue
        if q in LEGACY and shape[-1] % 256 == 0:
            continue
        out.append(q)
    return out


def weight_noise(w: torch.Tensor, f: torch.Tensor, qtype: str) -> list[float]:
    """Predicted output noise per timestep of storing ``w`` as ``qtype``: sum over runs of mean(F) * |dW|^2."""
    return _group_noise([w], [f], qtype)[0]


def _group_noise(ws: list[torch.Tensor], fs: list[torch.Tensor], qtype: str) -> list[list[float]]:
    """:func:`weight_noise` of several tensors with one codec call: their blocks concatenated (each tensor's
    blocks stay its own: every size here is whole blocks), which saves the per-call cost of many small tensors."""
    flat = torch.cat([w.detach().float().reshape(-1) for w in ws])
    dw = decoded(flat, qtype).sub_(flat)
    out, at = [], 0
    for w, f in zip(ws, fs):
        e = _run_sums(dw[at : at + w.numel()].pow(2)).double()
        at += w.numel()
        out.append([float((f[t].double() * e).sum()) / RUN for t in range(f.shape[0])])
    return out


def decoded(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """``w`` stored as ``qtype`` and read back, float32, in ``w``'s shape (blocks along the flattened tensor: the
    same blocks every flavor's stored shape gives)."""
    from unetkit.quant.gguf import dequantize, quantize

    x = w.detach().float().reshape(-1)
    if qtype == "F16":
        return x.half().float().view(w.shape)
    block = 256 if qtype.endswith("_K") else qtype_by_name(qtype).block_size
    rows = x.view(-1, block)
    return dequantize(quantize(rows, qtype), qtype, tuple(rows.shape)).reshape(w.shape)


# the encoder processes read the weights and F from the parent through fork (copy-on-write, nothing sent)
_SHARED: dict[str, Any] = {}
GROUP_ELEMENTS = 4 << 20  # tensors smaller than this are measured together, up to this many elements per job


def _jobs(weights: dict[str, torch.Tensor]) -> list[list[str]]:
    """Groups of tensor names: a big tensor alone, small ones together; biggest first (the pool's tail stays
    short)."""
    jobs: list[list[str]] = []
    group: list[str] = []
    size = 0
    for name in sorted(weights, key=lambda n: (-weights[n].numel(), n)):
        n = weights[name].numel()
        if group and size + n > GROUP_ELEMENTS:
            jobs.append(group)
            group, size = [], 0
        group.append(name)
        size += n
    if group:
        jobs.append(group)
    return jobs


def _predict_all(
    weights: dict[str, torch.Tensor], fmap: dict[str, torch.Tensor], workers: int | None, tick: Callable[..., None]
) -> dict[str, dict[str, list[float]]]:
    n_bytes = sum(w.numel() * 4 for w in weights.values())
    if workers is None:
        workers = (os.cpu_count() or 1) if n_bytes >= 256 << 20 else 0
    out: dict[str, dict[str, list[float]]] = {}
    jobs = _jobs(weights)
    if workers <= 1:
        for job in jobs:
            out.update(_noise_job_local(job, weights, fmap))
            tick(f"quantized {job[0]}", len(job))
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from unetkit.quant.gguf.codecs import fused

    fused.warm()
    _SHARED.update(weights=weights, fmap=fmap)
    try:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as ex:
            futures = {ex.submit(_noise_job, job): job for job in jobs}
            for fut in as_completed(futures):
                out.update(fut.result())
                tick(f"quantized {futures[fut][0]}", len(futures[fut]))
    finally:
        _SHARED.clear()
    return out


def _worker_init() -> None:
    torch.set_num_threads(1)


def _noise_job(job: list[str]) -> dict[str, dict[str, list[float]]]:
    return _noise_job_local(job, _SHARED["weights"], _SHARED["fmap"])


def _noise_job_local(
    job: list[str], weights: dict[str, torch.Tensor], fmap: dict[str, torch.Tensor]
) -> dict[str, dict[str, list[float]]]:
    """Every qtype measured for every tensor of the job, one codec call per qtype."""
    out: dict[str, dict[str, list[float]]] = {name: {} for name in job}
    qtypes = {name: qtypes_for(tuple(weights[name].shape)) for name in job}
    for q in (*LADDER, *LEGACY):
        names = [n for n in job if q in qtypes[n]]
        if names:
            for name, noise in zip(names, _group_noise([weights[n] for n in names], [fmap[n] for n in names], q)):
                out[name][q] = noise
    return {name: {q: out[name][q] for q in qtypes[name]} for name in job}


def _check(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    tensors: dict[str, TensorSensitivity],
    calib: Calibration,
    settings: Settings,
    tick: Callable[..., None],
) -> dict[str, Any]:
    """Run a seeded sample of single-tensor quantizations: predicted against measured output noise."""
    pairs = sample_pairs(tensors, settings.check, settings.seed)
    rows = []
    for name, qtype in pairs:
        w = weights[name]
        keep = w.detach().clone()
        try:
            with torch.no_grad():
                w.copy_(decoded(keep, qtype))
            outs = calib.run(model)
        finally:
            with torch.no_grad():
                w.copy_(keep)
        measured = sum(float((o - r).double().pow(2).sum()) for o, r in zip(outs, calib.outputs))
        predicted = tensors[name].total(qtype) or 0.0
        rows.append({"tensor": name, "qtype": qtype, "predicted": predicted, "measured": measured})
        tick(f"check {name} as {qtype}")
    return {"pairs": rows, **agreement(rows)}


def sample_pairs(tensors: dict[str, TensorSensitivity], k: int, seed: int) -> list[tuple[str, str]]:
    """``k`` (tensor, qtype) pairs spread over the tensors ranked by predicted Q4_K noise (or their middle
    qtype's), cycling through Q2_K, Q4_K, Q6_K and Q8_0 where measured: deterministic for a seed."""
    if k <= 0 or not tensors:
        return []

    def rank_key(t: TensorSensitivity) -> float:
        q = "Q4_K" if "Q4_K" in t.noise else sorted(t.noise)[len(t.noise) // 2]
        return t.total(q) or 0.0

    ranked = sorted(tensors.values(), key=lambda t: (rank_key(t), t.name))
    cycle = ["Q2_K", "Q4_K", "Q6_K", "Q8_0"]
    step = max(len(ranked) / k, 1.0)
    out = []
    for i in range(min(k, len(ranked))):
        t = ranked[int((i + 0.5) * step) % len(ranked)]
        qs = [q for q in cycle if q in t.noise] or sorted(t.noise)
        out.append((t.name, qs[(i + seed) % len(qs)]))
    return out


def agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pearson correlation of log10 noise, Spearman rank correlation, and the median measured/predicted ratio."""
    pts = [(r["predicted"], r["measured"]) for r in rows if r["predicted"] > 0 and r["measured"] > 0]
    if len(pts) < 3:
        return {"pearson_log": None, "spearman": None, "median_ratio": None, "n": len(pts)}
    lp = [math.log10(p) for p, _ in pts]
    lm = [math.log10(m) for _, m in pts]
    ratios = sorted(m / p for p, m in pts)
    return {
        "pearson_log": _pearson(lp, lm),
        "spearman": _pearson(_ranks(lp), _ranks(lm)),
        "median_ratio": ratios[len(ratios) // 2],
        "n": len(pts),
    }


def _pearson(a: list[float], b: list[float]) -> float | None:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    sa = math.sqrt(sum((x - ma) ** 2 for x in a))
    sb = math.sqrt(sum((y - mb) ** 2 for y in b))
    if sa == 0 or sb == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (sa * sb)


def _ranks(v: list[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    for rank, i in enumerate(order):
        r[i] = float(rank)
    return r
