"""GGML block codecs: byte-exact against ggml's own reference encoder output and against gguf-py.

The reference vectors live in the repository, in ``tests/data/ggml_reference.npz``, and were produced by ggml's C
quantizers (see ``tests/data/README.md``). The file's sha256 is pinned below (``GOLDEN_SHA256``) and checked before
use; these tests fail, not skip, when the file is missing or differs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from unetkit.errors import QuantError
from unetkit.quant.gguf import QTYPES, dequantize, get_codec, qtype_by_id, qtype_by_name, quantize, row_bytes
from unetkit.quant.gguf.codecs import base as codec_base
from unetkit.quant.gguf.codecs import fused, kquants

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "ggml_reference.npz"
#: sha256 of tests/data/ggml_reference.npz; a different file means different reference vectors, not a codec bug.
GOLDEN_SHA256 = "b457e3302781dfc3931304eb63d90dad66baf1758c0f0748edec5eb699b22841"

GOLDEN_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "BF16", "F16"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
QKX2_TYPES = ["Q2_K", "Q4_K", "Q5_K"]  # make_qkx2_quants: a fused CPU kernel (codecs/fused.py)
FUSED_TYPES = [*QKX2_TYPES, "Q6_K"]  # and make_qx_quants (Q6_K)
GGUF_PY_ENCODABLE = ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "F16", "BF16"]
ALL_TYPES = [q.name for q in QTYPES]


def _golden_key(name: str) -> str:
    return name[:-2].lower() + "_K" if name.endswith("_K") else name.lower()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The codecs run thousands of small ops; under pytest-xdist (or any other load on the CPU) OpenMP threads
    oversubscribe the cores and each op waits for a scheduler slice. One thread keeps the suite fast and steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_golden_file() -> None:
    """Fail, with what to do, unless tests/data/ggml_reference.npz is there and is the pinned file."""
    assert GOLDEN.is_file(), (
        f"ggml reference vectors not found at {GOLDEN}: the codec tests need tests/data/ggml_reference.npz "
        f"(it is part of the repository: git checkout -- tests/data/ggml_reference.npz)"
    )
    digest = hashlib.sha256(GOLDEN.read_bytes()).hexdigest()
    assert digest == GOLDEN_SHA256, (
        f"ggml reference vectors {GOLDEN} have sha256 {digest}, expected {GOLDEN_SHA256}: the file is corrupt, "
        f"truncated or replaced; restore it with git checkout -- tests/data/ggml_reference.npz (if it was "
        f"regenerated on purpose, update GOLDEN_SHA256 here and the sha256 in tests/data/README.md)"
    )


def test_golden_file_is_the_pinned_one():
    _check_golden_file()


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    _check_golden_file()
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def gguf_quants():
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    return quants, gguf.GGMLQuantizationType


def _bits(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns (compares NaN, -0.0 and inf exactly)."""
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


def _differing_blocks(got: np.ndarray, want: np.ndarray, type_size: int) -> int:
    return int((got.reshape(-1, type_size) != want.reshape(-1, type_size)).any(axis=1).sum())


# ---------------------------------------------------------------------------------------------------------------------
# the qtype table


def test_qtype_table_matches_gguf_py():
    gguf = pytest.importorskip("gguf")
    for q in QTYPES:
        gq = gguf.GGMLQuantizationType[q.name]
        assert q.ggml_id == int(gq), q.name
        assert (q.block_size, q.type_size) == gguf.GGML_QUANT_SIZES[gq], q.name
        assert q.exact_encoder, q.name


def test_qtype_lookup():
    assert qtype_by_name("q4_k") is qtype_by_name("Q4_K")
    assert qtype_by_id(12).name == "Q4_K"
    assert row_bytes("Q4_K", 512) == 288
    assert row_bytes("Q8_0", 64) == 68
    assert row_bytes("F16", 3) == 6
    with pytest.raises(QuantError, match="block size is 256"):
        row_bytes("Q6_K", 100)
    with pytest.raises(QuantError, match="unsupported ggml type id"):
        qtype_by_id(9)


