"""Outputs never cost an input, and leave nothing half-written: path safety, signals, stale temporaries, OS errors,
the sha256 cache keyed on ctime."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import no_temp_files, save_ldm, tiny_unet
from unetkit.cli.app import main
from unetkit.conversion import convert
from unetkit.errors import OutputError, OutputExistsError
from unetkit.formats.atomic import TMP_MARK, collect_stale

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return save_ldm(tiny_unet(), tmp_path_factory.mktemp("out") / "m.safetensors")


def test_output_folder_holding_the_input_is_refused_even_with_force(src, tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(src.read_bytes())
    with pytest.raises(OutputExistsError, match="holds the input"):
        convert(model, tmp_path, to="diffusers", force=True)
    assert model.read_bytes() == src.read_bytes()


def test_output_inside_an_input_folder_is_refused(src, tmp_path):
    convert(src, tmp_path / "unet", to="diffusers")
    with pytest.raises(OutputExistsError, match="inside the input folder"):
        convert(tmp_path / "unet", tmp_path / "unet" / "back.safetensors", to="ldm", force=True)


def test_output_equal_to_the_input_is_refused(src):
    with pytest.raises(OutputExistsError, match="is the input"):
        convert(src, src, to="ldm", force=True)


@pytest.mark.parametrize("flag", ["--json", "--html"])
def test_a_verify_report_never_replaces_a_model(src, tmp_path, flag, capsys):
    model = tmp_path / "m.safetensors"
    model.write_bytes(src.read_bytes())
    code = main(["verify", str(model), str(model), flag, str(model), "--force", "-q"])
    assert code == 2 and "is the input" in capsys.readouterr().err
    assert model.read_bytes() == src.read_bytes()


def test_a_bench_report_never_replaces_a_model(src, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    model.write_bytes(src.read_bytes())
    assert main(["bench", str(model), "--json", str(model), "--force", "-q"]) == 2
    assert "is the input" in capsys.readouterr().err and model.read_bytes() == src.read_bytes()


def test_a_report_into_a_missing_folder_fails_before_the_work(src, tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["verify", str(src), str(src), "--json", str(tmp_path / "no" / "r.json"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err and time.perf_counter() - t0 < 5


def test_a_parent_that_is_a_file_is_one_line_with_the_errno(src, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write the output: .*\(E"):
        convert(src, tmp_path / "file" / "out.safetensors", to="ldm")


SLOW_CONVERT = """
import sys, time
import unetkit.formats.safetensors_io as sio
real = sio._write_tensor
delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05
def slow(*a, **k):
    time.sleep(delay)
    return real(*a, **k)
sio._write_tensor = slow
from unetkit.conversion import convert
print("started", flush=True)
convert(sys.argv[1], sys.argv[2], to="ldm", dtype="fp16")
"""


def _start_slow(script: str, src: Path, out: Path) -> subprocess.Popen:
    """Run ``script`` (a slowed-down writer) in a child and return once its temporary output exists."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(src), str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    deadline = time.time() + 60
    while not any(TMP_MARK in p.name for p in out.parent.iterdir()):  # writing has begun
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    time.sleep(0.3)
    return proc


