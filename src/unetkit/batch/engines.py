"""Where tasks run: one small interface, two engines.

An engine takes tasks (``submit``), says whether it can take another now (``can_admit``, given the task's
estimated peak memory), and hands back ledger rows as tasks finish (``wait``). The runner
(:mod:`unetkit.batch.runner`) owns the order, the dependencies and the ledger; the engine owns processes.

- ``local`` (default): a pool of worker processes, one per core unless told, running task after task. They come
  from a fork server that has imported torch, diffusers' UNet and the verbs once, so each starts warm. Not
  ``spawn``: it starts a fresh interpreter for each worker. Not a plain ``fork`` of this process either: a process
  with threads (a test runner's, a progress bar's) can fork a child that deadlocks on a lock another thread held,
  and under pytest-xdist one did. A task is admitted only when its estimated peak fits the memory budget left by
  the tasks running (default: 90 % of the memory available when the batch starts); one that fits no budget runs
  alone. A worker that dies (SIGKILL, out of memory) breaks the pool: the tasks it held run again once in a new
  pool, then fail with the cause.
- ``ray``: each task a Ray task with its resource requests (1 CPU, its estimated memory) and ``max_retries`` for
  workers that die. With no address a local Ray instance is started (and stopped at the end); ``auto`` or
  ``ray://host:port`` joins a cluster, whose nodes must all see the inputs and the output folder at the same paths.
  Ray is imported here only, when this engine is chosen (``pip install unetkit[ray]``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Iterator
from typing import Any, Protocol

from unetkit.batch.jobs import new_row, run_task, setup_worker
from unetkit.batch.plan import Task
from unetkit.errors import BackendUnavailable, UnetkitError

ENGINES = ("local", "ray")
GB = 1 << 30
#: what the local engine's fork server imports once, for every worker it forks
PRELOAD = (
    "unetkit.batch.jobs",
    "torch",
    "diffusers.models.unets.unet_2d_condition",  # ``import diffusers`` alone is lazy: 5 s more in every worker
    "unetkit.conversion",
    "unetkit.gguf_export",
    "unetkit.loading",
    "unetkit.verification.compare",
)


class Engine(Protocol):
    name: str
    workers: int
    notes: list[str]  # what the user should know of how tasks ran (one over the memory budget, a capped request)

    def __enter__(self) -> Engine: ...
    def __exit__(self, *exc: object) -> None: ...
    def can_admit(self, estimate: int) -> bool: ...
    def submit(self, task: Task, of: Task | None, estimate: int) -> None: ...
    def running(self) -> int: ...
    def wait(self) -> list[dict[str, Any]]: ...


def make_engine(
    name: str, *, workers: int | None = None, memory: int | None = None, address: str | None = None, force: bool = False
) -> Engine:
    if name == "local":
        return LocalEngine(workers=workers, memory=memory, force=force)
    if name == "ray":
        return RayEngine(workers=workers, address=address, force=force)
    raise UnetkitError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


def available_memory() -> int:
    """Bytes of memory available now (Linux: MemAvailable; elsewhere: physical pages free)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_threads(workers: int) -> int:
    """torch threads per local worker: the cores shared out, and never more than ``OMP_NUM_THREADS`` where the user
    set it. More threads than cores is far worse than slow: OpenMP threads spin against each other (a tiny UNet's
    forward measured 6 s with two threads on a busy 2-core machine, 0.1 s with one)."""
    n = max(1, _cores() // workers)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return min(n, int(omp)) if omp.isdigit() and int(omp) > 0 else n


class LocalEngine:
    name = "local"

    def __init__(self, workers: int | None = None, memory: int | None = None, force: bool = False, retries: int = 1):
        self.workers = max(1, workers or _cores())
        self.threads = worker_threads(self.workers)
        self.budget = memory if memory is not None else int(0.9 * available_memory())
        self.force, self.retries = force, retries
        self.pool: Any = None
        self.inflight: dict[Any, tuple[Task, Task | None, int]] = {}  # future -> (task, of, estimate)
        self.attempts: dict[str, int] = {}
        self.replaced = 0  # pools replaced after a worker died
        self.notes: list[str] = []
        _start_fork_server()

    def __enter__(self) -> LocalEngine:
        self._new_pool()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _new_pool(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("forkserver")
        self.pool = ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=setup_worker, initargs=(self.threads,)
        )
        # start every worker now, so that the first tasks do not wait for the fork server; the pool starts no other
        # (a broken one is replaced here)
        with _main_not_rerun():
            for f in [self.pool.submit(_ready) for _ in range(self.workers)]:
                f.result()

    def running(self) -> int:
        return len(self.inflight)

    def can_admit(self, estimate: int) -> bool:
        if len(self.inflight) >= self.workers:
            return False
        if not self.inflight:
            return True  # alone, even over the budget (submit notes it)
        return sum(e for _, _, e in self.inflight.values()) + estimate <= self.budget

    def submit(self, task: Task, of: Task | None, estimate: int) -> None:
        from concurrent.futures.process import BrokenProcessPool

        if not self.inflight and estimate > self.budget and task.id not in self.attempts:
            self.notes.append(
                f"{task.id}: estimated peak {estimate / GB:.1f} GB is over the memory budget "
                f"({self.budget / GB:.1f} GB); it ran alone"
            )
        self.attempts[task.id] = self.attempts.get(task.id, 0) + 1
        try:
            fut = self.pool.submit(run_task, task, of, self.force)
        except BrokenProcessPool:  # a worker died while idle: the pool refuses work until it is replaced
            self._replace_pool()
            fut = self.pool.submit(run_task, task, of, self.force)
        self.inflight[fut] = (task, of, estimate)

    def _replace_pool(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.replaced += 1
        self._new_pool()

    def wait(self) -> list[dict[str, Any]]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures
        from concurrent.futures.process import BrokenProcessPool

        done, _ = wait_futures(list(self.inflight), return_when=FIRST_COMPLETED)
        rows, lost = [], []
        for fut in done:
            task, of, est = self.inflight.pop(fut)
            try:
                row = fut.result()
            except BrokenProcessPool:
                lost.append((task, of, est))
                continue
            row["attempt"] = self.attempts[task.id]
            rows.append(row)
        if lost:
            # a worker died (SIGKILL, out of memory): the pool is broken, and every task still in it is lost too
            lost += list(self.inflight.values())
            self.inflight.clear()
            self._replace_pool()
            for task, of, est in lost:
                if self.attempts[task.id] <= self.retries:
                    self.submit(task, of, est)
                else:
                    rows.append(worker_died_row(task, self.attempts[task.id]))
        return rows


def _start_fork_server() -> None:
    """Start the fork server now: it imports PRELOAD (seconds) while the batch reads its inputs' headers; the first
    worker waits only for what is left. One per process, reused by every pool after."""
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    forkserver.ensure_running()


def _ready() -> int:
    return os.getpid()


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """multiprocessing runs the caller's main script again in every new worker (forkserver, like spawn): a script
    without an ``if __name__ == "__main__":`` guard that calls ``run_batch`` would start a batch in each worker,
    and the pool would break. Workers run unetkit's own functions only, so while they start, ``__main__`` is
    shown to them as an empty module."""
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved
        else:
            del sys.modules["__main__"]


def worker_died_row(task: Task, attempts: int) -> dict[str, Any]:
    error = (
        f"the worker process died {attempts} time(s) running this task (killed, or out of memory); nothing was "
        "written under the output's name"
    )
    return {**new_row(task, error), "attempt": attempts}


def _ray_task(task: Task, of: Task | None, force: bool, threads: int) -> dict[str, Any]:
    setup_worker(threads)
    return run_task(task, of, force)


class RayEngine:
    name = "ray"

    def __init__(
        self, workers: int | None = None, address: str | None = None, force: bool = False, retries: int = 2
    ) -> None:
        try:
            import ray
        except ImportError as e:
            raise BackendUnavailable(
                "the ray engine needs Ray: pip install 'unetkit[ray]' (or use the default --engine local)"
            ) from e
        self.ray = ray
        self.address, self.force, self.retries = address, force, retries
        self.workers = workers or _cores()
        self.started = False
        self.inflight: dict[Any, tuple[Task, Task | None]] = {}
        self.remote: Any = None
        self.memory_cap = 0
        self.notes: list[str] = []

    def __enter__(self) -> RayEngine:
        ray = self.ray
        env = {k: v for k, v in os.environ.items() if k.startswith("UNETKIT_")}
        kw: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": "WARNING",
            "log_to_driver": False,
            "runtime_env": {"env_vars": env} if env else None,
        }
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, **kw)
            else:
                # Ray starts its workers at niceness 15 (its daemons stay responsive); here they do all the work,
                # and niced workers starve behind anything else on the machine: importing torch and diffusers took
                # 180 s in a niced worker against 21 s at 0 while a benchmark ran. A cluster keeps its own setting.
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(num_cpus=self.workers, **kw)
            self.started = True
        res = ray.cluster_resources()
        self.workers = int(res.get("CPU", self.workers))
        self.memory_cap = int(0.9 * res.get("memory", available_memory()))
        self.remote = ray.remote(_ray_task)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.ray.shutdown()

    def running(self) -> int:
        return len(self.inflight)

    def can_admit(self, estimate: int) -> bool:
        return len(self.inflight) < 2 * self.workers  # Ray queues and places them; this keeps the driver's view short

    def submit(self, task: Task, of: Task | None, estimate: int) -> None:
        assert self.remote is not None
        memory = min(estimate, self.memory_cap)  # a request over every node's memory would wait for ever
        if memory < estimate:
            self.notes.append(
                f"{task.id}: estimated peak {estimate / GB:.1f} GB is over the cluster's memory; requested "
                f"{memory / GB:.1f} GB"
            )
        ref = self.remote.options(num_cpus=1, memory=memory, max_retries=self.retries).remote(task, of, self.force, 1)
        self.inflight[ref] = (task, of)

    def wait(self) -> list[dict[str, Any]]:
        ray = self.ray
        done, _ = ray.wait(list(self.inflight), num_returns=1)
        rows = []
        for ref in done:
            task, _of = self.inflight.pop(ref)
            try:
                row = ray.get(ref)
            except ray.exceptions.RayError as e:  # the worker died more than max_retries times, or Ray failed
                row = worker_died_row(task, self.retries + 1)
                row["error"] = f"Ray could not run this task: {type(e).__name__}: {str(e).splitlines()[0]}"
            rows.append(row)
        return rows
