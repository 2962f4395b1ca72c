"""The GGUF quantization policy (unetkit.quant.gguf.policy), table-driven.

Every expected value below was worked out by hand from the policy's documented rules (its module docstring and
the recipe table), not by running the policy: the qtype block sizes (Q8_0/Q5_x/Q4_x: 32 elements, K-quants: 256),
ComfyUI-GGUF's rows of 256, sdcpp's exact shapes and 127-byte names with the ``model.diffusion_model.`` prefix, and
diffusers' Linear-only quantization. Names and shapes are real SD1.5, SDXL and SDXL-refiner LDM tensors (without
prefix).

Which tensors are sensitive is not the policy's to know: the caller passes ``sensitive`` ({LDM name: reason}, from
the model family's ``Family.sensitive``), so the table passes it as an input column; the last test checks that the
SD1 family names the three SD1.5 sensitive modules (conv_in, conv_out, the time embedding).
"""

from __future__ import annotations

import pytest

from unetkit.errors import QuantError
from unetkit.quant.gguf.policy import Recipe, decide, plan, unet_order

# real SD1.5 LDM tensors (name without prefix, shape)
BIAS = ("input_blocks.1.0.in_layers.2.bias", (320,))
NORM = ("input_blocks.1.1.norm.weight", (320,))
CONV_IN = ("input_blocks.0.0.weight", (320, 4, 3, 3))
CONV_OUT = ("out.2.weight", (4, 320, 3, 3))
TIME_EMB = ("time_embed.0.weight", (1280, 320))
TIME_EMB_BIAS = ("time_embed.0.bias", (1280,))
CONV3 = ("input_blocks.1.0.in_layers.2.weight", (320, 320, 3, 3))  # 921600 elements = 3600 rows of 256
UPSAMPLE = ("output_blocks.2.1.conv.weight", (1280, 1280, 3, 3))  # 14745600 elements = 57600 rows of 256
PROJ_IN = ("input_blocks.1.1.proj_in.weight", (320, 320, 1, 1))  # 1x1 conv: 102400 elements = 400 rows of 256
SKIP = ("input_blocks.7.0.skip_connection.weight", (1280, 640, 1, 1))
TO_V_320 = ("input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight", (320, 320))  # 320 fits 32, not 256
TO_V_X = ("input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight", (320, 768))  # 768 = 3 * 256
TO_V_MID = ("middle_block.1.transformer_blocks.0.attn1.to_v.weight", (1280, 1280))  # 1280 = 5 * 256
TO_K_MID = ("middle_block.1.transformer_blocks.0.attn1.to_k.weight", (1280, 1280))
FF2_MID = ("middle_block.1.transformer_blocks.0.ff.net.2.weight", (1280, 5120))  # 5120 = 20 * 256
FF0_MID = ("middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", (10240, 1280))
FF0_320 = ("input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", (2560, 320))  # 819200 = 3200 rows of 256
EMB = ("input_blocks.1.0.emb_layers.1.weight", (320, 1280))

# real SDXL base / refiner LDM tensors: the add embedding (label_emb <-> add_embedding), a deep stack's 10th block, the
# 640-wide level (640 = 2.5 x 256), the refiner's 384-wide level (384 = 1.5 x 256) and its 1152-input skip (4.5 x 256)
LABEL_EMB_0 = ("label_emb.0.0.weight", (1280, 2816))  # 2816 = 11 x 256: fits every block
LABEL_EMB_2 = ("label_emb.0.2.weight", (1280, 1280))
LABEL_EMB_BIAS = ("label_emb.0.0.bias", (1280,))
XL_FF2_DEEP = ("middle_block.1.transformer_blocks.9.ff.net.2.weight", (1280, 5120))
XL_TO_K_DEEP = ("output_blocks.2.1.transformer_blocks.9.attn2.to_k.weight", (1280, 2048))
XL_TO_V_640 = ("input_blocks.4.1.transformer_blocks.1.attn1.to_v.weight", (640, 640))  # 409600 = 1600 rows of 256
XL_PROJ_IN_640 = ("input_blocks.5.1.proj_in.weight", (640, 640))
REF_TIME_EMB = ("time_embed.0.weight", (1536, 384))  # 589824 = 2304 rows of 256
REF_CONV_384 = ("input_blocks.1.0.in_layers.2.weight", (384, 384, 3, 3))  # 1327104 = 5184 rows of 256
REF_SKIP_1152 = ("output_blocks.8.0.skip_connection.weight", (384, 1152, 1, 1))  # 442368 = 1728 rows of 256
S_ADD = "sensitive layer: the add embedding (pooled text + size conditioning) conditions every block"

# what a caller passes as ``sensitive`` for the SD1.5 sensitive tensors (the SD family's wording, shortened)
S_CONV_IN = "sensitive layer: conv_in sees the raw latents"
S_CONV_OUT = "sensitive layer: conv_out writes the prediction"
S_TIME = "sensitive layer: the time embedding conditions every block"
ONE_D = "1-D tensor"
DIFFUSERS = "diffusers' GGUF loader dequantizes only nn.Linear"


