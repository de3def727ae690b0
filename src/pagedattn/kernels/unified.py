"""Unified paged attention: one kernel for prefill, prefix-prefill, decode and any mix of them,
over either cache contract, with an optional split of the keys (split-KV decode) and the
reduction kernel that merges the partial results.

Work decomposition. A program owns one *query tile* of one KV head: BLOCK_Q consecutive query
tokens of one sequence times the QPK = num_q_heads / num_kv_heads query heads that share the KV
head, packed into BLOCK_M = BLOCK_Q * QPK rows (padded). Each K/V tile is therefore loaded once
for all the query heads that read it. Grid axis 0 enumerates query tiles of every sequence
(an upper bound, num_tokens // BLOCK_Q + num_seqs, found by binary search over cu_seqlens_q, so
the grid depends only on shapes: CUDA-graph safe); axis 1 is the KV head; axis 2 the KV split.

Keys are read in tiles of BLOCK_N tokens gathered across pages (BLOCK_N may span several cache
blocks). Under the context-cache contract the keys past ctx_len come from k_new/v_new instead.
Softmax runs online in fp32, in the log2 domain (scale pre-multiplied by log2(e), exp2).

Semantics are exactly those of `pagedattn.reference` (its docstring is the specification).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreter_enabled
from .launch import FastKernel

LOG2E = 1.4426950408889634
# fp32 inputs are the accuracy path: "ieee" dots on FMA units. They hold their operand tiles in
# registers, so dispatch gives fp32 small tiles (scripts/compile_check.py reports each tile's
# stack frame); "tf32x3" (three tf32 terms on the tensor cores) would spill far less.
FP32_PRECISION: tl.constexpr = tl.constexpr("ieee")


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _find_sequence(cu_seqlens_q_ptr, num_seqs, tile_idx, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles contain global tile `tile_idx`: tiles of sequence s start at
    cu_seqlens_q[s] // BLOCK_Q + s (an upper bound on tiles before it), so binary-search that."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if start <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _load_kv_fp(x, FP8: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Convert a loaded K/V tile to the dot dtype (fp8 caches arrive as uint8 storage). fp8 goes
    through fp16, which Hopper converts to in hardware (cvt.f16x2.e4m3x2), then to OUT_DTYPE."""
    if FP8 == 1:
        if INTERPRET:
            # Triton's interpreter decodes e4m3fn's NaN (0x7F/0xFF) as 480; the GPU's cvt gives
            # NaN. Match the hardware so poisoned fp8 slots surface on CPU too.
            nan = (x & 0x7F) == 0x7F
            x = tl.where(nan, float("nan"), x.to(tl.float8e4nv, bitcast=True).to(tl.float32))
        x = x.to(tl.float8e4nv, bitcast=True).to(tl.float16) if not INTERPRET else x
    elif FP8 == 2:
        x = x.to(tl.float8e5, bitcast=True).to(tl.float16)
    return x.to(OUT_DTYPE)


