"""SDXL through GGUF.

- Tiny SDXL base, refiner and inpainting UNets (three or four levels, transformer stacks deeper than one, the add
  embedding ``label_emb``): every flavor and recipe written, read back, loaded both ways and run against the float
  model; the add embedding's decisions recorded with their reasons; F16 GGUF -> LDM is bit-exact.
- Files as other producers write them (ComfyUI-GGUF's own pipeline, stable-diffusion.cpp, diffusers names) load.
- Full size, shapes only: unetkit's planned files are within 1 % of what ComfyUI-GGUF's pipeline writes for the same
  recipe (``quant.gguf.comfy_reference``), and that model of the pipeline gives the sizes of published files.
"""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from safetensors.torch import load_file, save_file

from helpers import forward, inputs, ldm_state, tiny_unet
from unetkit import convert, load_unet, open_unet
from unetkit.formats.gguf import ORIG_SHAPE_KEY, file_bytes, read_gguf, read_header
from unetkit.gguf_export import plan_config, quantize_file
from unetkit.metrics import compare
from unetkit.provenance import DECISIONS, LDM_PREFIX
from unetkit.quant.gguf import comfy_reference, quantize
from unetkit.sample import unet_config

VARIANTS = ["sdxl", "sdxl-refiner", "sdxl-inpainting"]
FLAVORS = ["comfy", "sdcpp", "diffusers"]
RECIPES = ["F16", "Q8_0", "Q5_K_S", "Q4_K_M"]
#: output SQNR floors (dB) against the float model, for the comfy flavor, where every tensor but the kept ones takes
#: the recipe's types. Measured on these tiny random UNets (16x16 latents): F16 50-52, Q8_0 30-33, Q5_K_S 14-17,
#: Q4_K_M 9-10 dB; random weights make a deep UNet amplify weight error (see unetkit.sample.SCALE), so the floors
#: are what these models give with a margin, not what a trained SDXL gives. sdcpp/diffusers keep more in F16 (exact
#: shapes: at these widths few rows fit 256), so they must do at least as well as Q8_0 there.
MIN_SQNR = {"F16": 45.0, "Q8_0": 27.0, "Q5_K_S": 12.0, "Q4_K_M": 7.5}
ADD_EMBEDDING = ("label_emb.0.0.weight", "label_emb.0.2.weight")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny tensors here gain nothing from intra-op threads, and on a shared 2-core machine the K-quant search
    loops run 10x slower with two spinning OpenMP threads (measured: Q4_K_M of the tiny SDXL, 56 s against 5.6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=VARIANTS)
def source(request, tmp_path_factory):
    """(variant, float model, fp32 LDM file, its inputs, the float model's output)."""
    model = tiny_unet(request.param)
    path = tmp_path_factory.mktemp(request.param) / "in.safetensors"
    save_file(ldm_state(model), str(path))
    args = inputs(model)
    return request.param, model, path, args, forward(model, args)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``get(source, flavor, recipe)``: (path, QuantizeResult) of unetkit's GGUF file, written once per module."""
    cache: dict = {}

    def get(source, flavor: str, recipe: str):
        variant, _, path, _, _ = source
        key = (variant, flavor, recipe)
        if key not in cache:
            out = tmp_path_factory.mktemp("gguf") / f"{variant}-{flavor}-{recipe}.gguf"
            cache[key] = out, quantize_file(path, out, f"gguf:{recipe}", flavor=flavor)
        return cache[key]

    return get


#: every flavor of every shape; the base at every recipe, the refiner and inpainting shapes at Q8_0 and Q4_K_M (their
#: F16 and Q5_K_S files add nothing the base's do not test, and the suite has a time budget)
CASES = [(v, f, r) for v in VARIANTS for f in FLAVORS for r in (RECIPES if v == "sdxl" else ["Q8_0", "Q4_K_M"])]


