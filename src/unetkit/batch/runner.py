"""``run_batch``: a plan's tasks through an engine, in order, with dependencies, a ledger and a summary.

1. Every input is opened in this process first (headers only): one that cannot be read, or is not a UNet unetkit
   converts (a LoRA, a VAE, a truncated file), fails all its tasks here, with its error; the rest go on. The
   others get each task's estimated peak memory from their tensor shapes (see :func:`estimate`).
2. The temporaries a killed earlier run left beside the outputs are removed.
3. Tasks go to the engine in plan order as it admits them; a verify task waits for the task it checks, and fails
   without running when that one failed. Each finished task's row is appended to the ledger at once (JSONL,
   flushed and fsynced), so a batch killed at any point keeps every row it finished; the next run skips what is
   up to date (see :mod:`unetkit.batch.jobs`) and does the rest.
4. The result counts done, skipped and failed; the CLI exits 1 when anything failed.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unetkit._version import __version__
from unetkit.batch.engines import make_engine
from unetkit.batch.jobs import new_row
from unetkit.batch.plan import Plan, Task
from unetkit.errors import UnetkitError

#: (work units done, total, the row just finished or None) -> None
Progress = Callable[[float, float, "dict[str, Any] | None"], None]


@dataclass
class BatchResult:
    run: str
    engine: str
    workers: int
    rows: list[dict[str, Any]]
    ledger: Path
    seconds: float
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def failed(self) -> bool:
        return self.count("failed") > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "engine": self.engine,
            "workers": self.workers,
            "unetkit_version": __version__,
            "seconds": round(self.seconds, 3),
            "done": self.count("done"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "ledger": str(self.ledger),
            "notes": self.notes,
            "rows": self.rows,
        }


@dataclass(frozen=True)
class Cost:
    """What the runner knows of a task before it runs: estimated peak memory and relative work (for the ETA)."""

    memory: int
    work: float


def estimate(task: Task, params: int, largest: int, stored: int) -> Cost:
    """Estimated peak resident memory of ``task`` in a worker, from its input's parameter count, largest tensor
    (elements) and stored bytes; ``work`` is proportional to the time it takes, for the progress bar's ETA.
    Streaming verbs hold a few tensors at a time; runtime quantization and gguf:auto hold the model in float32
    (and gguf:auto its gradients); verify holds both sides (``verification.memory``)."""
    from unetkit.verification.memory import RUNTIME_BYTES

    job, f32 = task.job, params * 4
    if job.verb == "convert":
        return Cost(RUNTIME_BYTES + 3 * largest * 4, stored / 2**20)
    if job.verb == "verify":
        return Cost(RUNTIME_BYTES + 2 * f32 + f32 // 2, 30 * stored / 2**20)
    if job.method.lower() == "gguf:auto":
        return Cost(RUNTIME_BYTES + 3 * f32, 60 * stored / 2**20)
    if job.method.lower().startswith("gguf:"):
        return Cost(RUNTIME_BYTES + 16 * largest * 4, 6 * stored / 2**20)
    return Cost(RUNTIME_BYTES + 3 * f32, 8 * stored / 2**20)


def run_batch(
    plan: Plan,
    *,
    engine: str = "local",
    workers: int | None = None,
    memory: int | None = None,
    address: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> BatchResult:
    """Run every task of ``plan`` (see the module docstring). ``workers``: processes (local) or CPUs of a local
    Ray instance (default: the cores); ``memory``: the local engine's budget in bytes (default 90 % of what is
    available); ``address``: a Ray cluster to join; ``force``: replace outputs that exist but were not made by
    this job from this source."""
    from unetkit.formats.atomic import collect_stale

    t0 = time.perf_counter()
    run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    for task in plan.tasks:
        collect_stale(Path(task.output))
    eng = make_engine(engine, workers=workers, memory=memory, address=address, force=force)  # starts warming up
    costs, bad = _examine(plan)
    by_id = {t.id: t for t in plan.tasks}
    dependents: dict[str, list[Task]] = {}
    for t in plan.tasks:
        if t.depends:
            dependents.setdefault(t.depends, []).append(t)
    total = sum(c.work for c in costs.values()) or 1.0
    done_work = 0.0
    rows: list[dict[str, Any]] = []
    notes = list(plan.notes)
    ledger = _Ledger(plan.ledger, run)

    def finish(row: dict[str, Any]) -> None:
        nonlocal done_work
        if row["id"] in finished:
            return
        finished.add(row["id"])
        ledger.append(row)
        rows.append(row)
        done_work += costs[row["id"]].work
        if progress:
            progress(done_work, total, row)
        for dep in dependents.get(row["id"], []):
            if row["status"] == "failed":
                finish({**new_row(dep, f"not run: {row['job']} failed on this input: {row['error']}"), "seconds": 0.0})
            else:
                ready.append(dep)

    ready: list[Task] = []
    finished: set[str] = set()
    with ledger, eng:
        if progress:
            progress(0.0, total, None)
        for t in plan.tasks:
            if t.depends:
                continue  # released (or failed) when the task it checks finishes
            if t.input in bad:
                finish({**new_row(t, bad[t.input]), "seconds": 0.0})
            else:
                ready.append(t)
        while ready or eng.running():
            admitted = True
            while ready and admitted:
                admitted = False
                for i, t in enumerate(ready):
                    est = costs[t.id].memory
                    if eng.can_admit(est):
                        eng.submit(t, by_id.get(t.depends or ""), est)
                        del ready[i]
                        admitted = True
                        break
            if eng.running():
                for row in eng.wait():
                    finish(row)
        notes += eng.notes
    return BatchResult(run, engine, eng.workers, rows, plan.ledger, time.perf_counter() - t0, notes)


def _examine(plan: Plan) -> tuple[dict[str, Cost], dict[str, str]]:
    """Each input's header, once: task costs, and the inputs that cannot run (path -> error)."""
    from unetkit.resolve import open_unet

    sizes: dict[str, tuple[int, int, int]] = {}  # input -> (parameters, largest tensor, stored bytes)
    bad: dict[str, str] = {}
    for inp in plan.inputs:
        try:
            entries = list(open_unet(inp).tensors.values())
        except UnetkitError as e:
            bad[inp] = str(e)
            continue
        sizes[inp] = (
            sum(e.numel for e in entries),
            max((e.numel for e in entries), default=0),
            sum(e.nbytes or e.numel * 2 for e in entries),
        )
    costs = {t.id: estimate(t, *sizes[t.input]) if t.input in sizes else Cost(0, 1.0) for t in plan.tasks}
    return costs, bad


class _Ledger:
    """Append-only JSONL: one row per finished task, with the run's id and time; flushed and fsynced per row."""

    def __init__(self, path: Path, run: str):
        self.path, self.run = path, run
        self.f: Any = None

    def __enter__(self) -> _Ledger:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            cut = False
            if self.path.is_file() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    cut = f.read(1) != b"\n"
            self.f = open(self.path, "a", encoding="utf-8")
            if cut:  # a row cut short by a kill: end its line, so that the next row stands on its own
                self.f.write("\n")
        except OSError as e:
            raise UnetkitError(f"{self.path}: cannot open the ledger: {e.strerror or e}") from e
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def append(self, row: dict[str, Any]) -> None:
        row.setdefault("run", self.run)
        row.setdefault("unetkit_version", __version__)
        self.f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a ledger, oldest first (a last line cut short by a kill is left out)."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UnetkitError(f"{path}: cannot read the ledger: {e.strerror or e}") from e
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
