"""SDXL at run time: load_unet returns a ready UNet (fp16 weights computed in fp32 layer by layer, bit for bit as
a whole-model cast), verify feeds SDXL's added_cond_kwargs to every call (CFG's two halves each their own pooled
embedding), exact and measured mode on the three tiny SDXL shapes, blame's lockstep passes (no stored
activations; misaligned, failing and interrupted passes end cleanly) and the memory estimate."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import unetkit
from helpers import forward, inputs
from unetkit.dtypes import compute_dtype
from unetkit.gguf_export import quantize_file
from unetkit.loading import cast_in_forward
from unetkit.metrics import compare, weight_bytes
from unetkit.sample import build_unet, write_ldm_checkpoint
from unetkit.verification import SCHEMA_PATH, verify
from unetkit.verification.blame import run_blame
from unetkit.verification.memory import KERNEL_FACTOR, Held, estimate_memory, forward_peak_bytes

SDXL = ["sdxl", "sdxl-refiner", "sdxl-inpainting"]
TINY = dict(timesteps=2, steps=2, size=16)


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Per SDXL shape: an fp16 LDM file (as SDXL checkpoints ship) and its Q8_0 GGUF."""
    root = tmp_path_factory.mktemp("sdxl-runtime")
    out = {}
    for v in SDXL:
        src = write_ldm_checkpoint(root / f"{v}.safetensors", v, "tiny", seed=3, dtype="fp16")
        quantize_file(src, root / f"{v}-Q8_0.gguf", "gguf:Q8_0")
        out[v] = {"src": src, "q8": root / f"{v}-Q8_0.gguf"}
    return out


def _validate(report) -> None:
    import jsonschema

    jsonschema.validate(report.to_dict(), json.loads(SCHEMA_PATH.read_text()))


# ---------------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("variant", SDXL)
def test_fp16_weights_computed_in_fp32_bit_for_bit(files, variant):
    src = files[variant]["src"]
    whole = unetkit.load_unet(src, dtype="fp32")
    lazy = unetkit.load_unet(src, dequantize="on-the-fly", compute_dtype="fp32")
    assert {p.dtype for p in lazy.parameters()} == {torch.float16} and compute_dtype(lazy) == torch.float32
    assert not any(p.is_meta for p in lazy.parameters())
    assert 2 * weight_bytes(lazy) == weight_bytes(whole)
    # the same weights as the builder's, and the same output as the model cast whole, bit for bit
    built = build_unet(variant, "tiny", seed=3, dtype="fp16")
    assert all(torch.equal(a, b) for a, b in zip(lazy.state_dict().values(), built.state_dict().values()))
    args = inputs(lazy)  # float32, the compute dtype
    with torch.no_grad():
        out = lazy(**args).sample
    assert torch.equal(out, forward(whole, args)) and torch.equal(out, forward(built.float(), args))
    assert {p.dtype for p in lazy.parameters()} == {torch.float16}  # put back after the forward
    with torch.inference_mode():  # as bench runs it
        assert torch.equal(lazy(**args).sample, out)
    # fed in the stored dtype (as a pipeline feeds unet.dtype), each layer casts its inputs: a float32 output
    fp16_out = forward(lazy, args)
    assert fp16_out.dtype == torch.float32 and torch.allclose(fp16_out, out, atol=2e-2)


