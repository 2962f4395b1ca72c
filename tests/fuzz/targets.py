"""Fuzz targets: one per parser unetkit owns, each a function of random bytes/choices that builds an input in a
folder and runs the parser. The contract (``run``): every input gives a result or a ``UnetkitError``; anything else
is a crash. Seeds are valid files made from a tiny UNet, then mutated with structure (JSON values, header fields)
and without (byte flips, truncation). Used by tests/test_fuzz.py (hypothesis, in CI) and by
benchmarks/fuzz_parsers.py (counts per parser, also against an older tree)."""

from __future__ import annotations

import copy
import json
import random
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: the values a JSON mutation may put anywhere
ODD_VALUES: list[Any] = [
    None, True, 0, -1, 1, 2**62, -(2**63), 1e308, float("nan"), "", "F32", "I32", "BOGUS", [], {}, [0], [-5, 3],
    [2**62, 4], [0, 2**40], {"a": 1}, "x" * 300, [[[[[]]]]],
]  # fmt: skip


def mutate_json(rng: random.Random, obj: Any, n: int = 3) -> Any:
    """``obj`` with ``n`` random structural edits: a value replaced, a key dropped or added, a list cut."""
    obj = json.loads(json.dumps(obj))
    for _ in range(n):
        path = []
        node = obj
        while isinstance(node, (dict, list)) and node and rng.random() < 0.7:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            path.append((node, key))
            node = node[key]
        if not path:
            return _odd(rng) if rng.random() < 0.3 else obj
        parent, key = path[-1]
        r = rng.random()
        if r < 0.6:
            parent[key] = _odd(rng)
        elif r < 0.8 and isinstance(parent, dict):
            del parent[key]
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "__metadata__", key + "x"])] = _odd(rng)
        else:
            del parent[key:]
    return obj


def _odd(rng: random.Random) -> Any:
    """One of ODD_VALUES, copied: a later edit that descends into an inserted list must not change the table (it
    did: later inputs then drew differently for the same choices, which hypothesis reports as flaky generation)."""
    return copy.deepcopy(rng.choice(ODD_VALUES))


def mutate_bytes(rng: random.Random, data: bytes, region: int | None = None) -> bytes:
    """Flip, overwrite or cut bytes, mostly in the first ``region`` bytes (the header)."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        end = min(len(b), region or len(b))
        r = rng.random()
        at = rng.randrange(max(end, 1))
        if r < 0.5 and at < len(b):
            b[at] ^= 1 << rng.randrange(8)
        elif r < 0.8 and len(b) >= at + 8:
            b[at : at + 8] = struct.pack("<Q", rng.choice([0, 1, 31, 2**31, 2**40, 2**63, 2**64 - 1]))
        elif r < 0.9:
            del b[rng.randrange(max(len(b), 1)) :]
        else:
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(b)


class Seeds:
    """Valid inputs: a tiny UNet's LDM safetensors, a Q8_0 GGUF of it, its diffusers folder, a small Lightning-style
    pickle. ``build`` makes them with this tree; ``Seeds(folder)`` reads them back (any tree can then be fuzzed)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.safetensors = folder / "seed.safetensors"
        self.gguf = folder / "seed.gguf"
        self.diffusers = folder / "seed_unet"
        raw = self.safetensors.read_bytes()
        (hlen,) = struct.unpack("<Q", raw[:8])
        self.st_header = json.loads(raw[8 : 8 + hlen])
        self.st_data = raw[8 + hlen :]
        self.config = json.loads((self.diffusers / "config.json").read_text())
        self.ckpt = (folder / "seed.ckpt").read_bytes()

    @classmethod
    def build(cls, folder: Path) -> Seeds:
        import torch

        from helpers import save_ldm, tiny_unet
        from unetkit.conversion import convert
        from unetkit.gguf_export import quantize_file

        src = save_ldm(tiny_unet(), folder / "seed.safetensors")
        quantize_file(src, folder / "seed.gguf", "gguf:Q8_0")
        convert(src, folder / "seed_unet", to="diffusers")
        torch.save({"state_dict": {"w": torch.zeros(64)}, "global_step": 3}, folder / "seed.ckpt")
        return cls(folder)


