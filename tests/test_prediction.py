"""The prediction type: read from every marker and metadata form, reported with where it came from (conflicts
too), kept through every conversion (the marker tensors bit for bit), probed on request, used by verify."""

import json
import struct

import pytest
import torch
from safetensors import safe_open

from helpers import ldm_state, save_ldm, tiny_unet
from unetkit import open_unet
from unetkit.cli.app import main
from unetkit.conversion import convert
from unetkit.errors import FormatError, KeyMapError
from unetkit.formats.safetensors_io import read_header
from unetkit.gguf_export import quantize_file
from unetkit.inspection import inspect_file
from unetkit.prediction import EPSILON, V_PREDICTION, Marker, detect
from unetkit.sample import write_ldm_checkpoint

EMPTY = torch.tensor([])  # what ComfyUI writes on save
#: marker sets as they occur: ComfyUI's v_pred (+ ztsnr), CosXL's EDM v-prediction sigmas (a float64 one too, to
#: show the dtype is kept), Playground v2.5's latent statistics
MARKERS = {
    "v_pred": {"v_pred": EMPTY},
    "v_pred+ztsnr": {"v_pred": EMPTY, "ztsnr": EMPTY},
    "cosxl": {
        "edm_vpred.sigma_max": torch.tensor(120.0),
        "edm_vpred.sigma_min": torch.tensor(0.002, dtype=torch.float64),
    },
    "playground": {
        "edm_mean": torch.tensor([-1.6574, 1.886, -1.383, 2.5155]).reshape(1, 4, 1, 1),
        "edm_std": torch.tensor([8.4927, 5.9022, 6.5498, 5.2299]).reshape(1, 4, 1, 1).half(),
    },
}
EXPECTED = {  # marker set -> (type, zero terminal SNR, EDM kind)
    "v_pred": (V_PREDICTION, False, None),
    "v_pred+ztsnr": (V_PREDICTION, True, None),
    "cosxl": (V_PREDICTION, False, "edm_vpred"),
    "playground": (EPSILON, False, "edm"),
}


def raw_tensors(path, keys):
    """(dtype code, shape, bytes) of each key as stored in the safetensors file."""
    hlen, header = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for k in keys:
            begin, end = header[k]["data_offsets"]
            f.seek(8 + hlen + begin)
            out[k] = (header[k]["dtype"], header[k]["shape"], f.read(end - begin))
    return out


def marked(tmp_path, markers, variant="sd1.x", metadata=None, name="m.safetensors"):
    return write_ldm_checkpoint(tmp_path / name, variant, extra_buffers=markers, metadata=metadata)


# ------------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("kind", list(MARKERS))
def test_marker_keys_are_read_and_kept_not_ignored(kind, tmp_path):
    src = open_unet(marked(tmp_path, MARKERS[kind]))
    ptype, zsnr, edm = EXPECTED[kind]
    p = src.prediction
    assert (p.type, p.zero_terminal_snr, (p.edm or {}).get("kind")) == (ptype, zsnr, edm)
    assert set(p.markers) == set(MARKERS[kind]) and p.markers_from == "file"
    assert not set(MARKERS[kind]) & set(src.ignored)  # the model's markers: not UNet tensors, not ignored
    assert p.source.startswith("key") and not p.from_default and p.decisions == []
    if kind == "cosxl":
        assert p.edm["sigma_max"] == 120.0 and p.edm["sigma_min"] == 0.002 and p.edm["sigma_data"] == 1.0
    if kind == "playground":
        assert p.edm["latents_std"] == [float(v) for v in MARKERS[kind]["edm_std"].flatten()]


def test_no_marker_is_the_family_default_and_says_so(tmp_path):
    p = open_unet(save_ldm(tiny_unet("sd2.x"), tmp_path / "m.safetensors")).prediction
    assert p.type == EPSILON and p.from_default and p.source == "family default (SD2.x)" and not p.markers


@pytest.mark.parametrize(
    "metadata, expected, source",
    [
        ({"modelspec.prediction_type": "v"}, V_PREDICTION, "metadata modelspec.prediction_type='v'"),
        ({"modelspec.prediction_type": "v_prediction"}, V_PREDICTION, "metadata modelspec.prediction_type"),
        ({"modelspec.prediction_type": "epsilon"}, EPSILON, "metadata modelspec.prediction_type"),
        ({"ss_v_parameterization": "True"}, V_PREDICTION, "metadata ss_v_parameterization"),
        ({"ss_v_parameterization": "False"}, EPSILON, "metadata ss_v_parameterization"),
        ({"v_pred": ""}, V_PREDICTION, "metadata v_pred"),
        ({"unetkit.prediction_type": "v_prediction"}, V_PREDICTION, "metadata unetkit.prediction_type"),
    ],
)
def test_metadata_forms(metadata, expected, source):
    p = detect({}, metadata, default=EPSILON, family="SD1.x")
    assert p.type == expected and p.source.startswith(source) and not p.from_default and p.decisions == []


