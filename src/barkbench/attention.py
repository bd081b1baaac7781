"""Bark self-attention through `torch.nn.functional.scaled_dot_product_attention`.

transformers 5.x ships Bark with eager and FlashAttention-2 only, and optimum's BetterTransformer
(which passed `attn_mask=None` for Bark) is gone. This module swaps the class of each eager
attention module in place (same weights, same buffers) and, unlike the old layer, honours the
attention mask so padded batches stay correct.

Against a pre-allocated (static) KV cache, Bark's own causal mask is wrong: it assumes the queries are
the last `q_len` of the keys, while a static cache always returns all of its slots. With a static
cache layer, the causal mask comes from the positions the new queries take in the cache (the layer's
fill level before the update), so one decode step has fixed shapes and compiles once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import StaticLayer
from transformers.models.bark.modeling_bark import BarkSelfAttention


class BarkSdpaAttention(BarkSelfAttention):
    def forward(self, hidden_states, attention_mask=None, cache=None, use_cache=False, output_attentions=False,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values  # named past_key_values before transformers 5.2x
        query, key, value = self.att_proj(hidden_states).split(self.embed_dim, dim=2)
        query = self._split_heads(query, self.num_heads, self.head_dim)
        key = self._split_heads(key, self.num_heads, self.head_dim)
        value = self._split_heads(value, self.num_heads, self.head_dim)
        query_positions = None
        if cache is not None:
            layer = cache.layers[self.layer_idx]
            if isinstance(layer, StaticLayer):
                # read before the update advances it: where the new queries land in the cache
                start = layer.cumulative_length.to(query.device)
                query_positions = start + torch.arange(query.size(-2), device=query.device)
            key, value = cache.update(key, value, self.layer_idx)
        attn_output, attn_weights = self._attn(query, key, value, attention_mask, query_positions)
        attn_output = self._merge_heads(attn_output, self.num_heads, self.head_dim)
        attn_output = self.resid_dropout(self.out_proj(attn_output))
        return attn_output, attn_weights

    def _attn(self, query, key, value, attention_mask=None, query_positions=None):
        q_len, k_len = query.size(-2), key.size(-2)
        is_causal = False
        mask = attention_mask
        if self.is_causal and (q_len > 1 or query_positions is not None):
            if mask is None and q_len == k_len and query_positions is None:
                is_causal = True  # fused kernel path: no mask tensor at all
            else:
                if query_positions is None:  # dynamic cache: the queries are the last q_len keys
                    causal = self.bias[:, :, k_len - q_len : k_len, :k_len]
                else:  # static cache: key slot j is visible to a query at position p iff j <= p
                    slots = torch.arange(k_len, device=query.device)
                    causal = (slots[None, :] <= query_positions[:, None])[None, None]
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
