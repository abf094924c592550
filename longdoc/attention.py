"""`longdoc_sdpa`: PyTorch SDPA with bottom-right causality, registered through transformers' AttentionInterface.

Chunked prefill (a chunk of queries after cached keys) needs causal attention aligned to the last
key. Transformers' SDPA path expresses that with an explicit (q x kv) mask, which costs memory and
keeps SDPA off its fastest kernels. Here no mask is built: one query attends to everything, equal
lengths use `is_causal`, and a chunk after a cache is split in two. On CUDA the cached keys (no mask)
and the chunk's own keys (a square causal block) each go to cuDNN's attention, which returns the
log-sum-exp of its scores, and the two partial outputs are joined exactly by those log-sum-exps.
PyTorch serves a bottom-right causal mask only with its slower flash kernel (49 ms against 28 ms for
8K queries over 128K keys on an H200, `benchmarks/results/sdpa-probe-h200.txt`). Elsewhere the chunk
uses PyTorch's `causal_lower_right` bias. GQA key/value heads are shared, not repeated.
The model's own attention modules call this through the registry, as they call any implementation;
`register()` puts it there when a model is loaded. transformers' modeling code and `torch.nn.attention.bias`
(which pulls in torch._dynamo, 2-4 s) are imported on first use, so importing longdoc stays quick.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

NAME = "longdoc_sdpa"

# (query (b, H, q, d), key, value (b, Hkv, kv, d), causal, scale) -> (output (b, H, q, d), lse (b, H, q, 1))
AttentionWithLse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]


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
    visible = kwargs.get("visible_keys")
    if visible is not None and query.shape[2] == 1 and dropout == 0:
        # one query over the first `visible` slots of a static buffer (graph-captured decoding, decode_graph.py)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return decode_attention(query, key, value, visible, scale).transpose(1, 2).contiguous(), None
    if attention_mask is not None and query.shape[2] == 1 and attention_mask.shape[1:3] == (1, 1) and dropout == 0:
        # one query over a static buffer with a length mask
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return single_query_attention(query, key, value, attention_mask, scale).transpose(1, 2).contiguous(), None
    if attention_mask is not None:  # a caller that built its own mask gets transformers' SDPA unchanged
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dropout_p = dropout if module.training else 0.0
    if 1 < q_len < kv_len and dropout_p == 0.0 and cudnn_lse_usable(query, key):
        out = chunk_after_cache(query, key, value, scale, cudnn_attention_with_lse)
        return out.transpose(1, 2).contiguous(), None
    mask, causal = None, False
    if q_len == kv_len and q_len > 1:
        causal = True
    elif 1 < q_len < kv_len:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q_len, kv_len)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=causal,
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def chunk_after_cache(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, attend: AttentionWithLse
) -> torch.Tensor:
    """Causal attention of the last q positions over kv keys, as two unmasked/causal-square calls joined exactly.

    softmax over [cached | own] keys = each part's softmax weighted by exp(lse_part - lse_all).
    """
    past = key.shape[2] - query.shape[2]
    out_past, lse_past = attend(query, key[:, :, :past], value[:, :, :past], False, scale)
    out_own, lse_own = attend(query, key[:, :, past:], value[:, :, past:], True, scale)
    lse = torch.logaddexp(lse_past, lse_own)
    work = torch.promote_types(query.dtype, torch.float32)  # join in at least float32
    out = out_past.to(work).mul_((lse_past - lse).exp_())
    out.add_(out_own.to(work).mul_((lse_own - lse).exp_()))
    return out.to(query.dtype)


def single_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per head, (b, H, 1, d), over keys hidden by an additive (b, 1, 1, kv) mask -> (b, H, 1, d).

    The H / Hkv query heads that share a key head become the rows of one query block (no repeated keys).
    On CUDA the keys are also split into `kv / decode_chunk(kv)` chunks, run as batch entries and joined by
    their log-sum-exps (split-KV, as flash-decoding): one block per key head alone leaves most of the GPU
    idle while it reads a long cache.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    packed = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    chunk = decode_chunk(kv_len)
    if batch == 1 and kv_len > chunk and kv_len % chunk == 0 and efficient_lse_usable(query, key):
        out = split_kv_attention(packed, key, value, mask, scale, chunk, efficient_attention_with_lse)
    else:
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, 1, head_dim)


@torch.library.custom_op("longdoc::decode_attention", mutates_args=())
def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """query (1, H, 1, d) over the first `visible` (a (1,) int64 device tensor) of key/value (1, Hkv, capacity, d).

    On CUDA with Triton, flash_decode's kernel reads only those slots; elsewhere `single_query_attention` under
    the additive mask the same tensor gives. A custom op: torch.compile calls it as one opaque step.
    """
    from .flash_decode import triton_decode_attention, triton_usable

    if query.is_cuda and key.stride(-1) == 1 and value.stride(-1) == 1 and triton_usable():
        return triton_decode_attention(query, key, value, visible, scale)
    hidden = torch.arange(key.shape[2], device=key.device) >= visible
    mask = torch.zeros(key.shape[2], dtype=query.dtype, device=key.device).masked_fill_(
        hidden, torch.finfo(query.dtype).min
    )
    return single_query_attention(query, key, value, mask.view(1, 1, 1, -1), scale)


@decode_attention.register_fake
def _(query, key, value, visible, scale):
    return torch.empty_like(query)


def decode_chunk(kv_len: int) -> int:
    """Keys per split of single-query attention: 256, or more so that a buffer has at most 128 splits.

    Memory-efficient attention gives one block of queries per (batch, head); with eight key heads an
    unsplit buffer runs on eight blocks and reads the cache at a fraction of the bandwidth (H200, Llama-3.1-8B
    shape: 2,048-key chunks, 40 to 250 blocks, left graph decoding at 98 tokens/s with a 4K cache against
    120 with 1K, and 62 at 128K, half its floor). A buffer whose length is a multiple of
    `decode_chunk(length)` splits evenly (decode_graph.static_capacity); a shorter one is not split.
    """
    blocks = -(-kv_len // DECODE_BLOCK)
    return DECODE_BLOCK * -(-blocks // MAX_DECODE_SPLITS)


DECODE_BLOCK, MAX_DECODE_SPLITS = 256, 128

# (query (b, Hkv, g, d), key, value (b, Hkv, kv, d), bias (b, Hkv, g, kv), scale) -> (output, lse (b, Hkv, g, 1))
MaskedAttentionWithLse = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
]


def split_kv_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    chunk: int,
    attend: MaskedAttentionWithLse,
) -> torch.Tensor:
    """Packed queries (1, Hkv, g, d) over (1, Hkv, kv, d) keys in kv / chunk pieces, joined exactly by log-sum-exps.

    A piece whose keys are all masked gets a log-sum-exp near the mask's minimum and so a weight of zero.
    """
    kv_heads, groups, head_dim = query.shape[1:]
    splits = key.shape[2] // chunk
    pieces = (splits, kv_heads, groups, head_dim)
    keys = key[0].unflatten(1, (splits, chunk)).transpose(0, 1)  # (splits, Hkv, chunk, d), a view
    values = value[0].unflatten(1, (splits, chunk)).transpose(0, 1)
    bias = mask.reshape(splits, 1, 1, chunk).expand(splits, kv_heads, groups, chunk)
    out, lse = attend(query.expand(pieces).contiguous(), keys, values, bias, scale)
    weights = lse.float().softmax(0)  # exp(lse_piece - lse_all)
    return (out.float() * weights).sum(0, keepdim=True).to(query.dtype)


def efficient_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's memory-efficient attention (takes an additive bias) with its log-sum-exp (padded to 32 rows)."""
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, scale=scale)[:2]
    return out, lse[..., : query.shape[2]].unsqueeze(-1)


