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
    _, heads, _, head_dim = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    piece = piece_len(capacity)
    pieces = -(-capacity // piece)
    rows = max(16, triton_next_power_of_2(groups))  # tl.dot wants 16 rows at least; the spare ones are zeros
    width = max(16, triton_next_power_of_2(head_dim))
    query = query.contiguous()
    partial = torch.empty((kv_heads, pieces, rows, width), dtype=torch.float32, device=query.device)
    lse = torch.empty((kv_heads, pieces, rows), dtype=torch.float32, device=query.device)
    kernels.pieces[(kv_heads, pieces)](
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
        GROUPS=groups,
        HEAD_DIM=head_dim,
        ROWS=rows,
        WIDTH=width,
        PIECE=piece,
        PIECES=pieces,
        BLOCK=BLOCK_KEYS,
        IEEE=query.dtype == torch.float32,
        num_warps=4,
        num_stages=2,
    )
    out = torch.empty_like(query)
    kernels.join[(kv_heads, groups)](
        partial,
        lse,
        out,
        out.stride(1),
        HEAD_DIM=head_dim,
        ROWS=rows,
        WIDTH=width,
        PIECES=pieces,
        SPAN=triton_next_power_of_2(pieces),
        GROUPS=groups,
        num_warps=4,
    )
    return out


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@lru_cache
def _kernels():
    """The two Triton kernels, defined on first use so that importing longdoc never imports Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def pieces_kernel(
        Q,
        K,
        V,
        Visible,
        Partial,
        Lse,
        scale_log2,
        stride_qh,
        stride_kh,
        stride_kn,
        stride_vh,
        stride_vn,
        GROUPS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        ROWS: tl.constexpr,
        WIDTH: tl.constexpr,
        PIECE: tl.constexpr,
        PIECES: tl.constexpr,
        BLOCK: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """One (key head, piece): the packed queries over the piece's visible keys, online softmax in base 2."""
        kv_head = tl.program_id(0)
        piece = tl.program_id(1)
        visible = tl.load(Visible + 0 * piece)
        row = tl.arange(0, ROWS)
        dim = tl.arange(0, WIDTH)
        q_mask = (row[:, None] < GROUPS) & (dim[None, :] < HEAD_DIM)
        q = tl.load(Q + (kv_head * GROUPS + row[:, None]) * stride_qh + dim[None, :], mask=q_mask, other=0.0)
        start = piece * PIECE
        end = tl.minimum(start + PIECE, visible)
        k_base = K + kv_head.to(tl.int64) * stride_kh
        v_base = V + kv_head.to(tl.int64) * stride_vh
        top = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, WIDTH], tl.float32)
        for first in range(start, end, BLOCK):
            key_index = first + tl.arange(0, BLOCK)
            shown = key_index < end
            kv_mask = shown[:, None] & (dim[None, :] < HEAD_DIM)
            k = tl.load(k_base + key_index[:, None] * stride_kn + dim[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(shown[None, :], scores * scale_log2, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            rescale = tl.exp2(top - new_top)
            weights = tl.exp2(scores - new_top[:, None])
            total = total * rescale + tl.sum(weights, 1)
            v = tl.load(v_base + key_index[:, None] * stride_vn + dim[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
            top = new_top
        # A piece past `visible` holds nothing: output 0 and log-sum-exp -inf, so the join weighs it 0.
        safe = tl.where(total > 0, total, 1.0)
        cell = (kv_head * PIECES + piece) * ROWS
        tl.store(Partial + (cell + row[:, None]) * WIDTH + dim[None, :], acc / safe[:, None])
        tl.store(Lse + cell + row, top + tl.log2(safe))  # base 2, as the scores

    @triton.jit
    def join_kernel(
        Partial,
        Lse,
        Out,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        ROWS: tl.constexpr,
        WIDTH: tl.constexpr,
        PIECES: tl.constexpr,
        SPAN: tl.constexpr,
        GROUPS: tl.constexpr,
    ):
        """One query head: its pieces' outputs weighted by exp2(lse_piece - lse_all)."""
        kv_head = tl.program_id(0)
        group = tl.program_id(1)
        piece = tl.arange(0, SPAN)
        dim = tl.arange(0, WIDTH)
        cells = (kv_head * PIECES + piece) * ROWS + group
        lse = tl.load(Lse + cells, mask=piece < PIECES, other=float("-inf"))
        weights = tl.exp2(lse - tl.max(lse, 0))
        weights = weights / tl.sum(weights, 0)
        parts = tl.load(Partial + cells[:, None] * WIDTH + dim[None, :], mask=(piece < PIECES)[:, None], other=0.0)
        out = tl.sum(parts * weights[:, None], 0)
        head = kv_head * GROUPS + group
        tl.store(Out + head * stride_oh + dim, out.to(Out.dtype.element_ty), mask=dim < HEAD_DIM)

    class Kernels:
        pieces = pieces_kernel
        join = join_kernel

    return Kernels