def safetensors_header(seeds: Seeds, rng: random.Random, work: Path) -> Callable[[], Any]:
    from unetkit.formats import read

    header = mutate_json(rng, seeds.st_header, rng.randint(1, 4))
    raw = json.dumps(header).encode()
    p = work / "f.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + seeds.st_data)
    return lambda: _touch(read(p))


def safetensors_bytes(seeds: Seeds, rng: random.Random, work: Path) -> Callable[[], Any]:
    from unetkit.formats import read

    p = work / "b.safetensors"
    p.write_bytes(mutate_bytes(rng, seeds.safetensors.read_bytes(), 4096))
    return lambda: _touch(read(p))


def gguf_header(seeds: Seeds, rng: random.Random, work: Path) -> Callable[[], Any]:
    from unetkit.formats import read

    p = work / "g.gguf"
    data = seeds.gguf.read_bytes()
    p.write_bytes(mutate_bytes(rng, data, 64 << 10))
    return lambda: _touch(read(p))


def diffusers_config(seeds: Seeds, rng: random.Random, work: Path) -> Callable[[], Any]:
    from unetkit.resolve import open_unet

    folder = _copy_folder(seeds, work)
    (folder / "config.json").write_text(json.dumps(mutate_json(rng, seeds.config, rng.randint(1, 3))))
    return lambda: open_unet(folder)


def shard_index(seeds: Seeds, rng: random.Random, work: Path) -> Callable[[], Any]:
    from unetkit.resolve import open_unet

    folder = _copy_folder(seeds, work)
    weights = folder / "diffusion_pytorch_model.safetensors"
    names = [k for k in seeds.st_header if k != "__metadata__"]
    from unetkit.formats import read

    index = {"weight_map": {k: weights.name for k in read(weights).entries}}
    index = mutate_json(rng, index, rng.randint(1, 3))
    if rng.random() < 0.3 or not isinstance(index, dict):
        index = {"weight_map": {rng.choice(names + ["x"]): rng.choice(["../x", "/etc/hostname", "nope", weights.name])}}
    weights.rename(folder / "diffusion_pytorch_model-1.safetensors")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return lambda: open_unet(folder)


def user_config(seeds: Seeds, rng: random.Random, work: Path) -> Callable[[], Any]:
    from unetkit.resolve import open_unet

    p = work / "config.json"
    p.write_text(json.dumps(mutate_json(rng, seeds.config, rng.randint(1, 3))))
    return lambda: open_unet(seeds.safetensors, config=p)


def pickle_bytes(seeds: Seeds, rng: random.Random, work: Path) -> Callable[[], Any]:
    from unetkit.formats import read

    p = work / "p.ckpt"
    if rng.random() < 0.5:
        p.write_bytes(mutate_bytes(rng, seeds.ckpt))
    else:  # a structurally valid zip whose members are damaged
        src = work / "src.ckpt"
        src.write_bytes(seeds.ckpt)
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(p, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info.filename)
                zout.writestr(info, mutate_bytes(rng, data) if rng.random() < 0.5 else data)
    return lambda: _touch(read(p))


TARGETS: dict[str, Callable[[Seeds, random.Random, Path], Callable[[], Any]]] = {
    "safetensors header (JSON)": safetensors_header,
    "safetensors bytes": safetensors_bytes,
    "GGUF header and KV/tensor info": gguf_header,
    "diffusers config.json": diffusers_config,
    "diffusers shard index": shard_index,
    "--config": user_config,
    "pickle / zip checkpoints": pickle_bytes,
}


def _copy_folder(seeds: Seeds, work: Path) -> Path:
    import shutil

    out = work / "unet"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(seeds.diffusers, out)
    return out


def _touch(ckpt: Any) -> Any:
    """Load every tensor a reader returned: lazy loaders must keep the contract too."""
    for entry in list(ckpt.entries.values())[:64]:
        entry.load()
    return ckpt


def run(target: Callable[[], Any]) -> str:
    """'ok', 'error' (a UnetkitError), or raise: anything else breaks the contract."""
    from unetkit.errors import UnetkitError

    try:
        target()
    except UnetkitError:
        return "error"
    return "ok"
