"""deepep_megatron: expert-parallel dispatch and combine for Mixture-of-Experts models.

A drop-in for DeepEP's `deep_ep` module (`import deepep_megatron as deep_ep`), with a portable
torch.distributed backend that gives the same results on any device, and compiled intranode
kernels for Hopper GPUs.
"""

from deepep_megatron import utils
from deepep_megatron.buffer import Buffer
from deepep_megatron.compat import install_as_deep_ep, uninstall_as_deep_ep
from deepep_megatron.config import Config
from deepep_megatron.event import EventOverlap
from deepep_megatron.handle import DispatchHandle, LowLatencyHandle
from deepep_megatron.validation import topk_idx_t

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "Config",
    "DispatchHandle",
    "EventOverlap",
    "LowLatencyHandle",
    "install_as_deep_ep",
    "topk_idx_t",
    "uninstall_as_deep_ep",
    "utils",
    "__version__",
]
