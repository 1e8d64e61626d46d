"""Bytes of symmetric memory the low-latency kernels need: a pure-Python mirror of
`csrc/low_latency/layout.h` (`required_bytes`), so that `Buffer.get_low_latency_rdma_size_hint`
works without the extension. A GPU test checks the two agree.

Per rank: a control area, two banks of signals (sized by the rank count only) and two banks of
data (sized per call by T tokens, hidden H and E experts): dispatch landing slots
`[E_local][R][T]` (= E * T messages), dispatch staging `[T]` messages and `[T][16]` headers,
combine landing `[T][16][H]` bf16 and the zero-copy combine buffer `[E_local][R * T][H]` bf16.
"""

from __future__ import annotations

PART_CHANNELS = 1024
SCALE_BLOCK = 128
MAX_TOPK = 16
MAX_LOCAL_EXPERTS = 1024
HEADER_BYTES = 16
SECTION_ALIGNMENT = 256
CONTROL_BYTES = 256
BANK_COUNTER_BYTES = 32


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _num_parts(hidden: int) -> int:
    return (hidden + PART_CHANNELS - 1) // PART_CHANNELS


def _chunk_bytes(channels: int, fp8: bool) -> int:
    scales = _align(channels // SCALE_BLOCK * 4, 16) if fp8 else 0
    return _align(scales + channels * (1 if fp8 else 2), 16)


def message_bytes(hidden: int, fp8: bool) -> int:
    """A dispatch message: a 16-byte header, then one chunk per part of 1024 channels."""
    last = _num_parts(hidden) - 1
    last_channels = min(PART_CHANNELS, hidden - last * PART_CHANNELS)
    return HEADER_BYTES + last * _chunk_bytes(PART_CHANNELS, fp8) + _chunk_bytes(last_channels, fp8)


def slot_bytes(hidden: int) -> int:
    fp8 = message_bytes(hidden, True) if hidden % SCALE_BLOCK == 0 else 0
    return max(message_bytes(hidden, False), fp8)


def signal_bank_bytes(num_ranks: int) -> int:
    pairs = MAX_LOCAL_EXPERTS * num_ranks * 8
    ranks = num_ranks * 8
    sections = [pairs, pairs, ranks, ranks, ranks, pairs, ranks, BANK_COUNTER_BYTES]
    return sum(_align(size, SECTION_ALIGNMENT) for size in sections)


def _data_sections(max_tokens: int, hidden: int, num_experts: int) -> list[int]:
    slot, row = slot_bytes(hidden), hidden * 2
    return [
        num_experts * max_tokens * slot,  # dispatch landing
        max_tokens * slot,  # dispatch staging
        max_tokens * MAX_TOPK * HEADER_BYTES,  # dispatch header staging
        max_tokens * MAX_TOPK * row,  # combine landing
        num_experts * max_tokens * row,  # combine staging (zero-copy buffer)
    ]


def data_bank_bytes(max_tokens: int, hidden: int, num_experts: int) -> int:
    return sum(_align(size, SECTION_ALIGNMENT) for size in _data_sections(max_tokens, hidden, num_experts))


def required_bytes(max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Exactly what the kernels lay out (`layout.h`'s `required_bytes`)."""
    signals = 2 * signal_bank_bytes(num_ranks)
    return CONTROL_BYTES + signals + 2 * data_bank_bytes(max_tokens, hidden, num_experts)


def size_hint(max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """An upper bound of `required_bytes` that grows strictly with every size (each data section
    counted with its worst-case alignment padding rather than rounded up)."""
    sections = _data_sections(max_tokens, hidden, num_experts)
    data = sum(sections) + len(sections) * SECTION_ALIGNMENT
    return CONTROL_BYTES + 2 * signal_bank_bytes(num_ranks) + 2 * data
