"""Runtime quantization (torchao, optimum-quanto): coverage including Conv2d, quality, save and bit-exact reload
in a fresh process, clear errors for what cannot run here, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unetkit
from helpers import forward, inputs, save_ldm, tiny_unet
from unetkit.cli.app import main
from unetkit.errors import BackendUnavailable, FormatError, KeyMapError, OutputExistsError, QuantError
from unetkit.formats.quantized_dir import MANIFEST, WEIGHTS
from unetkit.metrics import compare

TESTS = Path(__file__).resolve().parents[1]

#: method -> minimum output SQNR (dB) on the tiny random-weight UNets (measured: int8 28-30, float8 18-19,
#: qint4 8-9, qint2 about 0: random dense weights are the worst case for low bit widths; qint2 only has to run)
SQNR_MIN = {
    "torchao:int8-weight-only": 25.0,
    "torchao:int8-dynamic": 24.0,
    "torchao:float8-weight-only": 15.0,
    "quanto:qint8": 25.0,
    "quanto:qint4": 6.0,
    "quanto:qint2": -3.0,
    "quanto:qfloat8": 15.0,
}
#: methods that cannot run on a CPU-only machine, with a phrase their error must contain
CPU_UNAVAILABLE = {"torchao:int4-weight-only": "CUDA"}

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only machine")


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


#: SD1.x (plain and LCM's cond_proj) and SDXL's three shapes (base, refiner, inpainting: the add embedding, deep
#: transformer stacks, three or four levels)
VARIANTS = ["sd1.x", "sd1.x-lcm", "sdxl", "sdxl-refiner", "sdxl-inpainting"]
#: each method on two variants, so that every variant meets every backend (torchao: the first three methods,
#: quanto: the last four) without the whole 7 x 5 product, which doubled the file's time for no new path: which
#: layers stay float is the variant's policy, the same for every method of a backend
CASES = [(m, VARIANTS[v]) for i, m in enumerate(SQNR_MIN) for v in (i % 5, (i + 3) % 5)]
#: the cases reloaded in a fresh process: each method's first (the reload path is the method's, not the variant's)
RELOADED = {m: v for m, v in reversed(CASES)}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Every case (method, variant): quantized, run and saved here; then each method's reloaded case (RELOADED)
    loaded in ONE fresh process (one interpreter start, not seven, keeps the file fast). Failures are kept and
    re-raised per case."""
    root = tmp_path_factory.mktemp("runtime-quant")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results, jobs = {}, []
    for method, variant in CASES:
        case = root / f"{method.replace(':', '_')}-{variant}"
        try:
            unet = tiny_unet(variant)
            args = inputs(unet)
            ref = forward(unet, args)
            n_params = sum(p.numel() for p in unet.parameters())
            unet, report = unetkit.quantize(unet, method)
            got = forward(unet, args)
            unetkit.save_quantized(unet, case)
            torch.save(args, f"{case}.args.pt")
            if RELOADED[method] == variant:
                jobs.append([str(case), f"{case}.args.pt", f"{case}.out.pt"])
            results[method, variant] = dict(report=report, ref=ref, got=got, folder=case, params=n_params)
        except Exception as e:
            results[method, variant] = e
    (root / "jobs.json").write_text(json.dumps(jobs))
    code = (
        "import json, sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]);"
        "from helpers import forward; import unetkit\n"
        "for folder, args, out in json.load(open(sys.argv[2])):\n"
        "    torch.save(forward(unetkit.load_unet(folder), torch.load(args)), out)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(TESTS), str(root / "jobs.json")], capture_output=True, text=True, timeout=300
    )
    torch.set_num_threads(threads)
    return results, p


