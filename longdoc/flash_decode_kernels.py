"""flash_decode's Triton kernels: the pieces of one single-query attention, and their exact join.

Imported by flash_decode on first use only: importing longdoc never imports Triton.
"""

import triton
import triton.language as tl


@triton.jit
def attend_tile(q, k, v, shown, top, total, acc, scale_log2, IEEE: tl.constexpr):
    """One tile of keys and values into the online softmax (base 2): the new (top, total, acc)."""
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = tl.where(shown[None, :], scores * scale_log2, float("-inf"))
    new_top = tl.maximum(top, tl.max(scores, 1))
    rescale = tl.exp2(top - new_top)
    weights = tl.exp2(scores - new_top[:, None])
    total = total * rescale + tl.sum(weights, 1)
    if IEEE:
        acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision="ieee")
    else:
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
    return new_top, total, acc


@triton.jit
def load_queries(
    Q, kv_head, stride_qh, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr
):
    """The GROUPS query heads of one key head as the rows of a (ROWS, WIDTH) tile, zeros past them."""
    row = tl.arange(0, ROWS)
    dim = tl.arange(0, WIDTH)
    q_mask = (row[:, None] < GROUPS) & (dim[None, :] < HEAD_DIM)
    return tl.load(Q + (kv_head * GROUPS + row[:, None]) * stride_qh + dim[None, :], mask=q_mask, other=0.0)


@triton.jit
def store_piece(
    Partial, Lse, kv_head, piece, top, total, acc, PIECES: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr
):
    """A piece's output and log-sum-exp (base 2); a piece past `visible` holds nothing: 0 and -inf, so the join
    weighs it 0."""
    row = tl.arange(0, ROWS)
    dim = tl.arange(0, WIDTH)
    safe = tl.where(total > 0, total, 1.0)
    cell = (kv_head * PIECES + piece) * ROWS
    tl.store(Partial + (cell + row[:, None]) * WIDTH + dim[None, :], acc / safe[:, None])
    tl.store(Lse + cell + row, top + tl.log2(safe))


