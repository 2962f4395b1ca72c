"""Names only, never tensor data: the LDM <-> diffusers key table, file prefixes and ignored keys."""

from unetkit.keymap.table import KeyMap, build_pairs
from unetkit.keymap.topology import COND_PROJ, Topology

__all__ = ["COND_PROJ", "KeyMap", "Topology", "build_pairs"]
