"""A batch's summary: the terminal table and the self-contained HTML page (a table of every task, the time and
peak memory of each as plots)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from unetkit.formats.atomic import atomic_output
from unetkit.verification.html import CSS, _img, _plt, _png, _table

HEADER = ["input", "job", "status", "output", "size", "time", "peak RSS", "SQNR", "note"]


def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def summary_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        sqnr = r.get("sqnr_db")
        note = r.get("error") or r.get("reason") or ""
        out.append(
            [
                Path(r["input"]).name,
                r["job"],
                r["status"],
                Path(r["output"]).name,
                _mib(r.get("bytes")),
                f"{r['seconds']:.1f} s" if r.get("seconds") is not None else "-",
                f"{r['peak_rss_mb'] / 1024:.2f} GB" if r.get("peak_rss_mb") else "-",
                f"{sqnr:.1f} dB" if isinstance(sqnr, (int, float)) else "-",
                note if len(note) <= 90 else note[:87] + "...",
            ]
        )
    return out


TITLE = "<title>unetkit batch</title>"


def check_page(path: str | Path, force: bool = False) -> None:
    """The summary page replaces an earlier run's page; any other existing file only with ``force`` (checked before
    the batch runs, not after)."""
    from unetkit.errors import OutputExistsError

    path = Path(path)
    if path.exists() and not force:
        ours = False
        if path.is_file():
            with open(path, "rb") as f:
                ours = TITLE.encode() in f.read(4096)
        if not ours:
            raise OutputExistsError(f"{path}: exists and is not a batch summary; pass --force to replace it")


def write_html(result: dict[str, Any], path: str | Path, force: bool = False) -> Path:
    """The batch page (``result``: ``BatchResult.to_dict()``), written atomically (see :func:`check_page`)."""
    path = Path(path)
    check_page(path, force)
    rows = result["rows"]
    counts = f"{result['done']} done, {result['skipped']} skipped, {result['failed']} failed"
    cls = "fail" if result["failed"] else "pass"
    body = [
        f"<p class='{cls}'>{html.escape(counts)}</p>",
        f"<p>engine {html.escape(result['engine'])}, {result['workers']} workers, {result['seconds']:.1f} s; "
        f"run {html.escape(result['run'])}; unetkit {html.escape(result['unetkit_version'])}; ledger "
        f"<code>{html.escape(result['ledger'])}</code></p>",
    ]
    if result["notes"]:
        body.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result["notes"]) + "</ul>")
    ran = [r for r in rows if r["status"] != "failed" or r.get("peak_rss_mb")]
    if ran:
        try:
            body.append(_img(_plot(ran), "time and peak memory per task"))
        except Exception as e:  # no matplotlib: the table says it all
            body.append(f"<p>(no plot: {html.escape(str(e))})</p>")
    body.append(_table(HEADER, summary_rows(rows)))
    errors = [r for r in rows if r.get("error")]
    if errors:
        body.append("<h2>errors</h2>")
        body.append(_table(["input", "job", "error"], [[r["input"], r["job"], r["error"]] for r in errors]))
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'>{TITLE}"
        f"<style>{CSS}</style></head><body><h1>unetkit batch</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def _plot(rows: list[dict[str, Any]]) -> str:
    plt = _plt()
    colors = {"done": "#3b7dd8", "skipped": "#9aa5b1", "failed": "#b00020"}
    labels = [f"{Path(r['input']).stem[:24]} {r['job']}" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.28 * len(rows) + 1.2), sharey=True)
    y = range(len(rows))
    a.barh(y, [r.get("seconds") or 0 for r in rows], color=[colors.get(r["status"], "#888") for r in rows])
    a.set_yticks(list(y), labels, fontsize=7)
    a.invert_yaxis()
    a.set_xlabel("wall time (s)")
    b.barh(y, [(r.get("peak_rss_mb") or 0) / 1024 for r in rows], color="#6a9f58")
    b.set_xlabel("peak RSS (GB)")
    fig.suptitle("per task (blue: done, grey: skipped, red: failed)", fontsize=9)
    return _png(fig)