def test_cast_in_forward_restores_on_error_and_is_removable():
    model = build_unet("sdxl", "tiny", dtype="fp16")
    params = dict(model.named_parameters())
    remove = cast_in_forward(model, "fp32")
    assert compute_dtype(model) == torch.float32
    args = {**inputs(model), "sample": torch.zeros(1, 3, 16, 16)}
    with pytest.raises(RuntimeError):  # a wrong channel count fails inside conv_in: its weight comes back anyway
        model(**args)
    assert all(p is params[n] and p.dtype == torch.float16 for n, p in model.named_parameters())
    remove()
    assert compute_dtype(model) == torch.float16
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_runtime_quantization_of_fp16_weights_computed_in_fp32(files, tmp_path):
    """A UNet held in fp16 and computed in fp32 is quantized from fp32 weights (a whole cast first, its hooks
    gone): the quantized UNet computes in fp32, is saved and reloads bit for bit."""
    lazy = unetkit.load_unet(files["sdxl"]["src"], dequantize="on-the-fly", compute_dtype="fp32")
    args = inputs(lazy)
    ref = forward(unetkit.load_unet(files["sdxl"]["src"], dtype="fp32"), args)
    q, report = unetkit.quantize(lazy, "quanto:qint8")
    assert compute_dtype(q) == torch.float32 and not hasattr(q, "unetkit_compute_dtype")
    assert not any(m._forward_pre_hooks for m in q.modules())
    out = forward(q, args)
    assert 25 < compare(ref, out).sqnr_db < 200
    unetkit.save_quantized(q, tmp_path / "q")
    assert torch.equal(forward(unetkit.load_unet(tmp_path / "q"), args), out)


# ----------------------------------------------------------------------------------------------------------- verify


@pytest.mark.parametrize("variant", SDXL)
def test_verify_exact_and_measured(files, variant, tmp_path):
    src, q8 = files[variant]["src"], files[variant]["q8"]
    unetkit.convert(src, tmp_path / "diffusers", to="diffusers")
    exact = verify(src, tmp_path / "diffusers", **TINY)
    assert exact.summary["verdict"] == "bit-identical" and exact.passed, exact.summary
    assert exact.reference.dtype == "float16" and exact.reference.variant == variant
    assert exact.settings["compute_dtype"] == {"reference": "float32", "candidate": "float32"}
    assert exact.blame["differing"] == 0 and exact.sampling["final"]["identical"]
    measured = verify(src, q8, min_sqnr=15, **TINY)
    assert measured.candidate.quantized and not measured.settings["exact_mode"]
    assert measured.passed and measured.summary["verdict"] == "passed", measured.summary
    assert measured.blame["differing"] > 0 and measured.blame["first_divergence"] is not None
    # the add embedding is kept at high precision by the recipe: not where the error comes from
    add = next(b for b in measured.blame["blocks"] if b["block"] == "add_embedding")
    assert add["worst_local_sqnr_db"] is None or add["worst_local_sqnr_db"] > 40
    _validate(measured)


def test_verify_runtime_quantized_folder(files, tmp_path):
    from unetkit.quantization import quantize_to_dir

    src = files["sdxl"]["src"]
    quantize_to_dir(src, tmp_path / "q", "torchao:int8-weight-only")
    r = verify(src, tmp_path / "q", min_sqnr=15, **TINY)
    assert r.candidate.quantized and r.passed, r.summary
    assert r.settings["compute_dtype"]["reference"] == "float32"


def test_perturbed_add_embedding_is_blamed(files):
    ref = unetkit.load_unet(files["sdxl"]["src"], dtype="fp32")
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand.add_embedding.linear_2.weight.mul_(1.05)
    r = verify(ref, cand, **TINY)
    assert not r.passed and r.exact["first_tensor"]["name"] == "add_embedding.linear_2.weight"
    assert r.blame["blamed"] == "add_embedding.linear_2" and r.blame["blamed_block"] == "add_embedding"
    # everything before it in execution order computes exactly what the reference does
    assert r.blame["first_divergence"] == "add_embedding.linear_2"


