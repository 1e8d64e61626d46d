"""A core attention for megatron-core's local (non-Transformer-Engine) layer spec that also
serves multi-latent attention.

megatron-core 0.19.2's local spec pairs ``MLASelfAttention`` with ``DotProductAttention``, which
does not take the ``k_channels`` / ``v_channels`` arguments MLA passes (the query/key head
dimension ``qk_head_dim + qk_pos_emb_head_dim`` differs from the value head dimension), so MLA
cannot be built without Transformer Engine. :class:`SDPACoreAttention` takes them and computes
causal attention with ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory
efficient kernels on GPU, a fused kernel on CPU). :func:`use_sdpa_core_attention` swaps it into a
layer spec.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec


class SDPACoreAttention(MegatronModule):
    """Core attention on ``scaled_dot_product_attention``, with separate key and value head
    sizes (MLA) and grouped-query attention.

    Inputs are megatron's ``[s, b, heads, dim]``; the output is ``[s, b, heads * v_dim]``.
    Tensor and context parallelism of size 1 only (what the examples use).
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention supports context_parallel_size == 1 only")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        k_channels = k_channels or config.kv_channels
        self.hidden_size_per_attention_head_v = v_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(k_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
        **kwargs,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.size(1) != q.size(1):  # grouped-query attention
            repeat = q.size(1) // k.size(1)
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask.bool()  # megatron masks with True = "do not attend"
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
        )
        # [b, h, s, dv] -> [s, b, h * dv]
        b, h, s, dv = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * dv)


def use_sdpa_core_attention(layer_specs):
    """Replace the core attention of every layer spec (a ``ModuleSpec`` or a list / block spec of
    them) by :class:`SDPACoreAttention`, in place. Returns its argument."""
    specs = getattr(layer_specs, "layer_specs", layer_specs)
    if isinstance(specs, ModuleSpec):
        specs = [specs]
    for spec in specs:
        attention = getattr(spec.submodules, "self_attention", None)
        if attention is not None and hasattr(attention.submodules, "core_attention"):
            attention.submodules.core_attention = SDPACoreAttention
    return layer_specs