@triton.jit
def _scores(
    q, k, key_pos, row_pos, row_valid, head_alibi, key_start, key_end, qk_scale, softcap, sliding_window,
    IEEE: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, SLIDING: tl.constexpr,
    MASK: tl.constexpr,
):
    """Scores of a key tile, [BLOCK_M, BLOCK_N], masked with -inf where MASK. In log2 units with
    softcap or ALiBi; otherwise raw q.k (the scale is folded into _softmax_pv's exp2 argument: one
    FMA per score, s * qk_scale - m, instead of a multiply and a subtract)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision=FP32_PRECISION)
    else:
        s = tl.dot(q, tl.trans(k))
    if USE_SOFTCAP:
        # cap * tanh(x / cap) in natural units, then to log2 units; tanh via exp (stable at +-inf)
        x = s * (qk_scale / 1.4426950408889634) / softcap
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * 1.4426950408889634
    elif USE_ALIBI:
        s = s * qk_scale
    if USE_ALIBI:
        s += head_alibi[:, None] * (key_pos[None, :] - row_pos[:, None]).to(tl.float32) * 1.4426950408889634
    if MASK:
        in_range = (key_pos >= key_start) & (key_pos < key_end)
        visible = (key_pos[None, :] <= row_pos[:, None]) & in_range[None, :] & row_valid[:, None]
        if SLIDING:
            visible &= (row_pos[:, None] - key_pos[None, :]) < sliding_window
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _softmax_pv(
    acc, m_i, l_i, s, v, qk_scale, PV_DTYPE: tl.constexpr, IEEE: tl.constexpr, FOLD: tl.constexpr,
    MASK: tl.constexpr,
):
    """One online-softmax step: scores s of a key tile (raw when FOLD, else in log2 units) and its
    values v [BLOCK_N, HEAD_PAD] in PV_DTYPE (P is cast to it for the dot)."""
    if FOLD:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale > 0: the max scales with it
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASK:
        # a row that has seen no visible key yet keeps m = -inf: subtract 0 instead (no inf - inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    if FOLD:
        p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    else:
        p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc += tl.dot(p.to(PV_DTYPE), v, input_precision=FP32_PRECISION)
    else:
        acc += tl.dot(p.to(PV_DTYPE), v)
    return acc, m_new, l_i


@triton.jit
def _tile_blocks(bt_row, start, key_start, key_end, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                 MASK: tl.constexpr, IDX64: tl.constexpr):
    """Key positions of the tile at `start`, which of them are in range, their cache blocks (through
    the block table: a tile may span several pages) and their slots within the blocks."""
    key_pos = start + tl.arange(0, BLOCK_N)
    if MASK:
        key_ok = (key_pos < key_end) & (key_pos >= key_start)
        block = tl.load(bt_row + key_pos // PAGE, mask=key_ok, other=0)
    else:
        key_ok = key_pos >= 0
        block = tl.load(bt_row + key_pos // PAGE)
    if IDX64:  # only caches of 2^31 elements or more pay for 64-bit offset arithmetic
        block = block.to(tl.int64)
    return key_pos, key_ok, block, key_pos % PAGE


@triton.jit
def _load_tile(cache_ptr, block, in_block, key_ok, head_off, stride_b, stride_t, dim_off, dim_valid,
               MASK: tl.constexpr, EVEN_D: tl.constexpr, KV_FP8: tl.constexpr, OUT_DTYPE: tl.constexpr,
               INTERPRET: tl.constexpr):
    """A [BLOCK_N, HEAD_PAD] K or V tile from the paged cache, converted to OUT_DTYPE."""
    offs = block[:, None] * stride_b + in_block[:, None] * stride_t + head_off + dim_off[None, :]
    if MASK:
        x = tl.load(cache_ptr + offs, mask=key_ok[:, None] & dim_valid[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(cache_ptr + offs)
    else:
        x = tl.load(cache_ptr + offs, mask=dim_valid[None, :], other=0.0)
    return _load_kv_fp(x, KV_FP8, OUT_DTYPE, INTERPRET)


@triton.jit
def _cache_tiles(
    acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, lo, hi, kv_head,
    stride_kb, stride_kt, stride_kh, k_dim_off, stride_vb, stride_vt, stride_vh, stride_vd,
    dims, dim_valid, row_pos, row_valid, head_alibi, key_start, key_end, qk_scale, softcap,
    sliding_window, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, KV_FP8: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr, IEEE: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr, SLIDING: tl.constexpr, MASK: tl.constexpr, EVEN_D: tl.constexpr,
    IDX64: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Key tiles [lo, hi) (lo a multiple of BLOCK_N) gathered from the paged cache through the
    block table. Unmasked tiles (MASK=False) lie wholly in range."""
    FOLD: tl.constexpr = not (USE_SOFTCAP or USE_ALIBI)
    k_head = kv_head * stride_kh
    v_head = kv_head * stride_vh
    v_dim_off = dims * stride_vd
    for start in range(lo, hi, BLOCK_N):
        key_pos, key_ok, block, in_block = _tile_blocks(bt_row, start, key_start, key_end, BLOCK_N, PAGE,
                                                        MASK, IDX64)
        k = _load_tile(k_cache_ptr, block, in_block, key_ok, k_head, stride_kb, stride_kt, k_dim_off,
                       dim_valid, MASK, EVEN_D, KV_FP8, DOT_DTYPE, INTERPRET)
        v = _load_tile(v_cache_ptr, block, in_block, key_ok, v_head, stride_vb, stride_vt, v_dim_off,
                       dim_valid, MASK, EVEN_D, KV_FP8, PV_DTYPE, INTERPRET)
        s = _scores(q, k, key_pos, row_pos, row_valid, head_alibi, key_start, key_end, qk_scale, softcap,
                    sliding_window, IEEE, USE_SOFTCAP, USE_ALIBI, SLIDING, MASK)
        acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, s, v, qk_scale, PV_DTYPE, IEEE, FOLD, MASK)
    return acc, m_i, l_i


