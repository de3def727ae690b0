"""Shared-prefix (cascade) attention: keys that several sequences share are read once for all of
their queries, then merged with each sequence's own keys through the log-sum-exp.

A *group* is a set of sequences whose first `prefix_len` keys are the same cache blocks (a system
prompt, the prompt of parallel samples), with prefix_len a multiple of the block size and below
every member's first query position: every query of the group sees every prefix key, so the
prefix part is non-causal. Two kernels:

- `_prefix_kernel`: one program per (query tile of a group, KV head, split of the prefix keys).
  A tile packs BLOCK_Q query tokens of the group (any tokens of the batch, listed by the plan) x
  the QPK query heads of the KV head into BLOCK_M rows, as the unified kernel does, so a K/V tile
  is loaded once for up to BLOCK_Q sequences' queries. The prefix keys are split NUM_SPLITS ways
  (256 decode queries alone give only a few dozen tiles). It writes split-KV partials: the raw
  accumulator, the running max (log2 units) and the sum of exp2, per token, query head and split.
- the suffix: the unified kernel (`unified.bind_attention(..., partials=...)`) over each
  sequence's remaining keys, through a block table shifted past the shared blocks and seq_lens
  minus the shared tokens. Positions there are relative, which changes nothing: causality and
  ALiBi depend on key - query differences only. Sinks join its first split (once).
- `_cascade_merge_kernel`: per query token (and group of query heads), the prefix's and the suffix's
  partials merged:
  out = sum_i acc_i 2^(m_i - M) / sum_i l_i 2^(m_i - M), M = max_i m_i. A sequence in no group
  has no prefix partials (its shared length is 0).

The group metadata is one int32 tensor the plan fills (`pack_size` gives its layout), so
re-planning into the same buffers keeps CUDA-graph launches valid: the grid depends on the
number of tokens and the group capacity only.

Memory safety does not depend on the metadata: token ids are bounded by num_tokens and block
ids by num_blocks (a key in no valid block makes its rows NaN, as in the unified kernel).
This module imports nothing from pagedattn above `kernels/`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import BoundLaunch, FastKernel, interpreter_enabled
from .unified import (
    _TL_DTYPES,
    FP8_CODES,
    LOG2E_FLOAT,
    _bad_blocks,
    _cache_tiles,
    _find_sequence,
    _kv_scales,
    _normalized,
    _sequence,
    _store_partials,
    head_pad_for,
)


# ---------------------------------------------------------------------------------------------
# the prefix kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _prefix_kernel(
    q_ptr,
    q_strides,  # q: [num_tokens, num_q_heads, head_size], strides (t, h, d)
    k_cache_ptr,
    k_strides,  # K cache strides (block, slot, head, dim-chunk, dim): as in the unified kernel
    v_cache_ptr,
    v_strides,  # (block, slot, head, dim)
    groups_ptr,  # int32: starts [G + 1], rows [G], prefix lens [G], tokens [T], positions [T]
    block_table_ptr,
    bt_strides,  # [num_seqs, max_blocks], strides (row, column)
    k_scale_ptr,
    v_scale_ptr,
    alibi_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS, (HEAD_PAD|1)]
    num_groups,
    num_tokens,
    num_seqs,
    num_blocks,
    max_blocks,
    qk_scale,
    softcap,
    scale_strides,  # fp8 caches: (k, v), each 0 (one scale) or 1 (one per KV head)
    QPK: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    K_X: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PV_DTYPE: tl.constexpr,
    IEEE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IDX64: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # tiles of group g start at starts[g] // BLOCK_Q + g (as sequences' do in the unified kernel)
    g = _find_sequence(groups_ptr, num_groups, tile_idx, BLOCK_Q)
    if g < 0:
        return
    g_start = tl.load(groups_ptr + g)
    g_end = tl.load(groups_ptr + g + 1)
    tile_in_group = tile_idx - (g_start // BLOCK_Q + g)
    if tile_in_group * BLOCK_Q >= g_end - g_start:
        return
    src = tl.load(groups_ptr + num_groups + 1 + g)  # the block-table row the prefix is read from
    prefix_len = tl.load(groups_ptr + 2 * num_groups + 1 + g)
    src = tl.minimum(tl.maximum(src, 0), num_seqs - 1)
    tokens_ptr = groups_ptr + 3 * num_groups + 1
    positions_ptr = tokens_ptr + num_tokens

    rows = tl.arange(0, BLOCK_M)
    idx = g_start + tile_in_group * BLOCK_Q + rows // QPK
    row_valid = (rows < BLOCK_Q * QPK) & (idx < g_end) & (idx >= 0) & (idx < num_tokens)
    tok = tl.load(tokens_ptr + idx, mask=row_valid, other=0)
    row_valid = row_valid & (tok >= 0) & (tok < num_tokens)
    row_pos = tl.load(positions_ptr + idx, mask=row_valid, other=0)
    row_head = kv_head * QPK + rows % QPK
    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_SIZE
    io_mask = row_valid[:, None] & dim_valid[None, :]
    tok64 = tok.to(tl.int64)
    q_offs = tok64[:, None] * q_strides[0] + row_head[:, None] * q_strides[1] + dims[None, :] * q_strides[2]
    q = tl.load(q_ptr + q_offs, mask=io_mask, other=0.0).to(DOT_DTYPE)

    # this split's keys: whole key tiles, the last split may end inside one
    partition = tl.cdiv(tl.cdiv(prefix_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    key_start = split * partition
    key_end = tl.minimum(prefix_len, key_start + partition)
    full_hi = key_start + tl.maximum(key_end - key_start, 0) // BLOCK_N * BLOCK_N

    head_alibi = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        head_alibi = tl.load(alibi_ptr + row_head, mask=row_valid, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    k_scale, v_scale = _kv_scales(k_scale_ptr, v_scale_ptr, kv_head, scale_strides, KV_FP8)
    bt_row = block_table_ptr + src.to(tl.int64) * bt_strides[0]
    k_dim_off = (dims // K_X) * k_strides[3] + (dims % K_X) * k_strides[4]
    v_dim_off = dims * v_strides[3]
    for r in tl.static_range(2):
        # r = 0: whole tiles, no mask (every query sits after every prefix key); r = 1: the tail
        lo = key_start if r == 0 else full_hi
        hi = full_hi if r == 0 else key_end
        acc, m_i, l_i = _cache_tiles(
            (acc, m_i, l_i),
            q,
            lo,
            hi,
            (k_cache_ptr, k_strides[0], k_strides[1], kv_head * k_strides[2], k_dim_off),
            (v_cache_ptr, v_strides[0], v_strides[1], kv_head * v_strides[2], v_dim_off),
            (bt_row, num_blocks, max_blocks),
            dim_valid,
            (row_pos, row_valid, head_alibi),
            (key_start, key_end),
            (qk_scale * k_scale, softcap, 0),
            (IEEE, USE_SOFTCAP, USE_ALIBI, False),
            (BLOCK_N, PAGE, IDX64),
            (KV_FP8, DOT_DTYPE, PV_DTYPE, HEAD_PAD == HEAD_SIZE, INTERPRET, False),
            r == 1,
        )
    if _bad_blocks((bt_row, num_blocks, max_blocks), key_start, key_end, PAGE):
        l_i = tl.full([BLOCK_M], float("nan"), dtype=tl.float32)
    if KV_FP8 != 0:
        acc = acc * v_scale
    parts = (part_acc_ptr, part_m_ptr, part_l_ptr)
    _store_partials(parts, tok64, row_head, split, acc, m_i, l_i, row_valid, io_mask, QPK, NUM_SPLITS, HEAD_PAD)


# ---------------------------------------------------------------------------------------------
# the merge
# ---------------------------------------------------------------------------------------------
@triton.jit
def _load_partial(acc_ptr, m_ptr, l_ptr, slot, head_ok, mask, HEAD_PAD: tl.constexpr):
    """(acc, m, l) of one split's partials at `slot` ([HEADS] rows), as _store_partials wrote them."""
    dims = tl.arange(0, HEAD_PAD)
    m = tl.load(m_ptr + slot, mask=head_ok, other=float("-inf"))
    l = tl.load(l_ptr + slot, mask=head_ok, other=0.0)
    acc = tl.load(acc_ptr + slot[:, None] * HEAD_PAD + dims[None, :], mask=mask, other=0.0)
    return acc, m, l


