"""The verify report as one self-contained HTML page: tables plus plots embedded as base64 PNGs (matplotlib, Agg
backend), no external URL, script or stylesheet, so the file can be mailed or archived as is.

Plots per report: SQNR per timestep (with the threshold), SQNR of the latents along the sampling loop, the error
per layer through the network (local and propagated), and the final latents (reference, candidate, difference)
or, with a VAE, the two decoded images side by side."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from unetkit.errors import BackendUnavailable
from unetkit.formats.atomic import atomic_output

if TYPE_CHECKING:
    from unetkit.verification.report import Report

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.pass{color:#176f2c;font-weight:bold}.fail{color:#b00020;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}code{background:#f4f4f4;padding:0 3px}
"""


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise BackendUnavailable(
            "the HTML report draws its plots with matplotlib: pip install matplotlib (or unetkit[report])"
        ) from e
    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def _db(v) -> str:
    return "identical" if v is None else f"{v:.1f} dB"


def _sqnr_plot(report: Report) -> str | None:
    rows = report.timesteps
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    finite = [r["sqnr_db"] for r in rows if r["sqnr_db"] is not None]
    cap = (max(finite) + 10) if finite else 100.0
    xs = [r["timestep"] for r in rows]
    ys = [cap if r["identical"] else (r["sqnr_db"] if r["sqnr_db"] is not None else -10) for r in rows]
    ax.plot(xs, ys, "o-", label="guided noise prediction")
    if any(r["identical"] for r in rows):
        ax.plot(
            [x for x, r in zip(xs, rows) if r["identical"]],
            [cap for r in rows if r["identical"]],
            "g^",
            label=f"bit-identical (drawn at {cap:.0f})",
        )
    thr = report.settings.get("min_sqnr_db")
    if thr is not None:
        ax.axhline(thr, color="r", ls="--", label=f"--min-sqnr {thr:g} dB")
    ax.set_xlabel("timestep")
    ax.set_ylabel("SQNR (dB)")
    ax.invert_xaxis()
    ax.set_title("SQNR per timestep (higher is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _sampling_plot(report: Report) -> str | None:
    if not report.sampling or not report.sampling["per_step"]:
        return None
    plt = _plt()
    rows = report.sampling["per_step"]
    finite = [r["sqnr_db"] for r in rows if r["sqnr_db"] is not None]
    cap = (max(finite) + 10) if finite else 100.0
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in rows], [cap if r["identical"] else (r["sqnr_db"] or -10) for r in rows], "o-")
    ax.set_xlabel("sampling step")
    ax.set_ylabel("latent SQNR (dB)")
    ax.set_title(f"latents along the {report.sampling['scheduler']} loop")
    ax.grid(alpha=0.3)
    return _png(fig)


def _layers_plot(report: Report) -> str | None:
    if not report.blame or not report.blame["layers"]:
        return None
    plt = _plt()
    layers = report.blame["layers"]
    vals = [v for r in layers for v in (r["local_sqnr_db"], r["propagated_sqnr_db"]) if v is not None]
    cap = (max(vals) + 10) if vals else 100.0
    xs = [r["order"] for r in layers]
    prop = [cap if r["propagated_sqnr_db"] is None else r["propagated_sqnr_db"] for r in layers]
    local_x = [r["order"] for r in layers if r["local_sqnr_db"] is not None]
    local_y = [r["local_sqnr_db"] for r in layers if r["local_sqnr_db"] is not None]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(xs, prop, "-", lw=1, label="propagated: output in the candidate's own pass")
    ax.plot(local_x, local_y, ".", ms=4, color="C3", label="local: candidate module on the reference's inputs")
    if report.blame["ranking"]:
        top = report.blame["ranking"][0]
        y = top["local"]["sqnr_db"] if top["local"]["sqnr_db"] is not None else -10
        ax.annotate(
            f"worst: {top['module']}",
            (top["order"], y),
            fontsize=7,
            xytext=(0, -30),
            textcoords="offset points",
            ha="center",
            arrowprops={"arrowstyle": "->", "lw": 0.6},
        )
    # block boundaries
    last = None
    for r in layers:
        block = r["module"].split(".")[0]
        if block != last:
            ax.axvline(r["order"], color="#ccc", lw=0.5)
            last = block
    ax.set_xlabel("leaf module, in execution order")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(f"error per layer through the network (t={report.blame['timestep']}; identical drawn at {cap:.0f})")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    return _png(fig)


def _latent_grid(report: Report) -> str | None:
    if report.latents is None:
        return None
    plt = _plt()
    ref, cand = report.latents
    diff = (cand - ref).abs()
    c = ref.shape[0]
    fig, axes = plt.subplots(3, c, figsize=(2 * c, 6), squeeze=False)
    lo, hi = float(ref.min()), float(ref.max())
    for i in range(c):
        for row, (name, t, kw) in enumerate(
            [
                ("reference", ref, dict(vmin=lo, vmax=hi)),
                ("candidate", cand, dict(vmin=lo, vmax=hi)),
                ("|difference|", diff, dict(vmin=0, vmax=max(float(diff.max()), 1e-12))),
            ]
        ):
            ax = axes[row][i]
            ax.imshow(t[i].numpy(), cmap="gray" if row < 2 else "magma", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name)
            if row == 0:
                ax.set_title(f"channel {i}")
    fig.suptitle("final latents (first sample)")
    return _png(fig)