def math_masked_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in explicit float32 (or wider) tensor code, for checks and for devices without the kernel."""
    work = torch.promote_types(query.dtype, torch.float32)
    scores = query.to(work) @ key.to(work).transpose(-1, -2) * scale + bias.to(work)
    lse = scores.logsumexp(-1, keepdim=True)
    return ((scores - lse).exp() @ value.to(work)).to(query.dtype), lse


def efficient_lse_usable(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Checked once per shape family and remembered in a plain dict, which a compiled decode step reads as a
    constant (the check itself runs kernels torch.compile cannot trace: decode_graph checks before compiling)."""
    if not query.is_cuda:
        return False
    family = (query.device.index or 0, query.dtype, key.shape[1], query.shape[1], query.shape[-1])
    if family not in _EFFICIENT_LSE_WORKS:
        _EFFICIENT_LSE_WORKS[family] = _efficient_lse_works(*family)
    return _EFFICIENT_LSE_WORKS[family]


_EFFICIENT_LSE_WORKS: dict[tuple, bool] = {}


def _efficient_lse_works(device_index: int, dtype: torch.dtype, kv_heads: int, heads: int, head_dim: int) -> bool:
    """Once per shape family, before any graph capture: does the kernel run on split views and match the math?"""
    chunk, splits = DECODE_BLOCK, 3
    query, key, value = _random_inputs(
        device_index, dtype, (1, kv_heads, heads // kv_heads, head_dim), (1, kv_heads, chunk * splits, head_dim)
    )
    mask = torch.zeros(1, 1, 1, chunk * splits, device=query.device, dtype=dtype)
    mask[..., chunk + 7 :] = torch.finfo(dtype).min  # the last piece wholly masked, the middle one partly
    try:
        got = split_kv_attention(query, key, value, mask, head_dim**-0.5, chunk, efficient_attention_with_lse)
    except RuntimeError:
        return False
    want = split_kv_attention(query, key, value, mask, head_dim**-0.5, chunk, math_masked_attention_with_lse)
    return bool(torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2))


