"""A Gluon (Hopper, sm_90) kernel for paged prefill and prefix-prefill attention (issue 17).

Scope: the full-cache contract (every key, the query tokens' own included, is already in the
paged cache), causal, fp16/bf16 queries and caches of the same dtype, head size 64 or 128, query
heads per KV head a power of two up to 128, NHD cache layout [num_blocks, block_size,
num_kv_heads, head_size] with a unit last stride. Everything else (window, ALiBi, softcap, sinks,
fp8 caches, the context contract, decode rows' split-KV) stays on the Triton kernel
(`kernels/unified.py`); `unsupported_reason` says why a call does not qualify.

Work decomposition: as in unified.py. A program owns one query tile of one KV head: BLOCK_Q
consecutive query tokens of one sequence times the QPK query heads of that KV head, packed into
BLOCK_M = 128 rows (row r: token r // QPK, head r % QPK), so each K/V tile is read once for all
the query heads that share it. Grid axis 0 enumerates an upper bound of the query tiles of every
sequence (num_tokens // BLOCK_Q + num_seqs; CUDA-graph safe), in reverse so that the longest
(last) causal tiles start first; axis 1 is the KV head.

Pipeline (8 warps = two warpgroups of 64 rows each):
- K and V tiles of BLOCK_N keys are gathered from the pages with cp.async (one 16-byte copy per
  thread and chunk; a tile spans BLOCK_N / block_size pages, each a contiguous run of rows) into
  two shared-memory rings of RING slots each, in NVMMA (wgmma-swizzled) layout. K of tile j + RING
  - 1 and V of tile j + RING - 2 are issued at the top of iteration j (the slots the previous
  iteration released), and the block ids of the next tile to issue are loaded one iteration ahead,
  so no load latency sits on the critical path.
- FlashAttention-3's intra-warpgroup overlap, written out: iteration j issues the q.k wgmma of tile
  j and the P.V wgmma of tile j - 1 asynchronously, waits for q.k only (wgmma groups retire in
  order), runs the online softmax of tile j while P.V(j - 1) is still on the tensor cores, then
  waits for P.V and rescales the accumulator. P stays in registers (wgmma's A operand).
- Causal masking only on the tiles that straddle the diagonal: the key loop runs as two loops,
  the unmasked tiles then the diagonal ones, each with a branch-free body (a constexpr flag).

Warp-specialized variant (`warp_specialized=True`, experimental: compiled and SASS-checked for
sm_90 here, not yet run on a GPU): 4 producer warps (24 registers each) gather K and V with cp.async
and signal per-slot "ready" mbarriers through cp.async.mbarrier.arrive.noinc; the 8 consumer warps
(240 registers) wait on them, run the same wgmma/softmax schedule and release slots on "empty"
mbarriers; no CTA-wide barrier and no address arithmetic left in the consumers' loop. One kernel
function serves both (`P_WARPS > 0` takes the warp-specialized branch at compile time); the
key-loop steps share their softmax (`_softmax_step`).

Memory safety does not depend on the metadata: every load is bounded (keys by seq_len, block-table
columns by its width, block ids clamped to [0, num_blocks)); a sequence whose metadata cannot be
served (as unified.py defines it) or that uses a block id outside the cache gets NaN in all its
rows. Validation proper is the host's (pagedattn.validate), before any launch.

Gluon kernels do not run in Triton's interpreter: on CPU this module is only compiled (for
sm_90, with Triton's bundled ptxas) and its host-side checks are exercised.
This module imports nothing from pagedattn above `kernels/` (only `errors`).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ..errors import DTypeError, LayoutError, ShapeError, UnsupportedConfigError

LOG2E = 1.4426950408889634
BLOCK_M = 128  # packed query rows per program: two warpgroups of 64
NUM_WARPS = 8
WS_PRODUCER_WARPS = 4
WS_PRODUCER_REGS = 24
WS_MAXNREG = 168
HEAD_SIZES = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _find_sequence(cu_seqlens_q_ptr, num_seqs, tile_idx, BLOCK_Q: gl.constexpr):
    """The sequence whose query tiles contain global tile `tile_idx` (tiles of sequence s start at
    cu_seqlens_q[s] // BLOCK_Q + s, an upper bound on the tiles before it): a binary search."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = gl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if start <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@gluon.jit
def _load_q(
    q_smem,
    q_ptr,
    t0,
    n_valid,
    kv_head,
    stride_qt,
    stride_qh,
    QPK: gl.constexpr,
    BLOCK_M: gl.constexpr,
    HEAD: gl.constexpr,
    LOAD: gl.constexpr,
):
    """The Q tile into shared memory: packed rows, zero past the sequence's tokens."""
    qr = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LOAD))
    qd = gl.arange(0, HEAD, layout=gl.SliceLayout(0, LOAD))
    q_offs = (t0 + qr // QPK).to(gl.int64) * stride_qt + (kv_head * QPK + qr % QPK) * stride_qh
    q = gl.load(q_ptr + q_offs[:, None] + qd[None, :], mask=(qr // QPK < n_valid)[:, None], other=0.0)
    q_smem.store(q)


@gluon.jit
def _store_rows(
    out_ptr,
    val,
    t0,
    n_valid,
    kv_head,
    stride_ot,
    stride_oh,
    QPK: gl.constexpr,
    BLOCK_M: gl.constexpr,
    HEAD: gl.constexpr,
    LAYOUT: gl.constexpr,
):
    """Store a [BLOCK_M, HEAD] tile (in LAYOUT) into the rows of the first n_valid tokens."""
    r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LAYOUT))
    d = gl.arange(0, HEAD, layout=gl.SliceLayout(0, LAYOUT))
    tok = r // QPK
    head = kv_head * QPK + r % QPK
    offs = (t0 + tok).to(gl.int64) * stride_ot + head * stride_oh
    gl.store(out_ptr + offs[:, None] + d[None, :], val.to(out_ptr.dtype.element_ty), mask=(tok < n_valid)[:, None])


@gluon.jit
def _store_out(
    acc,
    l_i,
    bad,
    out_ptr,
    t0,
    n_valid,
    kv_head,
    stride_ot,
    stride_oh,
    QPK: gl.constexpr,
    BLOCK_M: gl.constexpr,
    HEAD: gl.constexpr,
    O_L: gl.constexpr,
):
    """The normalized output rows, or NaN rows where a key had no valid block (`bad`): never
    plausible numbers."""
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, O_L))[:, None]
    if bad:
        out = gl.full([BLOCK_M, HEAD], float("nan"), gl.float32, O_L)
    _store_rows(out_ptr, out, t0, n_valid, kv_head, stride_ot, stride_oh, QPK, BLOCK_M, HEAD, O_L)