def test_zero_terminal_snr_from_kohya_and_the_scheduler_config():
    p = detect({}, {"ss_v_parameterization": "True", "ss_zero_terminal_snr": "True"}, default=EPSILON, family="x")
    assert p.type == V_PREDICTION and p.zero_terminal_snr and p.zero_terminal_snr_source.startswith("metadata ss_zero")
    sched = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    p = detect({}, {}, default=EPSILON, family="x", scheduler_config=sched)
    assert p.type == V_PREDICTION and p.zero_terminal_snr and p.source.startswith("scheduler_config.json")


def test_an_unknown_metadata_value_is_a_recorded_decision_not_a_guess():
    p = detect({}, {"modelspec.prediction_type": "flow"}, default=EPSILON, family="SD1.x")
    assert p.type == EPSILON and p.from_default
    assert any("'flow'" in d and "ignored" in d for d in p.decisions)


def test_conflicting_markers_are_decided_and_reported(tmp_path, capsys, caplog):
    path = marked(tmp_path, {"v_pred": EMPTY}, metadata={"modelspec.prediction_type": "epsilon"})
    p = open_unet(path).prediction
    assert p.type == V_PREDICTION and p.source == "key v_pred"
    assert len(p.decisions) == 1 and "modelspec.prediction_type" in p.decisions[0]
    assert "marker keys win" in p.decisions[0]
    assert "marker keys win" in caplog.text  # logged as a warning too
    assert main(["-q", "inspect", str(path), "--no-scan"]) == 0
    out = capsys.readouterr().out
    assert "prediction   v_prediction (from key v_pred)" in out and "decided" in out and "marker keys win" in out
    assert main(["inspect", str(path), "--no-scan", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prediction"]["decisions"] == p.decisions


def test_marker_kinds_that_disagree_follow_comfyuis_order():
    markers = {
        "edm_mean": Marker("edm_mean", "F32", (1,), struct.pack("<f", 0.5)),
        "edm_std": Marker("edm_std", "F32", (1,), struct.pack("<f", 2.0)),
        "v_pred": Marker.empty("v_pred"),
    }
    p = detect(markers, {}, default=EPSILON, family="SDXL")
    assert p.type == EPSILON and p.edm["kind"] == "edm" and any("as ComfyUI does" in d for d in p.decisions)


def test_a_folder_whose_scheduler_config_was_edited_wins_over_the_record_and_says_so(tmp_path):
    folder = tmp_path / "unet"
    convert(save_ldm(tiny_unet(), tmp_path / "m.safetensors"), folder, to="diffusers")
    sched = json.loads((folder / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon"
    assert open_unet(folder).prediction.origin == "family default (SD1.x)"  # the record tells where it came from
    sched["prediction_type"] = "v_prediction"
    (folder / "scheduler_config.json").write_text(json.dumps(sched))
    p = open_unet(folder).prediction
    assert p.type == V_PREDICTION and p.source.endswith("scheduler_config.json (prediction_type)")
    assert any("unetkit.prediction gives epsilon" in d and "scheduler_config.json wins" in d for d in p.decisions)


# ------------------------------------------------------------------------------------------------ kept


@pytest.mark.parametrize("kind", list(MARKERS))
def test_markers_survive_ldm_diffusers_ldm_bit_for_bit(kind, tmp_path):
    variant = "sdxl" if kind in ("cosxl", "playground", "v_pred+ztsnr") else "sd1.x"
    src = marked(tmp_path, MARKERS[kind], variant)
    r = convert(src, tmp_path / "unet", to="diffusers")
    assert r.prediction["type"] == EXPECTED[kind][0]
    folder = tmp_path / "unet"
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert not set(MARKERS[kind]) & set(read_header(weights)[1])  # no marker tensor among the diffusers weights
    back = tmp_path / "back.safetensors"
    convert(folder, back, to="ldm", dtype="fp16")  # markers are not weights: their dtype is kept
    assert raw_tensors(back, MARKERS[kind]) == raw_tensors(src, MARKERS[kind])
    p = open_unet(back).prediction
    assert p.source.startswith("key") and p.markers_from == "file" and p.decisions == []


def test_the_diffusers_folder_records_it_where_diffusers_looks(tmp_path):
    from diffusers import DDIMScheduler, EDMEulerScheduler, EulerDiscreteScheduler, UNet2DConditionModel

    src = marked(tmp_path, MARKERS["v_pred+ztsnr"], "sdxl")
    convert(src, tmp_path / "unet", to="diffusers")
    folder = tmp_path / "unet"
    sched = EulerDiscreteScheduler.from_pretrained(folder)
    assert sched.config.prediction_type == "v_prediction" and sched.config.rescale_betas_zero_snr
    assert sched.config.timestep_spacing == "trailing"
    assert DDIMScheduler.from_config(json.loads((folder / "scheduler_config.json").read_text())).config[
        "prediction_type"
    ] == ("v_prediction")
    UNet2DConditionModel.from_pretrained(folder)  # the extra file does not disturb diffusers' own loader
    meta = read_header(folder / "diffusion_pytorch_model.safetensors")[1]["__metadata__"]
    assert meta["unetkit.prediction_type"] == "v_prediction"
    assert set(json.loads(meta["unetkit.prediction_markers"])) == {"v_pred", "ztsnr"}

    cos = marked(tmp_path, MARKERS["cosxl"], "sdxl", name="cos.safetensors")
    convert(cos, tmp_path / "cos", to="diffusers")
    edm = EDMEulerScheduler.from_pretrained(tmp_path / "cos")
    assert edm.config.prediction_type == "v_prediction" and edm.config.sigma_max == 120.0


def test_a_diffusers_folder_that_says_v_prediction_gets_the_ldm_markers(tmp_path):
    """A folder diffusers wrote (no unetkit metadata): its pipeline's scheduler config says v-prediction with zero
    terminal SNR; the LDM file gets v_pred and ztsnr as ComfyUI writes them, and the result says so."""
    from diffusers import EulerDiscreteScheduler

    pipe = tmp_path / "pipe"
    tiny_unet().save_pretrained(pipe / "unet")
    (pipe / "model_index.json").write_text("{}")
    EulerDiscreteScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True).save_pretrained(
        pipe / "scheduler"
    )
    for opened in (pipe, pipe / "unet"):  # the pipeline, or its unet/ folder alone
        p = open_unet(opened).prediction
        assert p.type == V_PREDICTION and p.zero_terminal_snr and "scheduler" in p.source
    out = tmp_path / "m.safetensors"
    r = convert(pipe, out, to="ldm")
    with safe_open(str(out), "pt") as f:
        for key in ("v_pred", "ztsnr"):
            t = f.get_tensor(key)
            assert t.dtype == torch.float32 and t.shape == (0,)
    assert any("v_pred, ztsnr" in n for n in r.notes)
    assert open_unet(out).prediction.source == "key v_pred"


def test_metadata_that_says_v_prediction_gives_an_ldm_file_its_marker(tmp_path):
    src = write_ldm_checkpoint(tmp_path / "m.safetensors", metadata={"modelspec.prediction_type": "v"})
    r = convert(src, tmp_path / "o.safetensors", to="ldm")
    assert raw_tensors(tmp_path / "o.safetensors", ["v_pred"]) == {"v_pred": ("F32", [0], b"")}
    assert any("v_pred" in n and "modelspec.prediction_type" in n for n in r.notes)
    epsilon = write_ldm_checkpoint(tmp_path / "e.safetensors")  # a family default writes nothing
    r = convert(epsilon, tmp_path / "e2.safetensors", to="ldm")
    assert r.notes == [] and "v_pred" not in read_header(tmp_path / "e2.safetensors")[1]


@pytest.mark.parametrize("flavor", ["comfy", "sdcpp"])
@pytest.mark.parametrize("kind", ["v_pred+ztsnr", "cosxl"])
def test_markers_survive_ldm_gguf_ldm_bit_for_bit(kind, flavor, tmp_path):
    src = marked(tmp_path, MARKERS[kind])
    quantize_file(src, tmp_path / "m.gguf", "gguf:Q8_0", flavor=flavor)
    g = open_unet(tmp_path / "m.gguf").prediction
    assert g.type == EXPECTED[kind][0] and g.markers_from == "metadata unetkit.prediction_markers"
    back = tmp_path / "back.safetensors"
    convert(tmp_path / "m.gguf", back, to="ldm")
    assert raw_tensors(back, MARKERS[kind]) == raw_tensors(src, MARKERS[kind])


def test_markers_of_a_pickle_are_kept(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {**ldm_state(tiny_unet()), **MARKERS["cosxl"]}}, ckpt)
    out = tmp_path / "m.safetensors"
    convert(ckpt, out, to="ldm")
    got = raw_tensors(out, MARKERS["cosxl"])
    assert got["edm_vpred.sigma_min"][0] == "F64" and got["edm_vpred.sigma_max"][1] == []
    assert struct.unpack("<d", got["edm_vpred.sigma_min"][2])[0] == 0.002


def test_a_huge_tensor_under_a_marker_name_is_refused(tmp_path):
    path = marked(tmp_path, {"edm_mean": torch.zeros(64, 64)})
    with pytest.raises(KeyMapError, match="edm_mean.*4096 values"):
        open_unet(path)


def test_damaged_marker_metadata_is_an_error(tmp_path):
    path = write_ldm_checkpoint(
        tmp_path / "m.safetensors", metadata={"unetkit.prediction_markers": '{"v_pred": {"dtype": "F32"}}'}
    )
    with pytest.raises(FormatError, match="marker 'v_pred' is malformed"):
        open_unet(path)


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_reports_v_prediction_library_and_cli(tmp_path, capsys):
    path = marked(tmp_path, MARKERS["v_pred+ztsnr"], "sdxl")
    info = inspect_file(path, scan=False)
    assert info["prediction"]["type"] == "v_prediction" and info["prediction"]["source"] == "key v_pred"
    assert info["prediction"]["zero_terminal_snr"] and info["prediction_probe"] is None
    assert main(["inspect", str(path), "--no-scan", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["prediction"] == info["prediction"]
    assert main(["-q", "inspect", str(path), "--no-scan"]) == 0
    out = capsys.readouterr().out
    assert "prediction   v_prediction, zero terminal SNR (from key v_pred; zero terminal SNR from key ztsnr)" in out
    assert "marker     v_pred: F32 [0]" in out


def _probe_model(bias: float):
    model = tiny_unet()
    with torch.no_grad():
        model.conv_out.weight.mul_(0.01)
        model.conv_out.bias.fill_(bias)
    return model


@pytest.mark.parametrize("bias, expected", [(-5.0, "v_prediction"), (0.0, "epsilon")])
def test_probe_prediction_is_a_labelled_probe(bias, expected, tmp_path, capsys):
    path = save_ldm(_probe_model(bias), tmp_path / "m.safetensors")
    assert main(["inspect", str(path), "--no-scan", "--probe-prediction", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    probe = info["prediction_probe"]
    assert probe["method"] == "probe" and probe["prediction_type"] == expected
    assert (probe["mean_output_minus_input"] < -1) == (expected == "v_prediction")
    assert "not a marker" in probe["note"] and probe["file_says"] == "epsilon"
    assert info["prediction"]["type"] == "epsilon"  # what the file says is unchanged by the probe
    if expected == "v_prediction":
        assert not probe["agrees"] and "family default" in probe["note"]
    assert main(["-q", "inspect", str(path), "--no-scan", "--probe-prediction"]) == 0
    out = capsys.readouterr().out
    assert f"probe        {expected}" in out and "not a marker" in out


def test_probe_runs_sdxl_with_its_added_conditioning(tmp_path):
    from unetkit.inspection import probe_prediction

    probe = probe_prediction(open_unet(write_ldm_checkpoint(tmp_path / "x.safetensors", "sdxl")))
    assert probe["prediction_type"] in ("epsilon", "v_prediction") and "not a marker" in probe["note"]


# ------------------------------------------------------------------------------------------------ verify


def test_verify_uses_the_reference_prediction_type_unless_told(tmp_path):
    from unetkit.verification import verify

    src = marked(tmp_path, MARKERS["v_pred"])
    convert(src, tmp_path / "unet", to="diffusers")
    kw = dict(quick=True, blame=False, size=8, exact_fast=True)
    report = verify(src, tmp_path / "unet", **kw)
    assert report.settings["prediction_type"] == "v_prediction"
    assert report.settings["prediction_type_source"] == "the reference's key v_pred"
    assert "v_prediction, the reference's key v_pred" in report.text()
    report = verify(src, tmp_path / "unet", prediction_type="epsilon", **kw)
    assert report.settings["prediction_type"] == "epsilon" and "given" in report.settings["prediction_type_source"]
