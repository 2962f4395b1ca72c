"""GGUF file sizes for full-size SDXL (base, refiner) and SD1.5, from shapes alone: unetkit's planned files next to
what ComfyUI-GGUF's own pipeline writes for the same recipe, and next to published files.

    python benchmarks/bench_gguf_sdxl_sizes.py [--variants sdxl sdxl-refiner sd1.x] [--recipes Q8_0 Q4_K_M ...]
    python benchmarks/bench_gguf_sdxl_sizes.py --table        # the markdown from the last --json

No weights, no file written, no worker process: about 10 s (imports; a plan takes 0.1 s). Every size is exact
for its plan, computed from the config (``unetkit.sample.unet_config(variant, "full")``), not measured:
- unetkit: ``gguf_export.plan_config`` (the decisions ``quantize_file`` makes, comfy flavor unless --flavors says
  more), sized by ``formats.gguf.file_bytes`` with the KVs unetkit writes that depend on the plan (architecture,
  quantization version, ``comfy.gguf.orig_shape.*``, the ``unetkit.decisions`` JSON). The provenance KVs (config,
  versions, hashes: about 3 KB) are left out.
- ComfyUI-GGUF: ``quant.gguf.comfy_reference.plan`` (its tools/convert.py, then llama.cpp b3962's llama-quantize
  with tools/lcpp.patch), for an fp16 source (how fine-tunes are published) and an fp32 one, sized the same way
  with the KVs that pipeline writes.
- published: UNet-only files as their pages give them: SDXL nuupy/WAI-illustrious-SDXL-GGUF (fp16 fine-tune; GB,
  two decimals), SD1.5 ComfyUI-GGUF's (MiB; the figures bench_gguf_quantize.py shows).
Goal (issue 12): within 1 % of ComfyUI-GGUF's rules for the same recipe; each row says what differs and why."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_results, markdown, save_results

VARIANTS = ["sdxl", "sdxl-refiner", "sd1.x"]
RECIPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K"]
#: (value, unit) as published; unit GB = 1e9 bytes, MiB = 2**20
PUBLISHED = {
    "sdxl": {"F16": (5.14, "GB"), "Q8_0": (2.74, "GB"), "Q4_K_M": (1.63, "GB")},  # nuupy/WAI-illustrious-SDXL-GGUF
    "sd1.x": {"F16": (1639, "MiB"), "Q8_0": (873, "MiB"), "Q4_K_M": (482, "MiB"), "Q4_0": (468, "MiB")},
}
UNIT = {"GB": 1e9, "MiB": float(1 << 20)}
GOAL = 0.01


def unetkit_bytes(variant: str, recipe: str, flavor: str = "comfy") -> tuple[int, list]:
    """The planned unetkit file: (bytes, decisions)."""
    from unetkit.formats.gguf import ORIG_SHAPE_KEY, file_bytes
    from unetkit.gguf_export import plan_config
    from unetkit.provenance import DECISIONS, LDM_PREFIX
    from unetkit.sample import unet_config

    config = unet_config(variant, "full")
    decisions = plan_config(config, f"gguf:{recipe}", flavor=flavor)
    prefix = "" if flavor == "comfy" else LDM_PREFIX
    kv: dict = {"general.architecture": _arch(config), "general.quantization_version": 2}
    kv.update({ORIG_SHAPE_KEY + prefix + d.name: list(d.shape) for d in decisions if d.stored_shape != d.shape})
    kv[DECISIONS] = json.dumps({d.name: [d.qtype, d.reason] for d in decisions})
    return file_bytes([(prefix + d.name, d.qtype, d.stored_shape) for d in decisions], kv), decisions


def comfy_bytes(variant: str, recipe: str, source: str) -> tuple[int, list]:
    """ComfyUI-GGUF's file for the same UNet (its pipeline's rules): (bytes, decisions)."""
    from unetkit.formats.gguf import ORIG_SHAPE_KEY, file_bytes
    from unetkit.gguf_export import plan_config
    from unetkit.quant.gguf import comfy_reference
    from unetkit.sample import unet_config

    config = unet_config(variant, "full")
    names = [(d.name, d.shape) for d in plan_config(config, "gguf:F16")]  # LDM names without prefix, in order
    decisions = comfy_reference.plan(names, recipe, source)
    kv: dict = {"general.architecture": _arch(config), "general.quantization_version": 2, "general.file_type": 1}
    kv.update({ORIG_SHAPE_KEY + d.name: list(d.shape) for d in decisions if d.stored_shape != d.shape})
    return file_bytes([(d.name, d.qtype, d.stored_shape) for d in decisions], kv), decisions


def _arch(config: dict) -> str:
    from unetkit.families import for_config

    return for_config(config).gguf_architecture


def data_bytes(decisions: list) -> int:
    """The tensor data of a file (each tensor padded to GGUF's default 32-byte alignment): the rest is header."""
    from unetkit.quant.gguf.qtypes import n_bytes

    return sum(n + (-n % 32) for n in (n_bytes(d.qtype, d.stored_shape) for d in decisions))


def differences(ours: list, theirs: list) -> str:
    """What differs, tensor by tensor, grouped: '886 1-D tensors F32 here, F16 there; ...'."""
    groups: Counter = Counter()
    for a, b in zip(ours, theirs):
        if a.qtype != b.qtype:
            kind = "1-D" if len(a.shape) == 1 else f"{len(a.shape)}-D"
            groups[(a.qtype, b.qtype, kind)] += 1
    if not groups:
        return "every tensor the same qtype"
    return "; ".join(f"{n} {kind} tensors {a} here, {b} there" for (a, b, kind), n in groups.most_common())


def run(args, r: dict) -> None:
    for variant in args.variants:
        rows = r.setdefault(variant, {})
        for recipe in args.recipes:
            ours, ours_dec = unetkit_bytes(variant, recipe)
            rec: dict = {"unetkit": ours, "header_unetkit": ours - data_bytes(ours_dec)}
            for source in ("F16", "F32"):
                theirs, their_dec = comfy_bytes(variant, recipe, source)
                rec[f"comfy_{source}"] = theirs
                rec[f"header_comfy_{source}"] = theirs - data_bytes(their_dec)
                rec[f"diff_{source}"] = ours / theirs - 1
                rec[f"differences_{source}"] = differences(ours_dec, their_dec)
            pub = PUBLISHED.get(variant, {}).get(recipe)
            if pub:
                rec["published"] = {"value": pub[0], "unit": pub[1]}
            for flavor in args.flavors:
                if flavor != "comfy":
                    rec[f"unetkit_{flavor}"] = unetkit_bytes(variant, recipe, flavor)[0]
            rows[recipe] = rec
            print(
                f"  {variant} {recipe}: unetkit {ours / 2**20:.0f} MiB, ComfyUI-GGUF (fp16 source) "
                f"{rec['comfy_F16'] / 2**20:.0f} MiB ({100 * rec['diff_F16']:+.2f} %)",
                flush=True,
            )


def fmt(n: int, unit: str) -> str:
    return f"{n / UNIT[unit]:.3f} GB" if unit == "GB" else f"{n / UNIT[unit]:.1f} MiB"


def tables(r: dict) -> str:
    parts = []
    for variant, rows in r.items():
        unit = PUBLISHED.get(variant, {}).get("F16", (0, "GB"))[1]
        flavors = sorted({k.removeprefix("unetkit_") for rec in rows.values() for k in rec if k.startswith("unetkit_")})
        out = []
        for recipe, rec in rows.items():
            pub = rec.get("published")
            pub_txt = "-"
            if pub:
                value = pub["value"] * UNIT[pub["unit"]]
                pub_txt = f"{pub['value']:g} {pub['unit']} (unetkit {100 * (rec['unetkit'] / value - 1):+.1f} %)"
            header = rec["header_unetkit"] - rec["header_comfy_F16"]
            ok = "met" if abs(rec["diff_F16"]) <= GOAL and abs(rec["diff_F32"]) <= GOAL else "NOT met"
            out.append(
                [
                    recipe,
                    fmt(rec["unetkit"], unit),
                    f"{fmt(rec['comfy_F16'], unit)} ({100 * rec['diff_F16']:+.2f} %)",
                    f"{fmt(rec['comfy_F32'], unit)} ({100 * rec['diff_F32']:+.2f} %)",
                    pub_txt,
                    ok,
                    f"{rec['differences_F16']}; header {header / 1e3:+.0f} kB",
                    *[fmt(rec[f"unetkit_{f}"], unit) for f in flavors],
                ]
            )
        header = [
            f"{variant} (full size), recipe",
            "unetkit, comfy flavor (planned)",
            "ComfyUI-GGUF rules, fp16 source (unetkit vs it)",
            "ComfyUI-GGUF rules, fp32 source (unetkit vs it)",
            "published",
            "within 1 %",
            "what differs (vs the fp16-source file; header: unetkit.decisions and orig_shape KVs)",
            *[f"unetkit, {f} flavor" for f in flavors],
        ]
        parts.append(markdown(out, header))
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--flavors", nargs="*", default=["comfy"], help="also size these unetkit flavors")
    ap.add_argument("--json", default="bench_out/gguf_sdxl_sizes.json")
    ap.add_argument("--table", action="store_true", help="print the markdown tables from --json and exit")
    args = ap.parse_args()
    jpath = Path(args.json)
    r: dict = load_results(jpath)
    if not args.table:
        run(args, r)
        save_results(jpath, r)
    print(tables(r))


if __name__ == "__main__":
    main()