# Grouped arguments of the load helpers (flat tuples: Triton 3.6 passes a constexpr inside a
# nested tuple to a jit callee as None):
#   K, V:  (ring of shared-memory slots, cache pointer, the KV head's offset, block stride, slot stride)
#   table: (block-table row pointer, kv_lim (keys at or past it are not read), num_blocks, max_blocks)
@gluon.jit
def _issue_tile(
    cache, slot, blk, start, kv_lim, page_shift, BLOCK_N: gl.constexpr, HEAD: gl.constexpr, LOAD: gl.constexpr
):
    """cp.async of the [BLOCK_N, HEAD] K or V tile at key `start` (block ids `blk`, already
    clamped) into ring slot `slot`; keys at or past kv_lim are zero-filled without a read."""
    ring, cache_ptr, head_off, stride_b, stride_t = cache
    keys = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD))
    dims = gl.arange(0, HEAD, layout=gl.SliceLayout(0, LOAD))
    rows = blk.to(gl.int64) * stride_b + (keys & ((1 << page_shift) - 1)) * stride_t + head_off
    ptrs = cache_ptr + rows[:, None] + dims[None, :]
    async_copy.async_copy_global_to_shared(ring.index(slot), ptrs, mask=(keys < kv_lim)[:, None])


@gluon.jit
def _tile_blocks(table, start, page_shift, BLOCK_N: gl.constexpr, LOAD: gl.constexpr):
    """Block ids of the keys of the tile at `start` (clamped to a valid block) and which in-range
    keys had none (an id outside [0, num_blocks) or a column past the table's width)."""
    bt_row, kv_lim, num_blocks, max_blocks = table
    keys = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD))
    col = keys >> page_shift
    used = keys < kv_lim
    blk = gl.load(bt_row + col, mask=used & (col < max_blocks), other=-1)
    bad = used & ((blk < 0) | (blk >= num_blocks))
    blk = gl.where((blk < 0) | (blk >= num_blocks), 0, blk)
    return blk, bad


@gluon.jit
def _issue_kv(
    t,
    blk_k,
    blk_v,
    bad_acc,
    K,
    V,
    table,
    page_shift,
    BLOCK_N: gl.constexpr,
    HEAD: gl.constexpr,
    RING: gl.constexpr,
    LOAD: gl.constexpr,
    WITH_V: gl.constexpr,
):
    """One commit group of cp.async: K of tile t (block ids blk_k) and, WITH_V, V of tile t - 1
    (blk_v) into their ring slots. Returns the block ids of K(t + 1), looked up one step ahead so
    that no load latency sits on the critical path, those of V(t) (K(t)'s), and bad_acc updated
    with the keys of tile t + 1 that have no valid block."""
    kv_lim = table[1]
    _issue_tile(K, t % RING, blk_k, t * BLOCK_N, kv_lim, page_shift, BLOCK_N, HEAD, LOAD)
    if WITH_V:
        _issue_tile(V, (t - 1) % RING, blk_v, (t - 1) * BLOCK_N, kv_lim, page_shift, BLOCK_N, HEAD, LOAD)
    async_copy.commit_group()
    blk_next, bad = _tile_blocks(table, (t + 1) * BLOCK_N, page_shift, BLOCK_N, LOAD)
    return blk_next, blk_k, gl.maximum(bad_acc, bad.to(gl.int32))


