"""sha256 of a source, computed in a thread while the output is written."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from unetkit.errors import UnetkitError


class FileHasher:
    """sha256 of the source file(s), computed in a thread while the output is written (hashlib releases the
    GIL on large buffers, so it runs on the second core). Several files (shards) hash as their concatenation."""

    def __init__(self, files: tuple[Path, ...]):
        self.files = files
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            h = hashlib.sha256()
            buf = bytearray(8 << 20)  # one reused buffer: fresh 16 MB reads would page-fault 3 GB of new memory
            view = memoryview(buf)
            for f in self.files:
                with open(f, "rb", buffering=0) as fh:
                    while n := fh.readinto(view):
                        h.update(view[:n])
            self._digest = h.hexdigest()
        except BaseException as e:  # reported by result()
            self._error = e

    def result(self) -> str:
        if self._thread.ident is None:  # never started: hash now
            self._thread.start()
        self._thread.join()
        if self._error is not None:
            raise UnetkitError(f"could not hash the source: {self._error}") from self._error
        assert self._digest is not None
        return self._digest
