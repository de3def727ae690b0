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

fp8 (e4m3) tensors arrive as uint8 and are bitcast. fp8 queries (Q_FP8) are either the operands of
an fp8 tensor-core q.k dot over an e4m3 cache (DOT_DTYPE float8e4nv, sm_89+) or upcast exactly;
q_scale joins the softmax scale. k_scale / v_scale are one value or one per KV head (stride 0 or
1). An fp8 output (OUT_FP8) stores out / out_scale, saturated and rounded as the write kernel does.

Every tensor is addressed with its own strides (q, out, k_new, v_new, both caches), so strided
views (fused QKV, K|V halves of one buffer, HND caches) are read in place.

Memory safety does not depend on the metadata being valid. Every load and store is bounded by
the tensors' real extents: token rows by num_tokens, block-table columns by its width, block ids
by num_blocks. A sequence whose metadata is inconsistent (negative or decreasing offsets, rows
past num_tokens, seq_len < query_len, a block id outside the cache, a table too narrow, more
query tokens than its launch's tile holds) gets NaN in all its output rows: never plausible
numbers. Validation proper happens on the host, at plan time (`pagedattn.validate`).

Semantics are exactly those of `pagedattn.reference` (its docstring is the specification).
This module imports nothing from pagedattn above `kernels/`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import BoundLaunch, FastKernel, interpreter_enabled
from .write import _fp32_to_fp8_bits

# log2(e): softmax runs in the log2 domain (exp2). The launchers fold it into the scale they pass
# (LOG2E_FLOAT, a Python float); kernels convert natural-log quantities with LOG2E.
LOG2E_FLOAT = 1.4426950408889634
LOG2E: tl.constexpr = tl.constexpr(LOG2E_FLOAT)
# fp32 inputs are the accuracy path: "ieee" dots on FMA units. They hold their operand tiles in
# registers, so dispatch gives fp32 small tiles (scripts/compile_check.py reports each tile's
# stack frame); "tf32x3" (three tf32 terms on the tensor cores) would spill far less.
FP32_PRECISION: tl.constexpr = tl.constexpr("ieee")


def _fp8x4_asm(fmt: str) -> str:
    """Inline PTX: four fp8 (`fmt`) in $2 -> fp16 pairs in $0 (elements 0, 1) and $1 (2, 3)."""
    return f"{{ .reg .b16 lo, hi; mov.b32 {{lo, hi}}, $2; cvt.rn.f16x2.{fmt}x2 $0, lo; cvt.rn.f16x2.{fmt}x2 $1, hi; }}"


E4M3X4_TO_F16: tl.constexpr = tl.constexpr(_fp8x4_asm("e4m3"))
E5M2X4_TO_F16: tl.constexpr = tl.constexpr(_fp8x4_asm("e5m2"))


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _find_sequence(cu_seqlens_q_ptr, num_seqs, tile_idx, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles contain global tile `tile_idx`: tiles of sequence s start at
    cu_seqlens_q[s] // BLOCK_Q + s (an upper bound on tiles before it), so binary-search that.
    Returns -1 only for invalid offsets (cu_seqlens_q[0] > 0)."""
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
def _sequence(cu_seqlens_q_ptr, seq_lens_ptr, seq, num_seqs, num_tokens):
    """(q_start, query_len, seq_len, bad) of sequence `seq`. `bad`: its metadata cannot be served
    (rows outside [0, num_tokens), a negative length, seq_len < query_len, or offsets that
    decrease next to it so its rows overlap a neighbour's)."""
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_end = tl.load(cu_seqlens_q_ptr + seq + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    query_len = q_end - q_start
    prev_end = tl.load(cu_seqlens_q_ptr + seq - 1, mask=seq > 0, other=0)
    next_end = tl.load(cu_seqlens_q_ptr + seq + 2, mask=seq + 1 < num_seqs, other=num_tokens)
    bad = (q_start < 0) | (query_len < 0) | (q_end > num_tokens) | (seq_len < query_len)
    bad = bad | (prev_end > q_start) | (next_end < q_end)
    return q_start, query_len, seq_len, bad


@triton.jit
def _store_nan_rows(
    out_ptr,
    out_strides,
    tok_lo,
    tok_hi,
    num_tokens,
    kv_head,
    QPK: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    OUT_FP8: tl.constexpr,
):
    """NaN into rows [tok_lo, tok_hi) (clipped to [0, num_tokens)) of this KV head's query heads
    (an fp8 output, stored as uint8, gets e4m3's NaN pattern 0x7F). out_strides: (t, h, d)."""
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_PAD)
    heads = kv_head * QPK + rows % QPK
    lo = tl.maximum(tok_lo, 0)
    hi = tl.minimum(tok_hi, num_tokens)
    nan = tl.full([BLOCK_M, HEAD_PAD], float("nan"), dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_Q):
        tok = t0 + rows // QPK
        ok = (rows < BLOCK_Q * QPK) & (tok < hi)
        offs = (
            tok.to(tl.int64)[:, None] * out_strides[0]
            + heads[:, None] * out_strides[1]
            + dims[None, :] * out_strides[2]
        )
        tl.store(out_ptr + offs, _out_value(nan, 1.0, OUT_FP8, out_ptr), mask=ok[:, None] & (dims[None, :] < HEAD_SIZE))


@triton.jit
def _out_value(x, out_scale, OUT_FP8: tl.constexpr, out_ptr):
    """fp32 results as the output stores them: the output's dtype, or for an fp8 (e4m3) output
    x / out_scale saturated to +-448 and rounded to nearest even, as uint8 bits (NaN stays NaN;
    the bit conversion is exact in the interpreter too, see kernels/write.py)."""
    if OUT_FP8:
        y = tl.math.div_rn(x, out_scale)
        y = tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))
        return _fp32_to_fp8_bits(y, 4, 3, 512.0)
    else:
        return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _store_partials(
    parts,
    tokens,
    row_head,
    split,
    acc,
    m_i,
    l_i,
    row_valid,
    io_mask,
    QPK: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):
    """Split-KV partials of BLOCK_M rows (query token `tokens`, int64, x query head `row_head`):
    the raw accumulator, the running max (log2 units) and the sum of exp2, into
    parts = (part_acc, part_m, part_l), [num_tokens, num_q_heads, NUM_SPLITS, (HEAD_PAD|1)]."""
    part_acc_ptr, part_m_ptr, part_l_ptr = parts
    dims = tl.arange(0, HEAD_PAD)
    slot = (tokens * (QPK * tl.num_programs(1)) + row_head) * NUM_SPLITS + split
    tl.store(part_m_ptr + slot, m_i, mask=row_valid)
    tl.store(part_l_ptr + slot, l_i, mask=row_valid)
    tl.store(part_acc_ptr + slot[:, None] * HEAD_PAD + dims[None, :], acc, mask=io_mask)


@triton.jit
def _normalized(acc, l_i):
    """Rows of acc / l_i ([BLOCK_M, HEAD_PAD] over [BLOCK_M]): a row that saw no key has l == 0 and
    gives 0; NaN read from a poisoned slot stays NaN (never test `l > 0`, which is false for NaN
    and would hide the unwritten read)."""
    return tl.where(l_i[:, None] == 0, 0.0, acc / tl.where(l_i == 0, 1.0, l_i)[:, None])


@triton.jit
def _kv_scales(k_scale_ptr, v_scale_ptr, kv_head, scale_strides, KV_FP8: tl.constexpr):
    """(k_scale, v_scale) of this KV head over an fp8 cache (one scale, or one per KV head:
    scale_strides (k, v) each 0 or 1); 1.0 otherwise."""
    if KV_FP8 != 0:
        return tl.load(k_scale_ptr + kv_head * scale_strides[0]), tl.load(v_scale_ptr + kv_head * scale_strides[1])
    return 1.0, 1.0


@triton.jit
def _load_kv_fp(x, FP8: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, CVT_ASM: tl.constexpr = False):
    """Convert a loaded K/V tile to the dot dtype (fp8 caches arrive as uint8 storage). fp8 goes
    through fp16, which Hopper converts to in hardware (cvt.f16x2.e4m3x2), then to OUT_DTYPE.
    CVT_ASM (experimental, FP8_CVT_ASM; sm_89+): fp8 -> fp16 through inline PTX marked impure,
    which the compiler cannot move past the tile's shared-memory round trip: the tile is then
    converted in registers and read back with ldmatrix, instead of being read in the dot-operand
    layout one byte at a time (LDS.U8) and converted there."""
    if FP8 == 1 and OUT_DTYPE == tl.float8e4nv:
        return x.to(tl.float8e4nv, bitcast=True)  # e4m3 operands of an fp8 tensor-core dot
    if FP8 == 1:
        if INTERPRET:
            # Triton's interpreter decodes e4m3fn's NaN (0x7F/0xFF) as 480; the GPU's cvt gives
            # NaN. Match the hardware so poisoned fp8 slots surface on CPU too.
            nan = (x & 0x7F) == 0x7F
            x = tl.where(nan, float("nan"), x.to(tl.float8e4nv, bitcast=True).to(tl.float32))
        if CVT_ASM and not INTERPRET:
            x = _fp8x4_to_f16(x, E4M3X4_TO_F16)
        elif not INTERPRET:
            x = x.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    elif FP8 == 2:
        if CVT_ASM and not INTERPRET:
            x = _fp8x4_to_f16(x, E5M2X4_TO_F16)
        else:
            x = x.to(tl.float8e5, bitcast=True).to(tl.float16)
    return x.to(OUT_DTYPE)


@triton.jit
def _fp8x4_to_f16(x, ASM: tl.constexpr):
    """fp8 bits (uint8) to fp16 by inline PTX: four per 32-bit register (element 0 in the low
    byte, as Triton packs them) -> two f16x2, low half first, as Triton's own lowering converts."""
    return tl.inline_asm_elementwise(ASM, "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)


# Grouped arguments of the key-loop helpers below. Tuples of runtime values are unpacked by plain
# assignment; tuples of constexprs are read element by element into `NAME: tl.constexpr = T[i]`
# (a plain assignment would turn Triton constexprs into tensors), and are only ever built inline
# at a call site, for the same reason.
#   rows:   (row_pos, row_valid, head_alibi) of the BLOCK_M query rows
#   keys:   (key_start, key_end): the keys the rows may see
#   params: (qk_scale, softcap, sliding_window)
#   table:  (block-table row pointer, num_blocks, max_blocks)
#   K, V:   (cache pointer, block stride, slot stride, the KV head's offset, per-dim offsets [HEAD_PAD]); flat:
#           a constexpr in a nested tuple reaches the callee as None in Triton 3.6
#   SCORE:  constexprs (IEEE, USE_SOFTCAP, USE_ALIBI, SLIDING)
#   TILE:   constexprs (BLOCK_N, PAGE, IDX64)
#   LOAD:   constexprs (KV_FP8, DOT_DTYPE, PV_DTYPE, EVEN_D, INTERPRET, FP8_CVT_ASM)
@triton.jit
def _scores(q, k, key_pos, rows, keys, params, SCORE, MASK: tl.constexpr):
    """Scores of a key tile, [BLOCK_M, BLOCK_N], masked with -inf where MASK. In log2 units with
    softcap or ALiBi; otherwise raw q.k (the scale is folded into _softmax_pv's exp2 argument: one
    FMA per score, s * qk_scale - m, instead of a multiply and a subtract)."""
    row_pos, row_valid, head_alibi = rows
    key_start, key_end = keys
    qk_scale, softcap, sliding_window = params
    IEEE: tl.constexpr = SCORE[0]
    USE_SOFTCAP: tl.constexpr = SCORE[1]
    USE_ALIBI: tl.constexpr = SCORE[2]
    SLIDING: tl.constexpr = SCORE[3]
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision=FP32_PRECISION)
    else:
        s = tl.dot(q, tl.trans(k))
    if USE_SOFTCAP:
        # cap * tanh(x / cap) in natural units, then to log2 units; tanh via exp (stable at +-inf)
        x = s * (qk_scale / LOG2E) / softcap
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * LOG2E
    elif USE_ALIBI:
        s = s * qk_scale
    if USE_ALIBI:
        s += head_alibi[:, None] * (key_pos[None, :] - row_pos[:, None]).to(tl.float32) * LOG2E
    if MASK:
        in_range = (key_pos >= key_start) & (key_pos < key_end)
        visible = (key_pos[None, :] <= row_pos[:, None]) & in_range[None, :] & row_valid[:, None]
        if SLIDING:
            visible &= (row_pos[:, None] - key_pos[None, :]) < sliding_window
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _softmax_pv(
    acc,
    m_i,
    l_i,
    s,
    v,
    qk_scale,
    PV_DTYPE: tl.constexpr,
    IEEE: tl.constexpr,
    FOLD: tl.constexpr,
    MASK: tl.constexpr,
):
    """One online-softmax step: scores s of a key tile (raw when FOLD, else in log2 units) and its
    values v [BLOCK_N, HEAD_PAD] in PV_DTYPE (P is cast to it for the dot). An e4m3 P.V (fp8_pv)
    quantizes 256 * P, so probabilities down to 2^-17 survive e4m3's subnormals; the caller
    divides the accumulator by 256 (folded into v_scale)."""
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
    elif PV_DTYPE == tl.float8e4nv:
        acc += tl.dot((p * 256.0).to(PV_DTYPE), v)
    else:
        acc += tl.dot(p.to(PV_DTYPE), v)
    return acc, m_new, l_i


@triton.jit
def _tile_blocks(table, start, keys, TILE, MASK: tl.constexpr):
    """Key positions of the tile at `start`, which of them are in range, their cache blocks (through
    the block table: a tile may span several pages), their slots within the blocks, and whether
    any in-range key has no valid block (an id outside [0, num_blocks), or a column past the
    table's width). Such keys read block 0 instead (`_bad_blocks` turns the rows into NaN)."""
    bt_row, num_blocks, max_blocks = table
    key_start, key_end = keys
    BLOCK_N: tl.constexpr = TILE[0]
    PAGE: tl.constexpr = TILE[1]
    IDX64: tl.constexpr = TILE[2]
    key_pos = start + tl.arange(0, BLOCK_N)
    col = key_pos // PAGE
    if MASK:
        key_ok = (key_pos < key_end) & (key_pos >= key_start)
    else:
        key_ok = key_pos >= 0
    block = tl.load(bt_row + col, mask=key_ok & (col < max_blocks), other=-1)
    bad = key_ok & ((block < 0) | (block >= num_blocks))
    block = tl.where(bad, 0, block)
    if IDX64:  # only caches of 2^31 elements or more pay for 64-bit offset arithmetic
        block = block.to(tl.int64)
    return key_pos, key_ok, block, key_pos % PAGE


@triton.jit
def _load_tile(cache, block, in_block, key_ok, dim_valid, OUT_DTYPE: tl.constexpr, LOAD, MASK: tl.constexpr):
    """A [BLOCK_N, HEAD_PAD] K or V tile from the paged cache, converted to OUT_DTYPE."""
    # flat, not (ptr, (strides), ...): Triton 3.6 passes a constexpr (a stride specialized to 1, as
    # vLLM v0's keys-contiguous V has) inside a nested tuple to a callee as None
    cache_ptr, stride_b, stride_t, head_off, dim_off = cache
    KV_FP8: tl.constexpr = LOAD[0]
    EVEN_D: tl.constexpr = LOAD[3]
    INTERPRET: tl.constexpr = LOAD[4]
    offs = block[:, None] * stride_b + in_block[:, None] * stride_t + head_off + dim_off[None, :]
    if MASK:
        x = tl.load(cache_ptr + offs, mask=key_ok[:, None] & dim_valid[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(cache_ptr + offs)
    else:
        x = tl.load(cache_ptr + offs, mask=dim_valid[None, :], other=0.0)
    return _load_kv_fp(x, KV_FP8, OUT_DTYPE, INTERPRET, LOAD[5])


@triton.jit
def _cache_tiles(state, q, lo, hi, K, V, table, dim_valid, rows, keys, params, SCORE, TILE, LOAD, MASK: tl.constexpr):
    """Key tiles [lo, hi) (lo a multiple of BLOCK_N) gathered from the paged cache through the
    block table, folded into the online-softmax state (acc, m_i, l_i), which it returns. Unmasked
    tiles (MASK=False) lie wholly in range. The grouped arguments: see above."""
    acc, m_i, l_i = state
    BLOCK_N: tl.constexpr = TILE[0]
    DOT_DTYPE: tl.constexpr = LOAD[1]
    PV_DTYPE: tl.constexpr = LOAD[2]
    IEEE: tl.constexpr = SCORE[0]
    FOLD: tl.constexpr = not (SCORE[1] or SCORE[2])  # neither softcap nor ALiBi
    for start in range(lo, hi, BLOCK_N):
        key_pos, key_ok, block, in_block = _tile_blocks(table, start, keys, TILE, MASK)
        k = _load_tile(K, block, in_block, key_ok, dim_valid, DOT_DTYPE, LOAD, MASK)
        v = _load_tile(V, block, in_block, key_ok, dim_valid, PV_DTYPE, LOAD, MASK)
        s = _scores(q, k, key_pos, rows, keys, params, SCORE, MASK)
        acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, s, v, params[0], PV_DTYPE, IEEE, FOLD, MASK)
    return acc, m_i, l_i


@triton.jit
def _bad_blocks(table, key_start, key_stop, PAGE: tl.constexpr):
    """Whether any block the keys [key_start, key_stop) live in is not a valid block: an id outside
    [0, num_blocks) or a column past the table's width. One pass over the block-table row before
    the key loop (a few hundred bytes), so the loop itself pays only for a clamp."""
    bt_row, num_blocks, max_blocks = table
    COLS: tl.constexpr = 128
    bad = tl.full([], 0, tl.int32)
    for c0 in range(key_start // PAGE, tl.cdiv(key_stop, PAGE), COLS):
        cols = c0 + tl.arange(0, COLS)
        used = cols * PAGE < key_stop
        ids = tl.load(bt_row + cols, mask=used & (cols < max_blocks), other=-1)
        bad = tl.maximum(bad, tl.max((used & ((ids < 0) | (ids >= num_blocks))).to(tl.int32), 0))
    return bad > 0


# ---------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------
# Each tensor's strides arrive as one tuple argument. Triton 3.6 specializes a tuple's elements as
# it does lone arguments (an int equal to 1 becomes a constexpr, ints are keyed on divisibility
# by 16 and width) and its C launcher parses the tuple object itself (a nested "(...)" format, no
# flattening in Python), so the fast launcher binds each tuple once and passes it through
# (launch.arg_class keys tuples element by element). Pointers stay top-level arguments: the fast
# path passes them as ints, which it does only for top-level tensors.
@triton.jit
def _paged_attention_kernel(
    q_ptr,
    q_strides,  # q: [num_tokens, num_q_heads, head_size], strides (t, h, d)
    out_ptr,
    out_strides,  # out: like q
    # K cache strides (block, slot, head, dim-chunk, dim): element (b, s, h, d) at
    # b*k_strides[0] + s*k_strides[1] + h*k_strides[2] + (d // K_X)*k_strides[3] + (d % K_X)*k_strides[4]
    k_cache_ptr,
    k_strides,
    v_cache_ptr,
    v_strides,  # V cache: (block, slot, head, dim)
    k_new_ptr,
    k_new_strides,  # k_new: [num_tokens, num_kv_heads, head_size], strides (t, h, d)
    v_new_ptr,
    v_new_strides,  # v_new: like k_new (context contract only)
    cu_seqlens_q_ptr,
    seq_lens_ptr,  # [num_seqs + 1], [num_seqs]
    block_table_ptr,
    bt_strides,  # [num_seqs, max_blocks], strides (row, column)
    k_scale_ptr,
    v_scale_ptr,  # fp8 caches: [1] or [num_kv_heads] float32 (scale_strides: (k, v), each 0 or 1)
    q_scale_ptr,  # fp8 q: [1] float32, real q = q_fp8 * q_scale
    out_scale_ptr,  # fp8 out: [1] float32, out_fp8 = out / out_scale
    alibi_ptr,
    sinks_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,  # split-KV partials [num_tokens, num_q_heads, NUM_SPLITS, (HEAD_PAD|1)]
    num_seqs,
    num_tokens,
    num_blocks,
    max_blocks,  # the tensors' real extents
    qk_scale,
    softcap,
    sliding_window,
    partition_size,
    min_query_len,
    max_query_len,
    scale_strides,  # (k_scale, v_scale) element strides between KV heads
    QPK: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    K_X: tl.constexpr,
    KV_FP8: tl.constexpr,
    Q_FP8: tl.constexpr,
    OUT_FP8: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PV_DTYPE: tl.constexpr,
    NEW_DTYPE: tl.constexpr,
    IEEE: tl.constexpr,
    CONTEXT: tl.constexpr,
    DECODE_FROM_CACHE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_SINKS: tl.constexpr,
    SLIDING: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IDX64: tl.constexpr,
    INTERPRET: tl.constexpr,
    SEQ_GRID: tl.constexpr,
    PARTIALS: tl.constexpr = False,  # write partials even unsplit (cascade attention merges them)
    FP8_CVT_ASM: tl.constexpr = False,  # e4m3 tiles converted by opaque inline PTX (see _load_kv_fp)
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # ---- which sequence and query tile; invalid metadata -> NaN rows
    if SEQ_GRID:
        seq = tile_idx  # decode launches: every sequence they handle fits one tile
    else:
        seq = _find_sequence(cu_seqlens_q_ptr, num_seqs, tile_idx, BLOCK_Q)
    if seq < 0:
        return
    q_start, query_len, seq_len, bad = _sequence(cu_seqlens_q_ptr, seq_lens_ptr, seq, num_seqs, num_tokens)
    if SEQ_GRID:
        tile_in_seq = 0
    else:
        tile_in_seq = tile_idx - (q_start // BLOCK_Q + seq)
    in_launch = (query_len >= min_query_len) & (query_len <= max_query_len)
    # keys read from the cache: more than the block table can address is invalid metadata (and
    # would make the key loop run for as long as seq_len says, up to 2^31 keys)
    cache_need = seq_len
    if CONTEXT:
        if DECODE_FROM_CACHE:
            if query_len > 1:
                cache_need = seq_len - query_len
        else:
            cache_need = seq_len - query_len
    bad = bad | (cache_need > max_blocks * PAGE)
    if SEQ_GRID:
        bad = bad | (in_launch & (query_len > BLOCK_Q))  # max_query_len below the real one
    if bad:
        if split == 0:
            if SEQ_GRID:
                tok_lo = q_start
                tok_hi = q_start + query_len
            else:
                tok_lo = q_start + tile_in_seq * BLOCK_Q
                tok_hi = tl.minimum(tok_lo + BLOCK_Q, q_start + query_len)
            _store_nan_rows(
                out_ptr,
                out_strides,
                tok_lo,
                tok_hi,
                num_tokens,
                kv_head,
                QPK,
                BLOCK_Q,
                BLOCK_M,
                HEAD_SIZE,
                HEAD_PAD,
                OUT_FP8,
            )
        return
    if (tile_in_seq * BLOCK_Q >= query_len) | (not in_launch):
        return  # past the sequence's last tile, or a sequence of the other launch of a mixed batch
    ctx_len = seq_len - query_len

    # rows: BLOCK_Q query tokens x QPK heads of this KV head (row r -> token r // QPK, head r % QPK)
    rows = tl.arange(0, BLOCK_M)
    row_tok = tile_in_seq * BLOCK_Q + rows // QPK
    row_head = kv_head * QPK + rows % QPK
    row_valid = (rows < BLOCK_Q * QPK) & (row_tok < query_len)
    row_pos = ctx_len + row_tok
    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_SIZE
    io_mask = row_valid[:, None] & dim_valid[None, :]

    q_offs = (
        (q_start + row_tok).to(tl.int64)[:, None] * q_strides[0]
        + row_head[:, None] * q_strides[1]
        + dims[None, :] * q_strides[2]
    )
    q = tl.load(q_ptr + q_offs, mask=io_mask, other=0.0)
    q_scale = 1.0
    if Q_FP8:  # e4m3 bits (uint8): fp8 operands of the q.k dot, or upcast exactly to DOT_DTYPE
        q_scale = tl.load(q_scale_ptr)
        q = _load_kv_fp(q, 1, DOT_DTYPE, INTERPRET)
    else:
        q = q.to(DOT_DTYPE)

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
            m_i = tl.load(sinks_ptr + row_head, mask=row_valid, other=float("-inf")) * LOG2E
            l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)

    k_scale, v_scale = _kv_scales(k_scale_ptr, v_scale_ptr, kv_head, scale_strides, KV_FP8)
    tile_scale = qk_scale * q_scale * k_scale

    # ---- keys from the paged cache, in three ranges of key tiles: [tile_start, full_lo) and
    # [full_hi, cache_stop) need masks (window edge, causal diagonal, sequence end); every row sees
    # every key of [full_lo, full_hi) whole
    bt_row = block_table_ptr + seq.to(tl.int64) * bt_strides[0]
    cache_stop = tl.minimum(key_end, cache_end)
    k_dim_off = (dims // K_X) * k_strides[3] + (dims % K_X) * k_strides[4]
    v_dim_off = dims * v_strides[3]
    k_head = kv_head * k_strides[2]
    v_head = kv_head * v_strides[2]
    tile_start = (key_start // BLOCK_N) * BLOCK_N
    full_lo = key_start
    if SLIDING:
        full_lo = tl.maximum(full_lo, last_pos - sliding_window + 1)
    full_lo = tl.minimum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, cache_stop)
    full_hi = tl.maximum(tl.minimum(first_pos + 1, cache_stop) // BLOCK_N * BLOCK_N, full_lo)
    for r in tl.static_range(3):
        # r = 0, 2: the masked edges; r = 1: the unmasked middle
        lo = tile_start if r == 0 else (full_lo if r == 1 else full_hi)
        hi = full_lo if r == 0 else (full_hi if r == 1 else cache_stop)
        acc, m_i, l_i = _cache_tiles(
            (acc, m_i, l_i),
            q,
            lo,
            hi,
            (k_cache_ptr, k_strides[0], k_strides[1], k_head, k_dim_off),
            (v_cache_ptr, v_strides[0], v_strides[1], v_head, v_dim_off),
            (bt_row, num_blocks, max_blocks),
            dim_valid,
            (row_pos, row_valid, head_alibi),
            (key_start, cache_stop),
            (tile_scale, softcap, sliding_window),
            (IEEE, USE_SOFTCAP, USE_ALIBI, SLIDING),
            (BLOCK_N, PAGE, IDX64),
            (KV_FP8, DOT_DTYPE, PV_DTYPE, HEAD_PAD == HEAD_SIZE, INTERPRET, FP8_CVT_ASM),
            r != 1,
        )
    # a key with no valid block makes every row of the tile NaN (never a plausible number)
    if _bad_blocks((bt_row, num_blocks, max_blocks), key_start, cache_stop, PAGE):
        l_i = tl.full([BLOCK_M], float("nan"), dtype=tl.float32)

    if KV_FP8 != 0:
        if PV_DTYPE == tl.float8e4nv:
            v_scale = v_scale * (1.0 / 256.0)  # P was scaled by 256 for the e4m3 P.V dot
        acc = acc * v_scale

    # ---- keys of the query tokens themselves, passed separately (context-cache contract)
    if CONTEXT:
        new_start = tl.maximum(key_start, cache_end)
        q_new = q
        if Q_FP8:  # new keys come in the model's dtype: an exact upcast of q for their dots
            q_new = q.to(tl.float32).to(NEW_DTYPE)
        for start in range(new_start, key_end, BLOCK_N):
            key_pos = start + tl.arange(0, BLOCK_N)
            key_ok = key_pos < key_end
            tok = (q_start + key_pos - ctx_len).to(tl.int64)
            new_mask = key_ok[:, None] & dim_valid[None, :]
            k_offs = tok[:, None] * k_new_strides[0] + kv_head * k_new_strides[1] + dims[None, :] * k_new_strides[2]
            k = tl.load(k_new_ptr + k_offs, mask=new_mask, other=0.0).to(NEW_DTYPE)
            v_offs = tok[:, None] * v_new_strides[0] + kv_head * v_new_strides[1] + dims[None, :] * v_new_strides[2]
            v = tl.load(v_new_ptr + v_offs, mask=new_mask, other=0.0).to(NEW_DTYPE)
            s = _scores(
                q_new,
                k,
                key_pos,
                (row_pos, row_valid, head_alibi),
                (key_start, key_end),
                (qk_scale * q_scale, softcap, sliding_window),
                (IEEE, USE_SOFTCAP, USE_ALIBI, SLIDING),
                True,
            )
            acc, m_i, l_i = _softmax_pv(
                acc, m_i, l_i, s, v, qk_scale * q_scale, NEW_DTYPE, IEEE, not (USE_SOFTCAP or USE_ALIBI), True
            )

    out_rows = (q_start + row_tok).to(tl.int64)
    if NUM_SPLITS == 1 and not PARTIALS:
        out = _normalized(acc, l_i)
        o_offs = (
            out_rows[:, None] * out_strides[0] + row_head[:, None] * out_strides[1] + dims[None, :] * out_strides[2]
        )
        out_scale = 1.0
        if OUT_FP8:
            out_scale = tl.load(out_scale_ptr)
        tl.store(out_ptr + o_offs, _out_value(out, out_scale, OUT_FP8, out_ptr), mask=io_mask)
    else:
        parts = (part_acc_ptr, part_m_ptr, part_l_ptr)
        _store_partials(parts, out_rows, row_head, split, acc, m_i, l_i, row_valid, io_mask, QPK, NUM_SPLITS, HEAD_PAD)


@triton.jit
def _merge_splits_kernel(
    out_ptr,
    out_strides,  # (t, h, d)
    out_scale_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    num_seqs,
    num_tokens,
    num_q_heads,
    min_query_len,
    max_query_len,
    max_keys,
    OUT_FP8: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """out[t, h] = sum_s acc_s * 2^(m_s - M) / sum_s l_s * 2^(m_s - M), M = max_s m_s; 0 if empty.
    One program per (sequence, query head), over the sequence's few query tokens. Sequences with
    invalid metadata were given NaN rows by the attention kernel and are skipped here."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start, query_len, seq_len, bad = _sequence(cu_seqlens_q_ptr, seq_lens_ptr, seq, num_seqs, num_tokens)
    bad = bad | (seq_len > max_keys)  # as in the attention kernel (splits only under the full contract)
    if bad | (query_len < min_query_len) | (query_len > max_query_len) | (query_len > BLOCK_Q):
        return
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    dims = tl.arange(0, HEAD_PAD)
    out_scale = 1.0
    if OUT_FP8:
        out_scale = tl.load(out_scale_ptr)
    for i in range(0, query_len):
        token = q_start.to(tl.int64) + i
        base = (token * num_q_heads + head) * NUM_SPLITS
        m = tl.load(part_m_ptr + base + splits, mask=split_ok, other=float("-inf"))
        l = tl.load(part_l_ptr + base + splits, mask=split_ok, other=0.0)
        m_max = tl.max(m, 0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.math.exp2(m - m_safe)
        denom = tl.sum(l * w, 0)
        acc = tl.load(
            part_acc_ptr + (base + splits)[:, None] * HEAD_PAD + dims[None, :],
            mask=split_ok[:, None] & (dims[None, :] < HEAD_SIZE),
            other=0.0,
        )
        num = tl.sum(acc * w[:, None], 0)
        out = tl.where(denom == 0, 0.0, num / tl.where(denom == 0, 1.0, denom))  # NaN stays NaN
        tl.store(
            out_ptr + token * out_strides[0] + head * out_strides[1] + dims * out_strides[2],
            _out_value(out, out_scale, OUT_FP8, out_ptr),
            mask=dims < HEAD_SIZE,
        )


# ---------------------------------------------------------------------------------------------
# launchers: every argument bound at plan time except the per-layer tensors
# ---------------------------------------------------------------------------------------------
_PAGED_ATTENTION = FastKernel(_paged_attention_kernel)
# Experimental, off by default until a GPU run has checked it against the reference and timed it
# (PAGEDATTN_FP8_CVT_ASM=1, read at plan time): e4m3 caches converted by inline PTX. Offline
# sm_90 SASS of the b64-ctx4k decode launch: 4,456 -> 2,944 instructions, no LDS.U8.
FP8_CVT_ASM = os.environ.get("PAGEDATTN_FP8_CVT_ASM", "0") not in ("", "0")
_MERGE_SPLITS = FastKernel(_merge_splits_kernel)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
FP8_CODES = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}
# the per-layer tensors, in this order, fill these argument slots of the attention kernel:
# q, out, k_cache, v_cache, k_new, v_new, k_scale, v_scale, q_scale, out_scale
ATTENTION_SLOTS = tuple(
    _paged_attention_kernel.arg_names.index(name)
    for name in (
        "q_ptr",
        "out_ptr",
        "k_cache_ptr",
        "v_cache_ptr",
        "k_new_ptr",
        "v_new_ptr",
        "k_scale_ptr",
        "v_scale_ptr",
        "q_scale_ptr",
        "out_scale_ptr",
    )
)
# and of the split merge: out, out_scale
MERGE_SLOTS = tuple(_merge_splits_kernel.arg_names.index(name) for name in ("out_ptr", "out_scale_ptr"))
_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_retired_workspaces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # never freed


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
        ws = (
            torch.empty(rows * head_pad, dtype=torch.float32, device=device),
            torch.empty(rows, dtype=torch.float32, device=device),
            torch.empty(rows, dtype=torch.float32, device=device),
        )
        _workspaces[key] = ws
    return ws


def head_pad_for(head_size: int) -> int:
    return max(16, triton.next_power_of_2(head_size))


def fp8_dot_available(device: torch.device) -> bool:
    """Whether q.k can run on fp8 tensor cores (sm_89+; never in the interpreter)."""
    if interpreter_enabled() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def bind_attention(
    parts,
    *,
    strides,
    shapes,
    metadata,
    options,
    idx64: bool,
    device: torch.device,
    out_dtype: torch.dtype | None = None,
    new_dtype: torch.dtype | None = None,
    scale_strides: tuple[int, int] = (0, 0),
    fp8_dot: bool | None = None,
    fp8_pv: bool = False,
    partials=None,
):
    """The launches of one plan, as `BoundLaunch`es called with (q, out, k_cache, v_cache, k_new,
    v_new, k_scale, v_scale, q_scale, out_scale) (k_new/v_new: any tensor when absent, their
    strides are unused then; a scale a launch does not read: any tensor). fp8 tensors (q, out,
    caches) are passed as uint8 views.

    parts:    the plan's launches (`dispatch.Launch`: tiles, warps, stages, splits, query-length range)
    strides:  q (t, h, d), out (t, h, d), k_cache (block, slot, head, dim-chunk, dim), v_cache
              (block, slot, head, dim), k_new (t, h, d), v_new (t, h, d)
    shapes:   num_tokens, num_q_heads, num_kv_heads, head_size, page, k_x, num_blocks, q_dtype,
              cache_dtype
    metadata: cu_seqlens_q, seq_lens, block_table (device tensors)
    options:  scale, softcap, sliding_window, alibi, sinks (device tensors or None), context,
              decode_from_cache
    out_dtype: the output's dtype (default q_dtype); float8_e4m3fn stores out / out_scale
    new_dtype: k_new / v_new's dtype (context contract with fp8 q; default q_dtype)
    scale_strides: element strides of k_scale / v_scale between KV heads (0: one per-tensor value)
    fp8_dot:  fp8 q over an e4m3 cache: q.k on fp8 tensor cores (default: where the GPU has them)
    fp8_pv:   with the fp8 q.k dot, P.V on fp8 tensor cores too (P quantized to e4m3)
    partials: None, or a function (part, part_acc, part_m, part_l) -> BoundLaunch: every launch then
              writes split-KV partials (one split too) and that launch merges them instead of
              _merge_splits_kernel (cascade attention merges them with a shared prefix's)
    """
    num_tokens, num_q_heads, num_kv_heads, head_size, page, k_x, num_blocks, q_dtype, cache_dtype = shapes
    cu_seqlens_q, seq_lens, block_table = metadata
    # one tuple of Python ints per tensor: a kernel argument each (see the kernel's signature)
    (sq, so, sk, sv, skn, svn) = (tuple(int(x) for x in s) for s in strides)
    head_pad = head_pad_for(head_size)
    num_seqs = seq_lens.shape[0]
    fp8 = FP8_CODES.get(cache_dtype, 0)
    q_fp8 = q_dtype == torch.float8_e4m3fn
    out_dtype = q_dtype if out_dtype is None else out_dtype
    new_dtype = q_dtype if new_dtype is None else new_dtype
    interp = interpreter_enabled()
    if fp8_dot is None:
        fp8_dot = fp8_dot_available(device)
    if interp:
        dot_dtype = tl.float32
    elif not q_fp8:
        dot_dtype = _TL_DTYPES[q_dtype]
    elif fp8 == 1 and fp8_dot and head_size > 16:
        dot_dtype = tl.float8e4nv  # fp8 q . fp8 k on the tensor cores, fp32 accumulation
    else:  # fp8 q upcast (exactly) to the cache's dtype, or to fp16 over an fp8 cache
        dot_dtype = tl.float16 if fp8 else _TL_DTYPES[cache_dtype]
    # fp8 V converts to fp16 in hardware and is exact there (e4m3 and e5m2 both fit), and P in [0, 1]
    # keeps more bits in fp16 than in bf16: the P.V dot runs in fp16 with no fp16 -> bf16 step
    pv_dtype = tl.float16 if fp8 and dot_dtype in (tl.float16, tl.bfloat16, tl.float8e4nv) else dot_dtype
    if interp:
        new_tl = tl.float32
    else:
        new_tl = _TL_DTYPES[new_dtype] if q_fp8 and new_dtype in _TL_DTYPES else dot_dtype
    alibi, sinks = options["alibi"], options["sinks"]
    placeholder = cu_seqlens_q  # for pointer arguments a launch never reads
    # the scales a launch reads are per-call tensors; the others are bound once (no per-call cost)
    out_fp8 = out_dtype == torch.float8_e4m3fn
    scale_read = (bool(fp8), bool(fp8), q_fp8, out_fp8)
    slots = ATTENTION_SLOTS[:6] + tuple(slot for slot, read in zip(ATTENTION_SLOTS[6:], scale_read) if read)
    uses = tuple(range(6)) + tuple(6 + i for i, read in enumerate(scale_read) if read)
    launches = []
    for part in parts:
        num_splits = part.num_splits
        if num_splits > 1 or partials is not None:
            part_acc, part_m, part_l = workspace(num_tokens, num_q_heads, num_splits, head_pad, device)
        else:
            part_acc = part_m = part_l = placeholder
        tiles = num_seqs if part.seq_grid else num_tokens // part.block_q + num_seqs
        max_query_len = min(part.max_query_len, 2**31 - 1)
        args = [
            None,
            sq,
            None,
            so,
            None,
            sk,
            None,
            sv,
            None,
            skn,
            None,
            svn,
            cu_seqlens_q,
            seq_lens,
            block_table,
            (block_table.stride(0), block_table.stride(1)),
            None if scale_read[0] else placeholder,  # k_scale, v_scale, q_scale, out_scale: per call
            None if scale_read[1] else placeholder,
            None if scale_read[2] else placeholder,
            None if scale_read[3] else placeholder,
            alibi if alibi is not None else placeholder,
            sinks if sinks is not None else placeholder,
            part_acc,
            part_m,
            part_l,
            num_seqs,
            num_tokens,
            num_blocks,
            block_table.shape[1],
            options["scale"] * LOG2E_FLOAT,
            float(options["softcap"] or 1.0),
            int(options["sliding_window"] or 0),
            int(part.partition_size or 1),
            part.min_query_len,
            max_query_len,
            (int(scale_strides[0]), int(scale_strides[1])),
        ]
        kwargs = dict(
            QPK=num_q_heads // num_kv_heads,
            HEAD_SIZE=head_size,
            HEAD_PAD=head_pad,
            BLOCK_M=part.block_m,
            BLOCK_Q=part.block_q,
            BLOCK_N=part.block_n,
            PAGE=page,
            K_X=k_x,
            KV_FP8=fp8,
            Q_FP8=q_fp8,
            OUT_FP8=out_fp8,
            DOT_DTYPE=dot_dtype,
            # fp8_pv: FlashAttention-3's fp8 mode, P in e4m3 (scaled), V as stored; an fp8 dot
            # needs K >= 32, here the key tile
            PV_DTYPE=tl.float8e4nv if fp8_pv and dot_dtype == tl.float8e4nv and part.block_n >= 32 else pv_dtype,
            NEW_DTYPE=new_tl,
            IEEE=(dot_dtype == tl.float32 and not interp),
            CONTEXT=options["context"],
            DECODE_FROM_CACHE=bool(options["decode_from_cache"]),
            USE_SOFTCAP=bool(options["softcap"]),
            USE_ALIBI=alibi is not None,
            USE_SINKS=sinks is not None,
            SLIDING=bool(options["sliding_window"]),
            NUM_SPLITS=num_splits,
            IDX64=idx64,
            INTERPRET=interp,
            SEQ_GRID=part.seq_grid,
            PARTIALS=partials is not None,
            FP8_CVT_ASM=FP8_CVT_ASM and bool(fp8) and not interp and fp8_dot_available(device),
            num_warps=part.num_warps,
            num_stages=part.num_stages,
        )
        launches.append(BoundLaunch(_PAGED_ATTENTION, (tiles, num_kv_heads, num_splits), args, slots, kwargs, uses))
        if partials is not None:
            launches.append(partials(part, part_acc, part_m, part_l))
        elif num_splits > 1:
            merge_args = [
                None,
                so,
                None if out_fp8 else placeholder,  # out_scale: per call
                part_acc,
                part_m,
                part_l,
                cu_seqlens_q,
                seq_lens,
                num_seqs,
                num_tokens,
                num_q_heads,
                part.min_query_len,
                max_query_len,
                block_table.shape[1] * page,
            ]
            merge_kwargs = dict(
                OUT_FP8=out_fp8,
                HEAD_SIZE=head_size,
                HEAD_PAD=head_pad,
                NUM_SPLITS=num_splits,
                SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
                BLOCK_Q=part.block_q,
                num_warps=4,
            )
            launches.append(
                BoundLaunch(
                    _MERGE_SPLITS,
                    (num_seqs, num_q_heads),
                    merge_args,
                    MERGE_SLOTS if out_fp8 else MERGE_SLOTS[:1],
                    merge_kwargs,
                    uses=(1, 9) if out_fp8 else (1,),
                )
            )
    return launches