def test_sigterm_mid_write_leaves_no_temp_file(src, tmp_path):
    out = tmp_path / "o.safetensors"
    proc = _start_slow(SLOW_CONVERT, src, out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert not out.exists() and no_temp_files(tmp_path)


def test_after_sigkill_the_next_run_collects_the_temp_file(src, tmp_path, caplog):
    out = tmp_path / "o.safetensors"
    proc = _start_slow(SLOW_CONVERT, src, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = [p for p in tmp_path.iterdir() if TMP_MARK in p.name]
    assert len(left) == 1 and not out.exists()  # nothing can clean up at once: no final name holds a partial file
    convert(src, out, to="ldm")
    assert out.exists() and no_temp_files(tmp_path)
    assert any("partial output left by process" in r.getMessage() for r in caplog.records)


def test_a_live_process_temp_file_is_not_collected(tmp_path):
    mine = tmp_path / f".o.safetensors{TMP_MARK}{os.getpid()}-abcdef12"
    mine.write_bytes(b"x")
    assert collect_stale(tmp_path / "o.safetensors") == [] and mine.exists()


def test_hash_cache_sees_a_rewrite_with_the_mtime_restored(src, tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(src.read_bytes())
    first = convert(model, tmp_path / "a", to="diffusers")
    st = model.stat()
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # a different last byte, same size
    time.sleep(0.01)
    model.write_bytes(bytes(data))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back, as a user can
    second = convert(model, tmp_path / "b", to="diffusers")
    assert not second.source_sha256_cached and second.source_sha256 != first.source_sha256


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MiB tmpfs, where the machine lets the test mount one (root in a container that allows it)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_a_full_disk_is_one_line_and_leaves_nothing(src, small_disk, kind):
    from unetkit.gguf_export import quantize_file

    out = small_disk / f"o.{kind}"
    with pytest.raises(OutputError, match=r"the disk is full"):
        if kind == "gguf":
            quantize_file(src, out, "gguf:F16")
        else:
            convert(src, out, to="ldm")
    assert not out.exists() and no_temp_files(small_disk)


SLOW_QUANTIZE = """
import sys, time
import unetkit.gguf_export as ge
real = ge._producer
def slow(*a, **k):
    produce = real(*a, **k)
    def later():
        time.sleep(0.05)
        return produce()
    return later
ge._producer = slow
print("started", flush=True)
ge.quantize_file(sys.argv[1], sys.argv[2], "gguf:Q8_0", workers=0)
"""


def test_sigterm_mid_quantize_leaves_no_temp_file(src, tmp_path):
    out = tmp_path / "o.gguf"
    proc = _start_slow(SLOW_QUANTIZE, src, out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert not out.exists() and no_temp_files(tmp_path)


def test_two_concurrent_writers_to_one_output_leave_one_whole_file(src, tmp_path):
    from unetkit.formats import read

    out = tmp_path / "o.safetensors"
    script = SLOW_CONVERT.replace('dtype="fp16")', 'dtype="fp16", force=True)')
    procs = [
        subprocess.Popen(
            # 10 ms a tensor: about 7 s a write, which is overlap enough for two that start together
            [sys.executable, "-c", textwrap.dedent(script), str(src), str(out), "0.01"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert len(read(out).entries) == len(read(src).entries) and no_temp_files(tmp_path)


def test_force_never_replaces_a_folder_with_a_file_or_the_reverse(src, tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="does not replace a folder with a file"):
        convert(src, folder, to="ldm", force=True)
    assert (folder / "keep.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(OutputExistsError, match="does not replace a file with a folder"):
        convert(src, afile, to="diffusers", force=True)
    assert afile.read_text() == "mine"


def test_quiet_and_verbose_work_after_the_command(src, capsys):
    assert main(["inspect", str(src), "--no-scan", "-q", "-v"]) == 0
    assert "sd1.x" in capsys.readouterr().out


def test_a_read_only_mount_fails_before_the_work_and_on_write(src, tmp_path, capsys):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    try:
        assert main(["verify", str(src), str(src), "--json", str(mnt / "r.json"), "-q"]) == 2
        assert "not writable" in capsys.readouterr().err
        with pytest.raises(OutputError, match=r"cannot write the output: .*\(EROFS\)"):
            convert(src, mnt / "o.safetensors", to="ldm")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_after_sigkill_mid_quantize_the_next_run_collects_the_temp_file(src, tmp_path):
    from unetkit.gguf_export import quantize_file

    out = tmp_path / "o.gguf"
    proc = _start_slow(SLOW_QUANTIZE, src, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists() and not no_temp_files(tmp_path)
    quantize_file(src, out, "gguf:Q8_0")
    assert out.exists() and no_temp_files(tmp_path)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed SystemExit
def test_a_sigterm_swallowed_by_a_finalizer_still_commits_nothing(tmp_path):
    """Python ignores an exception raised while a ``__del__`` runs; the writer must not commit after such a SIGTERM."""
    from unetkit.formats.atomic import atomic_output

    class Dropped:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs, and raises, inside this finalizer
            time.sleep(0.05)

    out = tmp_path / "o.bin"
    with pytest.raises(SystemExit), atomic_output(out) as tmp:
        tmp.write_bytes(b"partial")
        Dropped()  # finalized at once: its SystemExit is printed as ignored, and the write goes on
    assert not out.exists() and no_temp_files(tmp_path)