@pytest.mark.parametrize(("method", "variant"), CASES)
def test_method_quantizes_convs_and_reloads_bit_exact(method, variant, cases):
    results, proc = cases
    case = results[method, variant]
    if isinstance(case, Exception):
        raise case
    report = case["report"]
    cov = report.coverage()
    for kind in ("Linear", "Conv2d 1x1", "Conv2d 3x3"):
        assert cov[kind]["params_quantized"] > 0, (kind, cov)
    assert report.params_total == case["params"]
    # 3x3 convolutions are most of the weights: nearly all of them must be quantized
    assert cov["Conv2d 3x3"]["params_quantized"] > 10 * cov["Conv2d 3x3"]["params_kept"]
    by_name = {d.name: d for d in report.decisions}
    for kept in ("conv_in", "conv_out", "time_embedding.linear_1", "conv_norm_out"):
        assert not by_name[kept].quantized and by_name[kept].reason
    if variant == "sd1.x-lcm":
        assert not by_name["time_embedding.cond_proj"].quantized
    if variant.startswith("sdxl"):  # the family's sensitive list: the add embedding stays float too
        for kept in ("add_embedding.linear_1", "add_embedding.linear_2"):
            assert not by_name[kept].quantized and "add embedding" in by_name[kept].reason
        # the deep stacks are quantized: every transformer block of the deepest level
        deep = [d for d in report.decisions if ".transformer_blocks." in d.name and d.kind == "Linear"]
        assert deep and all(d.quantized for d in deep)
    if method == "torchao:int8-dynamic":
        conv3 = next(d for d in report.decisions if d.kind == "Conv2d 3x3" and d.quantized)
        assert "activations stay float" in conv3.reason

    stats = compare(case["ref"], case["got"])
    assert stats.sqnr_db > SQNR_MIN[method], f"{method}: {stats}"

    folder = case["folder"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["method"] == method and manifest["versions"]["torch"] == torch.__version__
    assert len(manifest["report"]["decisions"]) == len(report.decisions)
    out = Path(f"{folder}.out.pt")
    if RELOADED[method] == variant:  # reloaded in a fresh process: bit for bit the output before saving
        assert out.is_file(), proc.stderr[-3000:]
        again = torch.load(out)
        assert torch.equal(again, case["got"]), compare(case["got"], again)


def test_reload_in_process_keeps_report_and_refuses_requantize(tmp_path):
    unet, report = unetkit.quantize(tiny_unet(), "torchao:int8-weight-only")
    unetkit.save_quantized(unet, tmp_path / "q")
    back = unetkit.load_unet(tmp_path / "q")
    assert back.unetkit_quant_report.to_dict() == report.to_dict()
    args = inputs(back)
    assert torch.equal(forward(back, args), forward(unet, args))
    with pytest.raises(unetkit.UnetkitError, match="quantized already"):
        unetkit.quantize(back, "quanto:qint8")
    with pytest.raises(OutputExistsError):
        unetkit.save_quantized(unet, tmp_path / "q")


@needs_cpu_only
@pytest.mark.parametrize("method", list(CPU_UNAVAILABLE))
def test_cpu_unavailable_methods_say_why(method):
    with pytest.raises(BackendUnavailable, match=CPU_UNAVAILABLE[method]) as e:
        unetkit.quantize(tiny_unet(), method)
    assert "quanto:qint4" in str(e.value)  # what would work


def test_unknown_method_lists_known():
    with pytest.raises(QuantError) as e:
        unetkit.quantize(tiny_unet(), "torchao:int3")
    for m in [*SQNR_MIN, *CPU_UNAVAILABLE]:
        assert m in str(e.value)
    with pytest.raises(QuantError, match="quanto:qint8"):
        unetkit.quantize(tiny_unet(), "bitsandbytes:nf4")


@pytest.mark.parametrize(
    "method,blocked,hint",
    [
        ("torchao:int8-weight-only", "torchao", "pip install 'unetkit[torchao]'"),
        ("quanto:qint8", "optimum", "pip install 'unetkit[quanto]'"),
    ],
)
def test_missing_package_gives_install_hint(method, blocked, hint, monkeypatch):
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now raises ImportError
    with pytest.raises(BackendUnavailable) as e:
        unetkit.quantize(tiny_unet(), method)
    assert hint in str(e.value)


def test_globs_and_precedence():
    unet, report = unetkit.quantize(
        tiny_unet("sd1.x-lcm"), "quanto:qint8", include=["*"], exclude=["*attn2*", "conv_out"]
    )
    d = {x.name: x for x in report.decisions}
    assert d["conv_in"].quantized and "included by '*'" in d["conv_in"].reason  # include lifts a default
    assert d["time_embedding.cond_proj"].quantized
    assert not d["conv_out"].quantized and "excluded by 'conv_out'" in d["conv_out"].reason  # exclude wins
    assert not d["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"].quantized
    assert not d["conv_norm_out"].quantized  # norms never: not a Linear/Conv2d
    unet, report = unetkit.quantize(tiny_unet(), "torchao:int8-weight-only", include=["mid_block.*"])
    q = [x.name for x in report.decisions if x.quantized]
    assert q and all(n.startswith("mid_block.") for n in q)
    kept = next(x for x in report.decisions if x.name == "down_blocks.0.resnets.0.conv1")
    assert kept.reason == "not matched by any include glob"


def _saved(tmp_path: Path, method: str = "torchao:int8-dynamic") -> Path:
    unet, _ = unetkit.quantize(tiny_unet(), method)
    return unetkit.save_quantized(unet, tmp_path / "q")


def test_bad_folders_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    weights = load_file(str(folder / WEIGHTS))
    qname = next(k for k in weights if k.endswith("._weight_qdata"))

    def broken(edit_manifest=None, edit_weights=None) -> Path:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        bad.mkdir()
        (bad / "config.json").write_text((folder / "config.json").read_text())
        m = json.loads(json.dumps(manifest))
        if edit_manifest:
            edit_manifest(m)
        (bad / MANIFEST).write_text(json.dumps(m))
        w = dict(weights)
        if edit_weights:
            edit_weights(w)
        save_file(w, str(bad / WEIGHTS))
        return bad

    with pytest.raises(KeyMapError, match=f"missing {qname}"):
        unetkit.load_unet(broken(edit_weights=lambda w: w.pop(qname)))
    with pytest.raises(KeyMapError, match="unexpected extra.weight"):
        unetkit.load_unet(broken(edit_weights=lambda w: w.update({"extra.weight": torch.zeros(2)})))
    with pytest.raises(KeyMapError, match=f"tensor '{qname}'"):
        unetkit.load_unet(broken(edit_weights=lambda w: w.update({qname: w[qname][:, :3].contiguous()})))
    with pytest.raises(FormatError, match="newer"):
        unetkit.load_unet(broken(edit_manifest=lambda m: m.update(format_version=99)))
    with pytest.raises(FormatError, match=r"unknown quantization method 'torchao:int3'.*known"):
        unetkit.load_unet(broken(edit_manifest=lambda m: m.update(method="torchao:int3")))
    # a manifest that names a tensor the file lacks, consistently: the torchao rebuild names it
    subclass_key = qname.replace("._weight_qdata", ".weight")
    no_sub = broken(edit_manifest=lambda m: m["backend_state"]["tensor_subclasses"].pop(subclass_key))
    with pytest.raises(FormatError, match="tensor_subclasses"):
        unetkit.load_unet(no_sub)
    # no manifest: an ordinary (here: unreadable) diffusers folder, never a silent float load
    (no_sub / MANIFEST).unlink()
    with pytest.raises(unetkit.UnetkitError):
        unetkit.load_unet(no_sub)
    from unetkit.loading import load_quantized

    with pytest.raises(FormatError, match=f"{MANIFEST} is missing"):
        load_quantized(no_sub)


def test_quanto_partial_folder_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path, "quanto:qint4")
    weights = load_file(str(folder / WEIGHTS))
    name = next(k for k in weights if k.endswith("weight._scale"))
    del weights[name]
    save_file(weights, str(folder / WEIGHTS))
    with pytest.raises(KeyMapError, match=name.replace(".", r"\.")):
        unetkit.load_unet(folder)


def test_cli_quantize_writes_folder_and_json(tmp_path, capsys):
    src = save_ldm(tiny_unet("sd1.x-lcm"), tmp_path / "in.safetensors")
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--method", "quanto:qint8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "quanto:qint8" and res["coverage"]["Conv2d 3x3"]["params_quantized"] > 0
    assert (out / MANIFEST).is_file() and (out / "config.json").is_file()
    ref = unetkit.load_unet(src)
    back = unetkit.load_unet(out)
    args = inputs(ref)
    assert compare(forward(ref, args), forward(back, args)).sqnr_db > SQNR_MIN["quanto:qint8"]
    # existing output needs --force; the table names every module kind
    assert main(["quantize", str(src), str(out), "--method", "quanto:qint8"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (
        main(
            [
                "quantize",
                str(src),
                str(out),
                "--method",
                "torchao:int8-weight-only",
                "--force",
                "--exclude",
                "up_blocks.*",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "Conv2d 3x3" in text and "Linear" in text and "excluded by 'up_blocks.*'" in text
    assert main(["quantize", str(src), str(tmp_path / "x"), "--method", "torchao:int3"]) == 2
    assert "known runtime methods" in capsys.readouterr().err
