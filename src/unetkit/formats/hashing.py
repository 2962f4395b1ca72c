"""sha256 of a source, computed in a thread while the output is written, and remembered per file.

Hashing 3.4 GB takes about 2 s on one core, longer than copying it. Like the web UIs' hash caches, the digest is
remembered per file under a key of (resolved path, size, mtime_ns, ctime_ns, inode, device): a file that changes
gets a new ctime (which no user can set, unlike mtime) and is hashed again. The cache is a small JSON file in
``$UNETKIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/unetkit``, else ``~/.cache/unetkit``); ``UNETKIT_HASH_CACHE=0``
turns it off. A cache that
cannot be read or written is ignored, never an error."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from unetkit.errors import UnetkitError

CACHE_FILE = "sha256.json"
MAX_ENTRIES = 2000


def cache_dir() -> Path:
    if d := os.environ.get("UNETKIT_CACHE_DIR"):
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unetkit"


def _enabled() -> bool:
    return os.environ.get("UNETKIT_HASH_CACHE", "1").lower() not in ("0", "false", "no", "off")


def _file_key(f: Path) -> str:
    st = os.stat(f)
    # st_ctime_ns too: no user can set it, so a file rewritten in place with its mtime restored is hashed again
    return f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{st.st_dev}"


def _key(files: tuple[Path, ...]) -> str:
    return "\n".join(_file_key(f) for f in files)


def _load() -> dict[str, str]:
    try:
        data = json.loads((cache_dir() / CACHE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_key(files: tuple[Path, ...]) -> str | None:
    """The cache key of ``files`` as they are now (None when caching is off or a file cannot be stat'ed)."""
    if not _enabled():
        return None
    try:
        return _key(files)
    except OSError:
        return None


def cached_sha256(key: str | None) -> str | None:
    """The digest remembered under ``key`` (see ``file_key``), or None."""
    if key is None:
        return None
    value = _load().get(key)
    return value if isinstance(value, str) and len(value) == 64 else None


def remember_sha256(key: str | None, digest: str) -> None:
    if key is None:
        return
    try:
        data = _load()
        data.pop(key, None)
        data[key] = digest
        while len(data) > MAX_ENTRIES:  # oldest first (insertion order)
            data.pop(next(iter(data)))
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{CACHE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, d / CACHE_FILE)
    except OSError:
        pass


class FileHasher:
    """sha256 of the source file(s), computed in a thread while the output is written (hashlib releases the
    GIL on large buffers, so it runs on the second core). Several files (shards) hash as their concatenation.
    A digest remembered for the same unchanged files is used without reading them; ``cached`` says which.
    ``background = False`` (class-wide: set by batch engine workers, whose cores are spoken for) hashes in the
    caller's turn, inside ``result()``, instead of in a thread of its own."""

    background = True

    def __init__(self, files: tuple[Path, ...]):
        self.files = tuple(Path(f) for f in files)
        self._key = file_key(self.files)  # taken before reading: a file changed meanwhile is not remembered
        self._digest: str | None = cached_sha256(self._key)
        self.cached = self._digest is not None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        if not self.cached and self.background:
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
            if self._key is not None and file_key(self.files) == self._key:
                remember_sha256(self._key, self._digest)
        except BaseException as e:  # reported by result()
            self._error = e

    def result(self) -> str:
        if self.cached:
            assert self._digest is not None
            return self._digest
        if self._thread.ident is None:  # never started: hash now
            self._thread.start()
        self._thread.join()
        if self._error is not None:
            raise UnetkitError(f"could not hash the source: {self._error}") from self._error
        assert self._digest is not None
        return self._digest
