"""Per-token, per-128-channel FP8 (e4m3) casts, as used by FP8 dispatch.

Layout conventions (the same as DeepEP's):

- ``x_fp8`` is ``[num_tokens, hidden]`` ``torch.float8_e4m3fn``.
- Float scales are ``[num_tokens, hidden / 128]`` float32 and hold the *dequantisation* factor
  ("scale_inv"): ``x ~= x_fp8.float() * scales`` blockwise.
- Packed UE8M0 scales are ``[num_tokens, ceil(hidden / 128 / 4)]`` int32. Each scale is a power of two
  stored as its biased exponent byte ``log2(scale) + 127``; four bytes are packed per int32,
  little-endian along the block axis (block ``4 * j + i`` sits in bits ``8 * i .. 8 * i + 7`` of
  word ``j``), and missing blocks at the end are zero bytes.

Everything is computed in float32 with plain torch ops. Each step is either exact or a single
correctly rounded IEEE operation (division, multiplication, round-to-nearest-even casts), and the
power-of-two rounding works on the float bits rather than through ``log2``, so the result is
deterministic and bit-identical on CPU and CUDA.
"""

from __future__ import annotations

import torch

from deepep_megatron.limits import FP8_BLOCK_SIZE

__all__ = [
    "FP8_BLOCK_SIZE",
    "FP8_E4M3_MAX",
    "FP8_AMAX_MIN",
    "per_token_cast_to_fp8",
    "per_token_cast_back",
    "pack_ue8m0",
    "unpack_ue8m0",
    "fp8_roundtrip_error_bound",
]

"""Channels that share one scale."""

FP8_E4M3_MAX = 448.0
"""Largest finite ``torch.float8_e4m3fn`` value."""

FP8_AMAX_MIN = 1e-4
"""Lower clamp of a block's absolute maximum, so all-zero blocks get a finite, non-zero scale."""

_UE8M0_PER_WORD = 4
_F32_MANTISSA_MASK = 0x7FFFFF
_F32_EXP_SHIFT = 23


def _num_blocks(hidden: int) -> int:
    if hidden % FP8_BLOCK_SIZE != 0:
        raise ValueError(f"hidden size must be a multiple of {FP8_BLOCK_SIZE} for FP8, got {hidden}")
    return hidden // FP8_BLOCK_SIZE


def _ceil_pow2_bits(v: torch.Tensor) -> torch.Tensor:
    """Biased float32 exponent of ``2 ** ceil(log2(v))`` for positive, normal float32 ``v``, as int32.

    Done on the bits: ``torch.log2`` may round ``log2(2**k * (1 + 2**-23))`` down to ``k``, which
    would make the scale too small and overflow e4m3.
    """
    bits = v.contiguous().view(torch.int32)
    exponent = bits >> _F32_EXP_SHIFT  # sign bit is 0 for positive v
    return exponent + ((bits & _F32_MANTISSA_MASK) != 0).to(torch.int32)


def _exponent_to_float(exponent: torch.Tensor) -> torch.Tensor:
    """float32 ``2 ** (exponent - 127)`` built exactly from biased exponents in ``[1, 254]``."""
    return (exponent.to(torch.int32) << _F32_EXP_SHIFT).view(torch.float32)