def test_unknown_qtype_name_lists_known_ones():
    with pytest.raises(QuantError) as e:
        quantize(torch.zeros(32), "Q4_Z")
    msg = str(e.value)
    assert "Q4_Z" in msg
    for name in ALL_TYPES:
        assert name in msg


# ---------------------------------------------------------------------------------------------------------------------
# byte-exact against ggml


@pytest.mark.parametrize("name", GOLDEN_TYPES)
def test_encoder_matches_ggml_bytes(golden, name):
    x = torch.from_numpy(golden["input"])
    want = golden[f"{_golden_key(name)}_bytes"]
    got = quantize(x, name).numpy()
    assert got.shape == want.shape
    bad = _differing_blocks(got, want, qtype_by_name(name).type_size)
    assert bad == 0, f"{name}: {bad} blocks differ from ggml's reference encoder"


@pytest.fixture(params=["fused", "torch"])
def search_path(request, monkeypatch):
    """Run a test once with the fused numba search kernel and once with the torch reference loop."""
    monkeypatch.setenv("UNETKIT_FUSED", "1" if request.param == "fused" else "0")
    assert fused.available(torch.zeros(1)) == (request.param == "fused"), "numba missing: pip install numba"
    return request.param


@pytest.mark.parametrize("name", FUSED_TYPES)
def test_both_search_paths_match_ggml_bytes(golden, search_path, name):
    x = torch.from_numpy(golden["input"])
    want = golden[f"{_golden_key(name)}_bytes"]
    got = quantize(x, name).numpy()
    assert _differing_blocks(got, want, qtype_by_name(name).type_size) == 0, f"{name} ({search_path} search)"


def _hard_rows(rng: np.random.Generator) -> torch.Tensor:
    """Rows unlike the golden input: heavy tails, offsets, constant and zero sub-blocks, tiny and huge magnitudes,
    rows where one value dwarfs the rest (the nearest_int garbage range), exact ties (+a and -a in one sub-block),
    and a count of sub-blocks that is not a multiple of the kernel's tile."""
    rows = [
        rng.standard_normal((37, 256)),
        rng.standard_t(2, (37, 256)),
        rng.standard_normal((37, 256)) + 3.0,
        -np.abs(rng.standard_normal((37, 256))) - 1.0,
        rng.standard_normal((37, 256)) * 1e-30,
        rng.standard_normal((37, 256)) * 1e20,
        np.where(rng.random((37, 256)) < 0.01, 1e9, rng.standard_normal((37, 256)) * 1e-3),
        rng.integers(-4, 5, (37, 256)) / 8.0,
    ]
    x = np.concatenate(rows).astype(np.float32)
    x[5, :16] = 0.0
    x[6, 32:64] = 0.7
    x[7, 64:96] = -0.0
    x[8, 96:112] = np.tile(np.float32([0.5, -0.5, 0.25, -0.25]), 4)
    return torch.from_numpy(x)


@pytest.mark.parametrize("name", FUSED_TYPES)
def test_fused_search_equals_torch_search(monkeypatch, name):
    """The fused kernels and the torch loops give the same bytes on :func:`_hard_rows`."""
    x = _hard_rows(np.random.default_rng(11))
    monkeypatch.setenv("UNETKIT_FUSED", "1")
    got = quantize(x, name)
    monkeypatch.setenv("UNETKIT_FUSED", "0")
    want = quantize(x, name)
    assert _differing_blocks(got.numpy(), want.numpy(), qtype_by_name(name).type_size) == 0


# The whole search state, bit for bit: the best error itself, not only the decisions it leads to (a reordered sum
# changes the error's last bits long before it changes a block's bytes).


@pytest.mark.parametrize("name", QKX2_TYPES)
def test_fused_qkx2_state_equals_torch(name):
    rng = np.random.default_rng(11)
    x = _hard_rows(rng)
    n, nmax, steps, mad = {"Q2_K": (16, 3, 16, True), "Q4_K": (32, 15, 21, False), "Q5_K": (32, 31, 16, False)}[name]
    xT = x.reshape(-1, n).t().contiguous()
    w = xT.abs() + torch.from_numpy(rng.random(xT.shape[1]).astype(np.float32))
    cs = [float(np.float32(nmax - 0.5 + 0.1 * s)) for s in range(steps)]
    got_state, got_deg = fused.qkx2_search(xT, w, nmax, cs, mad)
    want_state, want_deg = kquants.qkx2_search_torch(xT, w, nmax, cs, mad)
    assert torch.equal(got_deg, want_deg) and int(got_deg.sum()) > 0
    live = ~want_deg  # constant columns return early in C; their state is discarded
    assert np.array_equal(_bits(got_state[:, live]), _bits(want_state[:, live]))


