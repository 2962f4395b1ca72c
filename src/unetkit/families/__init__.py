"""Model families, each declared once: ``sd1.py`` (SD1.x), ``sd2.py`` (SD2.x) and ``sdxl.py`` (SDXL); ``base.py``
says what a family declares. ``detect`` picks the family of tensors from their names and shapes alone;
``for_config`` the family of a complete diffusers config; ``named`` one by its name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from unetkit.errors import ModelDetectionError
from unetkit.families.base import Family, Shape
from unetkit.families.sd1 import SD1
from unetkit.families.sd2 import SD2
from unetkit.families.sdxl import SDXL
from unetkit.keymap.topology import Topology

#: every family unetkit handles, most specific first
FAMILIES: tuple[Family, ...] = (SD1, SD2, SDXL)
#: "SD1.x, SD2.x, SDXL": what messages say unetkit reads
TITLES = ", ".join(f.title for f in FAMILIES)


def detect(topo: Topology, shapes: Mapping[str, Shape]) -> Family:
    """The one family whose UNets have this topology and these shapes (diffusers names)."""
    found = [f for f in FAMILIES if f.claims(topo, shapes)]
    if len(found) != 1:
        names = ", ".join(f.title for f in found) or "none"
        raise ModelDetectionError(
            f"cannot tell the model family from the tensors (claimed by: {names}); unetkit handles {TITLES}"
        )
    found[0].check_topology(topo)
    return found[0]


def for_config(config: Mapping[str, Any]) -> Family:
    """The family a complete diffusers UNet config describes."""
    found = [f for f in FAMILIES if f.claims_config(config)]
    if len(found) != 1:
        raise ModelDetectionError(
            f"the config describes no UNet of a known family ({TITLES}): "
            f"use_linear_projection={config.get('use_linear_projection')!r}, "
            f"addition_embed_type={config.get('addition_embed_type')!r}"
        )
    return found[0]


def named(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ModelDetectionError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


__all__ = ["FAMILIES", "TITLES", "Family", "detect", "for_config", "named"]