# ---------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _paged_attention_kernel(
    # q, out: [num_tokens, num_q_heads, head_size]
    q_ptr, stride_qt, stride_qh,
    out_ptr, stride_ot, stride_oh,
    # k cache: element (block, token, head, d) at block*sb + token*st + head*sh + (d//K_X)*sx + d%K_X
    k_cache_ptr, stride_kb, stride_kt, stride_kh, stride_kx,
    # v cache: element (block, token, head, d) at block*sb + token*st + head*sh + d*sd
    v_cache_ptr, stride_vb, stride_vt, stride_vh, stride_vd,
    # k_new, v_new: [num_tokens, num_kv_heads, head_size] (context-cache contract only)
    k_new_ptr, v_new_ptr, stride_nt, stride_nh,
    cu_seqlens_q_ptr, seq_lens_ptr, block_table_ptr, stride_bt,
    k_scale_ptr, v_scale_ptr, alibi_ptr, sinks_ptr,
    # split-KV partials: [num_tokens, num_q_heads, NUM_SPLITS, (HEAD_PAD | 1)] fp32
    part_acc_ptr, part_m_ptr, part_l_ptr,
    num_seqs, qk_scale, softcap, sliding_window, partition_size, min_query_len, max_query_len,
    QPK: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, K_X: tl.constexpr, KV_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PV_DTYPE: tl.constexpr, IEEE: tl.constexpr, CONTEXT: tl.constexpr, DECODE_FROM_CACHE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_SINKS: tl.constexpr,
    SLIDING: tl.constexpr, NUM_SPLITS: tl.constexpr, IDX64: tl.constexpr, INTERPRET: tl.constexpr,
    SEQ_GRID: tl.constexpr,
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    if SEQ_GRID:
        # decode launches: every sequence they handle fits one tile, so program = sequence
        seq = tile_idx
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        tile_in_seq = 0
    else:
        seq = _find_sequence(cu_seqlens_q_ptr, num_seqs, tile_idx, BLOCK_Q)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        tile_in_seq = tile_idx - (q_start // BLOCK_Q + seq)
    if tile_in_seq * BLOCK_Q >= query_len:
        return
    if (query_len < min_query_len) | (query_len > max_query_len):
        return  # this sequence belongs to the other launch of a mixed batch
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - query_len

    # rows: BLOCK_Q query tokens x QPK heads of this KV head (row r -> token r // QPK, head r % QPK)
    rows = tl.arange(0, BLOCK_M)
    row_tok = tile_in_seq * BLOCK_Q + rows // QPK
    row_head = kv_head * QPK + rows % QPK
    row_valid = (rows < BLOCK_Q * QPK) & (row_tok < query_len)
    row_pos = ctx_len + row_tok
    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_SIZE

    q_offs = (q_start + row_tok).to(tl.int64)[:, None] * stride_qt + row_head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None] & dim_valid[None, :], other=0.0).to(DOT_DTYPE)

    # keys this tile needs: up to its last row's position; with a window, from its first row's
    first_pos = ctx_len + tile_in_seq * BLOCK_Q
    last_pos = ctx_len + tl.minimum(query_len, (tile_in_seq + 1) * BLOCK_Q) - 1
    key_start = 0
    if SLIDING:
        key_start = tl.maximum(first_pos - sliding_window + 1, 0)
    key_end = last_pos + 1
    if NUM_SPLITS > 1:
        key_start = tl.maximum(key_start, split * partition_size)
        if split < NUM_SPLITS - 1:  # the last split takes the rest, even past a max_seq_len too small
            key_end = tl.minimum(key_end, (split + 1) * partition_size)

    # where the cache ends: the whole sequence, or ctx_len under the context contract
    cache_end = seq_len
    if CONTEXT:
        if DECODE_FROM_CACHE:
            if query_len > 1:
                cache_end = ctx_len
        else:
            cache_end = ctx_len

    head_alibi = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        head_alibi = tl.load(alibi_ptr + row_head, mask=row_valid, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_SINKS:
        if split == 0:  # the sink joins the denominator once, in the first split
            m_i = tl.load(sinks_ptr + row_head, mask=row_valid, other=float("-inf")) * 1.4426950408889634
            l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)

    k_scale = 1.0
    v_scale = 1.0
    if KV_FP8 != 0:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    tile_scale = qk_scale * k_scale

    # ---- keys from the paged cache
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    cache_stop = tl.minimum(key_end, cache_end)
    k_dim_off = (dims // K_X) * stride_kx + dims % K_X
    tile_start = (key_start // BLOCK_N) * BLOCK_N
    # the key range loop below is split for speed; see _cache_tiles
    # Three ranges of key tiles: [tile_start, full_lo) and [full_hi, cache_stop) need masks (window
    # edge, causal diagonal, sequence end); every row sees every key of [full_lo, full_hi) whole.
    full_lo = key_start
    if SLIDING:
        full_lo = tl.maximum(full_lo, last_pos - sliding_window + 1)
    full_lo = tl.minimum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, cache_stop)
    full_hi = tl.maximum(tl.minimum(first_pos + 1, cache_stop) // BLOCK_N * BLOCK_N, full_lo)
    acc, m_i, l_i = _cache_tiles(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, tile_start, full_lo, kv_head,
        stride_kb, stride_kt, stride_kh, k_dim_off, stride_vb, stride_vt, stride_vh, stride_vd,
        dims, dim_valid, row_pos, row_valid, head_alibi, key_start, cache_stop, tile_scale, softcap,
        sliding_window, BLOCK_N, PAGE, KV_FP8, DOT_DTYPE, PV_DTYPE, IEEE, USE_SOFTCAP, USE_ALIBI, SLIDING, True,
        HEAD_PAD == HEAD_SIZE, IDX64, INTERPRET,
    )
    acc, m_i, l_i = _cache_tiles(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, full_lo, full_hi, kv_head,
        stride_kb, stride_kt, stride_kh, k_dim_off, stride_vb, stride_vt, stride_vh, stride_vd,
        dims, dim_valid, row_pos, row_valid, head_alibi, key_start, cache_stop, tile_scale, softcap,
        sliding_window, BLOCK_N, PAGE, KV_FP8, DOT_DTYPE, PV_DTYPE, IEEE, USE_SOFTCAP, USE_ALIBI, SLIDING, False,
        HEAD_PAD == HEAD_SIZE, IDX64, INTERPRET,
    )
    acc, m_i, l_i = _cache_tiles(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, full_hi, cache_stop, kv_head,
        stride_kb, stride_kt, stride_kh, k_dim_off, stride_vb, stride_vt, stride_vh, stride_vd,
        dims, dim_valid, row_pos, row_valid, head_alibi, key_start, cache_stop, tile_scale, softcap,
        sliding_window, BLOCK_N, PAGE, KV_FP8, DOT_DTYPE, PV_DTYPE, IEEE, USE_SOFTCAP, USE_ALIBI, SLIDING, True,
        HEAD_PAD == HEAD_SIZE, IDX64, INTERPRET,
    )

    if KV_FP8 != 0:
        acc = acc * v_scale

    # ---- keys of the query tokens themselves, passed separately (context-cache contract)
    if CONTEXT:
        new_start = tl.maximum(key_start, cache_end)
        for start in range(new_start, key_end, BLOCK_N):
            key_pos = start + tl.arange(0, BLOCK_N)
            key_ok = key_pos < key_end
            tok = (q_start + key_pos - ctx_len).to(tl.int64)
            k_offs = tok[:, None] * stride_nt + kv_head * stride_nh + dims[None, :]
            k = tl.load(k_new_ptr + k_offs, mask=key_ok[:, None] & dim_valid[None, :], other=0.0).to(DOT_DTYPE)
            v_offs = tok[:, None] * stride_nt + kv_head * stride_nh + dims[None, :]
            v = tl.load(v_new_ptr + v_offs, mask=key_ok[:, None] & dim_valid[None, :], other=0.0).to(DOT_DTYPE)
            s = _scores(q, k, key_pos, row_pos, row_valid, head_alibi, key_start, key_end, qk_scale, softcap,
                        sliding_window, IEEE, USE_SOFTCAP, USE_ALIBI, SLIDING, True)
            acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, s, v, qk_scale, DOT_DTYPE, IEEE,
                                        not (USE_SOFTCAP or USE_ALIBI), True)

    out_rows = (q_start + row_tok).to(tl.int64)
    if NUM_SPLITS == 1:
        # a row that saw no key has l == 0 and gives 0; NaN read from a poisoned slot must stay
        # NaN (never test `l > 0`, which is false for NaN and would hide the unwritten read)
        out = tl.where(l_i[:, None] == 0, 0.0, acc / tl.where(l_i == 0, 1.0, l_i)[:, None])
        o_offs = out_rows[:, None] * stride_ot + row_head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])
    else:
        # partial results: raw accumulator, running max (log2 units) and sum of exp2
        slot = (out_rows * (QPK * tl.num_programs(1)) + row_head) * NUM_SPLITS + split
        tl.store(part_m_ptr + slot, m_i, mask=row_valid)
        tl.store(part_l_ptr + slot, l_i, mask=row_valid)
        tl.store(part_acc_ptr + slot[:, None] * HEAD_PAD + dims[None, :], acc,
                 mask=row_valid[:, None] & dim_valid[None, :])