@pytest.mark.parametrize("source, flavor, recipe", CASES, indirect=["source"])
def test_every_flavor_writes_reads_and_runs(source, written, flavor, recipe):
    variant, model, path, args, reference = source
    out, r = written(source, flavor, recipe)
    assert r.variant == variant and r.tensors == len(model.state_dict())

    # the header: SDXL's architecture, names as the flavor writes them, the decisions stored; the file has exactly
    # the size its plan gives (formats.gguf.file_bytes, what the size model uses)
    kv, infos = read_header(out)
    assert kv["general.architecture"] == "sdxl"
    prefix = "" if flavor == "comfy" else LDM_PREFIX
    assert all(i.name.startswith(prefix) and not i.name.startswith("model.model.") for i in infos)
    assert out.stat().st_size == r.file_bytes == file_bytes([(i.name, i.qtype.name, i.shape) for i in infos], kv)
    stored = json.loads(kv[DECISIONS])
    assert stored == {d["name"]: [d["qtype"], d["reason"]] for d in r.decisions}

    # the add embedding (label_emb <-> add_embedding): high precision, with the family's reason, in every flavor
    by = {d["name"]: d for d in r.decisions}
    for name in ADD_EMBEDDING:
        assert by[name]["qtype"] == "F16", by[name]
        assert ("add embedding" in by[name]["reason"]) == (recipe not in ("F16", "BF16")), by[name]
        assert by[name.replace("weight", "bias")]["qtype"] == "F32"
    source_ = open_unet(out)
    assert source_.spec.variant == variant
    assert source_.tensors["add_embedding.linear_1.weight"].shape == model.add_embedding.linear_1.weight.shape

    # loads both ways, bit-identical to each other, close to the float model for the qtype
    a = forward(load_unet(out, dequantize="load"), args)
    b = forward(load_unet(out, dequantize="on-the-fly"), args)
    assert torch.equal(a, b)
    err = compare(reference, a)
    floor = MIN_SQNR[recipe] if flavor == "comfy" else max(MIN_SQNR[recipe], MIN_SQNR["Q8_0"])
    assert err.sqnr_db > floor, (variant, flavor, recipe, str(err))
    quantized = {q for q in r.by_qtype if q not in ("F32", "F16", "BF16")}
    assert bool(quantized) == (recipe != "F16")
    if recipe != "F16":
        assert err.sqnr_db < MIN_SQNR["F16"] + 10  # really quantized: far from the F16 file's error


@pytest.mark.parametrize("flavor", ["comfy", "sdcpp"])
def test_f16_gguf_back_to_ldm_is_bit_exact(source, flavor, tmp_path):
    """An fp16 LDM file -> F16 GGUF -> LDM safetensors (fp16) gives every tensor back bit for bit (1-D tensors went
    through F32, which holds every fp16 value exactly)."""
    variant, model, _, _, _ = source
    fp16 = {k: v.half() for k, v in ldm_state(model).items()}
    src = tmp_path / "fp16.safetensors"
    save_file(fp16, str(src))
    quantize_file(src, tmp_path / "m.gguf", "gguf:F16", flavor=flavor)
    convert(tmp_path / "m.gguf", tmp_path / "back.safetensors", to="ldm", dtype="fp16")
    back = load_file(str(tmp_path / "back.safetensors"))
    assert back.keys() == fp16.keys()
    for k, v in fp16.items():
        assert back[k].dtype == torch.float16 and torch.equal(back[k], v), k


# ---- other producers' files -------------------------------------------------------------------------------------