def _pack_exponents(exponent: torch.Tensor) -> torch.Tensor:
    """Pack ``[N, G]`` biased exponents (0..255, any int dtype) into ``[N, ceil(G / 4)]`` int32."""
    n, g = exponent.shape
    words = -(-g // _UE8M0_PER_WORD)
    padded = torch.zeros((n, words * _UE8M0_PER_WORD), dtype=torch.int64, device=exponent.device)
    padded[:, :g] = exponent.to(torch.int64)
    padded = padded.view(n, words, _UE8M0_PER_WORD)
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=exponent.device)
    packed = (padded << shifts).sum(dim=-1)  # in [0, 2**32): fold into int32's two's complement
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def pack_ue8m0(scales_pow2: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two float32 scales into UE8M0 bytes, four per int32.

    Args:
        scales_pow2: ``[N, G]`` float32, every entry a positive normal power of two
            (``2**-126 .. 2**127``).

    Returns:
        ``[N, ceil(G / 4)]`` int32; block ``4 * j + i`` is byte ``i`` (little-endian) of word ``j``,
        holding ``log2(scale) + 127``; trailing bytes are 0.

    Raises:
        ValueError: if an entry is not a positive normal power of two (this check syncs with the
            device once).
    """
    if scales_pow2.dim() != 2 or scales_pow2.dtype != torch.float32:
        raise ValueError(
            f"scales must be a 2-D float32 tensor, got {scales_pow2.dtype} {tuple(scales_pow2.shape)}"
        )
    bits = scales_pow2.contiguous().view(torch.int32)
    exponent = (bits >> _F32_EXP_SHIFT) & 0xFF
    ok = (bits > 0) & ((bits & _F32_MANTISSA_MASK) == 0) & (exponent >= 1) & (exponent <= 254)
    if not bool(ok.all()):
        raise ValueError("pack_ue8m0 needs positive normal powers of two")
    return _pack_exponents(exponent)


def unpack_ue8m0(packed: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0`.

    Args:
        packed: ``[N, ceil(num_blocks / 4)]`` int32 packed UE8M0 exponents.
        num_blocks: number of scales per row to return (``hidden / 128``).

    Returns:
        ``[N, num_blocks]`` float32 powers of two, ``2 ** (byte - 127)`` (byte 0 decodes to 0.0 and
        byte 255 to inf, as in the float32 encoding).
    """
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(
            f"packed scales must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    words = -(-num_blocks // _UE8M0_PER_WORD)
    if num_blocks < 0 or packed.shape[1] != words:
        raise ValueError(
            f"packed scales for {num_blocks} blocks need {words} int32 words, got {packed.shape[1]}"
        )
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=packed.device)
    exponent = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xFF  # arithmetic shift; masked
    exponent = exponent.reshape(packed.shape[0], words * _UE8M0_PER_WORD)[:, :num_blocks]
    return _exponent_to_float(exponent)


def per_token_cast_to_fp8(
    x: torch.Tensor, *, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast each token to FP8 e4m3 with one scale per block of 128 channels.

    Per row and block: ``amax = max(max|x|, 1e-4)``, ``scale = amax / 448`` (float32, correctly
    rounded), ``x_fp8 = fp8(x / scale)`` (float32 division, then round-to-nearest-even to e4m3).

    Args:
        x: ``[num_tokens, hidden]`` bf16 or float32, ``hidden % 128 == 0``; finite values.
        round_scale: round each scale *up* to a power of two, ``2 ** ceil(log2(amax / 448))``, so that
            dequantisation is exact in float32 and ``|x / scale| <= 448`` still holds.
        use_ue8m0: return the (power-of-two) scales packed as UE8M0 bytes; implies ``round_scale``.

    Returns:
        ``(x_fp8, scales)``: ``x_fp8`` is ``[num_tokens, hidden]`` float8_e4m3fn. ``scales`` is
        ``[num_tokens, hidden / 128]`` float32 (the dequantisation factor), or with ``use_ue8m0``
        ``[num_tokens, ceil(hidden / 512)]`` int32 packed UE8M0 (see the module docstring).

    Raises:
        ValueError: if ``x`` is not 2-D or ``hidden`` is not a multiple of 128.
        TypeError: if ``x`` is not bf16 or float32.
    """
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"x must be bf16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}")
    n, hidden = x.shape
    g = _num_blocks(hidden)

    blocks = x.reshape(n, g, FP8_BLOCK_SIZE).float()
    amax = blocks.abs().amax(dim=-1).clamp(min=FP8_AMAX_MIN)  # [n, g]
    # Divide by a tensor, not a Python scalar: CUDA turns division by a scalar into multiplication by
    # its reciprocal, which rounds differently from the CPU's division.
    scale = amax / torch.full_like(amax, FP8_E4M3_MAX)
    exponent = None
    if round_scale or use_ue8m0:
        exponent = _ceil_pow2_bits(scale)
        scale = _exponent_to_float(exponent)
    x_fp8 = (blocks / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(n, hidden)
    if use_ue8m0:
        return x_fp8, _pack_exponents(exponent)
    return x_fp8, scale


def per_token_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantise the output of :func:`per_token_cast_to_fp8`.

    Args:
        x_fp8: ``[num_tokens, hidden]`` float8_e4m3fn, ``hidden % 128 == 0``.
        scales: ``[num_tokens, hidden / 128]`` float32, or packed UE8M0 ``[num_tokens, ceil(hidden / 512)]``
            int32 (told apart by dtype).

    Returns:
        ``[num_tokens, hidden]`` bf16: ``bf16(float32(x_fp8) * scale)`` blockwise.
    """
    if x_fp8.dtype != torch.float8_e4m3fn or x_fp8.dim() != 2:
        raise ValueError(f"x_fp8 must be 2-D float8_e4m3fn, got {x_fp8.dtype} {tuple(x_fp8.shape)}")
    n, hidden = x_fp8.shape
    g = _num_blocks(hidden)
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales, g)
    elif scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 or packed int32, got {scales.dtype}")
    if tuple(scales.shape) != (n, g):
        raise ValueError(f"scales must be [{n}, {g}], got {tuple(scales.shape)}")
    out = x_fp8.reshape(n, g, FP8_BLOCK_SIZE).float() * scales.unsqueeze(-1)
    return out.to(torch.bfloat16).view(n, hidden)


def fp8_roundtrip_error_bound(x: torch.Tensor, *, round_scale: bool = False) -> torch.Tensor:
    """Elementwise bound on ``|x - per_token_cast_back(*per_token_cast_to_fp8(x))|``.

    Let ``s`` be the block's scale (as :func:`per_token_cast_to_fp8` computes it, a power of two when
    ``round_scale``; ``use_ue8m0`` gives the same values as ``round_scale``) and ``u = 2**-24`` the
    float32 unit roundoff. Round-to-nearest with ``p`` mantissa bits has relative error at most
    ``2**-(p+1) / (1 + 2**-(p+1))`` (worst at a tie just above a power of two). The round trip has four
    roundings:

    1. ``y = fl(x / s) = (x / s)(1 + d1)``, ``|d1| <= u``; ``|y| <= 448`` up to that rounding, so e4m3
       never overflows (it rounds to at most 448).
    2. ``q = e4m3(y)``: 3 mantissa bits, so for ``|y| >= 2**-6`` (the smallest normal)
       ``|q - y| <= |y| / 17``; below it the subnormal spacing is ``2**-9``, so ``|q - y| <= 2**-10``.
    3. ``d = fl(q * s) = q s (1 + d2)``, ``|d2| <= u``.
    4. ``out = bf16(d) = d (1 + d3)``, ``|d3| <= 1 / 257`` (7 mantissa bits; ``d`` is never below bf16's
       normal range since ``s >= 1e-4 / 448``).

    Steps 1-2 give ``|x - q s| <= E1 := max(|x| / 17, 2**-10 s) + 2**-23 |x|``. With a power-of-two
    ``s``, ``q s`` has at most 4 significant bits, so steps 3-4 are exact and the bound is ``E1``.
    Otherwise they add at most ``(|x| + E1) * (1/257 + 2**-23)``::

        round_scale:  E1
        otherwise:    E1 + (|x| + E1) * (1/257 + 2**-23)        (E1 = max(|x|/17, 2**-10 s) + 2**-23 |x|)

    That is about ``0.0588 |x|`` (``0.0630 |x|`` without ``round_scale``), or ``2**-10 s`` for tiny
    ``|x|``. With ``round_scale`` it is attained up to the ``2**-23`` term (an e4m3 tie just above a
    power of two, or half the smallest subnormal); without it random data reaches over 90% of it. So a
    cast that uses a scale 2x off, another block's scale or the wrong block size exceeds it.

    Args:
        x: ``[num_tokens, hidden]`` bf16 or float32, as passed to the cast.
        round_scale: whether the cast used power-of-two scales (``round_scale`` or ``use_ue8m0``).

    Returns:
        ``[num_tokens, hidden]`` float64 bound (float64 so that evaluating it adds only negligible
        rounding).
    """
    _, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    n, hidden = x.shape
    s = scales.double().repeat_interleave(FP8_BLOCK_SIZE, dim=1).view(n, hidden)
    ax = x.double().abs()
    e1 = torch.maximum(ax / 17, s * 2.0**-10) + ax * 2.0**-23
    if round_scale:
        return e1
    return e1 + (ax + e1) * (1 / 257 + 2.0**-23)
