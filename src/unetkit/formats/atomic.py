"""Outputs appear whole or not at all, and never at an input's expense.

- Path safety: an output is never an input, never inside an input folder, and never a folder that holds an input
  (replacing it would delete the input), whatever ``force`` says.
- Atomicity: written under a temporary name beside the target (``.NAME.unetkit-tmp-PID-XXXXXXXX``), renamed at the
  end; on failure, Ctrl-C or SIGTERM the temporary is removed. After a SIGKILL nothing can clean up at once, so the
  next run into the same folder removes the temporaries whose process is gone, and logs it.
- OS errors (full disk, read-only mount, a parent that is a file) become one error naming the path and the errno.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from unetkit.errors import OutputError, OutputExistsError

log = logging.getLogger(__name__)
TMP_MARK = ".unetkit-tmp-"
OLD_MARK = ".unetkit-old-"


def check_output(path: Path, force: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an output that would overwrite or delete an input (always), or an existing one without ``force``."""
    path = Path(path)
    out = _resolved(path)
    for src in inputs:
        inp = _resolved(Path(src))
        if out == inp:
            raise OutputExistsError(f"{path}: the output is the input {src}; choose another output path")
        if inp.is_relative_to(out):
            raise OutputExistsError(
                f"{path}: the output would replace a folder that holds the input {src}; choose another output path"
            )
        if Path(src).is_dir() and out.is_relative_to(inp):
            raise OutputExistsError(f"{path}: the output is inside the input folder {src}; write it elsewhere")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists; pass --force (force=True) to replace it")


def check_kind(path: Path, directory: bool) -> None:
    """--force replaces a file with a file and a folder with a folder, never one with the other: a folder given
    where a file is written (or the reverse) is most likely a mistake, and replacing it would delete its contents."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise OutputExistsError(
            f"{path}: is a file, and this output is a folder; --force does not replace a file "
            "with a folder: remove it yourself or choose another path"
        )
    if not directory and path.is_dir():
        raise OutputExistsError(
            f"{path}: is a folder, and this output is a file; --force does not replace a "
            "folder with a file: remove it yourself or choose another path"
        )


def check_writable(path: Path) -> None:
    """Fail now, not after minutes of work, when ``path``'s folder cannot take a new file."""
    parent = Path(path).parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise OutputError(f"{path}: cannot write here: {parent} {what}; create the folder first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write here: {parent} is not writable")


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except OSError:
        return p.absolute()


@contextmanager
def atomic_output(path: Path, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path (a file, or an empty folder when ``directory``) next to ``path``; on success
    move it to ``path`` (replacing an existing one only when ``force``), on failure delete it."""
    path = Path(path)
    check_output(path, force)
    check_kind(path, directory)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _os_errors(path), _signals_raise() as terminated:
            path.parent.mkdir(parents=True, exist_ok=True)
            collect_stale(path)
            if directory:
                tmp.mkdir()
            yield tmp
            if terminated:  # the handler's SystemExit can be swallowed (raised inside a finalizer): never commit
                raise SystemExit(128 + signal.SIGTERM)
            check_output(path, force)
            check_kind(path, directory)
            if path.exists() and (directory or path.is_dir()):
                old = path.parent / f".{path.name}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.replace(path, old)
                os.replace(tmp, path)
                _remove(old)
            else:
                os.replace(tmp, path)  # atomic for files, also over an existing one
    except BaseException:
        _remove(tmp)
        raise


def collect_stale(path: Path) -> list[Path]:
    """Remove temporaries of ``path`` left by unetkit processes that no longer run (killed with SIGKILL)."""
    removed = []
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            if not p.name.startswith(f".{path.name}") or (TMP_MARK not in p.name and OLD_MARK not in p.name):
                continue
            tail = p.name.split(TMP_MARK if TMP_MARK in p.name else OLD_MARK, 1)[1]
            pid = tail.split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                _remove(p)
                removed.append(p)
                log.warning("removed %s, a partial output left by process %s, which is gone", p, pid)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        code = errno.errorcode.get(e.errno or 0, "")
        if e.errno == errno.ENOSPC or (e.errno is None and "requested and" in str(e)):
            why = "the disk is full"
        else:
            why = e.strerror or str(e)
        raise OutputError(
            f"{path}: cannot write the output: {why}{f' ({code})' if code else ''}; nothing was "
            "left behind (the partial file is removed)"
        ) from e


@contextmanager
def _signals_raise() -> Iterator[list[int]]:
    """SIGTERM raises SystemExit in the main thread while an output is written, so the temporary is removed as it
    is on Ctrl-C (KeyboardInterrupt); the previous handler is restored afterwards. The yielded list is non-empty
    once a SIGTERM arrived: Python swallows an exception raised while the main thread runs a finalizer (``__del__``,
    a weakref callback), so the caller checks it again before committing."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        received.append(signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)
