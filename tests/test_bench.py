"""unetkit bench: one complete record per variant, in-process and in a fresh process; variant parsing; the CLI."""

import dataclasses
import importlib.util
import json
import math
import shutil
import sys

import pytest
import torch

from helpers import save_ldm, tiny_unet
from unetkit import convert
from unetkit.benchmarking import BenchRecord, Settings, bench, parse_variant, results_dict
from unetkit.benchmarking.measure import Latency, time_calls
from unetkit.benchmarking.record import CUDA_ONLY
from unetkit.benchmarking.runner import run_isolated
from unetkit.cli.app import main
from unetkit.errors import FormatError, UnetkitError
from unetkit.gguf_export import quantize_file

HAS_QUANTO = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None
FAST = dict(runs=2, warmup=1, size=16, device="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    st = save_ldm(tiny_unet(), d / "tiny.safetensors")
    gguf = d / "tiny-Q8_0.gguf"
    quantize_file(st, gguf, "gguf:Q8_0")
    folder = d / "tiny_diffusers"
    convert(st, folder, to="diffusers")
    return {"st": st, "gguf": gguf, "folder": folder}


def assert_complete(r: BenchRecord, runs: int) -> None:
    """Every field filled: nothing None but the CUDA-only fields on CPU, times positive and ordered."""
    for f in dataclasses.fields(r):
        value = getattr(r, f.name)
        if f.name in CUDA_ONLY:
            assert (value is None) == (r.device == "cpu"), f.name
        else:
            assert value is not None and value != "", f.name
        if isinstance(value, float):
            assert math.isfinite(value), f.name
    assert 0 < r.latency_min_s <= r.latency_median_s <= r.latency_max_s
    assert r.latency_iqr_s >= 0 and r.latency_iqr_s <= r.latency_max_s - r.latency_min_s
    assert len(r.latencies_s) == r.runs == runs and all(t > 0 for t in r.latencies_s)
    assert r.load_s > 0 and r.weight_mb > 0 and r.file_bytes > 0
    assert r.device == "cpu" and r.dtype == "fp32" and r.size == 16 and r.batch == 1


def test_a_record_per_variant_every_field_filled(files):
    st, gguf, folder = files["st"], files["gguf"], files["folder"]
    variants = [str(st), str(gguf), f"{gguf}@load", str(folder)]
    methods = ["as-stored", "on-the-fly", "load", "as-stored"]
    if HAS_QUANTO:
        variants.append(f"{st}@quanto:qint8")
        methods.append("quanto:qint8")
    seen = []
    settings = {**FAST, "warmup": 0}  # five variants: the isolated test below covers the warm-up
    records = bench(variants, isolate=False, progress=lambda i, n, v, r: seen.append((i, n, v, r is None)), **settings)

    assert [r.variant for r in records] == variants
    assert [r.method for r in records] == methods
    for r in records:
        assert_complete(r, runs=2)
        assert r.isolated is False and r.warmup == 0
    by_method = {r.variant: r for r in records}
    # sizes on disk: the file itself; for a folder, its weight file only (not config.json)
    assert by_method[str(st)].file_bytes == st.stat().st_size
    assert by_method[str(gguf)].file_bytes == by_method[f"{gguf}@load"].file_bytes == gguf.stat().st_size
    assert by_method[str(folder)].file_bytes == (folder / "diffusion_pytorch_model.safetensors").stat().st_size
    # the method took effect: on-the-fly keeps the Q8_0 bytes packed (about 8.5 bits), load decodes to fp32
    fp32_mb, packed_mb = by_method[str(st)].weight_mb, by_method[str(gguf)].weight_mb
    assert by_method[f"{gguf}@load"].weight_mb == pytest.approx(fp32_mb, rel=1e-6)
    assert packed_mb < 0.4 * fp32_mb
    assert by_method[f"{gguf}@load"].quantize_s == 0.0
    if HAS_QUANTO:
        q = by_method[f"{st}@quanto:qint8"]
        assert q.weight_mb < 0.5 * fp32_mb and q.quantize_s > 0 and q.load_s >= q.quantize_s
    # progress: a start and an end per variant, in order
    assert seen[0] == (0, len(variants), variants[0], True) and seen[-1] == (
        len(variants),
        len(variants),
        variants[-1],
        False,
    )
    assert len(seen) == 2 * len(variants)
    doc = json.loads(json.dumps(results_dict(records, {"runs": 2})))
    assert doc["unetkit"] and doc["torch"] and doc["environment"]["python"]
    assert [BenchRecord.from_dict(d) for d in doc["records"]] == records


def test_sdxl_variants(tmp_path):
    """SDXL's three shapes run (their added_cond_kwargs, a dict of tensors, reach the forward); an fp16 file is
    computed in float32 on the CPU with its weights held in fp16 (half-precision CPU convolutions are hundreds of
    times slower), a GGUF file on the fly, a runtime method on float32 weights."""
    from unetkit.sample import write_ldm_checkpoint

    base = write_ldm_checkpoint(tmp_path / "sdxl.safetensors", "sdxl", "tiny", dtype="fp16")
    refiner = write_ldm_checkpoint(tmp_path / "refiner.safetensors", "sdxl-refiner", "tiny", dtype="fp32")
    inpaint = write_ldm_checkpoint(tmp_path / "inpaint.safetensors", "sdxl-inpainting", "tiny", dtype="fp32")
    gguf = tmp_path / "sdxl-Q8_0.gguf"
    quantize_file(base, gguf, "gguf:Q8_0")
    variants = [str(base), str(gguf), str(refiner), str(inpaint)]
    if HAS_QUANTO:
        variants.append(f"{base}@quanto:qint8")
    records = bench(variants, isolate=False, **{**FAST, "runs": 1, "warmup": 0})
    for r in records:
        assert r.latency_median_s > 0 and r.dtype == "fp32" and r.load_s > 0
    fp16 = records[0]
    n_params = sum(p.numel() for p in tiny_unet("sdxl").parameters())
    assert fp16.method == "as-stored" and fp16.weight_mb * (1 << 20) == pytest.approx(2 * n_params, rel=1e-6)
    assert records[1].method == "on-the-fly" and records[1].weight_mb < 0.7 * fp16.weight_mb
    if HAS_QUANTO:
        q = records[-1]
        assert q.method == "quanto:qint8" and q.quantize_s > 0 and q.weight_mb < 0.8 * fp16.weight_mb


def test_isolated_variant_runs_in_its_own_process(files):
    (r,) = bench([files["st"]], isolate=True, **FAST)
    assert_complete(r, runs=2)
    assert (
        r.isolated is True and r.warmup == 1 and r.method == "as-stored" and r.file_bytes == files["st"].stat().st_size
    )
    # a fresh process: loading shows up as resident memory (the tiny model is ~10 MiB of fp32)
    assert r.rss_run_mb > 0.25 * r.weight_mb


def test_isolated_failure_names_the_variant(files, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(files["st"].read_bytes()[:4096])  # header promises more than the file holds
    with pytest.raises(FormatError, match="broken.safetensors") as e:
        bench([bad], isolate=True, **FAST)
    assert str(e.value).startswith(f"variant {str(bad)!r}:")


def test_worker_crash_reports_its_stderr(files, tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\ncat >/dev/null\necho 'Traceback (most recent call last):' >&2\n"
        "echo 'RuntimeError: kernel exploded' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(UnetkitError) as e:
        run_isolated(parse_variant(files["st"]), Settings(runs=1, size=16))
    msg = str(e.value)
    assert "tiny.safetensors" in msg and "exit code 1" in msg and "kernel exploded" in msg


def test_latency_statistics():
    calls = []
    lat = time_calls(lambda: calls.append(1), runs=4, warmup=2, device=torch.device("cpu"))
    assert len(calls) == 6 and len(lat.times_s) == 4 and all(t >= 0 for t in lat.times_s)
    lat = Latency((4.0, 1.0, 100.0, 3.0, 2.0))  # one slow outlier: the median and IQR do not move with it
    assert (lat.median_s, lat.min_s, lat.max_s, lat.iqr_s) == (3.0, 1.0, 100.0, 2.0)
    assert Latency((0.5,)).iqr_s == 0.0
    with pytest.raises(ValueError, match="runs"):
        time_calls(lambda: None, runs=0, warmup=0, device=torch.device("cpu"))


def test_variant_parsing(files, tmp_path):
    st, gguf = files["st"], files["gguf"]
    v = parse_variant(gguf)
    assert v.path == gguf and v.method == "on-the-fly" and v.is_gguf and v.dequantize == "on-the-fly"
    v = parse_variant(f"{gguf}@LOAD")
    assert v.method == "load" and v.dequantize == "load" and v.runtime_method is None
    v = parse_variant(st)
    assert v.method == "as-stored" and not v.is_gguf and v.runtime_method is None
    v = parse_variant(f"{st}@quanto:qint4") if HAS_QUANTO else None
    assert v is None or (v.path == st and v.runtime_method == "quanto:qint4" and v.dequantize == "load")

    # a path with '@' in it stays a path, also when a method follows it
    at = tmp_path / "runs@2024" / "m@v1.gguf"
    at.parent.mkdir()
    shutil.copy(gguf, at)
    assert parse_variant(at).path == at and parse_variant(at).method == "on-the-fly"
    v = parse_variant(f"{at}@load")
    assert v.path == at and v.method == "load"

    with pytest.raises(UnetkitError, match="unknown method 'quanto:qint3'") as e:
        parse_variant(f"{st}@quanto:qint3")
    for listed in ("on-the-fly", "load", "quanto:qint8", "torchao:int8-weight-only", str(st)):
        assert listed in str(e.value)
    with pytest.raises(UnetkitError, match="no such file"):
        parse_variant(tmp_path / "missing.safetensors")
    with pytest.raises(UnetkitError, match="no such file"):
        parse_variant(f"{tmp_path / 'missing.gguf'}@load")
    with pytest.raises(UnetkitError, match="not a GGUF file"):
        parse_variant(f"{st}@on-the-fly")


def test_settings_are_checked_before_anything_runs(files):
    with pytest.raises(UnetkitError, match="no variant"):
        bench([], isolate=False)
    with pytest.raises(UnetkitError, match="runs=0"):
        bench([files["st"]], runs=0, isolate=False)
    with pytest.raises(UnetkitError, match="size=12"):
        bench([files["st"]], size=12, isolate=False)
    with pytest.raises(UnetkitError, match="unknown device"):
        bench([files["st"]], device="tpu", isolate=False)
    # every variant is checked first: a bad last one fails before the first is measured
    calls = []
    with pytest.raises(UnetkitError, match="nope"):
        bench([files["st"], "nope.safetensors"], isolate=False, progress=lambda *a: calls.append(a))
    assert calls == []


def test_cli_table_and_json(files, tmp_path, capsys):
    st, gguf = str(files["st"]), str(files["gguf"])
    out = tmp_path / "bench.json"
    argv = ["-q", "bench", st, gguf, "--in-process", "--runs", "2", "--warmup", "0", "--size", "16", "--device", "cpu"]
    assert main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    for col in ("variant", "file", "load s", "RSS MiB", "weights MiB", "latency ms", "vs first"):
        assert col in header
    assert st in text and gguf in text and "1.00x" in text and f"wrote {out}" in text
    doc = json.loads(out.read_text())
    assert [r["variant"] for r in doc["records"]] == [st, gguf]
    assert [r["method"] for r in doc["records"]] == ["as-stored", "on-the-fly"]
    assert doc["unetkit"] and doc["torch"] and doc["settings"]["runs"] == 2 and doc["settings"]["isolate"] is False
    for r in doc["records"]:
        assert_complete(BenchRecord.from_dict(r), runs=2)

    # the JSON file exists now: refused before anything is measured, unless --force
    assert main([*argv, "--json", str(out)]) == 2
    assert "exists" in capsys.readouterr().err

    assert main([*argv[:3], "--in-process", "--runs", "1", "--size", "16", "--device", "cpu", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["records"]) == 1 and doc["records"][0]["runs"] == 1


def test_cli_bad_variant_is_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert main(["-q", "bench", str(missing), "--in-process"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("unetkit bench: error: variant") and str(missing) in err


def test_cli_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "unetkit bench" in text and "PATH@METHOD" in text and "on-the-fly" in text