@triton.jit
def _merge_splits_kernel(
    out_ptr, stride_ot, stride_oh, part_acc_ptr, part_m_ptr, part_l_ptr,
    num_q_heads, cu_seqlens_q_ptr, min_query_len, max_query_len,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """out[t, h] = sum_s acc_s * 2^(m_s - M) / sum_s l_s * 2^(m_s - M), M = max_s m_s; 0 if empty.
    One program per (sequence, query head), over the sequence's few query tokens."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if (query_len < min_query_len) | (query_len > max_query_len):
        return
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    dims = tl.arange(0, HEAD_PAD)
    for i in range(0, query_len):
        token = q_start.to(tl.int64) + i
        base = (token * num_q_heads + head) * NUM_SPLITS
        m = tl.load(part_m_ptr + base + splits, mask=split_ok, other=float("-inf"))
        l = tl.load(part_l_ptr + base + splits, mask=split_ok, other=0.0)
        m_max = tl.max(m, 0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.math.exp2(m - m_safe)
        denom = tl.sum(l * w, 0)
        acc = tl.load(part_acc_ptr + (base + splits)[:, None] * HEAD_PAD + dims[None, :],
                      mask=split_ok[:, None] & (dims[None, :] < HEAD_SIZE), other=0.0)
        num = tl.sum(acc * w[:, None], 0)
        out = tl.where(denom == 0, 0.0, num / tl.where(denom == 0, 1.0, denom))  # NaN stays NaN
        tl.store(out_ptr + token * stride_ot + head * stride_oh + dims,
                 out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_SIZE)


# ---------------------------------------------------------------------------------------------
# launcher (inputs were validated by pagedattn.attention; launch parameters come from dispatch)
# ---------------------------------------------------------------------------------------------
_PAGED_ATTENTION = FastKernel(_paged_attention_kernel)
_MERGE_SPLITS = FastKernel(_merge_splits_kernel)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_FP8_CODE = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}
_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_retired_workspaces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # never freed
_scalars: dict[tuple, torch.Tensor] = {}


def _scalar_tensor(value, device: torch.device) -> torch.Tensor:
    """A device float32 scalar for a scale given as float or tensor (cached: no per-call allocation)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(1).to(device=device, dtype=torch.float32)
    key = (float(value), str(device))
    t = _scalars.get(key)
    if t is None:
        t = _scalars[key] = torch.tensor([float(value)], dtype=torch.float32, device=device)
    return t


def workspace(num_tokens: int, num_q_heads: int, num_splits: int, head_pad: int, device: torch.device):
    """Split-KV scratch, preallocated and reused: (partial outputs, running max, sum-exp) with room
    for tokens x heads x splits rows (x head_pad floats for the outputs).

    It grows by powers of two, and a buffer it outgrows is kept alive rather than freed: a captured
    CUDA graph may still hold its address, and a freed buffer would go back to the caching
    allocator for another tensor to take. The kept buffers total less than the current one, which
    is under twice the largest need: all scratch stays under 4x the largest need.
    """
    key = (str(device), head_pad)
    need = num_tokens * num_q_heads * num_splits
    ws = _workspaces.get(key)
    if ws is None or ws[1].numel() < need:
        if ws is not None:
            _retired_workspaces.append(ws)
        rows = triton.next_power_of_2(need)
        ws = (torch.empty(rows * head_pad, dtype=torch.float32, device=device),
              torch.empty(rows, dtype=torch.float32, device=device),
              torch.empty(rows, dtype=torch.float32, device=device))
        _workspaces[key] = ws
    return ws


def cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_layout: str, head_pad: int):
    """(k strides (block, token, head, dim-chunk), K_X, v strides (block, token, head, dim))."""
    if kv_layout == "nhd":  # [num_blocks, block_size, num_kv_heads, head_size]
        kb, kt, kh, _ = k_cache.stride()
        vb, vt, vh, vd = v_cache.stride()
        return (kb, kt, kh, 0), head_pad, (vb, vt, vh, vd)
    # vllm_v0: k [num_blocks, num_kv_heads, head_size // x, block_size, x], v [num_blocks, num_kv_heads, head_size, block_size]
    kb, kh, kx, kt, _ = k_cache.stride()
    vb, vh, vd, vt = v_cache.stride()
    return (kb, kt, kh, kx), k_cache.shape[4], (vb, vt, vh, vd)