@pytest.mark.parametrize("nmax", [32, 4])  # Q6_K's, and a small one (more clamping)
def test_fused_qx_state_equals_torch(nmax):
    xT = _hard_rows(np.random.default_rng(11)).reshape(-1, 16).t().contiguous()
    cs = [-float(np.float32(nmax + np.float32(0.1) * np.float32(s))) for s in range(-9, 10) if s != 0]
    got_state, got_zero = fused.qx_search(xT, nmax, cs)
    want_state, want_zero = kquants.qx_search_torch(xT, nmax, cs)
    assert torch.equal(got_zero, want_zero) and int(got_zero.sum()) > 0
    live = ~want_zero  # all-zero columns return early in C; their state is discarded
    assert np.array_equal(_bits(got_state[:, live]), _bits(want_state[:, live]))


@pytest.mark.parametrize("name", GOLDEN_TYPES)
def test_decoder_matches_ggml_values(golden, name):
    data = torch.from_numpy(golden[f"{_golden_key(name)}_bytes"])
    want = golden[f"{_golden_key(name)}_dequant"]
    got = dequantize(data, name, want.shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    assert np.array_equal(_bits(got), _bits(want)), f"{name}: {int((_bits(got) != _bits(want)).sum())} values differ"


@pytest.mark.parametrize("name", GOLDEN_TYPES)
def test_decoder_matches_gguf_py(golden, gguf_quants, name):
    quants, T = gguf_quants
    data = golden[f"{_golden_key(name)}_bytes"]
    want = quants.dequantize(data, T[name])
    got = dequantize(torch.from_numpy(data), name, want.shape)
    assert np.array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("name", GGUF_PY_ENCODABLE)
@pytest.mark.parametrize("dist", ["normal", "heavy", "offset"])
def test_encoder_matches_gguf_py_on_random_rows(gguf_quants, name, dist):
    quants, T = gguf_quants
    rng = np.random.default_rng(20240601)
    x = rng.standard_normal((64, 1024)).astype(np.float32) * np.float32(0.02)
    if dist == "heavy":
        x *= np.exp(rng.standard_normal(x.shape) * 1.5).astype(np.float32)
    elif dist == "offset":
        x += np.float32(0.03)
    want = quants.quantize(x, T[name])
    got = quantize(torch.from_numpy(x), name).numpy()
    assert _differing_blocks(got, want.view(np.uint8), qtype_by_name(name).type_size) == 0
    decoded = dequantize(torch.from_numpy(got), name, x.shape)
    assert np.array_equal(_bits(decoded), _bits(quants.dequantize(want, T[name])))


# ---------------------------------------------------------------------------------------------------------------------
# edge cases


def _edge_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n = 512
    ties = np.zeros(n, dtype=np.float32)
    # every 32-block: one element sets the scale to a power of two so that x/d hits .5 exactly for the rest
    for b in range(0, n, 32):
        ties[b : b + 32] = (rng.integers(-16, 16, 32) + 0.5) / np.float32(8.0)
        ties[b] = -2.0
    return {
        "zeros": np.zeros(n, dtype=np.float32),
        "constant": np.full(n, 0.37, dtype=np.float32),
        "negative_constant": np.full(n, -1.25, dtype=np.float32),
        "tiny_1e-30": (rng.standard_normal(n) * 1e-30).astype(np.float32),
        "tiny_1e-6": (rng.standard_normal(n) * 1e-6).astype(np.float32),
        "huge_1e4": (rng.standard_normal(n) * 1e4).astype(np.float32),
        "ties": ties,
        "integers": rng.integers(-8, 8, n).astype(np.float32),
    }


EDGE = _edge_rows()


@pytest.mark.parametrize("case", list(EDGE))
@pytest.mark.parametrize("name", ALL_TYPES)
def test_edge_cases_round_trip(case, name):
    x = torch.from_numpy(EDGE[case]).reshape(2, 256)
    packed = quantize(x, name)
    y = dequantize(packed, name, x.shape)
    assert not torch.isnan(y).any()
    assert torch.isfinite(y).all()
    if case == "zeros":
        assert torch.equal(y, torch.zeros_like(y))
    if name == "F32":
        assert torch.equal(y, x)
    amax = float(x.abs().max())
    if case in ("constant", "negative_constant", "huge_1e4", "integers", "ties"):
        # a generous bound: every type keeps values within half of the row's magnitude
        assert float((y - x).abs().max()) <= 0.5 * amax + 1e-12


@pytest.mark.parametrize("case", list(EDGE))
@pytest.mark.parametrize("name", GGUF_PY_ENCODABLE)
def test_edge_cases_match_gguf_py(gguf_quants, case, name):
    quants, T = gguf_quants
    x = EDGE[case].reshape(2, 256)
    want = quants.quantize(x, T[name])
    got = quantize(torch.from_numpy(x), name).numpy()
    assert np.array_equal(got, want.view(np.uint8))


def test_ties_round_as_c_does():
    # Q8_0: d = 127/127 = 1, so q = roundf(x): half away from zero, not half to even
    x = torch.zeros(32)
    x[0] = 127.0
    x[1:9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5])
    q = quantize(x, "Q8_0")[2:].view(torch.int8)
    assert q[:9].tolist() == [127, 1, 2, 3, -1, -2, -3, 127, -127]


