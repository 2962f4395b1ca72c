"""gguf:auto: the optimiser (pure), the candidates per flavor, the sensitivity measurement and its cache, and
quantization to size, bits-per-weight and SQNR targets on tiny UNets."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from helpers import save_ldm, tiny_unet
from unetkit.cli.app import main
from unetkit.errors import QuantError, UnetkitError
from unetkit.formats.gguf import read_header
from unetkit.gguf_export import quantize_file
from unetkit.quant.gguf.auto import LADDER, Option, candidates, choose, hull
from unetkit.sensitivity import Settings, analyze, quantize_to_target

FAST = Settings(size=16, timesteps=2, probes=4, check=8)

# --------------------------------------------------------------------------------------------------------------------
# the optimiser


def _random_options(rng: random.Random, n: int) -> dict[str, list[Option]]:
    out = {}
    for i in range(n):
        size = rng.randint(1, 40) * 256
        scale = 10 ** rng.uniform(-3, 1)
        opts = []
        for k, q in enumerate(LADDER):
            bpw = [2.6, 3.4, 4.5, 5.5, 6.6, 8.5, 16][k]
            opts.append(Option(q, int(size * bpw / 8), scale * 4.0 ** (-bpw) * rng.uniform(0.7, 1.3)))
        out[f"t{i}"] = opts
    return out


def test_hull_drops_dominated_and_non_convex_options():
    a, b, c, d = Option("A", 10, 10.0), Option("B", 20, 9.9), Option("C", 30, 1.0), Option("D", 40, 2.0)
    assert hull([d, c, b, a]) == [a, c]  # D dominated by C; B above the segment A-C


@pytest.mark.parametrize("seed", range(4))
def test_byte_budget_is_never_exceeded_and_no_single_change_improves(seed):
    rng = random.Random(seed)
    options = _random_options(rng, 25)
    lo = sum(min(o.nbytes for o in v) for v in options.values())
    hi = sum(max(o.nbytes for o in v) for v in options.values())
    last = None
    for frac in (0.0, 0.1, 0.3, 0.6, 1.0):
        budget = int(lo + frac * (hi - lo))
        sol = choose(options, max_bytes=budget)
        assert sol.nbytes <= budget
        assert sol.nbytes == sum(c.option.nbytes for c in sol.choices.values())
        if last is not None:
            assert sol.noise <= last  # more bytes never gives more noise
        last = sol.noise
        for name, opts in options.items():  # polished: no single option change that fits lowers the noise
            cur = sol.choices[name].option
            for o in opts:
                if sol.nbytes - cur.nbytes + o.nbytes <= budget:
                    assert o.noise >= cur.noise
    assert choose(options, max_bytes=hi).noise == pytest.approx(sum(min(o.noise for o in v) for v in options.values()))


def test_greedy_is_close_to_the_exact_optimum_on_small_problems():
    """Against brute force over every combination: within 5 % of the least noise for the budget."""
    rng = random.Random(3)
    for _ in range(5):
        options = {k: v[:4] for k, v in _random_options(rng, 5).items()}  # 4^5 combinations
        lo = sum(min(o.nbytes for o in v) for v in options.values())
        hi = sum(max(o.nbytes for o in v) for v in options.values())
        budget = (lo + hi) // 2
        best = min(
            sum(o.noise for o in combo)
            for combo in itertools.product(*options.values())
            if sum(o.nbytes for o in combo) <= budget
        )
        assert choose(options, max_bytes=budget).noise <= best * 1.05


def test_noise_budget_met_when_reachable_and_flagged_when_not():
    options = _random_options(random.Random(5), 20)
    floor = sum(min(o.noise for o in v) for v in options.values())
    sol = choose(options, max_noise=floor * 3)
    assert sol.met and sol.noise <= floor * 3
    smaller = choose(options, max_noise=floor * 30)
    assert smaller.nbytes < sol.nbytes  # a looser target gives a smaller file
    out_of_reach = choose(options, max_noise=floor / 2)
    assert not out_of_reach.met


def test_budget_below_the_smallest_options_is_an_error():
    options = _random_options(random.Random(1), 3)
    with pytest.raises(QuantError, match="smallest options take"):
        choose(options, max_bytes=10)
    with pytest.raises(QuantError, match="exactly one target"):
        choose(options)


def test_choose_is_deterministic():
    options = _random_options(random.Random(9), 30)
    a = choose(options, max_bytes=sum(v[2].nbytes for v in options.values()))
    b = choose(dict(options), max_bytes=sum(v[2].nbytes for v in options.values()))
    assert {n: c.option for n, c in a.choices.items()} == {n: c.option for n, c in b.choices.items()}


def test_candidates_follow_the_policy_and_the_flavor():
    tensors = [
        ("input_blocks.0.0.weight", (320, 4, 3, 3)),  # conv_in: the family keeps it (sensitive)
        ("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (320, 320)),
        ("input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight", (320, 320)),
        ("input_blocks.7.1.transformer_blocks.0.attn1.to_q.weight", (1280, 1280)),
        ("input_blocks.1.0.in_layers.2.weight", (320, 320, 3, 3)),
        ("input_blocks.1.0.in_layers.2.bias", (320,)),
    ]
    sens = {"input_blocks.0.0.weight": "conv_in"}
    comfy = candidates(tensors, "comfy", keep=["*attn1.to_k*"], sensitive=sens)
    assert set(comfy) == {tensors[1][0], tensors[3][0], tensors[4][0]}  # kept, sensitive and 1-D settled
    assert comfy[tensors[1][0]] == list(LADDER)  # comfy stores rows of 256: every K-quant fits
    sdcpp = candidates(tensors, "sdcpp", sensitive=sens)
    assert sdcpp[tensors[1][0]] == ["Q4_0", "Q5_0", "Q8_0", "F16"]  # 320 fits no 256-block: legacy types only
    assert sdcpp[tensors[3][0]] == list(LADDER)  # 1280 rows hold whole 256-blocks
    diffusers = candidates(tensors, "diffusers", sensitive=sens)
    assert tensors[4][0] not in diffusers  # diffusers' loader dequantizes only Linear weights
    over = candidates(tensors, "comfy", override=["*to_q*=Q8_0"], sensitive=sens)
    assert tensors[1][0] not in over and tensors[3][0] not in over


# --------------------------------------------------------------------------------------------------------------------
# measurement and targets on a tiny SD1.5-topology UNet


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("UNETKIT_CACHE_DIR", str(d))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def src(tmp_path_factory, cache_dir):
    return save_ldm(tiny_unet("sd1.x"), tmp_path_factory.mktemp("auto") / "in.safetensors")


@pytest.fixture(scope="module")
def sens(src):
    return analyze(src, FAST, workers=0)


def test_prediction_agrees_with_single_tensor_runs(sens):
    c = sens.check
    assert c["n"] == FAST.check
    assert c["spearman"] > 0.9 and c["pearson_log"] > 0.9
    assert 0.5 < c["median_ratio"] < 2.0
    # more bits, less noise, for every tensor
    for t in sens.tensors:
        k = [t.total(q) for q in LADDER if q in t.noise]
        assert all(a >= b for a, b in zip(k, k[1:])), t.name


def test_sensitivity_cache_is_keyed_on_file_and_settings(src, sens, tmp_path):
    again = analyze(src, FAST, workers=0)
    assert again.cached and again.tensors == sens.tensors
    keys = {FAST.key(sens.sha256)}  # every setting is part of the key
    for change in ({"size": 24}, {"timesteps": 3}, {"probes": 5}, {"seed": 1}, {"guidance": 5.0}, {"check": 3}):
        keys.add(Settings(**{**FAST.__dict__, **change}).key(sens.sha256))
    assert len(keys) == 7
    changed = save_ldm(tiny_unet("sd1.x", seed=1), tmp_path / "changed.safetensors")
    fresh = analyze(changed, FAST, workers=0)
    assert not fresh.cached and fresh.sha256 != sens.sha256 and fresh.tensors != sens.tensors


def test_size_target_is_met_and_beats_the_fixed_recipe_at_its_size(src, sens, tmp_path):
    fixed = quantize_file(src, tmp_path / "q4.gguf", "gguf:Q4_K_M", workers=0)
    r = quantize_to_target(src, tmp_path / "auto.gguf", target_size=fixed.file_bytes, settings=FAST, workers=0)
    assert r.file_bytes <= fixed.file_bytes and (tmp_path / "auto.gguf").stat().st_size == r.file_bytes
    assert r.met is True and r.measured_sqnr_db is not None
    q4 = next(p for p in r.front["recipes"] if p["recipe"] == "Q4_K_M")
    assert r.predicted_sqnr_db > q4["predicted_sqnr_db"]
    assert abs(r.measured_sqnr_db - r.predicted_sqnr_db) < 3.0  # the prediction holds for the whole mix
    kv, _ = read_header(tmp_path / "auto.gguf")
    decided = json.loads(kv["unetkit.decisions"])
    assert any(reason.startswith("auto: ") for _, reason in decided.values())
    for target in (int(fixed.file_bytes * 0.8), int(fixed.file_bytes * 1.4)):
        out = tmp_path / f"auto{target}.gguf"
        assert quantize_to_target(src, out, target_size=target, settings=FAST, workers=0).file_bytes <= target


def test_bpw_and_sqnr_targets(src, sens, tmp_path):
    r = quantize_to_target(src, tmp_path / "bpw.gguf", target_bpw=5.0, settings=FAST, workers=0)
    assert r.bits_per_weight <= 5.0
    s = quantize_to_target(src, tmp_path / "sqnr.gguf", target_sqnr=30.0, settings=FAST, workers=0)
    assert s.predicted_sqnr_db >= 30.0
    assert s.met == (s.measured_sqnr_db >= 30.0)
    assert s.met or any("target missed" in n for n in s.notes)
    unreachable = quantize_to_target(src, tmp_path / "sqnr2.gguf", target_sqnr=200.0, settings=FAST, workers=0)
    assert unreachable.met is False and any("target missed" in n for n in unreachable.notes)


def test_results_are_deterministic(src, sens, tmp_path):
    a = quantize_to_target(src, tmp_path / "a.gguf", target_bpw=4.5, settings=FAST, workers=0, measure=False)
    b = quantize_to_target(src, tmp_path / "b.gguf", target_bpw=4.5, settings=FAST, workers=0, measure=False)
    assert a.decisions == b.decisions and a.file_bytes == b.file_bytes


def test_a_deliberately_sensitive_layer_gets_more_bits(tmp_path, cache_dir):
    """One cross-attention to_k gets outliers (a few weights 100x the rest): its blocks quantize far worse, so auto
    gives it a higher type than the same layer in the other blocks."""
    model = tiny_unet("sd1.x")
    victim = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    with torch.no_grad():
        w = dict(model.named_parameters())[victim]
        w.view(-1)[::97] *= 100.0
    src = save_ldm(model, tmp_path / "outliers.safetensors")
    r = quantize_to_target(src, tmp_path / "o.gguf", target_bpw=4.5, settings=FAST, workers=0, measure=False)
    rank = {q: i for i, q in enumerate(("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0", "F16"))}
    to_k = {d["name"]: d["qtype"] for d in r.decisions if d["name"].endswith("attn2.to_k.weight")}
    hit = to_k.pop("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight")
    assert all(rank[hit] > rank[q] for q in to_k.values()), (hit, to_k)


def test_keep_and_override_win_over_the_optimiser(src, sens, tmp_path):
    r = quantize_to_target(
        src,
        tmp_path / "ko.gguf",
        target_bpw=3.5,
        keep=["*attn2.to_k*"],
        override=["*attn2.to_v*=Q8_0"],
        settings=FAST,
        workers=0,
        measure=False,
    )
    for d in r.decisions:
        if "attn2.to_k.weight" in d["name"]:
            assert d["qtype"] == "F16" and "--keep" in d["reason"]
        if "attn2.to_v.weight" in d["name"]:
            assert d["qtype"] == "Q8_0" and "override" in d["reason"]


@pytest.mark.parametrize("flavor", ["sdcpp", "diffusers"])
def test_flavor_rules_hold_under_auto(src, sens, tmp_path, flavor):
    fixed = quantize_file(src, tmp_path / f"{flavor}-q8.gguf", "gguf:Q8_0", flavor=flavor, workers=0)
    r = quantize_to_target(
        src, tmp_path / f"{flavor}.gguf", target_size=fixed.file_bytes, flavor=flavor, settings=FAST, workers=0
    )
    assert r.file_bytes <= fixed.file_bytes and r.measured_sqnr_db is not None
    from unetkit.quant.gguf.qtypes import qtype_by_name

    for d in r.decisions:
        q = qtype_by_name(d["qtype"])
        assert d["stored_shape"] == d["shape"]  # exact shapes in both flavors
        assert d["shape"][-1] % q.block_size == 0
        if flavor == "diffusers" and len(d["shape"]) == 4:
            assert d["qtype"] in ("F16", "F32")  # only Linear weights are quantized


def test_auto_needs_exactly_one_target(src, tmp_path):
    with pytest.raises(UnetkitError, match="exactly one target"):
        quantize_to_target(src, tmp_path / "x.gguf", target_bpw=4.0, target_sqnr=20.0, settings=FAST)
    with pytest.raises(UnetkitError, match="needs? a target|chooses each tensor"):
        quantize_file(src, tmp_path / "y.gguf", "gguf:auto")
    with pytest.raises(UnetkitError, match="600MiB"):
        quantize_to_target(src, tmp_path / "z.gguf", target_size="lots", settings=FAST)
    with pytest.raises(UnetkitError, match="smallest file gguf:auto can write here is"):
        quantize_to_target(src, tmp_path / "w.gguf", target_size="1MiB", settings=FAST)


def test_cli_sensitivity_and_auto(src, sens, tmp_path, capsys):
    calib = ["--calib-size", "16", "--calib-timesteps", "2", "--probes", "4", "--check", "8"]
    j, h = tmp_path / "s.json", tmp_path / "s.html"
    assert main(["sensitivity", str(src), "--json", str(j), "--html", str(h), "-q", *calib]) == 0
    data = json.loads(j.read_text())
    assert data["cached"] and len(data["tensors"]) == len(sens.tensors)
    assert "<img" in h.read_text()
    out = tmp_path / "cli.gguf"
    html = tmp_path / "auto.html"
    argv = ["quantize", str(src), str(out), "--method", "gguf:auto", "--target-bpw", "5", "--json", *calib]
    capsys.readouterr()
    assert main([*argv, "--html", str(html)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bits_per_weight"] <= 5 and result["file_bytes"] == out.stat().st_size
    assert result["sensitivity"]["cached"]  # measured once, by the fixture
    assert "Mix per block" in html.read_text()
    assert main(["quantize", str(src), str(tmp_path / "n.gguf"), "--method", "gguf:auto", *calib]) == 2
    assert main(["quantize", str(src), str(tmp_path / "m.gguf"), "--method", "gguf:Q8_0", "--target-bpw", "5"]) == 2
