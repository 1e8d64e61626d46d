"""Rounding sizes and counts up to an alignment (per-expert counts, region offsets)."""


def align_up(value: int, alignment: int) -> int:
    """`value` rounded up to a multiple of `alignment`."""
    return (value + alignment - 1) // alignment * alignment