@gluon.jit
def _causal_mask(s, start, row_pos, cols, seq_len):
    """The scores s of the key tile at `start`, -inf where a key lies past the row's position or
    past the sequence."""
    keys = start + cols
    visible = (keys[None, :] <= row_pos[:, None]) & (keys < seq_len)[None, :]
    return gl.where(visible, s, float("-inf"))


@gluon.jit
def _softmax_first(s, mask_from, row_pos, cols, seq_len, qk_scale, dtype: gl.constexpr, P_L: gl.constexpr):
    """The online-softmax state (m_i, l_i, P as wgmma's register A operand) after key tile 0, which
    is masked when the diagonal starts there (mask_from == 0)."""
    if mask_from == 0:
        s = _causal_mask(s, 0, row_pos, cols, seq_len)
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    p_op = gl.convert_layout(p.to(dtype), P_L)
    return m_i, l_i, p_op


@gluon.jit
def _softmax_step(
    s,
    o_tok,
    m_i,
    l_i,
    p_op,
    start,
    row_pos,
    cols,
    seq_len,
    qk_scale,
    MASK: gl.constexpr,
    O_L: gl.constexpr,
    P_L: gl.constexpr,
):
    """Online softmax of the scores s of the key tile at `start` (masked where MASK, a constexpr)
    while the previous tile's P.V (o_tok) is still on the tensor cores, then that P.V's
    accumulator, rescaled: returns (acc, m_i, l_i, P). Shared by _step and _ws_step."""
    if MASK:
        s = _causal_mask(s, start, row_pos, cols, seq_len)
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, 1)
    p_op = gl.convert_layout(p.to(p_op.dtype), P_L)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
    return acc, m_new, l_i, p_op


