"""The names-only structure of a UNet: which blocks, layers, attentions and shortcuts exist.

The key map needs nothing else. A ``Topology`` is derived either from a diffusers config (when the config is
known) or from tensor names alone (when detecting a file), so detection and conversion share one key table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from unetkit.errors import ModelDetectionError

#: The LDM name of LCM's guidance projection (no standard LDM name exists: this is what diffusers' own reverse
#: script emits, a diffusers name under the LDM prefix) and the alias seen in some files.
COND_PROJ = "time_embedding.cond_proj.weight"
COND_PROJ_LDM_ALIASES = ("time_embed.cond_proj.weight",)
#: SDXL's pooled-text + size conditioning ("text_time"): the first layer's name in each layout
ADD_EMBEDDING_LDM = "label_emb.0.0.weight"
ADD_EMBEDDING = "add_embedding.linear_1.weight"


@dataclass(frozen=True)
class Topology:
    """Which modules exist. Up-block tuples are in diffusers order (``up_blocks.0`` is the deepest)."""

    n_blocks: int
    layers_per_block: int
    down_attention: tuple[int, ...]  # transformer depth per down block, 0 = no attention
    up_attention: tuple[int, ...]  # transformer depth per up block, 0 = no attention
    mid_attention: int  # transformer depth of the mid block
    down_shortcut: tuple[tuple[bool, ...], ...]  # per down block, per resnet: has conv_shortcut
    up_shortcut: tuple[tuple[bool, ...], ...]  # per up block, per resnet (layers_per_block + 1)
    has_cond_proj: bool = False
    has_add_embedding: bool = False  # SDXL's label_emb <-> add_embedding (addition_embed_type "text_time")

    @staticmethod
    def from_config(config: Mapping[str, Any]) -> Topology:
        """Derive the topology of ``UNet2DConditionModel(**config)`` without building it."""
        channels = list(config["block_out_channels"])
        n = len(channels)
        layers = config.get("layers_per_block", 2)
        if not isinstance(layers, int):
            raise ModelDetectionError(f"per-block layers_per_block {layers!r} is not supported (SD1.x/2.x use one int)")
        depth = config.get("transformer_layers_per_block", 1)
        depths = list(depth) if isinstance(depth, (list, tuple)) else [depth] * n
        down_types = list(config["down_block_types"])
        up_types = list(config["up_block_types"])
        down_att = tuple(depths[i] if down_types[i].startswith("CrossAttn") else 0 for i in range(n))
        rev_depths = list(reversed(depths))
        up_att = tuple(rev_depths[i] if up_types[i].startswith("CrossAttn") else 0 for i in range(n))

        down_io, up_io = resnet_channels(config)
        down_sc = [tuple(i != o for i, o in block) for block in down_io]
        up_sc = [tuple(i != o for i, o in block) for block in up_io]
        mid = depths[-1] if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") else 0
        return Topology(
            n_blocks=n,
            layers_per_block=layers,
            down_attention=down_att,
            up_attention=up_att,
            mid_attention=mid,
            down_shortcut=tuple(down_sc),
            up_shortcut=tuple(up_sc),
            has_cond_proj=bool(config.get("time_cond_proj_dim")),
            has_add_embedding=config.get("addition_embed_type") == "text_time",
        )

    @staticmethod
    def from_ldm_names(names: Iterable[str]) -> Topology:
        """Read the topology from un-prefixed LDM names (``input_blocks.4.1.proj_in.weight``, ...)."""
        names = set(names)
        inputs = _indices(names, r"input_blocks\.(\d+)\.")
        outputs = _indices(names, r"output_blocks\.(\d+)\.")
        if not inputs or not outputs or 0 not in inputs:
            raise ModelDetectionError("LDM names without input_blocks.0 / output_blocks: not a UNet")
        ops = sorted(_indices(names, r"input_blocks\.(\d+)\.0\.op\."))
        layers = ops[0] - 1 if ops else max(inputs)
        per = layers + 1
        if layers < 1 or (max(inputs) + 1) % per or (max(outputs) + 1) % per:
            raise ModelDetectionError(
                f"LDM block indices do not form a regular UNet: input_blocks 0..{max(inputs)}, "
                f"output_blocks 0..{max(outputs)}, first downsampler at input_blocks.{ops[0] if ops else '-'}"
            )
        n = (max(inputs) + 1) // per

        def depth(prefix: str) -> int:
            return len(_indices(names, re.escape(prefix) + r"transformer_blocks\.(\d+)\."))

        down_att = tuple(depth(f"input_blocks.{per * i + 1}.1.") for i in range(n))
        up_att = tuple(depth(f"output_blocks.{per * i}.1.") for i in range(n))
        down_sc = tuple(
            tuple(f"input_blocks.{per * i + j + 1}.0.skip_connection.weight" in names for j in range(layers))
            for i in range(n)
        )
        up_sc = tuple(
            tuple(f"output_blocks.{per * i + j}.0.skip_connection.weight" in names for j in range(layers + 1))
            for i in range(n)
        )
        return Topology(
            n_blocks=n,
            layers_per_block=layers,
            down_attention=down_att,
            up_attention=up_att,
            mid_attention=depth("middle_block.1."),
            down_shortcut=down_sc,
            up_shortcut=up_sc,
            has_cond_proj=COND_PROJ in names or any(a in names for a in COND_PROJ_LDM_ALIASES),
            has_add_embedding=ADD_EMBEDDING_LDM in names,
        )

    @staticmethod
    def from_diffusers_names(names: Iterable[str]) -> Topology:
        """Read the topology from diffusers names (``down_blocks.1.attentions.0.proj_in.weight``, ...)."""
        names = set(names)
        downs = _indices(names, r"down_blocks\.(\d+)\.")
        ups = _indices(names, r"up_blocks\.(\d+)\.")
        if not downs or not ups:
            raise ModelDetectionError("diffusers names without down_blocks / up_blocks: not a UNet")
        n = max(downs) + 1
        if downs != set(range(n)) or ups != set(range(n)):
            raise ModelDetectionError(
                f"diffusers block indices are not contiguous: down_blocks {sorted(downs)}, up_blocks {sorted(ups)}"
            )
        layers = len(_indices(names, r"down_blocks\.0\.resnets\.(\d+)\."))

        def depth(prefix: str) -> int:
            return len(_indices(names, re.escape(prefix) + r"transformer_blocks\.(\d+)\."))

        return Topology(
            n_blocks=n,
            layers_per_block=layers,
            down_attention=tuple(depth(f"down_blocks.{i}.attentions.0.") for i in range(n)),
            up_attention=tuple(depth(f"up_blocks.{i}.attentions.0.") for i in range(n)),
            mid_attention=depth("mid_block.attentions.0."),
            down_shortcut=tuple(
                tuple(f"down_blocks.{i}.resnets.{j}.conv_shortcut.weight" in names for j in range(layers))
                for i in range(n)
            ),
            up_shortcut=tuple(
                tuple(f"up_blocks.{i}.resnets.{j}.conv_shortcut.weight" in names for j in range(layers + 1))
                for i in range(n)
            ),
            has_cond_proj=COND_PROJ in names,
            has_add_embedding=ADD_EMBEDDING in names,
        )

    def check_supported(self) -> None:
        """Up-block attention must mirror the down blocks' (what every UNet2DConditionModel has); a family checks
        the rest (transformer depths) itself."""
        if tuple(reversed(self.down_attention)) != self.up_attention:
            raise ModelDetectionError(
                f"not a UNet2DConditionModel layout: up-block attention {self.up_attention} does not mirror down "
                f"{self.down_attention}"
            )


def resnet_channels(config: Mapping[str, Any]) -> tuple[list[list[tuple[int, int]]], list[list[tuple[int, int]]]]:
    """(in_channels, out_channels) of every resnet, per down block and per up block (diffusers order), exactly as
    ``UNet2DConditionModel`` wires them (up-block inputs include the concatenated skip connection)."""
    channels = list(config["block_out_channels"])
    n = len(channels)
    layers = config.get("layers_per_block", 2)
    down = []
    for i in range(n):
        block_in = channels[i - 1] if i > 0 else channels[0]
        down.append([(block_in if j == 0 else channels[i], channels[i]) for j in range(layers)])
    rev = list(reversed(channels))
    up = []
    for i in range(n):
        out_ch, prev_out, block_in = rev[i], rev[i - 1] if i > 0 else rev[0], rev[min(i + 1, n - 1)]
        up.append(
            [
                ((prev_out if j == 0 else out_ch) + (block_in if j == layers else out_ch), out_ch)
                for j in range(layers + 1)
            ]
        )
    return down, up


def _indices(names: Iterable[str], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    found = set()
    for name in names:
        m = rx.match(name)
        if m:
            found.add(int(m.group(1)))
    return found
