"""`longdoc_sdpa`: PyTorch SDPA with bottom-right causality, registered through transformers' AttentionInterface.

Chunked prefill (a chunk of queries after cached keys) needs causal attention aligned to the last
key. Transformers' SDPA path expresses that with an explicit (q x kv) mask, which costs memory and
keeps SDPA off its flash kernel. Here no mask is built: one query attends to everything, equal
lengths use `is_causal`, and a chunk after a cache uses PyTorch's `causal_lower_right` bias, which the
flash and memory-efficient kernels take as it is. GQA key/value heads are shared, not repeated.
The model's own attention modules call this through the registry, as they call any implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "longdoc_sdpa"


def causal_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (b, H, q, d), key/value (b, Hkv, kv, d) -> output (b, q, H, d)."""
    if attention_mask is not None:  # a caller that built its own mask gets transformers' SDPA unchanged
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    mask, causal = None, False
    if q_len == kv_len and q_len > 1:
        causal = True
    elif 1 < q_len < kv_len:
        mask = causal_lower_right(q_len, kv_len)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout if module.training else 0.0,
        is_causal=causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, causal_sdpa)