def test_first_occurrence_and_signed_zero_rules():
    """Scans in ggml keep the first extreme they meet; these pick the sign of the stored scale or minimum."""
    # Q4_0: `max` is the first element of largest magnitude: -2 before +2 gives d = -2/-8 = +0.25, else -0.25
    x = torch.zeros(32)
    x[3], x[20] = -2.0, 2.0
    d_first_neg = quantize(x, "Q4_0")[:2].view(torch.float16).item()
    x[3], x[20] = 2.0, -2.0
    d_first_pos = quantize(x, "Q4_0")[:2].view(torch.float16).item()
    assert (d_first_neg, d_first_pos) == (0.25, -0.25)
    # Q4_1/Q5_1: `min` is the first minimum met, so a -0.0 before any +0.0 is stored as fp16 -0.0 (0x8000)
    x = torch.rand(32) + 0.5
    x[4], x[9] = -0.0, 0.0
    for name in ("Q4_1", "Q5_1"):
        assert quantize(x, name)[2:4].tolist() == [0x00, 0x80], name
    x[4], x[9] = 0.0, -0.0
    for name in ("Q4_1", "Q5_1"):
        assert quantize(x, name)[2:4].tolist() == [0x00, 0x00], name
    # all-zero blocks: d = amax/127 = +0 (Q8_0), but d = max/-8 = -0.0 (Q4_0/Q5_0, ggml stores 0x8000 too)
    zeros = -torch.zeros(256)
    for name in ("Q8_0", "Q4_K", "Q6_K", "Q2_K"):
        assert not quantize(zeros, name).any(), name
    assert quantize(zeros, "Q4_0")[:2].tolist() == [0x00, 0x80]
    assert quantize(zeros, "Q5_0")[:2].tolist() == [0x00, 0x80]


def test_extreme_magnitudes_do_not_crash():
    rng = np.random.default_rng(3)
    for scale in (1e-41, 1e-38, 1e30):
        x = torch.from_numpy((rng.standard_normal((2, 256)) * scale).astype(np.float32))
        for name in ALL_TYPES:
            packed = quantize(x, name)
            assert packed.shape == (2, row_bytes(name, 256))
            dequantize(packed, name, x.shape)


# ---------------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(bad):
    x = torch.zeros(4, 256)
    x[2, 17] = bad
    x[3, 0] = bad
    with pytest.raises(QuantError) as e:
        quantize(x, "Q4_K", name="blocks.0.weight")
    msg = str(e.value)
    assert "blocks.0.weight" in msg
    assert "2 non-finite" in msg
    assert "(2, 17)" in msg


