"""The house rules, checked: ``import unetkit`` and the header-only commands import no torch (in a fresh process);
no module of the package imports the ``unetkit`` facade; every module sits on a floor of the import-linter
contract (``lint-imports`` checks that imports point down)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from helpers import save_ldm, tiny_unet

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "unetkit"
HEAVY = ("torch", "diffusers", "numpy")


def _fresh(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return which of HEAVY it ended up importing."""
    probe = code + f"\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return [m for m in last.split(",") if m]


def _cli(*argv: str) -> str:
    return (
        "import contextlib, io\nfrom unetkit.cli.app import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        code = main({list(argv)!r})\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "assert code in (0, None), code\n"
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from unetkit.gguf_export import quantize_file

    d = tmp_path_factory.mktemp("imports")
    st = save_ldm(tiny_unet(), d / "m.safetensors")
    quantize_file(st, d / "m.gguf", "gguf:Q8_0")
    return d


def test_import_unetkit_imports_no_torch():
    assert _fresh("import unetkit\nassert unetkit.__version__") == []


def test_public_names_resolve_lazily():
    assert _fresh("import unetkit\nunetkit.convert, unetkit.open_unet, unetkit.UnetkitError") == []
    assert "torch" in _fresh("import unetkit\nunetkit.load_unet")


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["convert", "--help"],
        ["quantize", "--help"],
        ["verify", "--help"],
        ["bench", "--help"],
        ["inspect", "--help"],
    ],
)
def test_help_imports_no_torch(argv):
    assert _fresh(_cli(*argv)) == []


@pytest.mark.parametrize("name", ["m.safetensors", "m.gguf"])
def test_header_only_inspect_imports_no_torch(files, name):
    assert _fresh(_cli("inspect", str(files / name), "--no-scan", "--json")) == []
    assert _fresh(_cli("inspect", str(files / name), "--no-scan")) == []


def test_byte_copy_convert_imports_no_torch(files, tmp_path):
    assert _fresh(_cli("convert", str(files / "m.safetensors"), str(tmp_path / "d"), "--to", "diffusers")) == []
    assert _fresh(_cli("convert", str(tmp_path / "d"), str(tmp_path / "back.safetensors"), "--to", "ldm")) == []
    assert (tmp_path / "back.safetensors").read_bytes()[8:9] == b"{"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def test_no_module_imports_the_facade():
    offenders = []
    for name, tree in _modules().items():
        if name == "unetkit":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "unetkit" for a in node.names):
                offenders.append(f"{name}: import unetkit")
            if isinstance(node, ast.ImportFrom) and node.module == "unetkit" and node.level == 0:
                for a in node.names:  # a submodule through the package is fine; a public name of the facade is not
                    if not (SRC / a.name).is_dir() and not (SRC / f"{a.name}.py").is_file():
                        offenders.append(f"{name}: from unetkit import {a.name}")
    assert offenders == []


def test_every_module_is_on_a_floor_of_the_contract():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    floors = next(c for c in config if c["name"].startswith("floors"))["layers"]
    named = {m.strip() for layer in floors for m in layer.split("|")}
    top = {".".join(n.split(".")[:2]) for n in _modules() if n != "unetkit"}
    assert top - named == set(), "add these modules to a floor in pyproject.toml"
    assert named - top == set(), "these floors name modules that do not exist"


def test_no_function_shadows_its_module():
    clashes = []
    for name, tree in _modules().items():
        leaf = name.rsplit(".", 1)[-1]
        if any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == leaf for n in tree.body):
            clashes.append(name)
    assert clashes == []
