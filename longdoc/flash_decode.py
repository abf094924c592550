"""Single-query attention over the first `visible` keys of a static buffer: flash-decoding in Triton on CUDA.

Graph decoding keeps every layer's keys and values in a fixed-capacity buffer (decode_graph.py). PyTorch's
kernels can only hide the unwritten slots with an additive mask, so they read the whole buffer, and they give
one block of queries per key head: the memory-efficient kernel split into pieces read Llama-3.1-8B's 128K cache at
1.7-1.9 TB/s on an H200, decoding full at 128K at half its floor (issue #18). Here the number of visible keys is a
device tensor the kernel reads, so a graph replays the same launch every token and no slot past it is read; the
query heads that share a key head are the rows of one tile (GQA-packed: each key is read once), and the buffer is
split into pieces read in parallel, each giving a partial output and its log-sum-exp, joined exactly by a second
kernel (flash-decoding). attention.py's `decode_attention` op calls it on CUDA, and elsewhere takes PyTorch's
path under a mask built from the same tensor.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

BLOCK_KEYS = 64  # keys per tile inside one piece
MAX_PIECES = 128  # pieces per key head: 8 key heads x 128 = 1,024 programs at 128K, about 8 waves on 132 SMs
MIN_PIECE = 128  # keys per piece at least: a short cache is read by few programs rather than many idle ones


@lru_cache
def triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def piece_len(capacity: int) -> int:
    """Keys per piece for a buffer of `capacity` slots: at most MAX_PIECES pieces, a whole number of tiles."""
    keys = max(MIN_PIECE, -(-capacity // MAX_PIECES))
    return -(-keys // BLOCK_KEYS) * BLOCK_KEYS


def triton_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """query (1, H, 1, d) over the first `visible` (a (1,) int64 tensor) of key/value (1, Hkv, capacity, d), each
    key and value row contiguous."""
    kernels = _kernels()
    kv_heads, capacity = key.shape[1], key.shape[2]
    query, partial, lse, shape = _partials(query, kv_heads, capacity)
    kernels.pieces[(kv_heads, shape["PIECES"])](
        query,
        key,
        value,
        visible,
        partial,
        lse,
        scale * math.log2(math.e),
        query.stride(1),
        key.stride(1),
        key.stride(2),
        value.stride(1),
        value.stride(2),
        **shape,
        BLOCK=BLOCK_KEYS,
        IEEE=query.dtype == torch.float32,
        num_warps=4,
        num_stages=2,
    )
    return _join(query, partial, lse, shape)


def triton_quantized_decode_attention(
    query: torch.Tensor,
    prompt: tuple[torch.Tensor, ...],
    folded: tuple[torch.Tensor, ...],
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    bits: int,
    capacity: int,
) -> torch.Tensor:
    """`triton_decode_attention` over a KIVI cache of fixed addresses (static_quantized.py), read where it lies.

    Positions [0, P) are the prompt's codes (`prompt`: key codes, steps, minimums, then the values', as
    quantized.PARTS; P their rows), [P, quantized_rows(visible)) the codes folded while decoding (`folded`, from
    position P on) and the rest the full-precision ring (`tail_keys` / `tail_values`, position p at p % its rows).
    Each tile of BLOCK_KEYS = GROUP keys lies in one of the three; the kernel reads the piece's tiles of each part in
    one loop with no branch inside (so that its loads are pipelined as the plain kernel's: 2.2x the speed of one loop
    that branched per tile, 52 against 24 tokens/s at 128K on an H200) and dequantizes them in registers as
    `dequantize_keys` / `dequantize_values` compute them, then casts them to the cache's dtype. In bf16 or fp16 code x
    step is exact in float32, so the fused multiply-add the compiler makes of it rounds as their multiply then add and
    the tiles equal the dequantized buffer's. The output is the dequantize-then-attend path's up to the rounding of the
    attention itself: the branching kernel equalled it to the bit in bf16 on an H200, this one did not in its first
    case (8-bit, 32K) while giving the eager loop's tokens on every family (tests/test_gpu.py). All parts contiguous.
    """
    kernels = _kernels()
    kv_heads, head_dim = tail_keys.shape[1], tail_keys.shape[-1]
    window = tail_keys.shape[2]
    prompt_rows = prompt[0].shape[2]
    if not prompt_rows:  # never read; empty tensors may have no address to hand a kernel
        prompt = folded
    query, partial, lse, shape = _partials(query, kv_heads, capacity)
    kernels.quantized_pieces[(kv_heads, shape["PIECES"])](
        query,
        *prompt,
        *folded,
        tail_keys,
        tail_values,
        visible,
        partial,
        lse,
        scale * math.log2(math.e),
        query.stride(1),
        prompt_rows,
        folded[0].shape[2],
        **shape,
        BLOCK=BLOCK_KEYS,
        BITS=bits,
        VALUE_GROUP=head_dim // folded[4].shape[-1],
        WINDOW=window,
        IEEE=query.dtype == torch.float32,
        num_warps=4,
        num_stages=2,
    )
    return _join(query, partial, lse, shape)


def _partials(query: torch.Tensor, kv_heads: int, capacity: int) -> tuple[torch.Tensor, ...]:
    """The contiguous query, the pieces' partial outputs and log-sum-exps, and the shape constants."""
    _, heads, _, head_dim = query.shape
    groups = heads // kv_heads
    piece = piece_len(capacity)
    pieces = -(-capacity // piece)
    rows = max(16, triton_next_power_of_2(groups))  # tl.dot wants 16 rows at least; the spare ones are zeros
    width = max(16, triton_next_power_of_2(head_dim))
    partial = torch.empty((kv_heads, pieces, rows, width), dtype=torch.float32, device=query.device)
    lse = torch.empty((kv_heads, pieces, rows), dtype=torch.float32, device=query.device)
    shape = dict(GROUPS=groups, HEAD_DIM=head_dim, ROWS=rows, WIDTH=width, PIECE=piece, PIECES=pieces)
    return query.contiguous(), partial, lse, shape


def _join(query: torch.Tensor, partial: torch.Tensor, lse: torch.Tensor, shape: dict) -> torch.Tensor:
    out = torch.empty_like(query)
    kv_heads, pieces = partial.shape[:2]
    _kernels().join[(kv_heads, shape["GROUPS"])](
        partial,
        lse,
        out,
        out.stride(1),
        HEAD_DIM=shape["HEAD_DIM"],
        ROWS=shape["ROWS"],
        WIDTH=shape["WIDTH"],
        PIECES=pieces,
        SPAN=triton_next_power_of_2(pieces),
        GROUPS=shape["GROUPS"],
        num_warps=4,
    )
    return out


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@lru_cache
def _kernels():
    """The Triton kernels (flash_decode_kernels.py), imported on first use so that importing longdoc never imports
    Triton."""
    from . import flash_decode_kernels

    return flash_decode_kernels
