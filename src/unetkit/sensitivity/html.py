"""HTML pages for ``unetkit sensitivity`` and ``quantize --method gguf:auto``: self-contained like verify's (plots
as embedded PNGs, matplotlib's Agg backend; no external URL).

- sensitivity: per tensor and qtype, the SQNR the output would keep if only that tensor were quantized (a plot
  along the UNet and a table), and the check: predicted against measured noise on the sampled pairs.
- auto: the target and whether it was met, predicted and measured SQNR, the chosen mix per block, and the
  size/SQNR front of auto against every fixed recipe, with the written file marked."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from unetkit.formats.atomic import atomic_output
from unetkit.sensitivity.measure import Sensitivity
from unetkit.verification.html import CSS, _img, _plt, _png, _table

QTYPE_ORDER = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0", "F16")


def _db(signal: float, noise: float | None) -> float | None:
    if noise is None or noise <= 0:
        return None
    return 10 * math.log10(signal / noise)


def _fmt(v: float | None) -> str:
    return "lossless" if v is None else f"{v:.1f}"


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n"
        f"<p><small>written by unetkit; every plot is embedded in this file.</small></p></body></html>\n"
    )


def _write(path: str | Path, page: str, force: bool) -> Path:
    path = Path(path)
    with atomic_output(path, force=force) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def render_sensitivity(sens: Sensitivity) -> str:
    signal = sum(sens.signal)
    qtypes = [q for q in QTYPE_ORDER if any(q in t.noise for t in sens.tensors)]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for q in qtypes:
        xs = [i for i, t in enumerate(sens.tensors) if q in t.noise]
        ys = [_db(signal, sens.tensors[i].total(q)) for i in xs]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ".-", ms=3, lw=0.6, label=q)
    ax.set_xlabel("tensor (UNet order)")
    ax.set_ylabel("output SQNR if only this tensor is quantized (dB)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=len(qtypes), fontsize=8)
    layers = _img(_png(fig), "per-tensor sensitivity")
    check = sens.check
    pairs = check.get("pairs", [])
    scatter = ""
    if pairs:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        pts = [(p["predicted"], p["measured"]) for p in pairs if p["predicted"] > 0 and p["measured"] > 0]
        if pts:
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o", ms=4)
            lo, hi = min(min(p) for p in pts), max(max(p) for p in pts)
            ax.loglog([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
            ax.legend(fontsize=8)
        ax.set_xlabel("predicted output noise")
        ax.set_ylabel("measured output noise")
        ax.grid(alpha=0.3, which="both")
        scatter = _img(_png(fig), "predicted against measured")
    summary = _table(
        ["source", "variant", "sha256", "settings", "tensors", "seconds", "cached"],
        [
            [
                sens.source,
                sens.variant,
                sens.sha256[:16],
                ", ".join(f"{k}={v}" for k, v in sens.settings.items()),
                len(sens.tensors),
                f"{sens.seconds.get('total', 0):.1f}",
                sens.cached,
            ]
        ],
    )
    agree = _table(
        ["pairs run", "Pearson (log noise)", "Spearman", "median measured/predicted"],
        [[check.get("n"), *(_num(check.get(k)) for k in ("pearson_log", "spearman", "median_ratio"))]],
    )
    pair_rows = [
        [p["tensor"], p["qtype"], f"{p['predicted']:.4g}", f"{p['measured']:.4g}", _fmt(_db(signal, p["measured"]))]
        for p in pairs
    ]
    rows = [
        [t.name, "x".join(map(str, t.shape)), *[_fmt(_db(signal, t.total(q))) if q in t.noise else "-" for q in qtypes]]
        for t in sens.tensors
    ]
    body = (
        f"{summary}<h2>Per tensor and qtype</h2>{layers}"
        f"<h2>Check: single-tensor quantizations run for real</h2>{agree}{scatter}"
        f"{_table(['tensor', 'qtype', 'predicted noise', 'measured noise', 'measured SQNR (dB)'], pair_rows)}"
        f"<h2>Table (output SQNR in dB if only that tensor is quantized)</h2>"
        f"{_table(['tensor', 'shape', *qtypes], rows)}"
    )
    return _page(f"unetkit sensitivity: {Path(sens.source).name}", body)


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_sensitivity_html(sens: Sensitivity, path: str | Path, force: bool = False) -> Path:
    return _write(path, render_sensitivity(sens), force)


def render_auto(result: dict[str, Any]) -> str:
    plt = _plt()
    target = result["target"]
    met = result["met"]
    verdict = "met" if met else ("not measured" if met is None else "MISSED")
    summary = _table(
        ["output", "target", "verdict", "file", "bits/weight", "predicted SQNR", "measured SQNR"],
        [
            [
                result["output"],
                f"{target['kind']} {target['given']}",
                verdict,
                f"{result['file_bytes']:,} bytes",
                f"{result['bits_per_weight']:.3f}",
                _fmt(result["predicted_sqnr_db"]),
                "-" if result["measured_sqnr_db"] is None else _fmt(result["measured_sqnr_db"]),
            ]
        ],
    )
    # the chosen mix per block, as stacked bars of parameters
    mix = result["mix"]
    blocks = list(mix)
    qtypes = [q for q in (*QTYPE_ORDER, "F32", "BF16") if any(q in m for m in mix.values())]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    bottom = [0.0] * len(blocks)
    for q in qtypes:
        vals = [mix[b].get(q, 0) / 1e6 for b in blocks]
        ax.bar(range(len(blocks)), vals, bottom=bottom, label=q)
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels(blocks, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("parameters (M)")
    ax.legend(ncol=len(qtypes), fontsize=8)
    mix_plot = _img(_png(fig), "mix per block")
    # the front
    front = result["front"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [(p["file_bytes"] / 2**20, p["predicted_sqnr_db"]) for p in front["auto"] if p["predicted_sqnr_db"]]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="auto (predicted)")
    for r in front["recipes"]:
        if r["predicted_sqnr_db"] is not None:
            ax.plot(r["file_bytes"] / 2**20, r["predicted_sqnr_db"], "s", color="gray")
            ax.annotate(r["recipe"], (r["file_bytes"] / 2**20, r["predicted_sqnr_db"]), fontsize=7)
    if result["predicted_sqnr_db"] is not None:
        ax.plot(result["file_bytes"] / 2**20, result["predicted_sqnr_db"], "*", ms=12, label="this file (predicted)")
    if result["measured_sqnr_db"] is not None:
        ax.plot(result["file_bytes"] / 2**20, result["measured_sqnr_db"], "x", ms=10, label="this file (measured)")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("output SQNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    front_plot = _img(_png(fig), "size/SQNR front")
    mix_rows = [[b, *[f"{mix[b].get(q, 0):,}" for q in qtypes]] for b in blocks]
    recipe_rows = [[r["recipe"], f"{r['file_bytes']:,}", _fmt(r["predicted_sqnr_db"])] for r in front["recipes"]]
    decision_rows = [[d["name"], d["qtype"], d["reason"]] for d in result["decisions"]]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.get("notes", []))
    body = (
        f"{summary}{'<ul>' + notes + '</ul>' if notes else ''}"
        f"<h2>Mix per block</h2>{mix_plot}{_table(['block', *qtypes], mix_rows)}"
        f"<h2>Size and SQNR: auto against the fixed recipes (predicted on the calibration set)</h2>{front_plot}"
        f"{_table(['recipe', 'file bytes', 'predicted SQNR (dB)'], recipe_rows)}"
        f"<h2>Decisions</h2>{_table(['tensor', 'qtype', 'reason'], decision_rows)}"
    )
    return _page(f"unetkit gguf:auto: {Path(result['output']).name}", body)


def write_auto_html(result: dict[str, Any], path: str | Path, force: bool = False) -> Path:
    return _write(path, render_auto(result), force)
