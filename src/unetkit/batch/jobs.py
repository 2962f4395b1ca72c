"""One task, run in an engine worker: the up-to-date check, the verb itself, and the ledger row it returns.

A task never raises: whatever goes wrong (an unreadable input, a refused file, a failing verb, a verification
below its threshold) becomes a ``failed`` row with its error, and the other tasks go on.

Up to date means: the output exists and its metadata records this input's sha256, this job's verb and options
(``unetkit.batch_job``; for a verify job, the options of the job it checks too) and this unetkit version. Such a
task is ``skipped``. An output that exists but records something else (or nothing: a file the user put there) is
never replaced without ``force``: the task fails and says what differs.

Workers share the machine's cores: each runs torch with its share of threads, the GGUF encoder without its own
process pool, and hashes sources in its own turn (no hashing thread): see :func:`setup_worker`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from unetkit._version import __version__
from unetkit.batch.plan import Task
from unetkit.errors import UnetkitError
from unetkit.provenance import BATCH_JOB, SOURCE_SHA256, VERSION

#: the key of a verify report (JSON) that records what the batch job made it from
REPORT_STAMP = "unetkit_batch"
_SETUP: dict[str, Any] = {}


def setup_worker(threads: int = 1) -> None:
    """Once per worker process: third-party chatter off (the rows carry every error), torch threads, no nested
    pools or threads, die with the parent (Linux)."""
    if _SETUP.get("threads") == threads:
        return
    from unetkit._quiet import quiet_third_party

    quiet_third_party()
    import torch

    from unetkit.formats.hashing import FileHasher

    torch.set_num_threads(max(1, threads))
    FileHasher.background = False
    _die_with_parent()
    _SETUP["threads"] = threads


def _die_with_parent() -> None:
    """A local worker whose batch was killed (SIGKILL: no cleanup) must not go on writing: PR_SET_PDEATHSIG. Its
    parent is the engine's fork server, which exits when the batch process does."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def task_stamp(task: Task, of: Task | None) -> str:
    """What the output of ``task`` records as ``unetkit.batch_job``."""
    if task.job.verb == "verify" and of is not None:
        return json.dumps({"job": json.loads(task.job.stamp()), "of": json.loads(of.job.stamp())}, sort_keys=True)
    return task.job.stamp()


def new_row(task: Task, error: str | None = None) -> dict[str, Any]:
    """A ledger row for ``task``: failed with ``error`` until the task says otherwise."""
    return {
        "id": task.id,
        "input": task.input,
        "job": task.job.name,
        "verb": task.job.verb,
        "options": task.job.options,
        "output": task.output,
        "status": "failed",
        "reason": None,
        "error": error,
        "source_sha256": None,
        "bytes": None,
        "seconds": None,
        "peak_rss_mb": None,
        "sqnr_db": None,
    }


def run_task(task: Task, of: Task | None = None, force: bool = False) -> dict[str, Any]:
    """Run ``task`` (``of``: the task whose output a verify task checks) and return its ledger row."""
    row = new_row(task)
    row.update(worker=f"{socket.gethostname()}:{os.getpid()}", started=time.time())
    t0 = time.perf_counter()
    _reset_peak()
    try:
        from unetkit.formats import read
        from unetkit.formats.hashing import FileHasher

        sha = FileHasher(read(task.input).files).result()
        row["source_sha256"] = sha
        stamp = task_stamp(task, of)
        out = Path(task.output)
        replace = force
        if out.exists():
            differs = _differs(out, sha, stamp)
            if not differs:
                row.update(status="skipped", reason="up to date: the output records this source, job and version")
                row["bytes"] = _size(out)
                if task.job.verb == "verify":
                    _verify_outcome(row, json.loads(out.read_text())["summary"], earlier=True)
                return row
            if not force:
                raise UnetkitError(
                    f"{out}: exists but was not made by this job from this source ({differs}); pass --force to "
                    "replace it, or choose another output"
                )
        _run_verb(task, of, sha, stamp, replace, row)
        if row["error"] is None:
            row["status"] = "done"
        row["bytes"] = _size(out)
    except UnetkitError as e:
        row["error"] = str(e)
    except Exception as e:  # a bug, not the user's input: keep the traceback in the ledger
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=20)
    finally:
        row["seconds"] = round(time.perf_counter() - t0, 3)
        row["peak_rss_mb"] = _peak_mb()
        row["finished"] = time.time()
    return row