def cudnn_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's fused attention (GQA native) with its log-sum-exp, which the public SDPA call does not return."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, True, 0.0, causal, False, scale=scale
    )[:2]
    return out, lse.reshape(*query.shape[:3], 1)


def math_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in explicit tensor code (float32 or wider): the reference the kernel is checked against."""
    work = torch.promote_types(query.dtype, torch.float32)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1).to(work), value.repeat_interleave(groups, 1).to(work)
    scores = query.to(work) @ key.transpose(-1, -2) * scale
    if causal:
        q, k = scores.shape[-2:]
        visible = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(k - q)
        scores.masked_fill_(visible.logical_not(), -torch.inf)
    lse = scores.logsumexp(-1, keepdim=True)
    return ((scores - lse).exp() @ value).to(query.dtype), lse


def cudnn_lse_usable(query: torch.Tensor, key: torch.Tensor) -> bool:
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    return _cudnn_lse_works(query.device.index or 0, query.dtype, query.shape[1], key.shape[1], query.shape[-1])


@lru_cache
def _cudnn_lse_works(device_index: int, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Once per shape family: does this GPU's cuDNN run the kernel, and does the joined result match the math?"""
    query, key, value = _random_inputs(device_index, dtype, (1, heads, 48, head_dim), (1, kv_heads, 80, head_dim))
    try:
        got = chunk_after_cache(query, key, value, head_dim**-0.5, cudnn_attention_with_lse)
    except RuntimeError:
        return False
    want = chunk_after_cache(query, key, value, head_dim**-0.5, math_attention_with_lse)
    return bool(torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2))


def _random_inputs(
    device_index: int, dtype: torch.dtype, query_shape: tuple[int, ...], kv_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random query, key and value on a GPU, for the kernels' one-time checks."""
    device = torch.device("cuda", device_index)
    gen = torch.Generator(device).manual_seed(0)
    return tuple(
        torch.randn(shape, device=device, dtype=dtype, generator=gen) for shape in (query_shape, kv_shape, kv_shape)
    )


@lru_cache
def register() -> None:
    """Make `NAME` an attention implementation that transformers' models accept (once)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, causal_sdpa)