@gluon.jit
def _step(
    j,
    acc,
    m_i,
    l_i,
    p_op,
    blk_k,
    blk_v,
    bad_acc,
    q_smem,
    K,
    V,
    table,
    row_pos,
    cols,
    seq_len,
    qk_scale,
    s_zero,
    MASK: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD: gl.constexpr,
    page_shift,
    RING: gl.constexpr,
    LOAD: gl.constexpr,
    O_L: gl.constexpr,
    P_L: gl.constexpr,
):
    """Iteration j >= 1 of the key loop: refill the ring slots iteration j-1 released (K of tile
    j + RING - 1, V of tile j + RING - 2), then q.k(j) and P.V(j-1) asynchronously, softmax(j)
    while P.V(j-1) runs, the accumulator rescaled once P.V(j-1) is done. Branch-free (MASK is a
    constexpr): no basic-block boundary between the wgmma issue and its waits."""
    async_copy.wait_group(RING - 2)  # K(j) and V(j-1) have landed (this thread's copies)
    fence_async_shared()  # cp.async writes -> the async proxy wgmma reads through
    gl.thread_barrier()  # every thread's copies, and every warp is past iteration j-1
    blk_k, blk_v, bad_acc = _issue_kv(
        j + RING - 1, blk_k, blk_v, bad_acc, K, V, table, page_shift, BLOCK_N, HEAD, RING, LOAD, True
    )
    s_tok = warpgroup_mma(q_smem, K[0].index(j % RING).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    o_tok = warpgroup_mma(p_op, V[0].index((j - 1) % RING), acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
    acc, m_i, l_i, p_op = _softmax_step(
        s, o_tok, m_i, l_i, p_op, j * BLOCK_N, row_pos, cols, seq_len, qk_scale, MASK, O_L, P_L
    )
    return acc, m_i, l_i, p_op, blk_k, blk_v, bad_acc


# ---------------------------------------------------------------------------------------------
# the warp-specialized variant's partitions (experimental: compiled for sm_90 on CPU, not yet run
# on a GPU)
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _bad_block_scan(bt_row, kv_end, num_blocks, max_blocks, page_shift, LAYOUT: gl.constexpr):
    """Whether any block the keys [0, kv_end) live in is not a valid block (an id outside
    [0, num_blocks) or a column past the table's width): one pass over the block-table row."""
    COLS: gl.constexpr = 128
    bad = gl.zeros([COLS], gl.int32, LAYOUT)
    n_cols = (kv_end + (1 << page_shift) - 1) >> page_shift
    for c0 in range(0, n_cols, COLS):
        cols = c0 + gl.arange(0, COLS, layout=LAYOUT)
        used = cols < n_cols
        ids = gl.load(bt_row + cols, mask=used & (cols < max_blocks), other=-1)
        bad = gl.maximum(bad, (used & ((ids < 0) | (ids >= num_blocks))).to(gl.int32))
    return gl.max(bad, 0) > 0


@gluon.jit
def _ws_fill(
    cache,
    ready,
    empty,
    t,
    table,
    page_shift,
    BLOCK_N: gl.constexpr,
    HEAD: gl.constexpr,
    RING: gl.constexpr,
    CHUNK: gl.constexpr,
    LOAD: gl.constexpr,
):
    """cp.async of tile t of K or V (`cache`, grouped as K and V above) into its ring slot once the
    consumer released it (the slot's empty barrier), each thread's copies arriving on the slot's
    ready barrier when they land (cp.async.mbarrier.arrive.noinc: ready barriers count P_WARPS * 32
    arrivals). In CHUNK-row pieces, each looking up its own block ids, so that few registers stay
    live (producer warps run on a small register budget)."""
    ring, cache_ptr, head_off, stride_b, stride_t = cache
    bt_row, kv_lim, num_blocks, max_blocks = table
    slot = t % RING
    mbarrier.wait(empty.index(slot), ((t // RING) & 1) ^ 1)
    start = t * BLOCK_N
    for c in gl.static_range(BLOCK_N // CHUNK):
        keys = start + c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, LOAD))
        col = keys >> page_shift
        used = keys < kv_lim
        blk = gl.load(bt_row + col, mask=used & (col < max_blocks), other=0)
        blk = gl.where((blk < 0) | (blk >= num_blocks), 0, blk)  # the consumer NaNs such rows
        dims = gl.arange(0, HEAD, layout=gl.SliceLayout(0, LOAD))
        rows = blk.to(gl.int64) * stride_b + (keys & ((1 << page_shift) - 1)) * stride_t + head_off
        async_copy.async_copy_global_to_shared(
            ring.index(slot).slice(c * CHUNK, CHUNK), cache_ptr + rows[:, None] + dims[None, :], mask=used[:, None]
        )
    async_copy.mbarrier_arrive(ready.index(slot), increment_count=False)


@gluon.jit
def _ws_producer(
    k_ring,
    v_ring,
    kready,
    vready,
    kempty,
    vempty,
    k_cache_ptr,
    v_cache_ptr,
    bt_row,
    n_tiles,
    kv_lim,
    num_blocks,
    max_blocks,
    k_head,
    v_head,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    page_shift,
    BLOCK_N: gl.constexpr,
    HEAD: gl.constexpr,
    RING: gl.constexpr,
    P_WARPS: gl.constexpr,
):
    """Producer warps: gather K(0), then per step t K(t) and V(t-1) (the order the consumer
    needs them). Flat arguments, grouped here: a worker partition's arguments are the
    warp_specialize op's operands in this order, and grouping them at the call reorders those
    (which changes the SASS)."""
    TPD: gl.constexpr = HEAD // 8
    LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPD, TPD], [P_WARPS, 1], [1, 0])
    CHUNK: gl.constexpr = (32 // TPD) * P_WARPS * 2  # two 16-byte copies per thread per chunk
    table = (bt_row, kv_lim, num_blocks, max_blocks)
    K = (k_ring, k_cache_ptr, k_head, stride_kb, stride_kt)
    V = (v_ring, v_cache_ptr, v_head, stride_vb, stride_vt)
    for t in range(0, n_tiles + 1):
        if t < n_tiles:
            _ws_fill(K, kready, kempty, t, table, page_shift, BLOCK_N, HEAD, RING, CHUNK, LOAD)
        if t > 0:
            _ws_fill(V, vready, vempty, t - 1, table, page_shift, BLOCK_N, HEAD, RING, CHUNK, LOAD)


@gluon.jit
def _ws_step(
    j,
    acc,
    m_i,
    l_i,
    p_op,
    q_smem,
    k_ring,
    v_ring,
    kready,
    vready,
    kempty,
    vempty,
    row_pos,
    cols,
    seq_len,
    qk_scale,
    s_zero,
    MASK: gl.constexpr,
    BLOCK_N: gl.constexpr,
    RING: gl.constexpr,
    O_L: gl.constexpr,
    P_L: gl.constexpr,
):
    """Consumer iteration j >= 1 (as _step, the loads replaced by barrier waits): q.k(j) and
    P.V(j-1) in flight; once q.k(j) is done K(j) and V(j-2) are released (a V slot is freed one
    iteration after its P.V); softmax(j) under P.V(j-1)."""
    mbarrier.wait(kready.index(j % RING), (j // RING) & 1)
    mbarrier.wait(vready.index((j - 1) % RING), ((j - 1) // RING) & 1)
    fence_async_shared()  # the producer's cp.async writes (generic proxy) -> wgmma (async proxy)
    s_tok = warpgroup_mma(q_smem, k_ring.index(j % RING).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    o_tok = warpgroup_mma(p_op, v_ring.index((j - 1) % RING), acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
    # both warpgroups are done with K(j) and (iteration j-1's wait) with V(j-2): release them
    gl.thread_barrier()
    mbarrier.arrive(kempty.index(j % RING))
    mbarrier.arrive(vempty.index((j - 2 + RING) % RING), pred=j >= 2)
    return _softmax_step(s, o_tok, m_i, l_i, p_op, j * BLOCK_N, row_pos, cols, seq_len, qk_scale, MASK, O_L, P_L)


@gluon.jit
def _ws_consumer(
    q_smem,
    k_ring,
    v_ring,
    kready,
    vready,
    kempty,
    vempty,
    out_ptr,
    t0,
    n_valid,
    kv_head,
    stride_ot,
    stride_oh,
    ctx,
    t_lo,
    seq_len,
    n_tiles,
    mask_from,
    qk_scale,
    bad,
    QPK: gl.constexpr,
    HEAD: gl.constexpr,
    BLOCK_N: gl.constexpr,
    RING: gl.constexpr,
    S_L: gl.constexpr,
    O_L: gl.constexpr,
    P_L: gl.constexpr,
):
    """Consumer warpgroups (the default partition): the schedule of _gluon_prefill_kernel's own
    path, the loads replaced by barrier waits."""
    BLOCK_M: gl.constexpr = 128
    dtype: gl.constexpr = q_smem.dtype
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, S_L))
    row_pos = ctx + t_lo + rows // QPK
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_L)

    mbarrier.wait(kready.index(0), 0)
    fence_async_shared()
    s_tok = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
    gl.thread_barrier()
    mbarrier.arrive(kempty.index(0))
    m_i, l_i, p_op = _softmax_first(s, mask_from, row_pos, cols, seq_len, qk_scale, dtype, P_L)
    acc = gl.zeros([BLOCK_M, HEAD], gl.float32, O_L)

    mask_start = gl.maximum(gl.minimum(mask_from, n_tiles), 1)
    for masked in gl.static_range(2):  # the tiles below the diagonal, then the diagonal ones
        for j in range(mask_start if masked else 1, n_tiles if masked else mask_start):
            acc, m_i, l_i, p_op = _ws_step(
                j,
                acc,
                m_i,
                l_i,
                p_op,
                q_smem,
                k_ring,
                v_ring,
                kready,
                vready,
                kempty,
                vempty,
                row_pos,
                cols,
                seq_len,
                qk_scale,
                s_zero,
                masked,
                BLOCK_N,
                RING,
                O_L,
                P_L,
            )
    last = n_tiles - 1
    mbarrier.wait(vready.index(last % RING), (last // RING) & 1)
    fence_async_shared()
    o_tok = warpgroup_mma(p_op, v_ring.index(last % RING), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
    _store_out(acc, l_i, bad, out_ptr, t0, n_valid, kv_head, stride_ot, stride_oh, QPK, BLOCK_M, HEAD, O_L)


# ---------------------------------------------------------------------------------------------
# the kernels
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _gluon_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_table_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    num_seqs,
    num_tokens,
    num_blocks,
    max_blocks,
    qk_scale,  # softmax scale * log2(e)
    min_query_len,  # sequences with fewer query tokens are another launch's (a mixed batch's decodes)
    QPK: gl.constexpr,
    HEAD: gl.constexpr,
    page_shift,
    BLOCK_N: gl.constexpr,
    RING: gl.constexpr,
    num_warps: gl.constexpr,
    P_WARPS: gl.constexpr = 0,
    P_REGS: gl.constexpr = 0,
):
    """One query tile of one KV head (see the module docstring). P_WARPS > 0 (a compile-time
    branch): the warp-specialized variant."""
    BLOCK_M: gl.constexpr = 128
    BLOCK_Q: gl.constexpr = BLOCK_M // QPK
    dtype: gl.constexpr = q_ptr.dtype.element_ty

    # layouts: wgmma accumulators (8 warps along M), P as wgmma's register A operand, 16-byte
    # vectors for global <-> shared copies, wgmma-swizzled shared memory
    S_L: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    O_L: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD, 16]
    )
    P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
    TPD: gl.constexpr = HEAD // 8  # threads per row: 8 elements (16 bytes) each
    LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPD, TPD], [num_warps, 1], [1, 0])
    Q_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD], dtype)
    KV_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD], dtype)

    pid = gl.num_programs(0) - 1 - gl.program_id(0)  # last (longest causal) tiles first
    kv_head = gl.program_id(1)

    seq = _find_sequence(cu_seqlens_q_ptr, num_seqs, pid, BLOCK_Q)
    if seq < 0:
        return
    q_start = gl.load(cu_seqlens_q_ptr + seq)
    q_end = gl.load(cu_seqlens_q_ptr + seq + 1)
    seq_len = gl.load(seq_lens_ptr + seq)
    query_len = q_end - q_start
    tile = pid - (q_start // BLOCK_Q + seq)
    t_lo = tile * BLOCK_Q  # first token of the tile within the sequence
    if (t_lo >= query_len) | (query_len < min_query_len):
        return
    n_valid = gl.minimum(query_len - t_lo, BLOCK_Q)
    t0 = q_start + t_lo  # its row in q / out

    # metadata that cannot be served: NaN in every row of this tile (as unified.py)
    prev_end = gl.load(cu_seqlens_q_ptr + seq - 1, mask=seq > 0, other=0)
    next_end = gl.load(cu_seqlens_q_ptr + seq + 2, mask=seq + 1 < num_seqs, other=num_tokens)
    bad_seq = (q_start < 0) | (q_end > num_tokens) | (seq_len < query_len)
    bad_seq = bad_seq | (prev_end > q_start) | (next_end < q_end)
    if bad_seq:
        _store_rows(
            out_ptr,
            gl.full([BLOCK_M, HEAD], float("nan"), gl.float32, LOAD),
            t0,
            gl.maximum(gl.minimum(n_valid, num_tokens - t0), 0),
            kv_head,
            stride_ot,
            stride_oh,
            QPK,
            BLOCK_M,
            HEAD,
            LOAD,
        )
        return

    ctx = seq_len - query_len  # keys before the first query token
    kv_end = ctx + t_lo + n_valid  # keys any valid row of this tile sees
    n_tiles = gl.cdiv(kv_end, BLOCK_N)
    mask_from = (ctx + t_lo + 1) // BLOCK_N  # first tile with a key some valid row must not see
    kv_lim = gl.minimum(n_tiles * BLOCK_N, seq_len)
    bt_row = block_table_ptr + seq.to(gl.int64) * stride_bt

    if P_WARPS == 0:
        k_head = kv_head * stride_kh
        v_head = kv_head * stride_vh
        # shared memory: Q once, K and V rings
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD], Q_SL)
        k_ring = gl.allocate_shared_memory(dtype, [RING, BLOCK_N, HEAD], KV_SL)
        v_ring = gl.allocate_shared_memory(dtype, [RING, BLOCK_N, HEAD], KV_SL)

        table = (bt_row, kv_lim, num_blocks, max_blocks)
        K = (k_ring, k_cache_ptr, k_head, stride_kb, stride_kt)
        V = (v_ring, v_cache_ptr, v_head, stride_vb, stride_vt)

        # prologue: K of tiles 0 .. RING-2, V of tiles 0 .. RING-3, one commit group per step, so that
        # "wait until RING-2 groups are pending" at the top of iteration j means K(j) and V(j-1) landed
        bad_acc = gl.zeros([BLOCK_N], gl.int32, gl.SliceLayout(1, LOAD))
        blk_v = gl.zeros([BLOCK_N], gl.int32, gl.SliceLayout(1, LOAD))
        blk_k, bad = _tile_blocks(table, 0, page_shift, BLOCK_N, LOAD)
        bad_acc = gl.maximum(bad_acc, bad.to(gl.int32))
        for i in gl.static_range(RING - 1):
            blk_k, blk_v, bad_acc = _issue_kv(
                i, blk_k, blk_v, bad_acc, K, V, table, page_shift, BLOCK_N, HEAD, RING, LOAD, i >= 1
            )

        _load_q(q_smem, q_ptr, t0, n_valid, kv_head, stride_qt, stride_qh, QPK, BLOCK_M, HEAD, LOAD)

        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, S_L))
        row_pos = ctx + t_lo + rows // QPK
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_L)

        # ---- iteration 0 (peeled: no P.V to overlap yet)
        async_copy.wait_group(RING - 2)
        fence_async_shared()
        gl.thread_barrier()
        blk_k, blk_v, bad_acc = _issue_kv(
            RING - 1, blk_k, blk_v, bad_acc, K, V, table, page_shift, BLOCK_N, HEAD, RING, LOAD, True
        )

        s_tok = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
        m_i, l_i, p_op = _softmax_first(s, mask_from, row_pos, cols, seq_len, qk_scale, dtype, P_L)
        acc = gl.zeros([BLOCK_M, HEAD], gl.float32, O_L)

        # ---- steady state: q.k(j) and P.V(j-1) in flight together, softmax(j) under P.V(j-1). Two
        # loops, the unmasked tiles then the diagonal ones (`masked` is a compile-time constant:
        # static_range emits each loop with its own branch-free body), so that no branch sits between
        # the wgmma issue and its wait: ptxas retires every in-flight wgmma at a basic-block boundary,
        # which would serialize the softmax behind P.V again.
        mask_start = gl.maximum(gl.minimum(mask_from, n_tiles), 1)
        for masked in gl.static_range(2):  # the tiles below the diagonal, then the diagonal ones
            for j in range(mask_start if masked else 1, n_tiles if masked else mask_start):
                acc, m_i, l_i, p_op, blk_k, blk_v, bad_acc = _step(
                    j,
                    acc,
                    m_i,
                    l_i,
                    p_op,
                    blk_k,
                    blk_v,
                    bad_acc,
                    q_smem,
                    K,
                    V,
                    table,
                    row_pos,
                    cols,
                    seq_len,
                    qk_scale,
                    s_zero,
                    masked,
                    BLOCK_N,
                    HEAD,
                    page_shift,
                    RING,
                    LOAD,
                    O_L,
                    P_L,
                )

        # ---- the last tile's P.V
        async_copy.wait_group(0)
        fence_async_shared()
        gl.thread_barrier()
        o_tok = warpgroup_mma(p_op, v_ring.index((n_tiles - 1) % RING), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))

        bad = gl.max(bad_acc, 0) > 0
        _store_out(acc, l_i, bad, out_ptr, t0, n_valid, kv_head, stride_ot, stride_oh, QPK, BLOCK_M, HEAD, O_L)
    else:
        # warp-specialized: the K/V gathers in P_WARPS producer warps (P_REGS registers each, a
        # worker partition) that talk to the consumer warpgroups through ready/empty mbarriers per
        # ring slot, so the consumers neither compute addresses nor meet at CTA barriers for loads
        SCAN: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        bad = _bad_block_scan(bt_row, kv_end, num_blocks, max_blocks, page_shift, SCAN)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD], Q_SL)
        k_ring = gl.allocate_shared_memory(dtype, [RING, BLOCK_N, HEAD], KV_SL)
        v_ring = gl.allocate_shared_memory(dtype, [RING, BLOCK_N, HEAD], KV_SL)
        kready = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
        vready = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
        kempty = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
        vempty = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(RING):
            mbarrier.init(kready.index(i), count=P_WARPS * 32)
            mbarrier.init(vready.index(i), count=P_WARPS * 32)
            mbarrier.init(kempty.index(i), count=1)
            mbarrier.init(vempty.index(i), count=1)

        _load_q(q_smem, q_ptr, t0, n_valid, kv_head, stride_qt, stride_qh, QPK, BLOCK_M, HEAD, LOAD)
        fence_async_shared()
        gl.thread_barrier()

        gl.warp_specialize(
            [
                (
                    _ws_consumer,
                    (
                        q_smem,
                        k_ring,
                        v_ring,
                        kready,
                        vready,
                        kempty,
                        vempty,
                        out_ptr,
                        t0,
                        n_valid,
                        kv_head,
                        stride_ot,
                        stride_oh,
                        ctx,
                        t_lo,
                        seq_len,
                        n_tiles,
                        mask_from,
                        qk_scale,
                        bad,
                        QPK,
                        HEAD,
                        BLOCK_N,
                        RING,
                        S_L,
                        O_L,
                        P_L,
                    ),
                ),
                (
                    _ws_producer,
                    (
                        k_ring,
                        v_ring,
                        kready,
                        vready,
                        kempty,
                        vempty,
                        k_cache_ptr,
                        v_cache_ptr,
                        bt_row,
                        n_tiles,
                        kv_lim,
                        num_blocks,
                        max_blocks,
                        kv_head * stride_kh,
                        kv_head * stride_vh,
                        stride_kb,
                        stride_kt,
                        stride_vb,
                        stride_vt,
                        page_shift,
                        BLOCK_N,
                        HEAD,
                        RING,
                        P_WARPS,
                    ),
                ),
            ],
            [P_WARPS],
            [P_REGS],
        )


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
def tiles_for(head_size: int) -> tuple[int, int]:
    """(BLOCK_N, RING) for a head size: 128-key tiles, K and V rings of 2 slots each at head 128
    (Q 32 KB + 4 x 32 KB = 160 KB of shared memory), 3 at head 64."""
    return (128, 2) if head_size == 128 else (128, 3)


