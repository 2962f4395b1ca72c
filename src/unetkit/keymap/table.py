"""THE key table: LDM (original/CompVis) names <-> diffusers names, for SD1.x, SD2.x and SDXL UNets.

Small leaf tables below are data. ``build_pairs`` walks a :class:`Topology` once and expands them into the
explicit list of ``(ldm_key, diffusers_key)`` pairs; :class:`KeyMap` builds both lookup dicts from that list and
raises if either side has a duplicate, so the map is a bijection by construction. Conversion in either
direction is exact dict lookup: no string replacement, no substring tests, no order dependence.

LDM block numbering (L = layers_per_block, i = block, j = layer):

    input_blocks.0.0                         <-> conv_in
    input_blocks.{(L+1)i+j+1}.0 / .1         <-> down_blocks.i.resnets.j / down_blocks.i.attentions.j
    input_blocks.{(L+1)(i+1)}.0.op           <-> down_blocks.i.downsamplers.0.conv        (i < n-1)
    middle_block.0 / .1 / .2                 <-> mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{(L+1)i+j}.0 / .1          <-> up_blocks.i.resnets.j / up_blocks.i.attentions.j   (j <= L)
    output_blocks.{(L+1)i+L}.{2|1}.conv      <-> up_blocks.i.upsamplers.0.conv  (2 if the block has attention)
    time_embed.0 / .2                        <-> time_embedding.linear_1 / linear_2
    out.0 / out.2                            <-> conv_norm_out / conv_out
    time_embedding.cond_proj (LCM)           <-> time_embedding.cond_proj
    label_emb.0.0 / label_emb.0.2 (SDXL)     <-> add_embedding.linear_1 / linear_2

Transformer stacks of any depth (SDXL: 2 and 10, the refiner 4) expand ``transformer_blocks.{t}`` per block.
"""

from __future__ import annotations

from functools import lru_cache

from unetkit.errors import KeyMapError, list_some
from unetkit.keymap.topology import COND_PROJ, COND_PROJ_LDM_ALIASES, Topology

WEIGHT_BIAS = ("weight", "bias")

#: Fixed top-level modules, (ldm, diffusers).
TOP_LEVEL = (
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
)

#: SDXL's "text_time" additional embedding, (ldm, diffusers): present when the topology says so.
ADD_EMBEDDING = (
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
)

#: Inside a resnet block, (ldm, diffusers).
RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
)
RESNET_SHORTCUT = ("skip_connection", "conv_shortcut")

#: Inside a spatial transformer the sub-names are identical in both layouts.
ATTENTION_OUTER = ("norm", "proj_in", "proj_out")  # weight + bias each
TRANSFORMER_BLOCK = (
    "norm1.weight", "norm1.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "norm2.weight", "norm2.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "norm3.weight", "norm3.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
)  # fmt: skip

Pair = tuple[str, str]


def _module(ldm: str, diffusers: str) -> list[Pair]:
    return [(f"{ldm}.{p}", f"{diffusers}.{p}") for p in WEIGHT_BIAS]


def _resnet(ldm: str, diffusers: str, shortcut: bool) -> list[Pair]:
    leaves = RESNET + ((RESNET_SHORTCUT,) if shortcut else ())
    return [pair for a, b in leaves for pair in _module(f"{ldm}.{a}", f"{diffusers}.{b}")]


def _attention(ldm: str, diffusers: str, depth: int) -> list[Pair]:
    suffixes = [f"{m}.{p}" for m in ATTENTION_OUTER for p in WEIGHT_BIAS]
    suffixes += [f"transformer_blocks.{t}.{leaf}" for t in range(depth) for leaf in TRANSFORMER_BLOCK]
    return [(f"{ldm}.{s}", f"{diffusers}.{s}") for s in suffixes]