def test_cfg_gives_each_half_its_own_added_cond(files):
    """Classifier-free guidance runs [unconditional, conditional] as one batch: text_embeds follow the
    encoder_hidden_states' order (the negative pooled embedding first), time_ids are the same for both, and the
    guided prediction equals the one computed from two separate calls."""
    from unetkit.verification.compare import predict
    from unetkit.verification.inputs import make_inputs

    model = unetkit.load_unet(files["sdxl"]["src"], dtype="fp32")
    batch = 2
    vi = make_inputs(model.config, size=16, batch=batch, seed=0, scheduler="ddim", guidance=7.5)
    assert vi.uncond is not None and vi.added_cond is not None and vi.added_uncond is not None
    assert vi.added_cond["text_embeds"].shape == (batch, 1280) and vi.added_cond["time_ids"].shape == (batch, 6)
    assert not torch.equal(vi.added_cond["text_embeds"], vi.added_uncond["text_embeds"])
    assert torch.equal(vi.added_cond["time_ids"], vi.added_uncond["time_ids"])
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    xt = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        guided = predict(model, vi, xt, 500)
    hook.remove()
    (kw,) = seen
    added = kw["added_cond_kwargs"]
    assert torch.equal(kw["encoder_hidden_states"], torch.cat([vi.uncond, vi.cond]))
    assert torch.equal(added["text_embeds"], torch.cat([vi.added_uncond["text_embeds"], vi.added_cond["text_embeds"]]))
    assert torch.equal(added["time_ids"], vi.added_cond["time_ids"].repeat(2, 1))
    with torch.no_grad():
        un = model(xt, 500, encoder_hidden_states=vi.uncond, added_cond_kwargs=vi.added_uncond).sample
        co = model(xt, 500, encoder_hidden_states=vi.cond, added_cond_kwargs=vi.added_cond).sample
    torch.testing.assert_close(guided, un + 7.5 * (co - un), rtol=1e-4, atol=1e-4)
    # the refiner: five time ids, an aesthetic score in place of the target size
    refiner = make_inputs(build_unet("sdxl-refiner", device="meta").config, size=8, batch=1, seed=0,
                          scheduler="ddim", guidance=7.5)  # fmt: skip
    assert refiner.added_cond["time_ids"].tolist() == [[1024.0, 1024.0, 0.0, 0.0, 6.0]]