def test_last_dim_not_multiple_of_block_size_raises():
    with pytest.raises(QuantError) as e:
        quantize(torch.zeros(3, 100), "Q4_0", name="w")
    msg = str(e.value)
    assert "(3, 100)" in msg and "32" in msg and "'w'" in msg
    with pytest.raises(QuantError, match="256"):
        quantize(torch.zeros(8, 32), "Q4_K")


def test_non_float_input_raises():
    with pytest.raises(QuantError, match="floating-point"):
        quantize(torch.zeros(32, dtype=torch.int32), "Q8_0")


def test_dequantize_rejects_wrong_byte_count():
    with pytest.raises(QuantError, match="needs 288 bytes"):
        dequantize(torch.zeros(144, dtype=torch.uint8), "Q4_K", (512,))
    with pytest.raises(QuantError, match="multiple"):
        dequantize(torch.zeros(144, dtype=torch.uint8), "Q4_K", (2, 128))


# ---------------------------------------------------------------------------------------------------------------------
# shapes, dtypes, chunking


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "BF16"])
@pytest.mark.parametrize("shape", [(2, 3, 512), (4, 2, 3, 256), (256,)])
def test_shapes_are_preserved(name, shape):
    x = torch.randn(shape) * 0.1
    packed = quantize(x, name)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (*shape[:-1], row_bytes(name, shape[-1]))
    flat = quantize(x.reshape(-1, shape[-1]), name)
    assert torch.equal(packed.reshape(flat.shape), flat)
    y = dequantize(packed, name, shape)
    assert tuple(y.shape) == shape
    assert torch.equal(y.reshape(-1, shape[-1]), dequantize(flat, name, flat.shape[:-1] + (shape[-1],)))
    assert dequantize(packed, name, shape, dtype=torch.float16).dtype == torch.float16
    # raw bytes (numpy, flat) decode the same
    assert torch.equal(dequantize(packed.reshape(-1).numpy(), name, shape), y)


def test_non_float32_inputs_are_converted_first():
    x = torch.randn(4, 256)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dt)
        assert torch.equal(quantize(xd, "Q4_K"), quantize(xd.to(torch.float32), "Q4_K"))


@pytest.mark.parametrize("name", ["Q4_K", "Q3_K", "Q5_0", "F16"])
def test_chunking_does_not_change_bytes(monkeypatch, name):
    x = torch.randn(6, 512) * 0.05
    whole = quantize(x, name)
    monkeypatch.setattr(get_codec(name), "chunk_blocks", 5)
    assert torch.equal(quantize(x, name), whole)
    assert torch.equal(dequantize(whole, name, x.shape), dequantize(whole, name, x.shape))


def test_threads_argument_is_scoped():
    before = torch.get_num_threads()
    x = torch.randn(2, 256)
    assert torch.equal(quantize(x, "Q4_K", threads=2), quantize(x, "Q4_K"))
    assert torch.equal(
        dequantize(quantize(x, "Q8_0"), "Q8_0", x.shape, threads=2), dequantize(quantize(x, "Q8_0"), "Q8_0", x.shape)
    )
    assert torch.get_num_threads() == before


def test_sequential_sum_paths_agree(golden, monkeypatch):
    """The plain-loop path of seq_sum (used off CPU) gives the same bytes as the index_add_ path."""
    monkeypatch.setenv("UNETKIT_FUSED", "0")  # the torch search loop is the one that sums with seq_sum
    x = torch.from_numpy(golden["input"][:8])
    fast = {name: quantize(x, name) for name in K_TYPES}
    monkeypatch.setattr(codec_base, "_index_add_is_sequential", lambda: False)
    for name in K_TYPES:
        assert torch.equal(quantize(x, name), fast[name]), name


def test_seq_sum_is_left_to_right():
    t = torch.tensor([[1e8], [1.0], [-1e8], [1.0]], dtype=torch.float32)
    # ((0 + 1e8) + 1) - 1e8 + 1 == 1 in float32 (the first 1 is absorbed); a pairwise sum would give 2 or 0
    assert codec_base.seq_sum(t).item() == 1.0
    assert codec_base.seq_sum(t, init=torch.tensor([2.0])).item() == 1.0
