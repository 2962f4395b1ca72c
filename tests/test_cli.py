import json

import pytest

from helpers import save_ldm, tiny_unet
from unetkit.cli.app import main


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "convert" in out and "start here" in out
    for cmd in ("convert", "inspect"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "examples:" in text and "unetkit " + cmd in text


def test_inspect_and_convert_json(tmp_path, capsys):
    src = save_ldm(tiny_unet("sd1.x-lcm"), tmp_path / "in.safetensors")
    assert main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == "sd1.x-lcm" and info["config"]["time_cond_proj_dim"] == 32
    assert main(["convert", str(src), str(tmp_path / "unet"), "--to", "diffusers", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tensors"] == 687 and res["bytes_copied"] == res["bytes_written"]
    assert (tmp_path / "unet" / "config.json").exists()


def test_human_output(tmp_path, capsys):
    src = save_ldm(tiny_unet(), tmp_path / "in.safetensors")
    assert main(["-q", "inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "sd1.x" in out and "assumed" in out and "no NaN" in out
    assert main(["-q", "convert", str(src), str(tmp_path / "o.safetensors"), "--to", "ldm", "--dtype", "fp16"]) == 0
    assert "686 tensors" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