def _image_pair(report: Report) -> str | None:
    if report.image_pair is None:
        return None
    plt = _plt()
    ref, cand = report.image_pair
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    diff = (cand - ref).abs().mean(0)
    for ax, (title, img) in zip(axes, [("reference", ref), ("candidate", cand)]):
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(title)
        ax.axis("off")
    axes[2].imshow(diff.numpy(), cmap="magma")
    axes[2].set_title("|difference|")
    axes[2].axis("off")
    psnr = report.images.get("psnr_db") if report.images else None
    fig.suptitle(f"decoded images, PSNR {_db(psnr)}")
    return _png(fig)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _stats_row(d: dict) -> list[str]:
    if d.get("identical"):
        return ["identical", "1", "0", "0"]
    return [
        _db(d.get("sqnr_db")),
        f"{d['cosine']:.6f}",
        f"{d['rel_l2']:.3g}" if d.get("rel_l2") is not None else "-",
        f"{d['max_abs']:.3g}" if d.get("max_abs") is not None else "-",
    ]


def _section(report: Report, index: int) -> str:
    d = report.to_dict()
    s = d["summary"]
    cls = "pass" if s["passed"] else "fail"
    out = [
        f"<h2 id='r{index}'>{html.escape(d['candidate']['source'])}</h2>",
        f"<p>against <code>{html.escape(d['reference']['source'])}</code>: "
        f"<span class='{cls}'>{html.escape(s['verdict'])}</span> — {html.escape(s['reason'])}</p>",
    ]
    st = d["settings"]
    out.append(_table(["setting", "value"], [[k, v] for k, v in st.items()]))
    out.append(
        _table(
            ["", "source", "variant", "dtype", "quantized", "parameters"],
            [
                [
                    role,
                    d[role]["source"],
                    d[role]["variant"],
                    d[role]["dtype"],
                    d[role]["quantized"],
                    f"{d[role]['parameters']:,}",
                ]
                for role in ("reference", "candidate")
            ],
        )
    )
    if d["exact"] is not None:
        e = d["exact"]
        ft = e["first_tensor"]
        fo = e["first_output"]
        out.append("<h3>exact mode</h3>")
        out.append(
            _table(
                ["tensors compared", "first differing tensor", "first differing output"],
                [
                    [
                        e["tensors_compared"],
                        f"{ft['name']}: {ft['reason']}" if ft else "none",
                        f"timestep {fo['timestep']} ({_db(fo['sqnr_db'])})" if fo else "none",
                    ]
                ],
            )
        )
    out.append("<h3>per timestep (guided noise prediction)</h3>")
    for png, alt in [(_sqnr_plot(report), "SQNR per timestep")]:
        if png:
            out.append(_img(png, alt))
    out.append(
        _table(
            ["timestep", "SQNR", "cosine", "rel L2", "max abs"],
            [[t["timestep"], *_stats_row(t)] for t in d["timesteps"]],
        )
    )
    if d["sampling"]:
        sm = d["sampling"]
        out.append(f"<h3>sampling: {sm['steps']} {html.escape(sm['scheduler'])} steps from the same noise</h3>")
        out.append(_table(["final latents", "SQNR", "cosine", "rel L2", "max abs"], [["", *_stats_row(sm["final"])]]))
        for png, alt in [(_sampling_plot(report), "latent SQNR per step"), (_latent_grid(report), "final latents")]:
            if png:
                out.append(_img(png, alt))
    if d["images"]:
        out.append("<h3>decoded images</h3>")
        png = _image_pair(report)
        if png:
            out.append(_img(png, "decoded images"))
    if d["blame"]:
        b = d["blame"]
        out.append(f"<h3>per-layer blame (t={b['timestep']})</h3>")
        out.append(
            f"<p>{b['differing']} of {b['modules']} leaf modules give a different output on the reference's "
            f"own inputs; first divergence in the candidate's pass: "
            f"<code>{html.escape(str(b['first_divergence']))}</code>.</p>"
        )
        png = _layers_plot(report)
        if png:
            out.append(_img(png, "error per layer"))
        out.append(
            _table(
                ["#", "module", "type", "block", "local SQNR", "propagated SQNR", "growth"],
                [
                    [
                        i + 1,
                        r["module"],
                        r["type"],
                        r["block"],
                        _db(r["local"]["sqnr_db"]),
                        _db(r["propagated"]["sqnr_db"]) if r["propagated"] else "-",
                        f"{r['growth_db']:.1f} dB" if r["growth_db"] is not None else "-",
                    ]
                    for i, r in enumerate(b["ranking"][:20])
                ],
            )
        )
        out.append(
            _table(
                ["block", "modules", "differing", "worst local SQNR", "at"],
                [
                    [
                        r["block"],
                        r["modules"],
                        r["differing"],
                        _db(r["worst_local_sqnr_db"]) if r["differing"] else "identical",
                        r["module"] or "-",
                    ]
                    for r in b["blocks"]
                ],
            )
        )
    return "\n".join(out)


def render_html(reports: Sequence[Report], title: str = "unetkit verify") -> str:
    summary = _table(
        ["candidate", "reference", "verdict", "worst SQNR", "blamed first"],
        [
            [
                r.candidate.source,
                r.reference.source,
                r.summary["verdict"],
                _db(r.summary["worst_sqnr_db"]) if r.summary["verdict"] != "bit-identical" else "identical",
                (r.blame or {}).get("blamed") or "-",
            ]
            for r in reports
        ],
    )
    body = "\n".join(_section(r, i) for i, r in enumerate(reports))
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{summary}\n{body}\n"
        f"<p><small>written by unetkit; every plot is embedded in this file.</small></p></body></html>\n"
    )


def write_html(reports: Sequence[Report], path: str | Path, title: str = "unetkit verify", force: bool = False) -> Path:
    """Write one page for one or more reports (``make demo`` puts every artifact on one page)."""
    path = Path(path)
    page = render_html(reports, title)
    with atomic_output(path, force=force) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


__all__ = ["render_html", "write_html"]
