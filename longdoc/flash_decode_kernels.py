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
def unpacked_codes(Codes, place, row, shown, dim, HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr, BITS: tl.constexpr):
    """Rows `row` of one head's packed codes, (BLOCK, WIDTH) integers: channel c in byte c // (8 / BITS) at bit
    (c % (8 / BITS)) * BITS (quantized.pack). Power-of-two heads read each byte once and spread it in registers; other
    widths (Phi-3's 96) read a byte per channel."""
    PER: tl.constexpr = 8 // BITS
    CODE_WIDTH: tl.constexpr = HEAD_DIM // PER
    if HEAD_DIM == WIDTH:
        column = tl.arange(0, CODE_WIDTH)
        byte = tl.load(Codes + place + row[:, None] * CODE_WIDTH + column[None, :], mask=shown[:, None], other=0)
        if PER == 1:
            return byte
        shift = (tl.arange(0, PER) * BITS).to(tl.uint8)
        spread = (byte[:, :, None] >> shift[None, None, :]) & (2**BITS - 1)
        return tl.reshape(spread, (row.shape[0], WIDTH))
    mask = shown[:, None] & (dim[None, :] < HEAD_DIM)
    byte = tl.load(Codes + place + row[:, None] * CODE_WIDTH + dim[None, :] // PER, mask=mask, other=0)
    return (byte >> ((dim[None, :] % PER) * BITS).to(tl.uint8)) & (2**BITS - 1)


@triton.jit
def dequantized_keys(
    Codes,
    Step,
    Minimum,
    head,
    rows,
    first,
    start_row,
    shown,
    dim,
    HEAD_DIM: tl.constexpr,
    WIDTH: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Keys of the tile at row `first` of a part holding `rows` rows, `start_row` its first position: code * step +
    minimum in float32 as `dequantize_keys`, with the group's one step and minimum per channel."""
    head = head.to(tl.int64)
    row = first - start_row + tl.arange(0, BLOCK)
    code = unpacked_codes(Codes, head * rows * (HEAD_DIM * BITS // 8), row, shown, dim, HEAD_DIM, WIDTH, BITS)
    place = head * (rows // BLOCK) * HEAD_DIM + (first - start_row) // BLOCK * HEAD_DIM + dim
    channel = dim < HEAD_DIM
    step = tl.load(Step + place, mask=channel, other=0.0).to(tl.float32)
    low = tl.load(Minimum + place, mask=channel, other=0.0).to(tl.float32)
    return code.to(tl.float32) * step[None, :] + low[None, :]


@triton.jit
def dequantized_values(
    Codes,
    Step,
    Minimum,
    head,
    rows,
    first,
    start_row,
    shown,
    dim,
    HEAD_DIM: tl.constexpr,
    WIDTH: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    VALUE_GROUP: tl.constexpr,
):
    """Values of the same tile, as `dequantize_values`: one step and minimum per row and group of VALUE_GROUP
    channels (read once per group and spread in registers where the head is a power of two wide)."""
    head = head.to(tl.int64)
    row = first - start_row + tl.arange(0, BLOCK)
    code = unpacked_codes(Codes, head * rows * (HEAD_DIM * BITS // 8), row, shown, dim, HEAD_DIM, WIDTH, BITS)
    GROUPS: tl.constexpr = HEAD_DIM // VALUE_GROUP
    base = head * rows * GROUPS
    if HEAD_DIM == WIDTH:
        group = tl.arange(0, GROUPS)
        place = base + row[:, None] * GROUPS + group[None, :]
        step = tl.load(Step + place, mask=shown[:, None], other=0.0).to(tl.float32)
        low = tl.load(Minimum + place, mask=shown[:, None], other=0.0).to(tl.float32)
        grouped = tl.reshape(code, (BLOCK, GROUPS, VALUE_GROUP)).to(tl.float32)
        return tl.reshape(grouped * step[:, :, None] + low[:, :, None], (BLOCK, WIDTH))
    mask = shown[:, None] & (dim[None, :] < HEAD_DIM)
    place = base + row[:, None] * GROUPS + dim[None, :] // VALUE_GROUP
    step = tl.load(Step + place, mask=mask, other=0.0).to(tl.float32)
    low = tl.load(Minimum + place, mask=mask, other=0.0).to(tl.float32)
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
    """`pieces` over a KIVI cache: the piece's tiles of BLOCK (= GROUP) keys in order, from the prompt's codes, then
    the folded codes, then the ring, each dequantized in registers (`triton_quantized_decode_attention`). One loop per
    part, with no branch inside, so that the compiler can pipeline each loop's loads as it does `pieces`'."""
    kv_head = tl.program_id(0)
    piece = tl.program_id(1)
    visible = tl.load(Visible + 0 * piece)
    quantized = tl.maximum(visible - (WINDOW - BLOCK), 0) // BLOCK * BLOCK  # quantized_rows(visible)
    dim = tl.arange(0, WIDTH)
    q = load_queries(Q, kv_head, stride_qh, GROUPS, HEAD_DIM, ROWS, WIDTH)
    dtype = TK.dtype.element_ty
    start = piece * PIECE
    end = tl.minimum(start + PIECE, visible)
    top = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, WIDTH], tl.float32)
    for first in range(start, tl.minimum(end, prompt_rows), BLOCK):
        shown = first + tl.arange(0, BLOCK) < end
        k = dequantized_keys(PKC, PKS, PKM, kv_head, prompt_rows, first, 0, shown, dim, HEAD_DIM, WIDTH, BITS, BLOCK)
        v = dequantized_values(
            PVC, PVS, PVM, kv_head, prompt_rows, first, 0, shown, dim, HEAD_DIM, WIDTH, BITS, BLOCK, VALUE_GROUP
        )
        top, total, acc = attend_tile(q, k.to(dtype), v.to(dtype), shown, top, total, acc, scale_log2, IEEE)
    for first in range(tl.maximum(start, prompt_rows), tl.minimum(end, quantized), BLOCK):
        shown = first + tl.arange(0, BLOCK) < end
        k = dequantized_keys(
            FKC, FKS, FKM, kv_head, folded_rows, first, prompt_rows, shown, dim, HEAD_DIM, WIDTH, BITS, BLOCK
        )
        v = dequantized_values(
            FVC,
            FVS,
            FVM,
            kv_head,
            folded_rows,
            first,
            prompt_rows,
            shown,
            dim,
            HEAD_DIM,
            WIDTH,
            BITS,
            BLOCK,
            VALUE_GROUP,
        )
        top, total, acc = attend_tile(q, k.to(dtype), v.to(dtype), shown, top, total, acc, scale_log2, IEEE)
    ring_base = kv_head.to(tl.int64) * WINDOW * HEAD_DIM
    for first in range(tl.maximum(start, quantized), end, BLOCK):
        offset = tl.arange(0, BLOCK)
        shown = first + offset < end
        kv_mask = shown[:, None] & (dim[None, :] < HEAD_DIM)
        ring = (first % WINDOW + offset)[:, None] * HEAD_DIM + dim[None, :]  # consecutive: WINDOW is whole tiles
        k = tl.load(TK + ring_base + ring, mask=kv_mask, other=0.0)
        v = tl.load(TV + ring_base + ring, mask=kv_mask, other=0.0)
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