def row(tensor, recipe, flavor, keep, override, qtype, stored, reason, id, sensitive=None):
    name, shape = tensor
    return pytest.param(
        name, shape, recipe, flavor, tuple(keep), tuple(override), sensitive, qtype, tuple(stored), reason, id=id
    )


# (tensor, recipe, flavor, keep, override[, sensitive reason]) -> (qtype, stored shape, substring of the reason)
CASES = [
    # 1-D tensors (biases, norms) stay F32, whatever the recipe and flavor
    row(BIAS, "Q4_K_M", "comfy", [], [], "F32", (320,), ONE_D, "bias-f32"),
    row(NORM, "Q8_0", "sdcpp", [], [], "F32", (320,), ONE_D, "norm-f32-sdcpp"),
    row(TIME_EMB_BIAS, "Q4_K_M", "diffusers", [], [], "F32", (1280,), ONE_D, "time-emb-bias-f32"),
    row(BIAS, "F16", "comfy", [], [], "F32", (320,), ONE_D, "bias-f32-under-F16-recipe"),
    # sensitive layers (conv_in, conv_out, time embedding, as the caller says) -> F16 with the caller's reason, in
    # every flavor, even where they would fit; 1-D tensors stay F32 all the same
    row(
        CONV_IN,
        "Q4_K_M",
        "comfy",
        [],
        [],
        "F16",
        (320, 4, 3, 3),
        S_CONV_IN + ": kept in F16",
        "conv-in-f16",
        sensitive=S_CONV_IN,
    ),
    row(
        CONV_OUT,
        "Q4_K_M",
        "comfy",
        [],
        [],
        "F16",
        (4, 320, 3, 3),
        S_CONV_OUT + ": kept in F16",
        "conv-out-f16",
        sensitive=S_CONV_OUT,
    ),
    row(
        CONV_OUT, "Q8_0", "sdcpp", [], [], "F16", (4, 320, 3, 3), S_CONV_OUT, "conv-out-f16-sdcpp", sensitive=S_CONV_OUT
    ),
    row(
        TIME_EMB,
        "Q4_K_M",
        "comfy",
        [],
        [],
        "F16",
        (1280, 320),
        S_TIME + ": kept in F16",
        "time-emb-f16",
        sensitive=S_TIME,
    ),
    row(TIME_EMB, "Q8_0", "comfy", [], [], "F16", (1280, 320), S_TIME, "time-emb-f16-q8", sensitive=S_TIME),
    row(
        TIME_EMB, "Q4_K_M", "diffusers", [], [], "F16", (1280, 320), S_TIME, "time-emb-f16-diffusers", sensitive=S_TIME
    ),
    row(TIME_EMB_BIAS, "Q4_K_M", "comfy", [], [], "F32", (1280,), ONE_D, "sensitive-bias-still-f32", sensitive=S_TIME),
    # ... and without the caller's word they are ordinary tensors (conv_in: 11520 elements = 45 rows of 256)
    row(
        CONV_IN,
        "Q4_K_M",
        "comfy",
        [],
        [],
        "Q4_K",
        (45, 256),
        "recipe Q4_K_M; stored as rows of 256",
        "conv-in-not-sensitive-comfy",
    ),
    row(TIME_EMB, "Q8_0", "sdcpp", [], [], "Q8_0", (1280, 320), "recipe Q8_0", "time-emb-not-sensitive-sdcpp"),
    # Q4_K_M: base Q4_K, to_v -> Q6_K, ff.net.2 -> Q6_K (ComfyUI-GGUF's patched llama-quantize)
    row(TO_V_MID, "Q4_K_M", "comfy", [], [], "Q6_K", (1280, 1280), "upgrades '*.to_v.weight' to Q6_K", "q4km-to_v"),
    row(TO_V_X, "Q4_K_M", "sdcpp", [], [], "Q6_K", (320, 768), "upgrades '*.to_v.weight' to Q6_K", "q4km-attn2-to_v"),
    row(FF2_MID, "Q4_K_M", "comfy", [], [], "Q6_K", (1280, 5120), "upgrades '*.ff.net.2.weight' to Q6_K", "q4km-ff2"),
    row(TO_K_MID, "Q4_K_M", "comfy", [], [], "Q4_K", (1280, 1280), "recipe Q4_K_M", "q4km-to_k-base"),
    row(FF0_MID, "Q4_K_M", "sdcpp", [], [], "Q4_K", (10240, 1280), "recipe Q4_K_M", "q4km-ff0-base"),
    row(EMB, "Q4_K_M", "diffusers", [], [], "Q4_K", (320, 1280), "recipe Q4_K_M", "q4km-emb-diffusers"),
    # the recipe name is case-insensitive and may carry the gguf: prefix
    row(TO_V_MID, "gguf:q4_k_m", "comfy", [], [], "Q6_K", (1280, 1280), "recipe Q4_K_M", "recipe-name-normalized"),
    # comfy: a last dim that does not fit the block is stored as rows of 256 (the size allows): convs quantize too
    row(
        CONV3,
        "Q4_K_M",
        "comfy",
        [],
        [],
        "Q4_K",
        (3600, 256),
        "stored as rows of 256 (last dim 3 does not fit",
        "comfy-conv3x3-reshaped",
    ),
    row(UPSAMPLE, "Q4_K_M", "comfy", [], [], "Q4_K", (57600, 256), "comfy.gguf.orig_shape", "comfy-upsample-reshaped"),
    row(
        PROJ_IN,
        "Q4_K_M",
        "comfy",
        [],
        [],
        "Q4_K",
        (400, 256),
        "stored as rows of 256 (last dim 1 does not fit",
        "comfy-conv1x1-reshaped",
    ),
    row(
        TO_V_320,
        "Q4_K_M",
        "comfy",
        [],
        [],
        "Q6_K",
        (400, 256),
        "stored as rows of 256 (last dim 320 does not fit",
        "comfy-upgraded-to_v-reshaped",
    ),
    row(FF0_320, "Q4_K_S", "comfy", [], [], "Q4_K", (3200, 256), "256-block", "comfy-ff0-320-reshaped"),
    row(CONV3, "Q8_0", "comfy", [], [], "Q8_0", (3600, 256), "does not fit the 32-block", "comfy-conv3x3-q8"),
    # sdcpp: exact shapes; what does not fit stays F16 and says why
    row(
        CONV3,
        "Q4_K_M",
        "sdcpp",
        [],
        [],
        "F16",
        (320, 320, 3, 3),
        "requested Q4_K, but the last dim 3 is not a multiple of its block size 256",
        "sdcpp-conv3x3-f16",
    ),
    row(
        CONV3,
        "Q8_0",
        "sdcpp",
        [],
        [],
        "F16",
        (320, 320, 3, 3),
        "the sdcpp flavor needs exact shapes",
        "sdcpp-conv3x3-q8-f16",
    ),
    row(
        TO_V_320,
        "Q4_K_M",
        "sdcpp",
        [],
        [],
        "F16",
        (320, 320),
        "requested Q6_K, but the last dim 320 is not a multiple of its block size 256",
        "sdcpp-to_v-320-f16",
    ),
    row(TO_V_320, "Q8_0", "sdcpp", [], [], "Q8_0", (320, 320), "recipe Q8_0", "sdcpp-to_v-320-q8-fits"),
    # diffusers: exact shapes, and only 2-D (Linear) weights quantize
    row(CONV3, "Q4_K_M", "diffusers", [], [], "F16", (320, 320, 3, 3), DIFFUSERS, "diffusers-conv3x3-f16"),
    row(PROJ_IN, "Q8_0", "diffusers", [], [], "F16", (320, 320, 1, 1), DIFFUSERS, "diffusers-conv1x1-f16"),
    row(SKIP, "Q4_K_M", "diffusers", [], [], "F16", (1280, 640, 1, 1), DIFFUSERS, "diffusers-skip-f16"),
    row(
        FF2_MID,
        "Q4_K_M",
        "diffusers",
        [],
        [],
        "Q6_K",
        (1280, 5120),
        "upgrades '*.ff.net.2.weight'",
        "diffusers-ff2-q6k",
    ),
    row(
        TO_V_320,
        "Q4_K_M",
        "diffusers",
        [],
        [],
        "F16",
        (320, 320),
        "the diffusers flavor needs exact shapes",
        "diffusers-to_v-320-f16",
    ),
    # --keep: the globs keep more tensors high-precision (F16, or F32 for 1-D)
    row(TO_V_X, "Q4_K_M", "comfy", ["attn2"], [], "F16", (320, 768), "kept by --keep 'attn2'", "keep-dotted"),
    row(
        CONV3,
        "Q4_K_M",
        "comfy",
        ["input_blocks.1.*"],
        [],
        "F16",
        (320, 320, 3, 3),
        "kept by --keep 'input_blocks.1.*'",
        "keep-glob",
    ),
    row(BIAS, "Q4_K_M", "comfy", ["*.bias"], [], "F32", (320,), "kept by --keep '*.bias'", "keep-1d-f32"),
    row(TO_V_MID, "Q4_K_M", "comfy", ["attn2"], [], "Q6_K", (1280, 1280), "upgrades", "keep-no-match"),
    # --override GLOB=QTYPE sets the qtype (before keep and the sensitive-layer rule)
    row(
        TO_V_MID,
        "Q4_K_M",
        "comfy",
        [],
        ["attn1.to_v=Q8_0"],
        "Q8_0",
        (1280, 1280),
        "override 'attn1.to_v=Q8_0'",
        "override-dotted",
    ),
    row(
        TO_V_MID,
        "Q4_K_M",
        "comfy",
        [],
        ["*.to_v.weight=q5_k"],
        "Q5_K",
        (1280, 1280),
        "override '*.to_v.weight=Q5_K'",
        "override-glob-lowercase-qtype",
    ),
    row(
        FF2_MID,
        "Q4_K_S",
        "sdcpp",
        [],
        ["ff.net.2=Q6_K"],
        "Q6_K",
        (1280, 5120),
        "override 'ff.net.2=Q6_K'",
        "override-upgrade-s-recipe",
    ),
    row(
        CONV3,
        "Q4_K_M",
        "sdcpp",
        [],
        ["in_layers.2=F32"],
        "F32",
        (320, 320, 3, 3),
        "override 'in_layers.2=F32'",
        "override-to-f32",
    ),
    row(
        CONV_OUT,
        "Q4_K_M",
        "comfy",
        [],
        ["out.2=Q8_0"],
        "Q8_0",
        (45, 256),
        "override 'out.2=Q8_0'",
        "override-sensitive-comfy-reshaped",
        sensitive=S_CONV_OUT,
    ),
    row(
        TO_V_MID,
        "Q4_K_M",
        "comfy",
        ["attn1"],
        ["attn1.to_v=Q8_0"],
        "Q8_0",
        (1280, 1280),
        "override",
        "override-beats-keep",
    ),
    row(
        TO_K_MID, "Q4_K_M", "comfy", [], ["attn1.to_v=Q8_0"], "Q4_K", (1280, 1280), "recipe Q4_K_M", "override-no-match"
    ),
    # an override to a qtype that does not fit falls back to F16, saying why
    row(
        CONV3,
        "Q4_K_M",
        "sdcpp",
        [],
        ["in_layers.2=Q4_0"],
        "F16",
        (320, 320, 3, 3),
        "requested Q4_0, but the last dim 3 is not a multiple of its block size 32",
        "override-no-fit-sdcpp",
    ),
    row(
        TO_V_320,
        "Q8_0",
        "diffusers",
        [],
        ["attn1.to_v=Q6_K"],
        "F16",
        (320, 320),
        "the diffusers flavor needs exact shapes: kept in F16",
        "override-no-fit-diffusers",
    ),
    row(
        BIAS,
        "Q4_K_M",
        "comfy",
        [],
        ["in_layers.2.bias=Q4_K"],
        "F16",
        (320,),
        "the size is not a multiple of 256: kept in F16",
        "override-no-fit-comfy",
    ),
    # SDXL: the add embedding is sensitive (the family says so): F16 in every flavor, its bias F32
    row(LABEL_EMB_0, "Q4_K_M", "comfy", [], [], "F16", (1280, 2816), S_ADD, "xl-label-emb-f16", sensitive=S_ADD),
    row(LABEL_EMB_2, "Q8_0", "sdcpp", [], [], "F16", (1280, 1280), S_ADD, "xl-label-emb2-sdcpp", sensitive=S_ADD),
    row(LABEL_EMB_0, "Q5_K_S", "diffusers", [], [], "F16", (1280, 2816), S_ADD, "xl-label-emb-diff", sensitive=S_ADD),
    row(LABEL_EMB_BIAS, "Q4_K_M", "comfy", [], [], "F32", (1280,), ONE_D, "xl-label-emb-bias", sensitive=S_ADD),
    row(
        LABEL_EMB_0,
        "F16",
        "comfy",
        [],
        [],
        "F16",
        (1280, 2816),
        "recipe F16",
        "xl-label-emb-f16-recipe",
        sensitive=S_ADD,
    ),
    # ... and quantizable where the user asks (2816 = 11 x 256 fits K-quants in every flavor)
    row(
        LABEL_EMB_0,
        "Q4_K_M",
        "sdcpp",
        [],
        ["label_emb=Q6_K"],
        "Q6_K",
        (1280, 2816),
        "override",
        "xl-label-emb-override",
        sensitive=S_ADD,
    ),
    row(LABEL_EMB_0, "Q4_K_M", "comfy", [], [], "Q4_K", (1280, 2816), "recipe Q4_K_M", "xl-label-emb-not-sensitive"),
    # deep stacks: the 10th transformer block takes the same rules as the first
    row(XL_FF2_DEEP, "Q4_K_M", "sdcpp", [], [], "Q6_K", (1280, 5120), "'*.ff.net.2.weight' to Q6_K", "xl-deep-ff2"),
    row(XL_TO_K_DEEP, "Q4_K_M", "comfy", [], [], "Q4_K", (1280, 2048), "recipe Q4_K_M", "xl-deep-to_k"),
    # SDXL's 640-wide level: rows of 256 for comfy, F16 with the reason for the exact-shape flavors (K-quants only)
    row(XL_TO_V_640, "Q4_K_M", "comfy", [], [], "Q6_K", (1600, 256), "rows of 256 (last dim 640", "xl-to_v-640-comfy"),
    row(
        XL_TO_V_640,
        "Q4_K_M",
        "sdcpp",
        [],
        [],
        "F16",
        (640, 640),
        "requested Q6_K, but the last dim 640 is not a multiple of its block size 256",
        "xl-to_v-640-sdcpp",
    ),
    row(XL_TO_V_640, "Q8_0", "diffusers", [], [], "Q8_0", (640, 640), "recipe Q8_0", "xl-to_v-640-q8-diffusers"),
    row(XL_PROJ_IN_640, "Q5_K_S", "diffusers", [], [], "F16", (640, 640), "needs exact shapes", "xl-proj-in-640-diff"),
    # the refiner's 384-wide level: 384 = 1.5 x 256 is no K-quant row; its sizes are multiples of 256
    row(REF_TIME_EMB, "Q4_K_M", "comfy", [], [], "F16", (1536, 384), S_TIME, "ref-time-emb-f16", sensitive=S_TIME),
    row(
        REF_TIME_EMB,
        "Q4_K_M",
        "comfy",
        [],
        ["time_embed=Q4_K"],
        "Q4_K",
        (2304, 256),
        "rows of 256 (last dim 384",
        "ref-time-emb-override-comfy",
        sensitive=S_TIME,
    ),
    row(
        REF_TIME_EMB,
        "Q4_K_M",
        "sdcpp",
        [],
        ["time_embed=Q4_K"],
        "F16",
        (1536, 384),
        "requested Q4_K, but the last dim 384 is not a multiple of its block size 256",
        "ref-time-emb-override-sdcpp",
        sensitive=S_TIME,
    ),
    row(
        REF_TIME_EMB,
        "Q4_K_M",
        "sdcpp",
        [],
        ["time_embed=Q8_0"],
        "Q8_0",
        (1536, 384),
        "override",
        "ref-384-q8-fits",
        sensitive=S_TIME,
    ),
    row(REF_CONV_384, "Q4_K_M", "comfy", [], [], "Q4_K", (5184, 256), "last dim 3 does not fit", "ref-conv-384-comfy"),
    row(REF_CONV_384, "Q4_K_M", "sdcpp", [], [], "F16", (384, 384, 3, 3), "last dim 3", "ref-conv-384-sdcpp"),
    row(
        REF_SKIP_1152, "Q5_K_S", "comfy", [], [], "Q5_K", (1728, 256), "last dim 1 does not fit", "ref-skip-1152-comfy"
    ),
    row(REF_SKIP_1152, "Q5_K_S", "diffusers", [], [], "F16", (384, 1152, 1, 1), DIFFUSERS, "ref-skip-1152-diffusers"),
    # F16 / BF16 / F32 recipes: everything but 1-D tensors in the recipe's float type
    row(TO_V_MID, "F16", "comfy", [], [], "F16", (1280, 1280), "recipe F16", "f16-recipe"),
    row(CONV3, "F16", "sdcpp", [], [], "F16", (320, 320, 3, 3), "recipe F16", "f16-recipe-conv"),
    row(CONV3, "BF16", "comfy", [], [], "BF16", (320, 320, 3, 3), "recipe BF16", "bf16-recipe-conv"),
    row(FF2_MID, "BF16", "diffusers", [], [], "BF16", (1280, 5120), "recipe BF16", "bf16-recipe-diffusers"),
    row(TO_V_MID, "F32", "comfy", [], [], "F32", (1280, 1280), "recipe F32", "f32-recipe"),
    # Q8_0: no upgrades; 32-element blocks fit every SD1.5 Linear
    row(TO_V_MID, "Q8_0", "comfy", [], [], "Q8_0", (1280, 1280), "recipe Q8_0", "q8-to_v-no-upgrade"),
    row(FF2_MID, "Q8_0", "sdcpp", [], [], "Q8_0", (1280, 5120), "recipe Q8_0", "q8-ff2"),
    row(TO_V_320, "Q8_0", "comfy", [], [], "Q8_0", (320, 320), "recipe Q8_0", "q8-to_v-320-fits"),
    # the other recipes' upgrade tables
    row(FF2_MID, "Q5_K_M", "comfy", [], [], "Q6_K", (1280, 5120), "upgrades '*.ff.net.2.weight' to Q6_K", "q5km-ff2"),
    # (a lone tensor is the first of its kind: "the first N" upgrades apply to it)
    row(TO_K_MID, "Q4_K_S", "comfy", [], [], "Q4_K", (1280, 1280), "recipe Q4_K_S", "q4ks-to_k-base"),
    row(TO_V_MID, "Q4_K_S", "comfy", [], [], "Q5_K", (1280, 1280), "upgrades the first 4 '*.to_v.weight'", "q4ks-to_v"),
    row(FF2_MID, "Q4_K_S", "comfy", [], [], "Q5_K", (1280, 5120), "upgrades '*.ff.net.2.weight' to Q5_K", "q4ks-ff2"),
    row(TO_V_MID, "Q3_K_M", "comfy", [], [], "Q5_K", (1280, 1280), "upgrades the first 2 '*.to_v.weight'", "q3km-to_v"),
    row(FF2_MID, "Q2_K", "comfy", [], [], "Q2_K", (1280, 5120), "recipe Q2_K", "q2k-ff2-no-upgrade"),
    row(TO_V_MID, "Q2_K", "comfy", [], [], "Q3_K", (1280, 1280), "upgrades '*.to_v.weight' to Q3_K", "q2k-to_v"),
    row(FF2_MID, "Q4_0", "sdcpp", [], [], "Q4_1", (1280, 5120), "upgrades '*.ff.net.2.weight' to Q4_1", "q40-ff2"),
    row(FF2_MID, "Q5_0", "comfy", [], [], "Q5_1", (1280, 5120), "upgrades '*.ff.net.2.weight' to Q5_1", "q50-ff2"),
    row(TO_V_MID, "Q5_0", "comfy", [], [], "Q5_0", (1280, 1280), "recipe Q5_0", "q50-to_v-base"),
]