@triton.jit
def _cascade_merge_kernel(
    out_ptr,
    out_strides,  # (t, h, d)
    pre_acc_ptr,
    pre_m_ptr,
    pre_l_ptr,  # the prefix kernel's partials
    suf_acc_ptr,
    suf_m_ptr,
    suf_l_ptr,  # the suffix launch's partials
    cu_seqlens_q_ptr,
    seq_lens_ptr,  # the suffix's seq_lens (seq_len - shared)
    shared_ptr,  # [num_seqs] shared tokens of each sequence (0: in no group)
    num_seqs,
    num_tokens,
    num_q_heads,
    min_query_len,
    max_query_len,
    max_keys,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    HEADS: tl.constexpr,
    PRE_SPLITS: tl.constexpr,
    SUF_SPLITS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    SEQ_GRID: tl.constexpr,
):
    """One program per (query token, HEADS query heads), for the sequences of one suffix launch:
    the splits folded in one at a time (online log-sum-exp). The sequences the suffix launch gave
    NaN rows (invalid metadata) or left to another launch are skipped, with the unified kernel's
    own conditions."""
    token = tl.program_id(0)
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    lo = 0
    hi = num_seqs
    while lo < hi:  # the last sequence starting at or before `token`
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_q_ptr + mid) <= token:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    if seq < 0:
        return
    q_start, query_len, seq_len, bad = _sequence(cu_seqlens_q_ptr, seq_lens_ptr, seq, num_seqs, num_tokens)
    in_launch = (query_len >= min_query_len) & (query_len <= max_query_len)
    bad = bad | (seq_len > max_keys)
    if SEQ_GRID:
        bad = bad | (query_len > BLOCK_Q)
    if bad | (not in_launch) | (token >= q_start + query_len):
        return
    shared = tl.load(shared_ptr + seq)
    dims = tl.arange(0, HEAD_PAD)
    head_ok = heads < num_q_heads
    mask = head_ok[:, None] & (dims < HEAD_SIZE)[None, :]
    row = token.to(tl.int64) * num_q_heads + heads  # [HEADS]
    m_i = tl.full([HEADS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([HEADS], dtype=tl.float32)
    acc = tl.zeros([HEADS, HEAD_PAD], dtype=tl.float32)
    num_pre = tl.where(shared > 0, PRE_SPLITS, 0)
    for i in range(0, num_pre + SUF_SPLITS):
        if i < num_pre:
            acc_s, m_s, l_s = _load_partial(
                pre_acc_ptr, pre_m_ptr, pre_l_ptr, row * PRE_SPLITS + i, head_ok, mask, HEAD_PAD
            )
        else:
            slot = row * SUF_SPLITS + (i - num_pre)
            acc_s, m_s, l_s = _load_partial(suf_acc_ptr, suf_m_ptr, suf_l_ptr, slot, head_ok, mask, HEAD_PAD)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.math.exp2(m_i - m_safe)
        b = tl.math.exp2(m_s - m_safe)
        l_i = l_i * a + l_s * b
        acc = acc * a[:, None] + acc_s * b[:, None]
        m_i = m_new
    out = _normalized(acc, l_i)
    offs = token.to(tl.int64) * out_strides[0] + heads[:, None] * out_strides[1] + dims[None, :] * out_strides[2]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
_PREFIX = FastKernel(_prefix_kernel)
MERGE = FastKernel(_cascade_merge_kernel)  # the planner joins its streams before it
# the per-call tensors of the prefix launch: q, k_cache, v_cache (and k_scale, v_scale over fp8 caches)
_PER_CALL = ("q_ptr", "k_cache_ptr", "v_cache_ptr", "k_scale_ptr", "v_scale_ptr")
PREFIX_SLOTS = tuple(_prefix_kernel.arg_names.index(name) for name in _PER_CALL)
_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_retired_workspaces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # never freed


def prefix_workspace(num_tokens: int, num_q_heads: int, num_splits: int, head_pad: int, device: torch.device):
    """The prefix kernel's partials (outputs, max, sum-exp), beside the unified kernel's split-KV
    workspace (the suffix's, alive at the same time); grown and kept as `unified.workspace` is."""
    key = (str(device), head_pad)
    need = num_tokens * num_q_heads * num_splits
    ws = _workspaces.get(key)
    if ws is None or ws[1].numel() < need:
        if ws is not None:
            _retired_workspaces.append(ws)
        rows = triton.next_power_of_2(max(need, 1))
        ws = (
            torch.empty(rows * head_pad, dtype=torch.float32, device=device),
            torch.empty(rows, dtype=torch.float32, device=device),
            torch.empty(rows, dtype=torch.float32, device=device),
        )
        _workspaces[key] = ws
    return ws


def pack_size(num_groups: int, num_tokens: int) -> int:
    """Length of the int32 group tensor: starts [G + 1], rows [G], lens [G], tokens [T], positions [T]."""
    return 3 * num_groups + 1 + 2 * num_tokens


def bind_cascade(
    launch,
    *,
    strides,
    shapes,
    groups: torch.Tensor,
    num_groups: int,
    block_table: torch.Tensor,
    options,
    idx64: bool,
    device: torch.device,
    scale_strides: tuple[int, int] = (0, 0),
):
    """The prefix launch, called with (q, out, k_cache, v_cache, ...) like the unified launches, and
    a `merge(suffix_part, acc, m, l)` for `unified.bind_attention(partials=...)`.

    launch:  (BLOCK_M, BLOCK_Q, BLOCK_N, num_warps, num_stages, num_splits) of the prefix kernel
    strides: q (t, h, d), out (t, h, d), k_cache (block, slot, head, dim-chunk, dim), v_cache
    shapes:  num_tokens, num_q_heads, num_kv_heads, head_size, page, k_x, num_blocks, q_dtype,
             cache_dtype
    groups:  the int32 group tensor (`pack_size(num_groups, num_tokens)` entries)
    block_table: the full block table (the prefix is read from each group's row of it)
    scale_strides: element strides of k_scale / v_scale between KV heads (fp8 caches; the scales
             are per-call tensors, the 7th and 8th a launch is called with)
    options: scale, softcap, alibi, plus the suffix's metadata under
             "suffix" = (cu_seqlens_q, suffix seq_lens, shared tokens per sequence, max keys)
    """
    num_tokens, num_q_heads, num_kv_heads, head_size, page, k_x, num_blocks, q_dtype, cache_dtype = shapes
    block_m, block_q, block_n, warps, stages, num_splits = launch
    # one tuple of Python ints per tensor: a kernel argument each
    sq, so, sk, sv = (tuple(int(x) for x in s) for s in strides[:4])
    head_pad = head_pad_for(head_size)
    fp8 = FP8_CODES.get(cache_dtype, 0)
    interp = interpreter_enabled()
    dot_dtype = tl.float32 if interp else _TL_DTYPES[q_dtype]
    pv_dtype = tl.float16 if fp8 and dot_dtype in (tl.float16, tl.bfloat16) else dot_dtype
    pre_acc, pre_m, pre_l = prefix_workspace(num_tokens, num_q_heads, num_splits, head_pad, device)
    placeholder = groups
    alibi = options["alibi"]
    args = [
        None,
        sq,
        None,
        sk,
        None,
        sv,
        groups,
        block_table,
        (block_table.stride(0), block_table.stride(1)),
        None if fp8 else placeholder,  # k_scale, v_scale: per call over fp8 caches
        None if fp8 else placeholder,
        alibi if alibi is not None else placeholder,
        pre_acc,
        pre_m,
        pre_l,
        num_groups,
        num_tokens,
        block_table.shape[0],
        num_blocks,
        block_table.shape[1],
        options["scale"] * LOG2E_FLOAT,
        float(options["softcap"] or 1.0),
        (int(scale_strides[0]), int(scale_strides[1])),
    ]
    kwargs = dict(
        QPK=num_q_heads // num_kv_heads,
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        PAGE=page,
        K_X=k_x,
        KV_FP8=fp8,
        DOT_DTYPE=dot_dtype,
        PV_DTYPE=pv_dtype,
        IEEE=(q_dtype == torch.float32 and not interp),
        USE_SOFTCAP=bool(options["softcap"]),
        USE_ALIBI=alibi is not None,
        NUM_SPLITS=num_splits,
        IDX64=idx64,
        INTERPRET=interp,
        num_warps=warps,
        num_stages=stages,
    )
    tiles = num_tokens // block_q + num_groups
    slots, uses = (PREFIX_SLOTS, (0, 2, 3, 6, 7)) if fp8 else (PREFIX_SLOTS[:3], (0, 2, 3))
    prefix = BoundLaunch(_PREFIX, (tiles, num_kv_heads, num_splits), args, slots, kwargs, uses=uses)
    cu_seqlens_q, suffix_seq_lens, shared, max_keys = options["suffix"]
    heads = min(triton.next_power_of_2(num_q_heads), max(1, 4096 // head_pad))  # a [heads, head_pad] tile

    def merge(part, acc, m, l):  # noqa: E741
        merge_args = [
            None,
            so,
            pre_acc,
            pre_m,
            pre_l,
            acc,
            m,
            l,
            cu_seqlens_q,
            suffix_seq_lens,
            shared,
            suffix_seq_lens.shape[0],
            num_tokens,
            num_q_heads,
            part.min_query_len,
            min(part.max_query_len, 2**31 - 1),
            max_keys,
        ]
        merge_kwargs = dict(
            HEAD_SIZE=head_size,
            HEAD_PAD=head_pad,
            HEADS=heads,
            PRE_SPLITS=num_splits,
            SUF_SPLITS=part.num_splits,
            BLOCK_Q=part.block_q,
            SEQ_GRID=part.seq_grid,
            num_warps=4,
        )
        grid = (num_tokens, triton.cdiv(num_q_heads, heads))
        return BoundLaunch(MERGE, grid, merge_args, (0,), merge_kwargs, uses=(1,))

    return prefix, merge