def test_pooled_prompt_embeds_from_a_file(files, tmp_path):
    from safetensors.torch import save_file

    from unetkit.verification.inputs import make_inputs

    g = torch.Generator().manual_seed(4)
    pooled, negative = torch.randn(1280, generator=g), torch.randn(1, 1280, generator=g)
    emb = {"prompt_embeds": torch.randn(77, 64, generator=g), "pooled_prompt_embeds": pooled}
    save_file({**emb, "negative_pooled_prompt_embeds": negative}, str(tmp_path / "e.safetensors"))
    config = build_unet("sdxl", device="meta").config
    vi = make_inputs(config, size=8, batch=2, seed=0, scheduler="ddim", guidance=7.5,
                     prompt_embeds=tmp_path / "e.safetensors")  # fmt: skip
    assert torch.equal(vi.added_cond["text_embeds"], pooled.expand(2, -1))
    assert torch.equal(vi.added_uncond["text_embeds"], negative.expand(2, -1))
    save_file({**emb, "pooled_prompt_embeds": torch.zeros(3, 768)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(unetkit.UnetkitError, match="pooled_prompt_embeds has shape"):
        make_inputs(config, size=8, batch=1, seed=0, scheduler="ddim", guidance=7.5,
                    prompt_embeds=tmp_path / "bad.safetensors")  # fmt: skip
    r = verify(files["sdxl"]["src"], files["sdxl"]["q8"], prompt_embeds=tmp_path / "e.safetensors", blame=False, **TINY)
    assert r.settings["prompt_embeds"].endswith("e.safetensors") and r.timesteps


# ------------------------------------------------------------------------------------------------ blame in lockstep


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key}")


def _reset_peak() -> float:
    """Give freed heap back to the OS (glibc keeps it otherwise), reset the peak RSS; the RSS now, MiB."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists() or sys.platform != "linux", reason="peak RSS reset through /proc, glibc"
)


@needs_proc
def test_blame_stores_no_activations():
    """The two passes run in lockstep: blame's peak stays near one forward's, far below a copy of every leaf's
    output and first input (what blame kept before)."""
    from unetkit.verification.blame import _first_tensor, _leaves

    ref = build_unet("sdxl", "tiny", seed=1)
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand.conv_in.weight.mul_(1.01)
    args = {**inputs(ref, size=96)}
    stored = [0]

    def count(m, a, kw, out):
        stored[0] += sum(t.numel() * 4 for t in (_first_tensor(out), _first_tensor(a)) if t is not None)

    handles = [m.register_forward_hook(count, with_kwargs=True) for _, m in _leaves(ref)]
    with torch.no_grad():
        ref(**args)
    for h in handles:
        h.remove()
    run_blame(ref, cand, lambda: ref(**args), lambda: cand(**args), 500)  # warm: kernels, thread pools
    rss = _reset_peak()
    res = run_blame(ref, cand, lambda: ref(**args), lambda: cand(**args), 500)
    grown = _status_mib("VmHWM") - rss
    assert res.to_dict()["blamed"] == "conv_in" and all(e.propagated is not None for e in res.entries)
    assert grown < 0.3 * stored[0] / 2**20, (grown, stored[0] / 2**20)


def test_blame_out_of_step_candidate_ends_cleanly(caplog):
    ref = build_unet("sdxl", "tiny", seed=1)
    cand = copy.deepcopy(ref)
    cand.conv_in = nn.Sequential(cand.conv_in, nn.Identity())  # one leaf more, right at the start
    args = inputs(ref)
    with caplog.at_level(logging.WARNING):
        res = run_blame(ref, cand, lambda: ref(**args), lambda: cand(**args), 500)
    assert "propagated errors are not compared" in caplog.text
    # local errors need no alignment (the candidate's conv_in, a Sequential now, computes the same); propagated
    # ones are compared up to the first leaf out of step, and none after it
    assert all(e.local.identical for e in res.entries)
    first = next(i for i, e in enumerate(res.entries) if e.module == "conv_in")
    assert first > 0 and all(e.propagated is not None for e in res.entries[:first])
    assert all(e.propagated is None for e in res.entries[first:])


def test_blame_failures_propagate_without_hanging():
    ref = build_unet("sdxl", "tiny", seed=1)
    args = inputs(ref)

    class Broken(Exception):
        pass

    def fail():
        raise Broken("candidate")

    cand = copy.deepcopy(ref)
    with pytest.raises(Broken, match="candidate"):
        run_blame(ref, cand, lambda: ref(**args), fail, 500)

    def fail_midway():
        ref.mid_block(torch.zeros(1))  # inside the reference's pass: a few leaves have run

    with pytest.raises(Exception):  # noqa: B017  whatever torch raises for the bad input
        run_blame(ref, cand, lambda: (ref(**args), fail_midway()), lambda: cand(**args), 500)
    # both passes are over: a later blame runs normally
    res = run_blame(ref, cand, lambda: ref(**args), lambda: cand(**args), 500)
    assert res.to_dict()["differing"] == 0


# ------------------------------------------------------------------------------------------------ memory estimate


def test_memory_estimate_components(files):
    est = estimate_memory(files["sdxl"]["src"], files["sdxl"]["q8"], size=32)
    c = est.components
    assert est.total == sum(c.values()) and est.text().count("GB") == len(c) + 1
    src_bytes = files["sdxl"]["src"].stat().st_size
    assert abs(c["reference weights, as held"] - src_bytes) < 0.01 * src_bytes  # fp16 as stored, not fp32
    assert c["candidate weights, as held"] < 0.8 * c["reference weights, as held"]
    assert c["per-layer scratch (one weight cast or decoded, per thread)"] > 0
    # activations grow with the latent area; without blame there is no blame line
    big = estimate_memory(files["sdxl"]["src"], files["sdxl"]["q8"], size=64, blame=False)
    assert "blame (two passes in lockstep, nothing stored)" not in big.components
    assert (
        big.components["forward activations (one call, the CFG batch)"]
        > 3 * c["forward activations (one call, the CFG batch)"]
    )
    # a loaded model is held as loaded
    held = Held.of(unetkit.load_unet(files["sdxl"]["src"], dequantize="on-the-fly", compute_dtype="fp32"))
    assert held.weight_bytes == c["reference weights, as held"] and held.scratch_bytes > 0


@needs_proc
def test_forward_peak_matches_a_real_forward():
    """The meta-device simulation of a forward's live tensors against the peak RSS a real forward adds."""
    model = build_unet("sdxl", "tiny", seed=1)
    args = inputs(model, size=128)
    with torch.no_grad():
        model(**args)  # warm
    rss = _reset_peak()
    with torch.no_grad():
        model(**args)
    real = (_status_mib("VmHWM") - rss) * 2**20
    simulated, largest = forward_peak_bytes(model.config, 128, 1)
    assert 0 < largest < simulated
    estimated = KERNEL_FACTOR * simulated
    assert 0.7 * real < estimated < 1.6 * real + 8 * 2**20, (estimated / 2**20, real / 2**20)


@needs_proc
def test_memory_estimate_bounds_a_real_verify(files, tmp_path):
    """A whole verify in a fresh process: its peak RSS (GNU-time style, from the kernel) against the estimate."""
    src, q8 = files["sdxl"]["src"], files["sdxl"]["q8"]
    est = estimate_memory(src, q8, size=32)
    # VmHWM, this process image's own peak (ru_maxrss would carry pytest's own peak over fork and exec)
    code = (
        "import re, sys, torch; torch.set_num_threads(1); from unetkit.verification import verify\n"
        "verify(sys.argv[1], sys.argv[2], quick=True, size=32)\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024)"
    )
    p = subprocess.run([sys.executable, "-c", code, str(src), str(q8)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    peak = int(p.stdout.strip().splitlines()[-1])
    assert 0.6 * est.total < peak < 1.25 * est.total, (peak / 1e9, est.text())


# ------------------------------------------------------------------------------------------ the SDXL benchmark


def test_sdxl_benchmark_tasks_on_a_tiny_model(tmp_path, monkeypatch):
    """benchmarks/bench_sdxl.py's worker tasks, run in this process on a tiny SDXL (the script runs each in a fresh
    process; `--size tiny` does that end to end), and its tables."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.setenv("UNETKIT_HASH_CACHE", "0")
    import bench_sdxl
    from common import local_config

    src = bench_sdxl.make_source(tmp_path / "sdxl_tiny_fp16.safetensors", "tiny")
    config_dir = local_config(src, tmp_path / "config")
    q8 = tmp_path / "q8.gguf"
    r: dict = {"convert": {}, "quantize": {}, "forward": {}}
    rec = bench_sdxl.worker("unetkit_convert", str(src), str(tmp_path / "ours"), "")
    r["convert"]["unetkit_convert"] = {**rec, "median_s": rec["seconds"], "min_s": 0.0, "max_s": 1.0}
    rec = bench_sdxl.worker("diffusers_convert", str(src), str(tmp_path / "theirs"), str(config_dir))
    r["convert"]["diffusers_convert"] = {**rec, "median_s": rec["seconds"], "min_s": 0.0, "max_s": 1.0}
    ours, theirs = unetkit.load_unet(tmp_path / "ours"), unetkit.load_unet(tmp_path / "theirs")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    r["quantize"]["Q8_0"] = bench_sdxl.worker("quantize", str(src), str(q8), "Q8_0")
    assert r["quantize"]["Q8_0"]["file_bytes"] == q8.stat().st_size
    for task, key in (("forward_fp32", "fp32"), ("forward_q8_0", "q8_0_on_the_fly")):
        r["forward"][key] = bench_sdxl.worker(task, str(src), str(q8), "16,1")
        assert r["forward"][key]["median_s"] > 0 and r["forward"][key]["latent"] == 16
    est = bench_sdxl.worker("estimate", str(src), str(q8), "32")
    assert est["total"] == sum(est["components"].values()) and "peak (estimate)" in est["text"]
    text = bench_sdxl.tables(r, "tiny")
    for part in ("convert (tiny SDXL", "Q8_0", "Q8_0 on the fly", "x file"):
        assert part in text
