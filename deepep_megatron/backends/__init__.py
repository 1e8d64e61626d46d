"""Backends behind `Buffer`: `portable` (torch.distributed) and `cuda` (compiled kernels)."""
