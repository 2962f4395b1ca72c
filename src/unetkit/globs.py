"""Name globs, one rule for every policy: the GGUF recipe's ``--keep``/``--override`` and the runtime backends'
``--include``/``--exclude`` match names the same way."""

from __future__ import annotations

import fnmatch


def matches(name: str, pattern: str) -> bool:
    """Glob match on the whole name; a pattern without wildcards matches any name containing it as dotted parts
    (``attn2.to_v`` matches ``...attn2.to_v.weight``)."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return f".{pattern}." in f".{name}." or name == pattern