def write_foreign(path, tensors, arch: str | None = "sdxl") -> None:
    """A GGUF file written by gguf-py itself: (name, array, raw ggml type or None) tensors; ``arch=None`` drops
    general.architecture (stable-diffusion.cpp's own files have none)."""
    w = GGUFWriter(str(path), arch or "x")
    if arch is None:
        w.kv_data[0].pop("general.architecture")
    for name, arr, qt in tensors:
        w.add_tensor(name, arr, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_like_comfyui_gguf(path, model, recipe: str) -> list:
    """The file ComfyUI-GGUF's pipeline (tools/convert.py, then its patched llama-quantize) writes for this UNet from
    an fp32 source, written with gguf-py by its rules (``comfy_reference``): LDM names without prefix,
    general.architecture = sdxl, rows of 256 with comfy.gguf.orig_shape for F16 tensors too. Returns the
    decisions."""
    state = ldm_state(model, prefix="")
    decisions = comfy_reference.plan([(k, tuple(v.shape)) for k, v in state.items()], recipe, source="F32")
    w = GGUFWriter(str(path), "sdxl")
    w.add_quantization_version(2)
    w.add_file_type(1)
    for d in decisions:
        t = state[d.name].reshape(d.stored_shape)
        if d.stored_shape != d.shape:
            w.add_array(ORIG_SHAPE_KEY + d.name, list(d.shape))
        if d.qtype == "F32":
            w.add_tensor(d.name, t.float().numpy())
        elif d.qtype == "F16":
            w.add_tensor(d.name, t.half().numpy())
        else:
            w.add_tensor(d.name, quantize(t, d.qtype).numpy(), raw_dtype=GGMLQuantizationType[d.qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return decisions


@pytest.mark.parametrize("recipe", ["Q8_0", "Q4_K_M"])
def test_comfyui_gguf_pipeline_file_loads_and_equals_ours(source, written, recipe, tmp_path):
    """A file as ComfyUI-GGUF's own pipeline writes it loads as the right SDXL variant, its size is what the size
    model says, and it decodes to exactly the weights of unetkit's comfy-flavor file of the same recipe (same
    qtype for every tensor; reshaped or not, the same blocks)."""
    variant, model, path, args, reference = source
    theirs = tmp_path / "theirs.gguf"
    decisions = write_like_comfyui_gguf(theirs, model, recipe)
    assert theirs.stat().st_size == planned_bytes(decisions, "sdxl", {"general.file_type": 1})
    src = open_unet(theirs)
    assert src.spec.variant == variant
    # reshaped tensors (F16 ones too: the time embedding) come back in their real shapes
    assert ORIG_SHAPE_KEY + "time_embed.0.weight" in read_header(theirs)[0]
    assert src.tensors["time_embedding.linear_1.weight"].shape == tuple(model.time_embedding.linear_1.weight.shape)

    ours_unet = load_unet(written(source, "comfy", recipe)[0], dequantize="load")
    theirs_unet = load_unet(theirs, dequantize="load")
    mine, other = ours_unet.state_dict(), theirs_unet.state_dict()
    assert mine.keys() == other.keys()
    for k in mine:
        assert torch.equal(mine[k], other[k]), k
    out = forward(load_unet(theirs, dequantize="on-the-fly"), args)
    assert compare(reference, out).sqnr_db > MIN_SQNR[recipe]


def test_stable_diffusion_cpp_file_loads(source, tmp_path):
    """stable-diffusion.cpp's own convert (``sd -M convert --type q8_0``): prefixed LDM names, exact shapes; a tensor
    is converted when its row fits the block, except biases and names with time_embed., label_emb. or
    embedding (these keep the source type), so 1-D norm weights are Q8_0 too; 3x3 convs stay in the source type."""
    variant, model, _, args, reference = source
    tensors = []
    for name, t in ldm_state(model).items():
        keep = name.endswith(".bias") or any(s in name for s in ("time_embed.", "label_emb.", "embedding"))
        if t.shape[-1] % 32 == 0 and not keep:
            tensors.append((name, quantize(t, "Q8_0").numpy(), GGMLQuantizationType.Q8_0))
        else:
            tensors.append((name, t.float().numpy(), None))
    write_foreign(tmp_path / "sdcpp.gguf", tensors, arch=None)  # sd.cpp tells SDXL from the tensors
    src = open_unet(tmp_path / "sdcpp.gguf")
    assert src.spec.variant == variant
    assert src.tensors["down_blocks.0.resnets.0.norm1.weight"].qtype == "Q8_0"  # a quantized 1-D norm weight
    assert src.tensors["add_embedding.linear_1.weight"].qtype is None  # label_emb stays float
    out = forward(load_unet(tmp_path / "sdcpp.gguf", dequantize="on-the-fly"), args)
    assert compare(reference, out).sqnr_db > MIN_SQNR["Q8_0"]


def test_diffusers_named_file_loads(source, tmp_path):
    """A GGUF with diffusers names (what ComfyUI-GGUF's convert.py writes for a diffusers SDXL UNet:
    ``add_embedding.linear_1.weight``, no prefix, general.architecture = sdxl): F16 weights, F32 1-D tensors."""
    variant, model, _, args, reference = source
    tensors = [(k, (t.half() if t.ndim > 1 else t.float()).numpy(), None) for k, t in model.state_dict().items()]
    write_foreign(tmp_path / "d.gguf", tensors)
    src = open_unet(tmp_path / "d.gguf")
    assert src.spec.variant == variant and "add_embedding.linear_2.weight" in src.tensors
    out = forward(load_unet(tmp_path / "d.gguf"), args)
    assert compare(reference, out).sqnr_db > MIN_SQNR["F16"]


def test_diffusers_flavor_loads_in_diffusers_itself(tmp_path):
    """diffusers' own GGUF path reads the SDXL diffusers-flavor file (with a local config: no Hub) and computes what
    unetkit's on-the-fly modules compute, up to its fp16 rounding of the decoded weights."""
    from diffusers import GGUFQuantizationConfig, UNet2DConditionModel

    model = tiny_unet("sdxl")
    path = tmp_path / "in.safetensors"
    save_file(ldm_state(model), str(path))
    quantize_file(path, tmp_path / "d.gguf", "gguf:Q8_0", flavor="diffusers")
    convert(path, tmp_path / "cfg", to="diffusers")
    theirs = UNet2DConditionModel.from_single_file(
        str(tmp_path / "d.gguf"),
        config=str(tmp_path / "cfg"),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32,
    )
    args = inputs(model)
    ours = forward(load_unet(tmp_path / "d.gguf", dequantize="on-the-fly"), args)
    assert compare(ours, forward(theirs, args)).sqnr_db > 50


def test_shape_only_plan_is_the_files_plan(tmp_path):
    """``plan_config`` (config alone: no file, no weights) decides exactly what ``quantize_file`` decides."""
    model = tiny_unet("sdxl-refiner")
    path = tmp_path / "in.safetensors"
    save_file(ldm_state(model), str(path))
    for flavor in FLAVORS:
        r = quantize_file(path, tmp_path / f"{flavor}.gguf", "gguf:Q4_K_S", flavor=flavor)
        planned = {
            d.name: (d.qtype, list(d.stored_shape), d.reason)
            for d in plan_config(dict(model.config), "gguf:Q4_K_S", flavor=flavor)
        }
        written = {d["name"]: (d["qtype"], list(d["stored_shape"]), d["reason"]) for d in r.decisions}
        assert planned == written
        assert read_gguf(tmp_path / f"{flavor}.gguf").metadata["general.architecture"] == "sdxl"


# ---- full size, shapes only: the sizes ComfyUI-GGUF's pipeline gives ---------------------------------------------

SIZE_RECIPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K"]


def planned_bytes(decisions, arch: str, extra: dict | None = None) -> int:
    kv = {"general.architecture": arch, "general.quantization_version": 2, **(extra or {})}
    kv.update({ORIG_SHAPE_KEY + d.name: list(d.shape) for d in decisions if d.stored_shape != d.shape})
    return file_bytes([(d.name, d.qtype, d.stored_shape) for d in decisions], kv)


@pytest.mark.parametrize("recipe", SIZE_RECIPES)
@pytest.mark.parametrize("variant", ["sdxl", "sdxl-refiner"])
def test_full_size_within_1_percent_of_comfyui_gguf(variant, recipe):
    """The comfy flavor's planned file for the full-size SDXL base and refiner is within 1 % of the file
    ComfyUI-GGUF's pipeline writes for the same recipe, from an fp16 source (how fine-tunes are published) and from
    an fp32 one. Where they differ, and why: only 1-D tensors (biases, norms), which unetkit always stores in F32
    and ComfyUI-GGUF in the source's type (F16 from an fp16 source); every other tensor gets the same qtype."""
    ours = plan_config(unet_config(variant, "full"), f"gguf:{recipe}")
    names = [(d.name, d.shape) for d in ours]
    ours_bytes = planned_bytes(ours, "sdxl", {DECISIONS: json.dumps({d.name: [d.qtype, d.reason] for d in ours})})
    for src in ("F16", "F32"):
        theirs = comfy_reference.plan(names, recipe, source=src)
        for a, b in zip(ours, theirs):
            assert a.name == b.name
            if len(a.shape) > 1 or src == "F32":
                assert a.qtype == b.qtype, (a, b)
            else:
                assert (a.qtype, b.qtype) == ("F32", "F16")
        theirs_bytes = planned_bytes(theirs, "sdxl", {"general.file_type": 1})
        assert abs(ours_bytes / theirs_bytes - 1) < 0.01, (src, ours_bytes, theirs_bytes)


#: published UNet-only files, as their pages give them: SDXL nuupy/WAI-illustrious-SDXL-GGUF (an fp16 SDXL fine-tune;
#: GB with two decimals), SD1.5 ComfyUI-GGUF's own (MiB)
PUBLISHED = [
    ("sdxl", "F16", 5.14e9, 0.005e9),
    ("sdxl", "Q8_0", 2.74e9, 0.005e9),
    ("sdxl", "Q4_K_M", 1.63e9, 0.005e9),
    ("sd1.x", "F16", 1639 * 2**20, 2**20),
    ("sd1.x", "Q8_0", 873 * 2**20, 2**20),
    ("sd1.x", "Q4_K_M", 482 * 2**20, 2**20),
    ("sd1.x", "Q4_0", 468 * 2**20, 2**20),
]


@pytest.mark.parametrize("variant, recipe, size, rounding", PUBLISHED)
def test_the_size_model_gives_the_published_sizes(variant, recipe, size, rounding):
    """The model of ComfyUI-GGUF's pipeline (fp16 source) gives the published files' sizes within their rounding,
    and unetkit's planned comfy-flavor file is within 1 % of each."""
    ours = plan_config(unet_config(variant, "full"), f"gguf:{recipe}")
    arch = "sdxl" if variant.startswith("sdxl") else "sd1"
    theirs = comfy_reference.plan([(d.name, d.shape) for d in ours], recipe, source="F16")
    assert abs(planned_bytes(theirs, arch, {"general.file_type": 1}) - size) <= rounding
    assert abs(planned_bytes(ours, arch) / size - 1) < 0.01
