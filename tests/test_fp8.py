"""Tests of deepep_megatron.fp8 against an independent numpy reference (per block, own e4m3 rounding)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepep_megatron.fp8 import (
    fp8_roundtrip_error_bound,
    pack_ue8m0,
    per_token_cast_back,
    per_token_cast_to_fp8,
    unpack_ue8m0,
)

# ---------------------------------------------------------------------------------------------------
# Independent reference: numpy float32 arithmetic, e4m3 rounding from a table of all e4m3 values.


def _e4m3_table() -> tuple[np.ndarray, np.ndarray]:
    """All non-negative finite e4m3fn values (ascending) and their 7-bit codes."""
    codes = np.arange(0x7F)  # 0x7F is NaN
    exp, mant = codes >> 3, codes & 7
    vals = np.where(exp == 0, mant * 2.0**-9, (1 + mant / 8.0) * 2.0 ** (exp - 7.0))
    return vals, codes


_E4M3_VALS, _E4M3_CODES = _e4m3_table()
assert _E4M3_VALS.max() == 448.0 and np.all(np.diff(_E4M3_VALS) > 0)


def _ref_e4m3_bits(y: np.ndarray) -> np.ndarray:
    """Round float32 values (|y| <= 464) to e4m3fn, nearest with ties to even code; return uint8 bits."""
    a = np.abs(y.astype(np.float64)).ravel()
    hi = np.clip(np.searchsorted(_E4M3_VALS, a), 1, len(_E4M3_VALS) - 1)
    lo = hi - 1
    d_lo, d_hi = a - _E4M3_VALS[lo], _E4M3_VALS[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (_E4M3_CODES[hi] % 2 == 0))
    pick_hi &= a <= _E4M3_VALS[-1]  # beyond 448 (up to the 464 midpoint) rounds down to 448
    code = np.where(a >= _E4M3_VALS[-1], 0x7E, np.where(pick_hi, _E4M3_CODES[hi], _E4M3_CODES[lo]))
    sign = np.signbit(y.ravel())  # e4m3fn keeps the sign of zero
    return (code | (sign.astype(np.int64) << 7)).astype(np.uint8).reshape(y.shape)


def _ref_pow2_ceil(v: float) -> float:
    mant, exp = math.frexp(v)  # v = mant * 2**exp exactly, mant in [0.5, 1)
    return v if mant == 0.5 else math.ldexp(1.0, exp)


def _ref_cast(x: torch.Tensor, round_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-row, per-block loop. Returns (e4m3 bits uint8 [N, H], float32 scales [N, G])."""
    xf = x.float().numpy()
    n, h = xf.shape
    g = h // 128
    bits = np.zeros((n, h), np.uint8)
    scales = np.zeros((n, g), np.float32)
    for i in range(n):
        for b in range(g):
            blk = xf[i, b * 128 : (b + 1) * 128]
            amax = max(np.float32(np.abs(blk).max()), np.float32(1e-4))
            s = np.float32(amax / np.float32(448.0))
            if round_scale:
                s = np.float32(_ref_pow2_ceil(float(s)))
            scales[i, b] = s
            bits[i, b * 128 : (b + 1) * 128] = _ref_e4m3_bits(blk / s)
    return bits, scales