def _run_verb(task: Task, of: Task | None, sha: str, stamp: str, force: bool, row: dict[str, Any]) -> None:
    from unetkit.provenance import recording

    o = task.job.options
    verb = task.job.verb
    with recording({BATCH_JOB: stamp}):
        if verb == "convert":
            from unetkit.conversion import convert

            kw = {"to": o["to"], "dtype": o["dtype"], "prefix": o["prefix"], "ema": o["ema"]}
            convert(task.input, task.output, force=force, **kw)
        elif verb == "quantize" and task.job.method.lower() == "gguf:auto":
            from unetkit.sensitivity import quantize_to_target

            r = quantize_to_target(
                task.input,
                task.output,
                target_size=o["target_size"],
                target_bpw=o["target_bpw"],
                target_sqnr=o["target_sqnr"],
                flavor=o["flavor"],
                keep=o["keep"],
                override=o["override"],
                force=force,
                measure=o["measure"],
                workers=0,
            )
            row["sqnr_db"] = r.measured_sqnr_db
            if r.met is False:
                row["error"] = f"target missed: measured SQNR {r.measured_sqnr_db:.2f} dB < {r.target['value']} dB"
        elif verb == "quantize" and task.job.method.lower().startswith("gguf:"):
            from unetkit.gguf_export import quantize_file

            quantize_file(
                task.input,
                task.output,
                task.job.method,
                flavor=o["flavor"],
                keep=o["keep"],
                override=o["override"],
                force=force,
                ema=o["ema"],
                workers=0,
            )
        elif verb == "quantize":
            from unetkit.quantization import quantize_to_dir

            quantize_to_dir(
                task.input,
                task.output,
                task.job.method,
                include=o["include"],
                exclude=o["exclude"],
                force=force,
                ema=o["ema"],
            )
        else:
            _verify(task, of, sha, stamp, force, row)


def _verify(task: Task, of: Task | None, sha: str, stamp: str, force: bool, row: dict[str, Any]) -> None:
    from unetkit.formats.atomic import atomic_output
    from unetkit.verification import verify

    if of is None:
        raise UnetkitError(f"{task.id}: internal error: a verify task without the task it checks")
    o = task.job.options
    kw: dict[str, Any] = {"quick": o["quick"], "blame": o["blame"], "min_sqnr": o["min_sqnr"]}
    if o["size"] is not None:
        kw["size"] = o["size"]
    if o["timesteps"] is not None:
        kw["timesteps"] = o["timesteps"]
    report = verify(task.input, of.output, **kw)
    doc = report.to_dict()
    doc[REPORT_STAMP] = {VERSION: __version__, SOURCE_SHA256: sha, BATCH_JOB: stamp}
    with atomic_output(Path(task.output), force=force) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    _verify_outcome(row, doc["summary"], earlier=False)


def _verify_outcome(row: dict[str, Any], summary: dict[str, Any], earlier: bool) -> None:
    row["sqnr_db"] = summary.get("worst_sqnr_db")
    row["verdict"] = summary.get("verdict")
    if not summary.get("passed", False):
        when = " (as recorded by an earlier run)" if earlier else ""
        row["status"] = "failed"
        row["error"] = f"verification {summary.get('verdict')}{when}: {summary.get('reason')}"


def _differs(out: Path, sha: str, stamp: str) -> str:
    """'' when ``out`` records this source, job and version; else what differs."""
    try:
        meta = output_metadata(out)
    except (UnetkitError, OSError, ValueError, KeyError) as e:
        return f"its metadata cannot be read: {e}"
    want = {SOURCE_SHA256: sha, BATCH_JOB: stamp, VERSION: __version__}
    wrong = [k for k, v in want.items() if meta.get(k) != v]
    if not wrong:
        return ""
    if BATCH_JOB not in meta:
        return "no batch job recorded: not a unetkit batch output"
    return "different " + ", ".join(k.removeprefix("unetkit.") for k in wrong)


def output_metadata(out: Path) -> dict[str, str]:
    """The unetkit keys an output records: a file's or folder's metadata, or a verify report's stamp."""
    from unetkit.formats import read

    if out.is_file() and out.suffix == ".json":
        doc = json.loads(out.read_text())
        return dict(doc.get(REPORT_STAMP) or {})
    from unetkit.formats.quantized_dir import WEIGHTS, is_quantized_dir

    if is_quantized_dir(out):
        return dict(read(out / WEIGHTS).metadata)
    return dict(read(out).metadata)


def _size(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return None


def _reset_peak() -> None:
    """Linux: reset this process's peak RSS (VmHWM), so that each task's peak is its own in a reused worker."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        return round(int(m.group(1)) / 1024, 1) if m else None
    except OSError:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
