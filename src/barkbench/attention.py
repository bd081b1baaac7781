"""Bark self-attention through `torch.nn.functional.scaled_dot_product_attention`.

transformers 5.x ships Bark with eager and FlashAttention-2 only, and optimum's BetterTransformer
(which passed `attn_mask=None` for Bark) is gone. This module swaps the class of each eager
attention module in place (same weights, same buffers) and, unlike the old layer, honours the
attention mask so padded batches stay correct.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.bark.modeling_bark import BarkSelfAttention


class BarkSdpaAttention(BarkSelfAttention):
    def _attn(self, query, key, value, attention_mask=None):
        q_len, k_len = query.size(-2), key.size(-2)
        is_causal = False
        mask = attention_mask
        if self.is_causal and q_len > 1:
            if mask is None and q_len == k_len:
                is_causal = True  # fused kernel path: no mask tensor at all
            else:
                causal = self.bias[:, :, k_len - q_len : k_len, :k_len]
                min_value = torch.finfo(query.dtype).min
                causal_add = torch.zeros(causal.shape, dtype=query.dtype, device=query.device)
                causal_add = causal_add.masked_fill(~causal, min_value)
                # same arithmetic as eager (min + min overflows to -inf), so padded rows match too
                mask = causal_add if mask is None else causal_add + mask.to(query.dtype)
        elif mask is not None:
            mask = mask.to(query.dtype)
        dropout = self.dropout if self.training else 0.0
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                is_causal=is_causal)
        return output, None


def use_sdpa(model: torch.nn.Module) -> int:
    """Switch every eager Bark attention module of `model` to SDPA; returns how many were switched."""
    switched = 0
    for module in model.modules():
        if type(module) is BarkSelfAttention:
            module.__class__ = BarkSdpaAttention
            switched += 1
    if not switched:
        raise RuntimeError("no eager Bark attention module found to switch to SDPA")
    return switched