def unsupported_reason(
    *,
    head_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    block_size: int,
    dtype: torch.dtype,
    kv_cache_dtype: torch.dtype,
    causal: bool = True,
    contract: str = "full",
    sliding_window: int | None = None,
    alibi: bool = False,
    softcap: float | None = None,
    sinks: bool = False,
    device: torch.device | str | None = None,
) -> str | None:
    """Why the Gluon prefill path cannot serve this configuration (None when it can). Dispatch
    sends every other case to the Triton kernel and `explain` prints this reason."""
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda":
            return f"Gluon prefill needs a CUDA device, not {device.type}"
        if torch.cuda.get_device_capability(device)[0] != 9:
            return "Gluon prefill is written for Hopper (sm_90) only"
    if dtype not in DTYPES:
        return f"Gluon prefill takes fp16/bf16 queries, not {dtype}"
    if kv_cache_dtype != dtype:
        return f"Gluon prefill needs the cache in the query dtype ({dtype}), not {kv_cache_dtype}"
    if head_size not in HEAD_SIZES:
        return f"Gluon prefill supports head sizes {HEAD_SIZES}, not {head_size}"
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        return f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}"
    qpk = num_q_heads // num_kv_heads
    if qpk & (qpk - 1) or qpk > BLOCK_M:
        return f"Gluon prefill packs a power-of-two number of query heads per KV head (<= {BLOCK_M}), not {qpk}"
    block_n = tiles_for(head_size)[0]
    if block_size <= 0 or block_size & (block_size - 1) or block_size > block_n:
        return f"Gluon prefill needs a power-of-two block_size <= {block_n}, not {block_size}"
    if not causal:
        return "Gluon prefill is causal only"
    if contract != "full":
        return f"Gluon prefill serves the full-cache contract only, not {contract!r}"
    for name, on in (("sliding_window", sliding_window), ("alibi", alibi), ("softcap", softcap), ("sinks", sinks)):
        if on:
            return f"Gluon prefill does not implement {name}"
    return None