@pytest.mark.parametrize("name, shape, recipe, flavor, keep, override, sensitive, qtype, stored, reason", CASES)
def test_decision_table(name, shape, recipe, flavor, keep, override, sensitive, qtype, stored, reason):
    r = Recipe.parse(recipe, flavor=flavor, keep=keep, override=override)
    (d,) = plan([(name, shape)], r, sensitive=None if sensitive is None else {name: sensitive})
    assert (d.name, d.shape) == (name, shape)
    assert (d.qtype, d.stored_shape) == (qtype, stored), d.reason
    assert reason in d.reason, d.reason
    n_stored = n_real = 1
    for a in stored:
        n_stored *= a
    for a in shape:
        n_real *= a
    assert n_stored == n_real  # a reshape never changes the element count


# the recipe table of the module docstring (ComfyUI-GGUF's tools/lcpp.patch, img_tensor_get_type): recipe -> (base,
# to_v, ff.net.2), on middle-block tensors whose last dims (1280, 5120) fit every block size, so that no fitting rule
# gets in the way (one to_v: the first, so "the first N" upgrades apply)
RECIPE_TABLE = {
    "Q5_K_M": ("Q5_K", "Q6_K", "Q6_K"),
    "Q5_K_S": ("Q5_K", "Q5_K", "Q5_K"),
    "Q4_K_M": ("Q4_K", "Q6_K", "Q6_K"),
    "Q4_K_S": ("Q4_K", "Q5_K", "Q5_K"),
    "Q3_K_M": ("Q3_K", "Q5_K", "Q4_K"),
    "Q2_K": ("Q2_K", "Q3_K", "Q2_K"),
    "Q5_0": ("Q5_0", "Q5_0", "Q5_1"),
    "Q4_0": ("Q4_0", "Q4_0", "Q4_1"),
    **{q: (q, q, q) for q in ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_1", "Q4_1")},
}


@pytest.mark.parametrize("flavor", ["comfy", "sdcpp", "diffusers"])
@pytest.mark.parametrize("recipe", sorted(RECIPE_TABLE))
def test_recipe_table(recipe, flavor):
    base, to_v, ff2 = RECIPE_TABLE[recipe]
    r = Recipe.parse(recipe, flavor=flavor)
    got = [d.qtype for d in plan([TO_K_MID, TO_V_MID, FF2_MID, FF0_MID], r)]
    assert got == [base, to_v, ff2, base]


# (recipe, flavor, keep, override) -> substring of the QuantError
BAD_RECIPES = [
    pytest.param("Q4_K_XL", "comfy", [], [], "unknown GGUF recipe 'Q4_K_XL'", id="unknown-recipe"),
    pytest.param("Q7_K", "comfy", [], [], "unknown GGUF recipe", id="unknown-recipe-q7k"),
    pytest.param("Q4_K_M", "a1111", [], [], "unknown GGUF flavor 'a1111'", id="unknown-flavor"),
    pytest.param("Q4_K_M", "comfy", [], ["attn2.to_v"], "expected GLOB=QTYPE", id="override-without-equals"),
    pytest.param("Q4_K_M", "comfy", [], ["=Q6_K"], "expected GLOB=QTYPE", id="override-without-glob"),
    pytest.param("Q4_K_M", "comfy", [], ["attn2.to_v="], "expected GLOB=QTYPE", id="override-without-qtype"),
    pytest.param("Q4_K_M", "comfy", [], ["attn2.to_v=Q7_K"], "unknown GGUF qtype 'Q7_K'", id="override-unknown-qtype"),
    pytest.param("Q4_K_M", "comfy", [], ["attn2.to_v=Q4_K_M"], "unknown GGUF qtype", id="override-to-a-recipe"),
]


@pytest.mark.parametrize("recipe, flavor, keep, override, message", BAD_RECIPES)
def test_bad_recipe_raises(recipe, flavor, keep, override, message):
    with pytest.raises(QuantError) as e:
        Recipe.parse(recipe, flavor=flavor, keep=keep, override=override)
    assert message in str(e.value)


# stable-diffusion.cpp's ggml build holds names of at most 127 bytes, and sdcpp files carry the LDM prefix
SDCPP_PREFIX = "model.diffusion_model."  # 22 bytes
SDCPP_MAX = 127


def _name(n_bytes: int, tail: str = "") -> str:
    """A transformer-block weight name of exactly ``n_bytes`` UTF-8 bytes (without prefix), ending in ``tail``."""
    head, end = "middle_block.1.transformer_blocks.0.attn1.to_v", tail + ".weight"
    pad = n_bytes - len(head.encode()) - len(end.encode()) - 1
    name = f"{head}.{'x' * pad}{end}"
    assert len(name.encode()) == n_bytes
    return name


LONG_NAMES = [
    pytest.param("sdcpp", _name(SDCPP_MAX - len(SDCPP_PREFIX)), None, id="sdcpp-127-bytes-ok"),
    pytest.param("sdcpp", _name(SDCPP_MAX - len(SDCPP_PREFIX) + 1), "longer than 127 bytes", id="sdcpp-128-bytes"),
    pytest.param(
        "sdcpp",
        _name(SDCPP_MAX - len(SDCPP_PREFIX) + 1, "é"),
        "longer than 127 bytes",
        id="sdcpp-counts-bytes-not-chars",
    ),
    pytest.param("sdcpp", _name(200), "use --flavor comfy", id="sdcpp-200-bytes"),
    pytest.param("comfy", _name(200), None, id="comfy-no-limit"),
    pytest.param("diffusers", _name(200), None, id="diffusers-no-limit"),
]


@pytest.mark.parametrize("flavor, name, message", LONG_NAMES)
def test_sdcpp_name_limit(flavor, name, message):
    r = Recipe.parse("Q8_0", flavor=flavor)
    tensors = [TO_K_MID, (name, (1280, 1280))]
    if message is None:
        assert [d.qtype for d in plan(tensors, r)] == ["Q8_0", "Q8_0"]
    else:
        with pytest.raises(QuantError) as e:
            plan(tensors, r)
        assert message in str(e.value) and f"'{SDCPP_PREFIX}{name}'" in str(e.value)


def test_plan_keeps_order_and_uses_linear_names():
    """``plan`` decides every tensor in order; with ``linear_names`` the diffusers flavor quantizes exactly the
    Linear weights named there (here: not the 2-D ff.net.0.proj), without guessing from shapes."""
    r = Recipe.parse("Q4_K_M", flavor="diffusers")
    tensors = [FF2_MID, CONV3, BIAS, FF0_MID, TO_V_MID]
    got = plan(tensors, r, linear_names={FF2_MID[0], TO_V_MID[0]})
    assert [d.name for d in got] == [t[0] for t in tensors]
    assert [d.qtype for d in got] == ["Q6_K", "F16", "F32", "F16", "Q6_K"]
    assert DIFFUSERS in got[3].reason
    # and with is_linear given for one tensor, a 1x1 conv declared Linear still needs an exact fit (last dim 1)
    d = decide(*PROJ_IN, r, is_linear=True)
    assert (d.qtype, d.stored_shape) == ("F16", PROJ_IN[1]) and "needs exact shapes" in d.reason


def test_plan_passes_each_tensor_its_own_sensitive_reason():
    r = Recipe.parse("Q4_K_M", flavor="comfy")
    got = plan([CONV_IN, TO_V_MID, CONV_OUT], r, sensitive={CONV_IN[0]: S_CONV_IN, CONV_OUT[0]: S_CONV_OUT})
    assert [(d.qtype, d.reason) for d in got] == [
        ("F16", S_CONV_IN + ": kept in F16"),
        ("Q6_K", "recipe Q4_K_M upgrades '*.to_v.weight' to Q6_K"),
        ("F16", S_CONV_OUT + ": kept in F16"),
    ]


# diffusers module names of input_blocks.0.0, out.2 and time_embed.0
@pytest.mark.parametrize("module", ["conv_in", "conv_out", "time_embedding.linear_1"])
def test_sd1_family_names_the_sensitive_tensors(module):
    """The reasons the GGUF export passes as ``sensitive`` come from the family: for SD1.5 these three modules
    (diffusers names of input_blocks.0.0, out.2 and time_embed.0) are sensitive, an ordinary conv is not."""
    from unetkit.families import named

    sd1 = named("sd1")
    assert sd1.sensitive_reason(module)
    assert sd1.sensitive_reason("down_blocks.0.resnets.0.conv1") is None
    assert sd1.sensitive_reason("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v") is None


def test_first_n_upgrades_count_in_the_unets_order():
    """Q4_K_S upgrades the first 4 to_v, Q3_K_M the first 2 (then Q4_K), as ComfyUI-GGUF's patched llama-quantize
    does; "first" is the UNet's order (numbers compared as numbers), whatever the order the tensors come in, and a
    to_v a rule before the upgrades settles (--keep, --override) does not count."""
    names = [
        f"{block}.1.transformer_blocks.{i}.{attn}.to_v.weight"
        for block in ("input_blocks.4", "input_blocks.10", "middle_block")
        for i in range(2)
        for attn in ("attn1", "attn2")
    ]
    tensors = [(n, (1280, 1280)) for n in reversed(names)]  # the reverse of the UNet's order
    got = {d.name: d.qtype for d in plan(tensors, Recipe.parse("Q4_K_S"))}
    assert [got[n] for n in names] == ["Q5_K"] * 4 + ["Q4_K"] * 8  # input_blocks.4 before input_blocks.10
    got = {d.name: d.qtype for d in plan(tensors, Recipe.parse("Q3_K_M"))}
    assert [got[n] for n in names] == ["Q5_K"] * 2 + ["Q4_K"] * 10
    kept = plan(tensors, Recipe.parse("Q3_K_M", keep=["input_blocks.4.1.transformer_blocks.0.*"]))
    got = {d.name: (d.qtype, d.reason) for d in kept}
    assert [got[n][0] for n in names] == ["F16", "F16", "Q5_K", "Q5_K"] + ["Q4_K"] * 8
    assert "after the first 2" in got[names[4]][1]
    assert unet_order("input_blocks.2.0.weight") < unet_order("input_blocks.10.0.weight")


@pytest.mark.parametrize("module", ["conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_1"])
def test_sdxl_family_names_the_sensitive_tensors(module):
    """SDXL keeps the add embedding (label_emb.0.0/0.2 <-> add_embedding.linear_1/2) high-precision beside SD's
    three, as ComfyUI-GGUF's pipeline does; an ordinary Linear is not sensitive."""
    from unetkit.families import named

    sdxl = named("sdxl")
    assert sdxl.sensitive_reason(module)
    assert sdxl.sensitive_reason("add_embedding.linear_2")
    assert sdxl.sensitive_reason("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_v") is None


# ---- the model of ComfyUI-GGUF's own pipeline (quant.gguf.comfy_reference) ----------------------------------------


@pytest.mark.parametrize(
    "tensor, recipe, source, qtype, stored",
    [
        # step 1 (convert.py): F16 (F32 for 1-D and <= 1024 elements from an F32 source), rows of 256 when it can
        pytest.param(CONV_IN, "F16", "F16", "F16", (45, 256), id="f16-conv-in-reshaped"),
        pytest.param(BIAS, "F16", "F16", "F16", (320,), id="f16-source-bias-f16"),
        pytest.param(BIAS, "F16", "F32", "F32", (320,), id="f32-source-bias-f32"),
        pytest.param(("x.weight", (32, 32)), "F16", "F32", "F32", (4, 256), id="small-f32-reshaped"),
        pytest.param(TO_V_MID, "F16", "F16", "F16", (1280, 1280), id="row-fits-not-reshaped"),
        # step 2 (llama-quantize + lcpp.patch): embeddings, conv_in, conv_out keep their step-1 type
        pytest.param(LABEL_EMB_0, "Q4_K_M", "F16", "F16", (1280, 2816), id="label-emb-kept"),
        pytest.param(TIME_EMB, "Q8_0", "F32", "F16", (1600, 256), id="time-emb-kept-reshaped"),
        pytest.param(CONV_IN, "Q8_0", "F16", "F16", (45, 256), id="conv-in-kept"),
        pytest.param(CONV_OUT, "Q4_K_M", "F16", "F16", (45, 256), id="conv-out-kept"),
        # ... 2-D (reshaped) tensors take the ftype's type and the to_v / ff.net.2 upgrades
        pytest.param(CONV3, "Q4_K_M", "F16", "Q4_K", (3600, 256), id="conv3x3-q4k"),
        pytest.param(XL_TO_V_640, "Q4_K_M", "F16", "Q6_K", (1600, 256), id="to_v-q6k"),
        pytest.param(XL_FF2_DEEP, "Q4_K_M", "F16", "Q6_K", (1280, 5120), id="ff2-q6k"),
        pytest.param(FF2_MID, "Q4_0", "F16", "Q4_1", (1280, 5120), id="ff2-q41"),
        pytest.param(TO_V_MID, "Q2_K", "F16", "Q3_K", (1280, 1280), id="q2k-to_v-q3k"),
        # ... 4-D tensors that step 1 did not reshape are left alone; a K-quant row that does not fit falls back
        pytest.param(("x.conv.weight", (10, 10, 3, 3)), "Q8_0", "F16", "F16", (10, 10, 3, 3), id="4d-not-quantized"),
        pytest.param(("x.weight", (10, 320)), "Q4_K_M", "F16", "F16", (10, 320), id="k-row-fallback-f16"),
        pytest.param(BIAS, "Q8_0", "F16", "F16", (320,), id="1d-not-quantized"),
    ],
)
def test_comfy_reference_rules(tensor, recipe, source, qtype, stored):
    from unetkit.quant.gguf import comfy_reference

    (d,) = comfy_reference.plan([tensor], recipe, source)
    assert (d.qtype, d.stored_shape) == (qtype, stored), d.reason


def test_comfy_reference_counts_to_v_in_file_order_and_refuses_what_llama_quantize_aborts_on():
    from unetkit.quant.gguf import comfy_reference

    tensors = [(f"input_blocks.{i}.1.transformer_blocks.0.attn1.to_v.weight", (1280, 1280)) for i in range(6)]
    assert [d.qtype for d in comfy_reference.plan(tensors, "Q4_K_S")] == ["Q5_K"] * 4 + ["Q4_K"] * 2
    assert [d.qtype for d in comfy_reference.plan(tensors, "Q3_K_M")] == ["Q5_K"] * 2 + ["Q4_K"] * 4
    with pytest.raises(QuantError, match="llama-quantize would abort"):
        comfy_reference.plan([("x.weight", (10, 40))], "Q8_0")  # 400 elements: not reshaped; 40 is no Q8_0 row
    with pytest.raises(QuantError, match="known are"):
        comfy_reference.plan([TO_V_MID], "IQ4_XS")
