"""Attention scores as the model's heads see them: q.k per GQA group, and causal softmax of the last queries.

GemFilter (softmax score), SnapKV's observation window, HOMER's pruning and its calibration all
start from the same grouped q.k/sqrt(d); each reduces it its own way.
"""

from __future__ import annotations

import math

import torch


def grouped_logits(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q.k/sqrt(d) of each query head against its KV head's keys, float32.

    queries (b, H, w, d), keys (b, Hkv, n, d) -> (b, Hkv, H/Hkv, w, n).
    """
    batch, heads, w, d = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.float().view(batch, kv_heads, heads // kv_heads, w, d)
    return torch.einsum("bgrqd,bgnd->bgrqn", grouped, keys.float()) / math.sqrt(d)


def causal_window_probs(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the last w positions' queries over all n keys, each seeing only keys up to itself.

    queries (b, H, w, d) at positions n-w..n-1, keys (b, Hkv, n, d) -> (b, Hkv, H/Hkv, w, n).
    """
    w, n = queries.shape[2], keys.shape[2]
    logits = grouped_logits(queries, keys)
    future = torch.arange(n, device=keys.device)[None] > (n - w + torch.arange(w, device=keys.device))[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(-1)


def last_token_logits(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Max over heads of the last token's logit q.k/sqrt(d): query (1, H, 1, d), keys (1, Hkv, n, d) -> (n,)."""
    return grouped_logits(query, keys).flatten(1, 3).amax(1)[0]