def _check(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, out) -> None:
    """Shapes, dtypes and strides this kernel relies on (values are validate's job)."""
    if q.dim() != 3:
        raise ShapeError(f"q must be [num_tokens, num_q_heads, head_size], got shape {tuple(q.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[3] != q.shape[2]:
            raise ShapeError(
                f"{name} must be [num_blocks, block_size, num_kv_heads, {q.shape[2]}] (NHD), got shape {tuple(c.shape)}"
            )
        if c.dtype != q.dtype:
            raise DTypeError(f"{name} must have the query dtype {q.dtype} on the Gluon path, got {c.dtype}")
        if c.stride(3) != 1:
            raise LayoutError(f"{name} must have a unit stride along head_size, got strides {c.stride()}")
    if k_cache.shape != v_cache.shape:
        raise ShapeError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if q.stride(2) != 1 or out.stride(2) != 1:
        raise LayoutError(f"q and out need a unit stride along head_size, got {q.stride()} and {out.stride()}")
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ShapeError(f"out must match q ({tuple(q.shape)}, {q.dtype}), got {tuple(out.shape)}, {out.dtype}")
    for name, t, dim in (("cu_seqlens_q", cu_seqlens_q, 1), ("seq_lens", seq_lens, 1), ("block_table", block_table, 2)):
        if t.dtype != torch.int32:
            raise DTypeError(f"{name} must be int32, got {t.dtype}")
        if t.dim() != dim:
            raise ShapeError(f"{name} must have {dim} dimension(s), got shape {tuple(t.shape)}")
    if cu_seqlens_q.shape[0] != seq_lens.shape[0] + 1 or block_table.shape[0] != seq_lens.shape[0]:
        raise ShapeError(
            f"cu_seqlens_q ({cu_seqlens_q.shape[0]}) must have one entry more than seq_lens "
            f"({seq_lens.shape[0]}) and block_table one row per sequence ({block_table.shape[0]})"
        )
    if block_table.stride(1) != 1:
        raise LayoutError(f"block_table must have a unit column stride, got strides {block_table.stride()}")


def launch_args(
    q,
    k_cache,
    v_cache,
    cu_seqlens_q,
    seq_lens,
    block_table,
    out,
    scale: float,
    tiles=None,
    warp_specialized=False,
    min_query_len: int = 0,
):
    """(kernel, grid, positional args, constexpr kwargs) of one launch; shared by gluon_prefill and
    the offline sm_90 compile in the tests."""
    num_tokens, num_q_heads, head_size = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    reason = unsupported_reason(
        head_size=head_size,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        block_size=block_size,
        dtype=q.dtype,
        kv_cache_dtype=k_cache.dtype,
    )
    if reason is not None:
        raise UnsupportedConfigError(reason)
    _check(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, out)
    if not float(scale) > 0:  # the kernel scales each row's max by it: a positive scale keeps the max
        raise UnsupportedConfigError(f"scale must be > 0 on the Gluon path, got {scale}")
    qpk = num_q_heads // num_kv_heads
    block_n, ring = tiles or tiles_for(head_size)
    if block_size > block_n or ring < 2:
        raise UnsupportedConfigError(f"tiles (BLOCK_N, RING) = {tiles} need BLOCK_N >= block_size and RING >= 2")
    num_seqs = seq_lens.shape[0]
    grid = (num_tokens // (BLOCK_M // qpk) + num_seqs, num_kv_heads)
    args = (
        q,
        k_cache,
        v_cache,
        out,
        block_table,
        cu_seqlens_q,
        seq_lens,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_table.stride(0),
        num_seqs,
        num_tokens,
        num_blocks,
        block_table.shape[1],
        float(scale) * LOG2E,
        min_query_len,
    )
    meta = dict(
        QPK=qpk, HEAD=head_size, page_shift=block_size.bit_length() - 1, BLOCK_N=block_n, RING=ring, num_warps=NUM_WARPS
    )
    if not warp_specialized:
        return _gluon_prefill_kernel, grid, args, meta
    # 8 consumer + P_WARPS producer warps share the register file: 168 per thread at launch, then
    # setmaxnreg gives the producers P_REGS and the consumers the rest ((168 * 384 - 24 * 128) / 256
    # = 240 with 4 producer warps)
    meta.update(P_WARPS=WS_PRODUCER_WARPS, P_REGS=WS_PRODUCER_REGS, maxnreg=WS_MAXNREG)
    return _gluon_prefill_kernel, grid, args, meta


def gluon_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    scale: float,
    out: torch.Tensor | None = None,
    tiles: tuple[int, int] | None = None,
    warp_specialized: bool = False,
    min_query_len: int = 0,
) -> torch.Tensor:
    """Causal paged attention of every query token over the full cache (the query tokens' own keys
    included), on Hopper. Raises UnsupportedConfigError for what `unsupported_reason` rejects.
    Sequences with fewer than `min_query_len` query tokens are left alone (untouched `out` rows):
    the prefill launch of a mixed batch, whose decodes another kernel serves.
    `tiles` = (BLOCK_N, RING) overrides `tiles_for`; `warp_specialized` picks the producer/consumer
    variant (experimental: not yet run on a GPU)."""
    if out is None:
        out = torch.empty_like(q)
    kernel, grid, args, meta = launch_args(
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, out, scale, tiles, warp_specialized, min_query_len
    )
    if q.shape[0] and seq_lens.shape[0]:
        kernel[grid](*args, **meta)
    return out