def _ref_pack(exponents: np.ndarray) -> np.ndarray:
    n, g = exponents.shape
    words = (g + 3) // 4
    out = np.zeros((n, words), np.uint32)
    for i in range(n):
        for b in range(g):
            out[i, b // 4] |= np.uint32(int(exponents[i, b]) << (8 * (b % 4)))
    return out.view(np.int32)


def _make_x(n: int, g: int, dtype: torch.dtype, seed: int, spread: int = 8) -> torch.Tensor:
    """Random rows whose blocks differ in magnitude by up to 2**spread, with a few zeros and outliers."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, g, 128, generator=gen)
    x *= torch.exp2(torch.randint(-spread, spread + 1, (n, g, 1), generator=gen).float())
    # Some tiny elements, far below the block max: they land in e4m3's subnormal range.
    tiny = torch.rand(n, g, 128, generator=gen) < 0.1
    x = torch.where(tiny, x * 2.0**-12, x)
    x = torch.where(torch.rand(n, g, 128, generator=gen) < 0.05, torch.zeros(()), x)
    return x.reshape(n, g * 128).to(dtype)


def _err(x: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    return (x.double() - back.double()).abs()


# ---------------------------------------------------------------------------------------------------
# Exact agreement with the reference.


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 6),
    g=st.integers(1, 6),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    round_scale=st.booleans(),
    magnitude=st.integers(-40, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_cast_matches_reference(n, g, dtype, round_scale, magnitude, seed):
    x = (_make_x(n, g, torch.float32, seed) * 2.0**magnitude).to(dtype)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    ref_bits, ref_scales = _ref_cast(x, round_scale)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == (n, g * 128)
    assert scales.dtype == torch.float32 and scales.shape == (n, g)
    np.testing.assert_array_equal(scales.numpy(), ref_scales)
    np.testing.assert_array_equal(x_fp8.view(torch.uint8).numpy(), ref_bits)


def test_ties_round_to_even():
    # One block: amax 448 gives scale exactly 1, so x / scale == x and the e4m3 rounding is visible.
    # 1.0625 lies halfway between 1.0 (even code) and 1.125; 1.1875 between 1.125 and 1.25 (even).
    x = torch.zeros(1, 128)
    x[0, :4] = torch.tensor([448.0, 1.0625, 1.1875, -(2.0**-10) * 3])
    x_fp8, scales = per_token_cast_to_fp8(x)
    assert scales.item() == 1.0
    assert x_fp8.float()[0, :4].tolist() == [448.0, 1.0, 1.25, -(2.0**-8)]


@pytest.mark.parametrize("round_scale", [False, True])
def test_ue8m0_matches_round_scale(round_scale):
    x = _make_x(5, 7, torch.bfloat16, seed=3)  # 7 blocks: the second word has one padding byte
    ref_fp8, ref_scales = per_token_cast_to_fp8(x, round_scale=True)
    x_fp8, packed = per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=True)
    assert packed.dtype == torch.int32 and packed.shape == (5, 2)
    assert torch.equal(x_fp8.view(torch.uint8), ref_fp8.view(torch.uint8))
    exponents = np.log2(ref_scales.numpy().astype(np.float64)).astype(np.int64) + 127
    np.testing.assert_array_equal(packed.numpy(), _ref_pack(exponents))
    assert torch.equal(unpack_ue8m0(packed, 7), ref_scales)
    assert torch.equal(per_token_cast_back(x_fp8, packed), per_token_cast_back(ref_fp8, ref_scales))


# ---------------------------------------------------------------------------------------------------
# Power-of-two scales.


def test_round_scale_is_smallest_power_of_two_above():
    x = _make_x(8, 4, torch.float32, seed=11, spread=30)
    # Just above a power of two: fl(x / 448) = 2**-10 * (1 + 2**-23), whose float32 log2 rounds to
    # -10 exactly; a log2-based ceil would give 2**-10, too small a scale.
    x[0, :128] = float(np.nextafter(np.float32(0.4375), np.float32(1)))
    _, plain = per_token_cast_to_fp8(x)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=True)
    assert scales[0, 0].item() == 2.0**-9
    for s, p in zip(scales.flatten().tolist(), plain.flatten().tolist()):
        mant, _ = math.frexp(s)
        assert mant == 0.5, f"{s} is not a power of two"
        assert s >= p and s / 2 < p
    amax = x.view(8, 4, 128).abs().amax(-1).clamp(min=1e-4)
    assert torch.all(amax / scales <= 448.0)


def test_roundtrip_exact_dequant_multiplication_with_pow2():
    # With power-of-two scales the float32 product x_fp8 * scale is exact.
    x = _make_x(4, 3, torch.float32, seed=5)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=True)
    prod = x_fp8.double().view(4, 3, 128) * scales.double().unsqueeze(-1)
    assert torch.equal(prod.float().double(), prod)


# ---------------------------------------------------------------------------------------------------
# Round-trip error bound.


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 8),
    g=st.integers(1, 5),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    mode=st.sampled_from(["plain", "round_scale", "ue8m0"]),
    magnitude=st.integers(-60, 60),
    seed=st.integers(0, 2**31 - 1),
)
def test_roundtrip_within_bound(n, g, dtype, mode, magnitude, seed):
    x = (_make_x(n, g, torch.float32, seed) * 2.0**magnitude).to(dtype)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=mode == "round_scale", use_ue8m0=mode == "ue8m0")
    back = per_token_cast_back(x_fp8, scales)
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    bound = fp8_roundtrip_error_bound(x, round_scale=mode != "plain")
    assert torch.all(_err(x, back) <= bound)


@pytest.mark.parametrize("round_scale", [False, True])
def test_bound_is_nearly_attained(round_scale):
    # A vacuous bound would pass anything: random data must come close to it.
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    ratio = _err(x, per_token_cast_back(x_fp8, scales)) / fp8_roundtrip_error_bound(
        x, round_scale=round_scale
    )
    assert ratio.max() > 0.9


def test_bound_attained_at_ties():
    # Scale 1 (amax 448, a power of two): y == x. Ties just above powers of two round down by |y|/17;
    # half the smallest subnormal (2**-10) rounds to 0. The bound must be reached, not just approached.
    x = torch.zeros(1, 128)
    x[0, 0] = 448.0
    e = torch.arange(-6, 8, dtype=torch.float32)
    x[0, 1 : 1 + len(e)] = torch.exp2(e) * (1 + 2.0**-4)
    x[0, 20] = -(2.0**-10)
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=True)
    assert scales.item() == 1.0
    err = _err(x, per_token_cast_back(x_fp8, scales))
    ratio = err / fp8_roundtrip_error_bound(x, round_scale=True)
    assert torch.all(ratio[0, 1 : 1 + len(e)] > 1 - 2.0**-18)
    assert ratio[0, 20] > 1 - 2.0**-18


def _wrong_block_cast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A broken cast: channel c is scaled by block c % G (strided) instead of c // 128."""
    n, h = x.shape
    g = h // 128
    strided = x.float().view(n, 128, g)
    scales = (strided.abs().amax(1).clamp(min=1e-4) / 448.0).contiguous()
    x_fp8 = (strided / scales.unsqueeze(1)).clamp(-448, 448).to(torch.float8_e4m3fn).view(n, h)
    return x_fp8, scales


def _wrong_block_size_cast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A broken cast: the scale is taken from the first 64 channels of each block only."""
    n, h = x.shape
    blocks = x.float().view(n, h // 128, 128)
    scales = blocks[..., :64].abs().amax(-1).clamp(min=1e-4) / 448.0
    x_fp8 = (blocks / scales.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn).view(n, h)
    return x_fp8, scales


@pytest.mark.parametrize(
    "mutation", ["scale_x2", "scale_div2", "cast_with_2x_scale", "rolled_scales", "wrong_block", "block_64"]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_broken_cast_violates_bound(mutation, dtype):
    x = _make_x(16, 8, dtype, seed=7)
    bound = fp8_roundtrip_error_bound(x)
    x_fp8, scales = per_token_cast_to_fp8(x)
    assert torch.all(_err(x, per_token_cast_back(x_fp8, scales)) <= bound)  # the control passes
    if mutation == "scale_x2":
        x_fp8, scales = x_fp8, scales * 2
    elif mutation == "scale_div2":
        x_fp8, scales = x_fp8, scales / 2
    elif mutation == "cast_with_2x_scale":
        x_fp8 = (x.float().view(16, 8, 128) / (2 * scales).unsqueeze(-1)).to(torch.float8_e4m3fn).view(16, -1)
    elif mutation == "rolled_scales":
        scales = scales.roll(1, dims=1)
    elif mutation == "wrong_block":
        x_fp8, scales = _wrong_block_cast(x)
    else:
        x_fp8, scales = _wrong_block_size_cast(x)
    assert torch.any(_err(x, per_token_cast_back(x_fp8, scales)) > bound)


# ---------------------------------------------------------------------------------------------------
# Edge cases and argument checks.


@pytest.mark.parametrize("round_scale", [False, True])
def test_zero_rows(round_scale):
    x = _make_x(3, 2, torch.bfloat16, seed=1)
    x[1] = 0
    x_fp8, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    expected = np.float32(np.float32(1e-4) / np.float32(448.0))
    if round_scale:
        expected = _ref_pow2_ceil(float(expected))
    assert torch.all(scales[1] == torch.tensor(float(expected)))
    assert torch.all(x_fp8[1].float() == 0)
    back = per_token_cast_back(x_fp8, scales)
    assert torch.all(back[1] == 0) and torch.isfinite(back).all()


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_empty(use_ue8m0):
    x = torch.empty(0, 640, dtype=torch.bfloat16)
    x_fp8, scales = per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    assert x_fp8.shape == (0, 640)
    assert scales.shape == ((0, 2) if use_ue8m0 else (0, 5))
    assert per_token_cast_back(x_fp8, scales).shape == (0, 640)


def test_argument_checks():
    with pytest.raises(ValueError, match="multiple of 128"):
        per_token_cast_to_fp8(torch.zeros(2, 192))
    with pytest.raises(ValueError):
        per_token_cast_to_fp8(torch.zeros(256))
    with pytest.raises(TypeError):
        per_token_cast_to_fp8(torch.zeros(2, 256, dtype=torch.float16))
    x_fp8, scales = per_token_cast_to_fp8(torch.randn(2, 256))
    with pytest.raises(ValueError):
        per_token_cast_back(x_fp8, scales[:, :1])
    with pytest.raises(ValueError):
        per_token_cast_back(x_fp8, scales.double())
    with pytest.raises(ValueError):
        per_token_cast_back(x_fp8.float(), scales)
    with pytest.raises(ValueError):
        unpack_ue8m0(torch.zeros(2, 2, dtype=torch.int32), 9)  # 9 blocks need 3 words


# ---------------------------------------------------------------------------------------------------
# UE8M0 packing helpers.


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 5), g=st.integers(0, 13), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(n, g, seed):
    gen = torch.Generator().manual_seed(seed)
    exponents = torch.randint(1, 255, (n, g), generator=gen)  # all valid biased exponents, incl. >= 128
    scales = torch.exp2(exponents.double() - 127).float()
    packed = pack_ue8m0(scales)
    assert packed.dtype == torch.int32 and packed.shape == (n, (g + 3) // 4)
    np.testing.assert_array_equal(packed.numpy(), _ref_pack(exponents.numpy()))
    assert torch.equal(unpack_ue8m0(packed, g), scales)


def test_pack_known_word():
    scales = torch.tensor([[1.0, 2.0, 0.5, 2.0**-20, 2.0**100]])  # biased 127, 128, 126, 107, 227
    packed = pack_ue8m0(scales)
    word0 = 127 | 128 << 8 | 126 << 16 | 107 << 24
    assert packed.tolist() == [[word0, 227]]


def test_pack_rejects_non_power_of_two():
    for bad in (3.0, -2.0, 0.0, float("inf"), 1e-40):
        with pytest.raises(ValueError):
            pack_ue8m0(torch.tensor([[1.0, bad]]))


# ---------------------------------------------------------------------------------------------------
# Device independence.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["plain", "round_scale", "ue8m0"])
def test_cpu_and_cuda_bits_agree(mode):
    x = _make_x(256, 56, torch.bfloat16, seed=2)
    kw = {"round_scale": mode == "round_scale", "use_ue8m0": mode == "ue8m0"}
    cpu_fp8, cpu_s = per_token_cast_to_fp8(x, **kw)
    gpu_fp8, gpu_s = per_token_cast_to_fp8(x.cuda(), **kw)
    assert torch.equal(cpu_fp8.view(torch.uint8), gpu_fp8.cpu().view(torch.uint8))
    assert torch.equal(cpu_s, gpu_s.cpu())
    assert torch.equal(per_token_cast_back(cpu_fp8, cpu_s), per_token_cast_back(gpu_fp8, gpu_s).cpu())