def build_pairs(topo: Topology) -> list[Pair]:
    """Expand the leaf tables over ``topo`` into every (ldm_key, diffusers_key) pair, in model order."""
    per = topo.layers_per_block + 1
    n = topo.n_blocks
    pairs: list[Pair] = []
    for ldm, diffusers in TOP_LEVEL[:2]:
        pairs += _module(ldm, diffusers)
    if topo.has_cond_proj:
        pairs.append((COND_PROJ, COND_PROJ))
    if topo.has_add_embedding:
        for ldm, diffusers in ADD_EMBEDDING:
            pairs += _module(ldm, diffusers)
    pairs += _module(*TOP_LEVEL[2])
    for i in range(n):
        for j in range(topo.layers_per_block):
            k = per * i + j + 1
            pairs += _resnet(f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", topo.down_shortcut[i][j])
            if topo.down_attention[i]:
                pairs += _attention(f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", topo.down_attention[i])
        if i < n - 1:
            pairs += _module(f"input_blocks.{per * (i + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
    pairs += _resnet("middle_block.0", "mid_block.resnets.0", False)
    if topo.mid_attention:
        pairs += _attention("middle_block.1", "mid_block.attentions.0", topo.mid_attention)
    pairs += _resnet("middle_block.2", "mid_block.resnets.1", False)
    for i in range(n):
        for j in range(per):
            k = per * i + j
            pairs += _resnet(f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", topo.up_shortcut[i][j])
            if topo.up_attention[i]:
                pairs += _attention(f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", topo.up_attention[i])
        if i < n - 1:
            slot = 2 if topo.up_attention[i] else 1
            pairs += _module(
                f"output_blocks.{per * i + topo.layers_per_block}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv"
            )
    pairs += _module(*TOP_LEVEL[3])
    pairs += _module(*TOP_LEVEL[4])
    return pairs


class KeyMap:
    """A checked bijection between LDM keys and diffusers keys (both without any file prefix)."""

    def __init__(self, pairs: list[Pair]):
        self.pairs = tuple(pairs)
        self.ldm_to_diffusers: dict[str, str] = {}
        self.diffusers_to_ldm: dict[str, str] = {}
        for ldm, diffusers in self.pairs:
            if ldm in self.ldm_to_diffusers:
                raise KeyMapError(f"key table bug: LDM key {ldm!r} is produced twice")
            if diffusers in self.diffusers_to_ldm:
                raise KeyMapError(f"key table bug: diffusers key {diffusers!r} is produced twice")
            self.ldm_to_diffusers[ldm] = diffusers
            self.diffusers_to_ldm[diffusers] = ldm
        #: names accepted on read that are written under another name
        self.ldm_aliases = {a: COND_PROJ for a in COND_PROJ_LDM_ALIASES if COND_PROJ in self.ldm_to_diffusers}

    @staticmethod
    @lru_cache(maxsize=32)
    def for_topology(topo: Topology) -> KeyMap:
        return KeyMap(build_pairs(topo))

    def __len__(self) -> int:
        return len(self.pairs)

    def to_diffusers(self, ldm_key: str) -> str | None:
        """The diffusers name of an LDM key (aliases accepted), or None when the key is not in the table."""
        return self.ldm_to_diffusers.get(self.ldm_aliases.get(ldm_key, ldm_key))

    def to_ldm(self, diffusers_key: str) -> str | None:
        return self.diffusers_to_ldm.get(diffusers_key)

    def lookup(self, key: str, layout: str) -> str | None:
        """Map a key of ``layout`` ('ldm' or 'diffusers') to its diffusers name."""
        if layout == "ldm":
            return self.to_diffusers(key)
        return key if key in self.diffusers_to_ldm else None

    def rename_all(self, keys: list[str], layout: str) -> dict[str, str]:
        """Map every key of ``layout`` to its diffusers name; unknown keys raise one error listing them."""
        out, unknown = {}, []
        for k in keys:
            d = self.lookup(k, layout)
            if d is None:
                unknown.append(k)
            else:
                out[k] = d
        if unknown:
            raise KeyMapError(
                f"{len(unknown)} {layout} key(s) are not part of this UNet's key table: {list_some(unknown)}"
            )
        return out
