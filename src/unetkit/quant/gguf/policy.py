"""The GGUF quantization policy: a pure function (name, shape, dtype, recipe, flavor) -> Decision.

No I/O, no printing. Every tensor gets exactly one decision with its reason; a tensor that cannot take the
requested qtype gets an explicit decision saying so (never a silent fallback). Names are LDM names without prefix.

Recipes (what the user asks for) map to a base qtype plus upgrades for the layers quantization hurts most. The
upgrades are the ones ComfyUI-GGUF's patched ``llama-quantize`` applies to SD1/SDXL UNets (``tools/lcpp.patch``,
``img_tensor_get_type``: attention value projections ``.to_v.weight`` and the feed-forward output
``.ff.net.2.weight``), so that a recipe means here what it means in the files SD users download (file sizes within
0.4 % of that pipeline's for SD1.5, SDXL and the refiner: ``benchmarks/bench_gguf_sdxl_sizes.py``):

| recipe  | base | upgraded layers                                                                  |
|---------|------|----------------------------------------------------------------------------------|
| Q5_K_M  | Q5_K | to_v -> Q6_K, ff.net.2 -> Q6_K                                                    |
| Q5_K_S  | Q5_K | none                                                                             |
| Q4_K_M  | Q4_K | to_v -> Q6_K, ff.net.2 -> Q6_K                                                    |
| Q4_K_S  | Q4_K | the first 4 to_v -> Q5_K, ff.net.2 -> Q5_K                                        |
| Q3_K_M  | Q3_K | the first 2 to_v -> Q5_K, the other to_v -> Q4_K, ff.net.2 -> Q4_K                |
| Q2_K    | Q2_K | to_v -> Q3_K                                                                     |
| Q5_0    | Q5_0 | ff.net.2 -> Q5_1                                                                 |
| Q4_0    | Q4_0 | ff.net.2 -> Q4_1                                                                 |
| others  | itself (F32, F16, BF16, Q8_0, Q6_K, Q5_1, Q4_1)                                   |
| auto    | per tensor, what ``Recipe.chosen`` says (``gguf:auto``: :mod:`.auto` chooses)     |

"The first N" counts the tensors that reach the upgrade rule in the UNet's order (LDM names with their numbers
compared as numbers: input blocks, middle block, output blocks; llama-quantize counts in file order, which gives
the same tensors for SD1.x, SD2.x and SDXL files), so the choice never depends on how a source file is ordered.

Sensitive tensors stay high-precision by default: the modules the model family names (``Family.sensitive``: conv_in,
conv_out and the time embedding for SD; SDXL adds the add embedding, ``label_emb``) in F16, passed in by the caller
as ``sensitive``; 1-D tensors (biases, norms) in F32. These are the tensors ComfyUI-GGUF's pipeline leaves
unquantized for SD1/SDXL too (it keeps them, and 1-D tensors, in the source's float type: F16 from an fp16 source).
``keep`` globs keep more tensors high-precision; ``override`` globs set a qtype.

Flavors (what the consumer can read):
- comfy: ComfyUI-GGUF. A tensor whose last dim does not fit the block is stored as rows of 256 (when its size
  allows) with its real shape in ``comfy.gguf.orig_shape.<name>``: convolutions quantize too. Every tensor gets the
  qtype ComfyUI-GGUF's own pipeline gives it (``comfy_reference`` models that pipeline; the tests compare the two
  tensor by tensor at full size), except 1-D tensors from an fp16 source (F32 here, F16 there).
- sdcpp: stable-diffusion.cpp. Exact shapes: only tensors whose last dim is a multiple of the block size are
  quantized (3x3 convolutions stay in F16, with that reason); names must be under 128 bytes (its ggml build).
- diffusers: diffusers' GGUF loader. Exact shapes, and only 2-D Linear weights are quantized; everything else F16
  (diffusers 0.42 dequantizes nothing but Linear layers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from unetkit.errors import QuantError
from unetkit.globs import matches
from unetkit.provenance import LDM_PREFIX
from unetkit.quant.gguf.qtypes import qtype_by_name
from unetkit.shapes import numel

GGUF_METHOD = "gguf:"  # the prefix of every GGUF method name: gguf:Q4_K_M
FLAVORS = ("comfy", "sdcpp", "diffusers")
RESHAPE_ROW = 256  # ComfyUI-GGUF's row length for reshaped tensors
SDCPP_MAX_NAME = 127

TO_V, FF_OUT = "*.to_v.weight", "*.ff.net.2.weight"
AUTO = "AUTO"  # the recipe whose qtypes are chosen per tensor (Recipe.chosen) to meet a target


@dataclass(frozen=True)
class Upgrade:
    """Tensors matching ``glob`` get ``qtype``; with ``first``, only the first ``first`` of them (in the UNet's
    order) do, and the others get ``rest`` (None: the recipe's base)."""

    glob: str
    qtype: str
    first: int | None = None
    rest: str | None = None


#: recipe -> (base qtype, upgrades; the first matching upgrade applies)
RECIPES: dict[str, tuple[str, tuple[Upgrade, ...]]] = {
    "F32": ("F32", ()),
    "F16": ("F16", ()),
    "BF16": ("BF16", ()),
    "Q8_0": ("Q8_0", ()),
    "Q6_K": ("Q6_K", ()),
    "Q5_0": ("Q5_0", (Upgrade(FF_OUT, "Q5_1"),)),
    "Q5_1": ("Q5_1", ()),
    "Q4_0": ("Q4_0", (Upgrade(FF_OUT, "Q4_1"),)),
    "Q4_1": ("Q4_1", ()),
    "Q5_K_M": ("Q5_K", (Upgrade(TO_V, "Q6_K"), Upgrade(FF_OUT, "Q6_K"))),
    "Q5_K_S": ("Q5_K", ()),
    "Q4_K_M": ("Q4_K", (Upgrade(TO_V, "Q6_K"), Upgrade(FF_OUT, "Q6_K"))),
    "Q4_K_S": ("Q4_K", (Upgrade(TO_V, "Q5_K", first=4), Upgrade(FF_OUT, "Q5_K"))),
    "Q3_K_M": ("Q3_K", (Upgrade(TO_V, "Q5_K", first=2, rest="Q4_K"), Upgrade(FF_OUT, "Q4_K"))),
    "Q2_K": ("Q2_K", (Upgrade(TO_V, "Q3_K"),)),
}


@dataclass(frozen=True)
class Decision:
    name: str  # LDM name without prefix
    qtype: str  # what is stored: F32, F16, BF16, Q8_0, Q4_K, ...
    shape: tuple[int, ...]  # the tensor's real shape
    stored_shape: tuple[int, ...]  # the shape in the file (differs for comfy reshapes)
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Recipe:
    """What the user asked: a recipe name, a flavor, and glob overrides."""

    name: str = "Q8_0"
    flavor: str = "comfy"
    keep: tuple[str, ...] = ()  # globs kept at high precision
    override: tuple[tuple[str, str], ...] = field(default=())  # (glob, qtype)
    #: the AUTO recipe's choice: LDM name -> (qtype, reason), for every tensor no earlier rule settles
    chosen: Mapping[str, tuple[str, str]] = field(default_factory=dict, compare=False)

    @staticmethod
    def parse(name: str, flavor: str = "comfy", keep: Sequence[str] = (), override: Sequence[str] = ()) -> Recipe:
        key = name.upper().removeprefix("GGUF:")
        if key not in RECIPES and key != AUTO:
            raise QuantError(f"unknown GGUF recipe {name!r}; known: {', '.join(RECIPES)}, auto")
        if flavor not in FLAVORS:
            raise QuantError(f"unknown GGUF flavor {flavor!r}; known: {', '.join(FLAVORS)}")
        pairs = []
        for item in override:
            glob, sep, qt = item.partition("=")
            if not sep or not glob or not qt:
                raise QuantError(f"--override {item!r}: expected GLOB=QTYPE, e.g. 'attn2.to_v=Q6_K'")
            pairs.append((glob, qtype_by_name(qt).name))
        return Recipe(key, flavor, tuple(keep), tuple(pairs))


def decide(
    name: str,
    shape: Sequence[int],
    recipe: Recipe,
    is_linear: bool | None = None,
    sensitive: str | None = None,
    rank: int = 0,
) -> Decision:
    """The decision for one tensor. ``is_linear``: the tensor is an nn.Linear weight (needed by the diffusers
    flavor; inferred from the shape when None: 2-D means Linear in an SD UNet). ``sensitive``: why the model
    family keeps this tensor's module at high precision (``Family.sensitive_reason``), or None. ``rank``: how many
    tensors before this one (in the UNet's order) reached the same recipe upgrade; only upgrades limited to "the
    first N" (Q4_K_S, Q3_K_M) look at it, and ``plan`` computes it."""
    shape = tuple(int(d) for d in shape)
    early = settled(name, shape, recipe, is_linear, sensitive)
    if early is not None:
        return early
    if recipe.name == AUTO:
        if name not in recipe.chosen:
            raise QuantError(f"gguf:auto chose no qtype for {name!r}: its sensitivity was not measured")
        return fit(name, shape, *recipe.chosen[name], recipe.flavor)
    qtype, why = RECIPES[recipe.name][0], f"recipe {recipe.name}"
    up = upgrade_for(name, recipe)
    if up is not None:
        if up.first is None:
            qtype, why = up.qtype, f"recipe {recipe.name} upgrades '{up.glob}' to {up.qtype}"
        elif rank < up.first:
            qtype, why = up.qtype, f"recipe {recipe.name} upgrades the first {up.first} '{up.glob}' to {up.qtype}"
        elif up.rest is not None:
            qtype = up.rest
            why = f"recipe {recipe.name} upgrades '{up.glob}' after the first {up.first} to {up.rest}"
        else:
            why = f"recipe {recipe.name} (its '{up.glob}' upgrade covers only the first {up.first})"
    return fit(name, shape, qtype, why, recipe.flavor)


def upgrade_for(name: str, recipe: Recipe) -> Upgrade | None:
    """The recipe's upgrade rule for this tensor name, or None."""
    return next((up for up in RECIPES.get(recipe.name, ("", ()))[1] if matches(name, up.glob)), None)


def settled(
    name: str, shape: tuple[int, ...], recipe: Recipe, is_linear: bool | None, sensitive: str | None
) -> Decision | None:
    """The decision when a rule before the recipe's upgrades settles it (override, keep, 1-D, float recipe,
    sensitive layer, diffusers' Linear-only rule); None when the tensor reaches the upgrades."""

    def high(qtype: str, reason: str) -> Decision:
        return Decision(name, qtype, shape, shape, reason)

    for glob, qt in recipe.override:
        if matches(name, glob):
            return fit(name, shape, qt, f"override '{glob}={qt}'", recipe.flavor)
    for glob in recipe.keep:
        if matches(name, glob):
            return high("F16" if len(shape) > 1 else "F32", f"kept by --keep '{glob}'")
    if len(shape) <= 1:
        return high("F32", "1-D tensor (bias or norm): kept in F32")
    base = RECIPES[recipe.name][0] if recipe.name != AUTO else AUTO
    if base in ("F32", "F16", "BF16"):
        return high(base, f"recipe {recipe.name}")
    if sensitive:
        return high("F16", f"{sensitive}: kept in F16")
    if recipe.flavor == "diffusers" and not (is_linear if is_linear is not None else len(shape) == 2):
        return high("F16", "diffusers flavor: diffusers' GGUF loader dequantizes only nn.Linear weights")
    return None


def unet_order(name: str) -> tuple:
    """Sort key: the UNet's order of LDM names (numbers compared as numbers: input_blocks.2 before input_blocks.10)."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name)))


def fit(name: str, shape: tuple[int, ...], qtype: str, why: str, flavor: str = "comfy") -> Decision:
    """``qtype`` for the tensor when its rows fit the block; else, for the comfy flavor, rows of 256 when its size
    allows; else F16, with the reason."""
    q = qtype_by_name(qtype)
    n = numel(shape)
    if q.block_size == 1 or shape[-1] % q.block_size == 0:
        return Decision(name, q.name, shape, shape, why)
    if flavor == "comfy" and n % RESHAPE_ROW == 0 and RESHAPE_ROW % q.block_size == 0:
        return Decision(
            name,
            q.name,
            shape,
            (n // RESHAPE_ROW, RESHAPE_ROW),
            f"{why}; stored as rows of {RESHAPE_ROW} (last dim {shape[-1]} does not fit the "
            f"{q.block_size}-block), real shape in comfy.gguf.orig_shape",
        )
    return Decision(
        name,
        "F16",
        shape,
        shape,
        f"requested {q.name}, but the last dim {shape[-1]} is not a multiple of its block size "
        f"{q.block_size}"
        + (
            " and the size is not a multiple of 256"
            if flavor == "comfy"
            else f" and the {flavor} flavor needs exact shapes"
        )
        + ": kept in F16",
    )


def plan(
    tensors: Sequence[tuple[str, Sequence[int]]],
    recipe: Recipe,
    linear_names: set[str] | None = None,
    sensitive: Mapping[str, str] | None = None,
) -> list[Decision]:
    """Decisions for every (LDM name, shape), in the given order; checks the flavor's name limits. ``sensitive``
    maps the LDM names of the tensors the model family keeps at high precision to the reason. Upgrades limited to
    "the first N" tensors count them in the UNet's order (:func:`unet_order`), whatever the order given."""
    sensitive = sensitive or {}

    def is_linear(name: str) -> bool | None:
        return None if linear_names is None else name in linear_names

    for name, _ in tensors:
        if recipe.flavor == "sdcpp" and len((LDM_PREFIX + name).encode()) > SDCPP_MAX_NAME:
            raise QuantError(
                f"tensor name '{LDM_PREFIX}{name}' is longer than {SDCPP_MAX_NAME} bytes, the most "
                "stable-diffusion.cpp's ggml build holds; use --flavor comfy (names without prefix)"
            )
    ranks: dict[int, int] = {}
    seen: dict[str, int] = {}
    for i in sorted(range(len(tensors)), key=lambda i: unet_order(tensors[i][0])):
        name, shape = tensors[i]
        up = upgrade_for(name, recipe)
        if up is None or up.first is None:
            continue
        if settled(name, tuple(int(d) for d in shape), recipe, is_linear(name), sensitive.get(name)):
            continue
        ranks[i] = seen.get(up.glob, 0)
        seen[up.glob] = ranks[i] + 1
    return [
        decide(name, shape, recipe, is_linear(name), sensitive.get(name), ranks.get(i, 0))
        for i, (name, shape) in enumerate(tensors)
    ]
