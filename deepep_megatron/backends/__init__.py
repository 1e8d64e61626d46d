"""Backends behind `Buffer`.

- `protocols`: the seam, one protocol per mode with typed requests and results;
- `selection`: the one place that picks a backend per call, and says why;
- `portable`, `portable_low_latency` (on `all_to_all`): torch.distributed, any device;
- `intranode`: the compiled NVLink/IPC kernels (`csrc/intranode`), through `extension`.
"""