@triton.jit
def pieces(
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
    dim = tl.arange(0, WIDTH)
    q = load_queries(Q, kv_head, stride_qh, GROUPS, HEAD_DIM, ROWS, WIDTH)
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
        v = tl.load(v_base + key_index[:, None] * stride_vn + dim[None, :], mask=kv_mask, other=0.0)
        top, total, acc = attend_tile(q, k, v, shown, top, total, acc, scale_log2, IEEE)
    store_piece(Partial, Lse, kv_head, piece, top, total, acc, PIECES, ROWS, WIDTH)


@triton.jit
def dequantized_tile(
    Codes,
    Step,
    Minimum,
    head,
    row,
    tile_row,
    dim,
    mask,
    groups_rows,
    step_rows,
    STEP_PER_ROW: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr,
    STEP_GROUP: tl.constexpr,
):
    """Rows `row` (tile_row for the steps of keys) of one head's codes as float32: code * step + minimum.

    Codes are (rows, HEAD_DIM * BITS / 8) bytes, channel c in byte c // (8 / BITS) at bit (c % (8 / BITS)) * BITS
    (quantized.pack); steps and minimums one per (step row, c // STEP_GROUP)."""
    PER: tl.constexpr = 8 // BITS
    code_width: tl.constexpr = HEAD_DIM * BITS // 8
    step_width: tl.constexpr = HEAD_DIM // STEP_GROUP
    head = head.to(tl.int64)
    byte = tl.load(
        Codes + head * groups_rows * code_width + row[:, None] * code_width + dim[None, :] // PER,
        mask=mask,
        other=0,
    )
    code = (byte >> ((dim[None, :] % PER) * BITS).to(tl.uint8)) & (2**BITS - 1)
    if STEP_PER_ROW:
        place = head * step_rows * step_width + row[:, None] * step_width + dim[None, :] // STEP_GROUP
        step = tl.load(Step + place, mask=mask, other=0.0).to(tl.float32)
        low = tl.load(Minimum + place, mask=mask, other=0.0).to(tl.float32)
    else:  # one step row for the whole tile (a key group)
        place = head * step_rows * step_width + tile_row * step_width + dim // STEP_GROUP
        channel = dim < HEAD_DIM
        step = tl.load(Step + place, mask=channel, other=0.0).to(tl.float32)[None, :]
        low = tl.load(Minimum + place, mask=channel, other=0.0).to(tl.float32)[None, :]
    return code.to(tl.float32) * step + low


@triton.jit
def quantized_pieces(
    Q,
    PKC,
    PKS,
    PKM,
    PVC,
    PVS,
    PVM,  # the prompt's codes (quantized.PARTS)
    FKC,
    FKS,
    FKM,
    FVC,
    FVS,
    FVM,  # the groups folded while decoding, from position prompt_rows on
    TK,
    TV,
    Visible,
    Partial,
    Lse,
    scale_log2,
    stride_qh,
    prompt_rows,
    folded_rows,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
    WIDTH: tl.constexpr,
    PIECE: tl.constexpr,
    PIECES: tl.constexpr,
    BLOCK: tl.constexpr,
    BITS: tl.constexpr,
    VALUE_GROUP: tl.constexpr,
    WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
):
    """`pieces_kernel` over a KIVI cache: each tile of BLOCK (= GROUP) keys from the prompt's codes, the folded
    codes or the ring, dequantized in registers (`triton_quantized_decode_attention`)."""
    kv_head = tl.program_id(0)
    piece = tl.program_id(1)
    visible = tl.load(Visible + 0 * piece)
    quantized = tl.maximum(visible - (WINDOW - BLOCK), 0) // BLOCK * BLOCK  # quantized_rows(visible)
    dim = tl.arange(0, WIDTH)
    q = load_queries(Q, kv_head, stride_qh, GROUPS, HEAD_DIM, ROWS, WIDTH)
    dtype = TK.dtype.element_ty
    start = piece * PIECE
    end = tl.minimum(start + PIECE, visible)
    ring_base = kv_head.to(tl.int64) * WINDOW * HEAD_DIM
    top = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, WIDTH], tl.float32)
    for first in range(start, end, BLOCK):
        offset = tl.arange(0, BLOCK)
        shown = first + offset < end
        kv_mask = shown[:, None] & (dim[None, :] < HEAD_DIM)
        if first >= quantized:  # the ring: a tile's rows are consecutive there (WINDOW is a multiple of BLOCK)
            ring = (first % WINDOW + offset)[:, None] * HEAD_DIM + dim[None, :]
            k = tl.load(TK + ring_base + ring, mask=kv_mask, other=0.0)
            v = tl.load(TV + ring_base + ring, mask=kv_mask, other=0.0)
        elif first < prompt_rows:
            row = first + offset
            k = dequantized_tile(
                PKC,
                PKS,
                PKM,
                kv_head,
                row,
                first // BLOCK,
                dim,
                kv_mask,
                prompt_rows,
                prompt_rows // BLOCK,
                False,
                HEAD_DIM,
                BITS,
                1,
            ).to(dtype)
            v = dequantized_tile(
                PVC,
                PVS,
                PVM,
                kv_head,
                row,
                first,
                dim,
                kv_mask,
                prompt_rows,
                prompt_rows,
                True,
                HEAD_DIM,
                BITS,
                VALUE_GROUP,
            ).to(dtype)
        else:
            row = first - prompt_rows + offset
            k = dequantized_tile(
                FKC,
                FKS,
                FKM,
                kv_head,
                row,
                (first - prompt_rows) // BLOCK,
                dim,
                kv_mask,
                folded_rows,
                folded_rows // BLOCK,
                False,
                HEAD_DIM,
                BITS,
                1,
            ).to(dtype)
            v = dequantized_tile(
                FVC,
                FVS,
                FVM,
                kv_head,
                row,
                first,
                dim,
                kv_mask,
                folded_rows,
                folded_rows,
                True,
                HEAD_DIM,
                BITS,
                VALUE_GROUP,
            ).to(dtype)
        top, total, acc = attend_tile(q, k, v, shown, top, total, acc, scale_log2, IEEE)
    store_piece(Partial, Lse, kv_head, piece, top, total, acc, PIECES, ROWS, WIDTH)


@triton.jit
def join(
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