def launch(plan, q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_table, *, k_new=None,
           v_new=None, decode_from_cache=False, scale, sliding_window=0, alibi_slopes=None,
           softcap=0.0, sinks=None, k_scale=None, v_scale=None, kv_layout="nhd",
           query_lens_host=None):
    """Launch `plan` (and its `decode_part`, the second launch of a mixed batch). With host query
    lengths, a launch that would have no sequence to work on is skipped."""
    num_tokens, num_q_heads, head_size = q.shape
    num_kv_heads = k_cache.shape[2] if kv_layout == "nhd" else k_cache.shape[1]
    page = k_cache.shape[1] if kv_layout == "nhd" else k_cache.shape[3]
    head_pad = max(16, triton.next_power_of_2(head_size))
    num_seqs = seq_lens.shape[0]
    fp8 = _FP8_CODE.get(k_cache.dtype, 0)
    if fp8:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        k_scale_t, v_scale_t = _scalar_tensor(k_scale, q.device), _scalar_tensor(v_scale, q.device)
    else:
        k_scale_t = v_scale_t = q  # unused
    (kb, kt, kh, kx), k_x, (vb, vt, vh, vd) = cache_strides(k_cache, v_cache, kv_layout, head_pad)
    context = k_new is not None
    if context:
        nt, nh = k_new.stride(0), k_new.stride(1)
    else:
        k_new = v_new = q
        nt = nh = 0
    interp = interpreter_enabled()
    dot_dtype = tl.float32 if interp else _TL_DTYPES[q.dtype]
    # fp8 V converts to fp16 in hardware and is exact there (e4m3 and e5m2 both fit), and P in [0, 1]
    # keeps more bits in fp16 than in bf16: the P.V dot runs in fp16 with no fp16 -> bf16 step
    pv_dtype = tl.float16 if fp8 and dot_dtype in (tl.float16, tl.bfloat16) else dot_dtype
    for part in (plan, plan.decode_part):
        if part is None:
            continue
        if query_lens_host is not None and not any(
                part.min_query_len <= n <= part.max_query_len for n in query_lens_host):
            continue
        num_splits = part.num_splits
        if num_splits > 1:
            part_acc, part_m, part_l = workspace(num_tokens, num_q_heads, num_splits, head_pad, q.device)
        else:
            part_acc = part_m = part_l = q  # unused
        seq_grid = part.phase == "decode"
        tiles = num_seqs if seq_grid else num_tokens // part.block_q + num_seqs
        grid = (tiles, num_kv_heads, num_splits)
        _PAGED_ATTENTION[grid](
            q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1),
            k_cache, kb, kt, kh, kx, v_cache, vb, vt, vh, vd,
            k_new, v_new, nt, nh,
            cu_seqlens_q, seq_lens, block_table, block_table.stride(0),
            k_scale_t, v_scale_t,
            alibi_slopes if alibi_slopes is not None else q, sinks if sinks is not None else q,
            part_acc, part_m, part_l,
            num_seqs, scale * LOG2E, float(softcap or 1.0), int(sliding_window or 0),
            int(part.partition_size or 1), part.min_query_len, min(part.max_query_len, 2**31 - 1),
            QPK=num_q_heads // num_kv_heads, HEAD_SIZE=head_size, HEAD_PAD=head_pad,
            BLOCK_M=part.block_m, BLOCK_Q=part.block_q, BLOCK_N=part.block_n, PAGE=page, K_X=k_x,
            KV_FP8=fp8, DOT_DTYPE=dot_dtype, PV_DTYPE=pv_dtype,
            IEEE=(q.dtype == torch.float32 and not interp), CONTEXT=context,
            DECODE_FROM_CACHE=bool(decode_from_cache), USE_SOFTCAP=bool(softcap),
            USE_ALIBI=alibi_slopes is not None, USE_SINKS=sinks is not None,
            SLIDING=bool(sliding_window), NUM_SPLITS=num_splits,
            IDX64=max(k_cache.numel(), v_cache.numel()) >= 2**31, INTERPRET=interp,
            SEQ_GRID=seq_grid, num_warps=part.num_warps, num_stages=part.num_stages,
        )
        if num_splits > 1:
            _MERGE_SPLITS[(num_seqs, num_q_heads)](
                out, out.stride(0), out.stride(1), part_acc, part_m, part_l,
                num_q_heads, cu_seqlens_q, part.min_query_len, min(part.max_query_len, 2**31 - 1),
                HEAD_SIZE=head_size, HEAD_PAD=head_pad, NUM_SPLITS=num_splits,
                SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), num_warps=4,
            )
    return out
