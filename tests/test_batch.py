"""unetkit batch: plans, the local engine on a catalog of tiny UNets (good and bad inputs), skips on a second run,
resumption after kill -9, and the Ray engine on a real local Ray cluster, byte for byte against the local one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from helpers import no_temp_files
from unetkit.batch import PlanError, load_plan, read_ledger, run_batch, shortcut_plan
from unetkit.batch.jobs import output_metadata
from unetkit.cli.app import main
from unetkit.provenance import BATCH_JOB, SOURCE_SHA256
from unetkit.sample import write_ldm_checkpoint

pytestmark = pytest.mark.xdist_group("batch")

PLAN = """
inputs = ["models/*"]
output_dir = "out"
[[jobs]]
verb = "convert"
to = "diffusers"
[[jobs]]
verb = "quantize"
method = "gguf:Q8_0"
[[jobs]]
verb = "verify"
of = "Q8_0"
size = 16
"""


def _catalog(root: Path, n_sd1: int = 2) -> Path:
    """models/: SD1.5 files (fp32, fp16), an SD2 pickle, a tiny SDXL, a diffusers folder, a truncated file, a LoRA."""
    import torch

    from unetkit.conversion import convert

    m = root / "models"
    m.mkdir(parents=True)
    for i in range(n_sd1):
        write_ldm_checkpoint(m / f"sd15_{i}.safetensors", "sd1.x", "tiny", seed=i, dtype="fp16" if i % 2 else "fp32")
    sd2 = write_ldm_checkpoint(root / "sd2.safetensors", "sd2.x", "tiny", seed=5)
    torch.save({"state_dict": load_file(str(sd2))}, m / "sd2.ckpt")
    write_ldm_checkpoint(m / "xl.safetensors", "sdxl", "tiny", seed=6, dtype="fp16")
    src = write_ldm_checkpoint(root / "folder_src.safetensors", "sd1.x", "tiny", seed=7)
    convert(src, m / "folder_unet", to="diffusers")
    good = (m / "sd15_0.safetensors").read_bytes()
    (m / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    base = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {f"{base}.lora_A.weight": torch.zeros(4, 32), f"{base}.lora_B.weight": torch.zeros(32, 4)},
        str(m / "lora.safetensors"),
    )
    (root / "plan.toml").write_text(PLAN)
    return root / "plan.toml"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    plan_path = _catalog(root)
    first = run_batch(load_plan(plan_path), workers=2)
    second = run_batch(load_plan(plan_path), workers=2)
    return root, plan_path, first, second


def _by(rows):
    return {(Path(r["input"]).name, r["job"]): r for r in rows}


GOOD = ["sd15_0.safetensors", "sd15_1.safetensors", "sd2.ckpt", "xl.safetensors", "folder_unet"]
BAD = {"truncated.safetensors": "truncated", "lora.safetensors": "LoRA"}


def test_local_engine_runs_every_job_and_isolates_bad_inputs(local_run):
    root, _, first, _ = local_run
    rows = _by(first.rows)
    assert len(first.rows) == 7 * 3
    for name in GOOD:
        for job in ("diffusers", "Q8_0", "verify-Q8_0"):
            r = rows[(name, job)]
            assert r["status"] == "done", (name, job, r.get("error"))
            assert r["source_sha256"] and len(r["source_sha256"]) == 64
            assert r["bytes"] > 0 and r["seconds"] > 0 and r["peak_rss_mb"] > 0
            assert Path(r["output"]).exists()
        v = rows[(name, "verify-Q8_0")]
        assert v["sqnr_db"] == json.loads(Path(v["output"]).read_text())["summary"]["worst_sqnr_db"]
        assert 0 < v["sqnr_db"] < 100  # measured: lossy, far from noise
    for name, what in BAD.items():
        for job in ("diffusers", "Q8_0", "verify-Q8_0"):
            r = rows[(name, job)]
            assert r["status"] == "failed"
            assert name in r["error"] and what.lower() in r["error"].lower(), r["error"]
    assert first.failed and first.count("done") == 15
    assert no_temp_files(root / "out")


def test_outputs_are_stamped_and_load(local_run):
    from unetkit.loading import load_unet

    root, _, first, _ = local_run
    r = _by(first.rows)[("sd15_0.safetensors", "Q8_0")]
    meta = output_metadata(Path(r["output"]))
    assert meta[SOURCE_SHA256] == r["source_sha256"]
    assert json.loads(meta[BATCH_JOB]) == {"verb": "quantize", **r["options"]}
    d = _by(first.rows)[("xl.safetensors", "diffusers")]
    assert load_unet(d["output"]).config.addition_embed_type == "text_time"
    sd2 = _by(first.rows)[("sd2.ckpt", "verify-Q8_0")]
    rep = json.loads(Path(sd2["output"]).read_text())
    assert rep["summary"]["passed"] and rep["unetkit_batch"][SOURCE_SHA256] == sd2["source_sha256"]
    assert rep["candidate"]["source"] == _by(first.rows)[("sd2.ckpt", "Q8_0")]["output"]


def test_second_run_skips_what_is_up_to_date(local_run):
    _, plan_path, first, second = local_run
    rows = _by(second.rows)
    for name in GOOD:
        for job in ("diffusers", "Q8_0", "verify-Q8_0"):
            assert rows[(name, job)]["status"] == "skipped", rows[(name, job)]
            assert rows[(name, job)]["reason"].startswith("up to date")
        assert rows[(name, "verify-Q8_0")]["sqnr_db"] == _by(first.rows)[(name, "verify-Q8_0")]["sqnr_db"]
    for name in BAD:
        assert rows[(name, "Q8_0")]["status"] == "failed"
    ledger = read_ledger(load_plan(plan_path).ledger)
    assert len(ledger) == 42 and {r["run"] for r in ledger} == {first.run, second.run}
    for key in ("input", "source_sha256", "job", "output", "bytes", "seconds", "peak_rss_mb", "sqnr_db", "status"):
        assert all(key in r for r in ledger if r["status"] != "failed"), key


def test_a_changed_source_or_foreign_file_is_not_skipped_and_never_replaced_without_force(tmp_path):
    m = tmp_path / "models"
    m.mkdir()
    write_ldm_checkpoint(m / "a.safetensors", "sd1.x", "tiny", seed=0)
    plan = shortcut_plan(m, "*.safetensors", ["quantize:gguf:Q8_0"], tmp_path / "out")
    out = Path(plan.tasks[0].output)
    out.parent.mkdir()
    out.write_bytes(b"a file the user put here")
    r = run_batch(plan, workers=1).rows[0]
    assert r["status"] == "failed" and "not made by this job" in r["error"] and "--force" in r["error"]
    assert out.read_bytes() == b"a file the user put here"
    assert run_batch(plan, workers=1, force=True).rows[0]["status"] == "done"
    with open(plan.ledger, "a") as f:
        f.write('{"id": "a row cut short by a kill')  # no newline: the next run's first row must not join it
    write_ldm_checkpoint(m / "a.safetensors", "sd1.x", "tiny", seed=1)  # new weights under the same name
    r = run_batch(plan, workers=1).rows[0]
    assert r["status"] == "failed" and "different source_sha256" in r["error"]
    assert [x["status"] for x in read_ledger(plan.ledger)] == ["failed", "done", "failed"]


def test_a_failed_verification_stays_failed_on_the_next_run(tmp_path):
    m = tmp_path / "models"
    m.mkdir()
    write_ldm_checkpoint(m / "a.safetensors", "sd1.x", "tiny", seed=0)
    (tmp_path / "p.jsonl").write_text(
        '{"inputs": ["models/a.safetensors"], "output_dir": "out"}\n'
        '{"verb": "quantize", "method": "gguf:Q4_0"}\n'
        '{"verb": "verify", "of": "Q4_0", "min_sqnr": 200, "size": 8, "timesteps": 1}\n'
    )
    for run in range(2):
        rows = _by(run_batch(load_plan(tmp_path / "p.jsonl"), workers=1).rows)
        v = rows[("a.safetensors", "verify-Q4_0")]
        assert v["status"] == "failed" and "below threshold" in v["error"]
        assert rows[("a.safetensors", "Q4_0")]["status"] == ("done" if run == 0 else "skipped")
        assert ("earlier run" in v["error"]) == (run == 1)


def test_memory_budget_runs_jobs_one_at_a_time(tmp_path):
    m = tmp_path / "models"
    m.mkdir()
    for i in range(2):
        write_ldm_checkpoint(m / f"a{i}.safetensors", "sd1.x", "tiny", seed=i)
    plan = shortcut_plan(m, "*.safetensors", ["quantize:gguf:Q8_0", "convert:ldm:fp16"], tmp_path / "out")
    res = run_batch(plan, workers=2, memory=1)
    spans = sorted((r["started"], r["finished"]) for r in res.rows)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    assert sum("ran alone" in n for n in res.notes) == 4


@pytest.mark.parametrize(
    "text, match",
    [
        ('inputs = ["m/*"]\noutput_dir = "o"\n[[jobs]]\nverb = "shrink"\n', "verb 'shrink'"),
        (
            'inputs = ["m/*"]\noutput_dir = "o"\n[[jobs]]\nverb = "quantize"\nmethod = "gguf:Q4_K_M"\nflavour = "x"\n',
            "unknown option",
        ),
        (
            'inputs = ["m/*"]\noutput_dir = "o"\n[[jobs]]\nverb = "quantize"\nmethod = "gguf:Q9"\n',
            "unknown GGUF recipe",
        ),
        ('inputs = ["m/*"]\noutput_dir = "o"\n[[jobs]]\nverb = "verify"\nof = "Q8_0"\n', "not a convert or quantize"),
        ('inputs = ["m/*"]\n[[jobs]]\nverb = "convert"\nto = "ldm"\n', "output_dir"),
        ('inputs = ["m/*"]\noutput_dir = "o"\njob = 1\n', "unknown plan key"),
        ('inputs = ["m/*"]\noutput_dir = "o"\n[[jobs]]\nverb = "convert"\nto = "ldm"\noutput = "../x"\n', "inside"),
        (
            'inputs = ["m/*"]\noutput_dir = "o"\n[[jobs]]\nverb = "convert"\nto = "ldm"\noutput = "{model}"\n',
            "uses .'model'.",
        ),
        (
            'inputs = ["m/*"]\noutput_dir = "o"\n[[jobs]]\nverb = "convert"\nto = "ldm"\n[[jobs]]\nverb = "convert"\n'
            'to = "ldm"\n',
            "two jobs are named 'ldm'",
        ),
        ('inputs = ["m/*"]\noutput_dir = "o"\n[[jobs]]\nverb = "quantize"\nmethod = "gguf:auto"\n', "exactly one"),
        (
            'inputs = ["m/*"]\noutput_dir = "o"\n[[jobs]]\nverb = "convert"\nto = "ldm"\noutput = "same.safetensors"\n',
            "would both write",
        ),
        ("inputs = [\n", "not valid TOML"),
        ('inputs = ["nothing/*"]\noutput_dir = "o"\n[[jobs]]\nverb = "convert"\nto = "ldm"\n', "no input matched"),
    ],
)
def test_plan_errors_name_the_plan_and_the_job(tmp_path, text, match):
    (tmp_path / "m").mkdir()
    for i in range(2):
        (tmp_path / "m" / f"x{i}.safetensors").write_bytes(b"")
    (tmp_path / "plan.toml").write_text(text)
    with pytest.raises(PlanError, match=match) as e:
        load_plan(tmp_path / "plan.toml")
    assert str(tmp_path / "plan.toml") in str(e.value)


def test_minimal_plan_and_templates(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.safetensors").write_bytes(b"")
    (tmp_path / "plan.toml").write_text(
        PLAN + '[[jobs]]\nverb = "quantize"\nmethod = "torchao:int8-weight-only"\n'
        '[[jobs]]\nverb = "quantize"\nmethod = "gguf:auto"\ntarget_size = "5MiB"\nflavor = "sdcpp"\n'
        '[[jobs]]\nverb = "convert"\nto = "ldm"\ndtype = "fp16"\nname = "half"\noutput = "{name}/{stem}.safetensors"\n'
    )
    plan = load_plan(tmp_path / "plan.toml")
    outs = {t.job.name: Path(t.output).relative_to(tmp_path / "out").as_posix() for t in plan.tasks}
    assert outs == {
        "diffusers": "a-diffusers",
        "Q8_0": "a-Q8_0.gguf",
        "verify-Q8_0": "a-verify-Q8_0.json",
        "int8-weight-only": "a-int8-weight-only",
        "auto-size5MiB-sdcpp": "a-auto-size5MiB-sdcpp.gguf",
        "half": "half/a.safetensors",
    }
    assert plan.ledger == tmp_path / "out" / "ledger.jsonl"
    assert plan.tasks[2].depends == plan.tasks[1].id


def test_cli_folder_shortcut_exit_codes_json_and_html(tmp_path, capsys):
    m = tmp_path / "models"
    m.mkdir()
    write_ldm_checkpoint(m / "a.safetensors", "sd1.x", "tiny", seed=0)
    args = ["batch", str(m), "--glob", "*.safetensors", "--job", "convert:ldm:fp16", "-o", str(tmp_path / "out")]
    assert main([*args, "--dry-run"]) == 0  # lists, runs nothing
    assert "a-ldm-fp16.safetensors" in capsys.readouterr().out and not (tmp_path / "out").exists()
    assert main([*args, "--workers", "1", "--json", "-q"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["done"], d["failed"]) == (1, 0) and Path(d["html"]).is_file()
    assert "unetkit batch" in Path(d["html"]).read_text()
    (tmp_path / "mine.html").write_text("my notes")  # a page that is not a batch summary is not replaced
    assert main([*args, "--html", str(tmp_path / "mine.html")]) == 2
    assert "not a batch summary" in capsys.readouterr().err and (tmp_path / "mine.html").read_text() == "my notes"
    (m / "bad.safetensors").write_bytes(b"\x00" * 20)
    assert main([*args, "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "1 skipped, 1 failed" in out and "bad.safetensors" in out
    assert main(["batch", str(m), "--job", "convert:ldm"]) == 2
    assert "--glob" in capsys.readouterr().err


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL the batch while it runs; start it again: the outputs equal an uninterrupted run's byte for byte, no
    temporary is left, and no job that finished before the kill runs again."""
    root = tmp_path / "cat"
    m = root / "models"
    m.mkdir(parents=True)
    for i in range(3):
        write_ldm_checkpoint(m / f"m{i}.safetensors", "sd1.x", "tiny", seed=i)
    specs = ["quantize:gguf:Q4_K_M", "convert:diffusers"]
    ref = run_batch(shortcut_plan(m, "*.safetensors", specs, tmp_path / "ref"), workers=2)  # uninterrupted
    assert [r["status"] for r in ref.rows] == ["done"] * 6
    # the run that is killed: the Python API in a script with no ``if __name__ == "__main__":`` guard, which the
    # workers must not run again (they did once, and broke the pool: its rows would not be "done")
    out = tmp_path / "out"
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\nfrom unetkit import run_batch\nfrom unetkit.batch import shortcut_plan\n"
        f"run_batch(shortcut_plan(sys.argv[1], '*.safetensors', {specs!r}, sys.argv[2]), workers=2)\n"
    )
    err = tmp_path / "killed.stderr"
    with err.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(script), str(m), str(out)], stderr=f)
    ledger = out / "ledger.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not ledger.exists() or len(ledger.read_text().splitlines()) < 2):
        assert proc.poll() is None, err.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_ledger(ledger)
    assert 2 <= len(before) < 6, "the kill came too late to test resumption"
    assert all(r["status"] == "done" for r in before), before
    time.sleep(0.5)  # the workers die with the batch (PR_SET_PDEATHSIG)
    # resumed from the command line, as a user would
    cmd = [sys.executable, "-m", "unetkit.cli.app", "-q", "batch", str(m), "--glob", "*.safetensors"]
    cmd += [x for spec in specs for x in ("--job", spec)]
    again = subprocess.run([*cmd, "-o", str(out), "--workers", "2"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    rows = read_ledger(ledger)
    first = {r["id"] for r in rows if r["run"] == rows[0]["run"] and r["status"] == "done"}
    second = [r for r in rows if r["run"] != rows[0]["run"]]
    assert len(second) == 6 and all(r["status"] in ("done", "skipped") for r in second)
    assert not any(r["status"] == "done" and r["id"] in first for r in second), "a finished job ran again"
    assert no_temp_files(out)
    for f in sorted((tmp_path / "ref").rglob("*")):
        if f.is_file() and f.suffix != ".jsonl" and f.suffix != ".html":
            assert (out / f.relative_to(tmp_path / "ref")).read_bytes() == f.read_bytes(), f


def test_ray_engine_matches_the_local_engine(local_run, tmp_path):
    """A real local Ray instance (ray.init(num_cpus=2)): the same rows and byte-identical outputs."""
    pytest.importorskip("ray")
    root, plan_path, first, _ = local_run
    res = run_batch(load_plan(plan_path, output_dir=tmp_path / "ray_out"), engine="ray", workers=2)
    local, ray_rows = _by(first.rows), _by(res.rows)
    assert set(local) == set(ray_rows)
    for key, r in ray_rows.items():
        assert r["status"] == local[key]["status"], (key, r.get("error"))
        assert r.get("source_sha256") == local[key].get("source_sha256")
        if r["status"] == "done" and r["verb"] != "verify":
            assert r["bytes"] == local[key]["bytes"]
            a, b = Path(local[key]["output"]), Path(r["output"])
            files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()) if a.is_dir() else [Path()]
            for rel in files:
                assert (b / rel).read_bytes() == (a / rel).read_bytes(), (key, rel)
        if r["verb"] == "verify" and r["status"] == "done":
            assert r["sqnr_db"] == pytest.approx(local[key]["sqnr_db"], abs=1e-6)
    assert res.engine == "ray" and res.workers == 2


def test_nothing_below_batch_imports_ray_and_the_engine_says_how_to_install_it(tmp_path):
    code = (
        "import sys; import unetkit.batch, unetkit.cli.app; from unetkit.batch.engines import make_engine; "
        "assert 'ray' not in sys.modules, 'ray imported'; "
        "sys.modules['ray'] = None\n"
        "try:\n    make_engine('ray')\nexcept Exception as e:\n    print(e)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert r.returncode == 0, r.stderr
    assert "pip install 'unetkit[ray]'" in r.stdout


def test_local_workers_share_the_cores_and_honour_omp_num_threads(monkeypatch):
    from unetkit.batch.engines import _cores, worker_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert worker_threads(1) == _cores() and worker_threads(2 * _cores()) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert worker_threads(1) == 1


def test_a_worker_that_dies_is_replaced_and_its_task_run_again(tmp_path):
    """SIGKILL a local worker (as the OOM killer would): the pool is replaced and the task runs in the new one."""
    from unetkit.batch.engines import LocalEngine

    m = tmp_path / "models"
    m.mkdir()
    write_ldm_checkpoint(m / "a.safetensors", "sd1.x", "tiny", seed=0)
    plan = shortcut_plan(m, "*.safetensors", ["convert:ldm:fp16"], tmp_path / "out")
    with LocalEngine(workers=1) as eng:
        victim = next(iter(eng.pool._processes))
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and not eng.pool._broken:  # the executor notices the death
            time.sleep(0.05)
        eng.submit(plan.tasks[0], None, 0)
        rows = []
        while eng.running():
            rows += eng.wait()
        workers = set(eng.pool._processes)
    assert [r["status"] for r in rows] == ["done"], rows
    assert eng.replaced == 1 and victim not in workers
    assert Path(plan.tasks[0].output).is_file() and no_temp_files(tmp_path / "out")
