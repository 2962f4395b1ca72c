"""Outputs appear whole or not at all: written under a temporary name beside the target, renamed at the end."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unetkit.errors import OutputExistsError


def check_output(path: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    path = Path(path)
    for src in inputs:
        try:
            if path.exists() and path.resolve() == Path(src).resolve():
                raise OutputExistsError(f"{path}: the output is the input; choose another output path")
        except OSError:
            pass
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists; pass --force (force=True) to replace it")


@contextmanager
def atomic_output(path: Path, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path (a file, or an empty folder when ``directory``) next to ``path``; on success
    move it to ``path`` (replacing an existing one only when ``force``), on failure delete it."""
    path = Path(path)
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.unetkit-tmp-{uuid.uuid4().hex[:8]}"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if path.exists() and (directory or path.is_dir()):
            check_output(path, force)
            old = path.parent / f".{path.name}.unetkit-old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            check_output(path, force)
            os.replace(tmp, path)  # atomic for files, also over an existing one
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)
