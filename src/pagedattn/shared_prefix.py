"""Shared-prefix (cascade) planning: which sequences share leading cache blocks, and the device
metadata the cascade kernels read (`kernels/cascade.py` says how they run).

A *group* is a set of sequences whose block-table rows start with the same `n` block ids, with
n * block_size tokens below every member's first query position (ctx_len = seq_len - query_len):
every query of the group sees all of those keys, with no causal mask. Found two ways:

- detected (`shared_prefix=None`, the default) on the host copy of the block table and lengths,
  vectorised: sequences are grouped by their first block id (no two alike: done, the plain path
  pays only that sort); each member's common prefix with the group's longest member, and the
  group's prefix length the one that saves the most key reads ((members - 1) x blocks). A batch
  cascades when the groups save at least `min_saved_keys` key reads and a group's prefix is at
  least `min_prefix` tokens.
- told (`shared_prefix=[(members, tokens), ...]`): an engine knows its prefix sharing (prefix
  caching, parallel sampling); checked against the host copies (same block ids, below every
  member's first query position), `tokens` rounded down to whole blocks.

Not with a sliding window (the prefix would have to be masked per query) nor under the context
contract: those batches take the plain path, and `explain()` says why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import dispatch
from .errors import BatchMetadataError, UnsupportedConfigError
from .kernels.cascade import pack_size

MIN_PREFIX_TOKENS = 256  # vLLM's threshold too: shorter prefixes save less than the extra launches cost
MIN_SAVED_KEYS = 16384  # key reads (per KV head) the sharing must save: ~ one launch's cost at 4 KB a key
PREFIX_PARTITION_MIN = 512  # a split of the prefix keys never covers fewer than this


@dataclass
class Cascade:
    """A planned cascade: its groups (host) and the device metadata the launches are bound to."""

    groups: list[tuple[np.ndarray, int, int]]  # (members, shared blocks, block-table row read)
    capacity: int  # groups the kernel's grid and the group tensor have room for
    packed: torch.Tensor  # int32: the kernel's group tensor, then shared tokens per sequence
    seq_lens: torch.Tensor  # the suffix's: seq_len - shared tokens
    block_table: torch.Tensor  # the suffix's: each row shifted past its shared blocks
    shared: torch.Tensor  # [num_seqs] int32 shared tokens per sequence (a view of packed)
    max_seq_len: int  # the suffix's bound
    launch: tuple[int, int, int, int, int, int]  # prefix kernel: BLOCK_M, BLOCK_Q, BLOCK_N, warps, stages, splits
    shift_view: bool  # the suffix table is a view (one shift for every sequence), not a copy
    block_size: int

    def describe(self) -> str:
        sizes = [len(m) for m, _, _ in self.groups]
        tokens = [b * self.block_size for _, b, _ in self.groups]
        saved = sum((len(m) - 1) * b * self.block_size for m, b, _ in self.groups)
        m, q, n, w, s, splits = self.launch
        what = (
            f"{len(self.groups)} group(s) of {sizes} sequences sharing {tokens} tokens"
            if self.groups
            else "no group this step (captured with cascade: every sequence runs its whole context as its suffix)"
        )
        return (
            f"cascade: {what}, {saved} key reads per KV head saved; prefix kernel BLOCK_M={m} (BLOCK_Q={q}) "
            f"BLOCK_N={n} warps={w} stages={s} splits={splits}, suffix through "
            + ("a shifted view of the block table" if self.shift_view else "a shifted copy of the block table")
            + ", merged through the log-sum-exp"
        )


def detect(block_table: np.ndarray, ctx_lens: np.ndarray, block_size: int, min_blocks: int = 1):
    """Groups of sequences sharing leading block ids: [(members, blocks, source row)], members sorted.
    Only blocks wholly below a member's first query position count."""
    bt = _numpy(block_table)
    if not first_blocks_repeat(bt):
        return []
    usable = np.minimum(np.asarray(ctx_lens) // block_size, bt.shape[1])
    cand = np.flatnonzero(usable >= max(1, min_blocks))
    if cand.size < 2:
        return []
    first = bt[cand, 0]
    order = np.lexsort((-usable[cand], first))  # by first block, longest first within a run
    f = first[order]
    same = f[1:] == f[:-1]
    if not same.any():
        return []
    starts = np.concatenate(([0], np.flatnonzero(~same) + 1))
    sizes = np.diff(starts, append=f.size)
    run = np.repeat(np.arange(starts.size), sizes)
    keep = sizes[run] >= 2
    seqs = cand[order][keep]
    gid = np.unique(run[keep], return_inverse=True)[1]
    leaders = cand[order][starts[sizes >= 2]]
    if leaders.size <= 8:  # few groups (the usual case): each against its leader's row, no gathered copy
        lcp = np.empty(seqs.size, dtype=np.int64)
        for g, leader in enumerate(leaders):
            where = np.flatnonzero(gid == g)
            lcp[where] = _common_prefix(bt, seqs[where], leader, usable)
    else:
        width = int(usable[seqs].max())
        eq = bt[seqs, :width] == bt[leaders[gid], :width]
        lcp = np.where(eq.all(1), width, eq.argmin(1))
    lcp = np.minimum(lcp, usable[seqs])  # the leader (longest) has the largest: it is always a member
    # per group, the prefix length p saving most: (members with lcp >= p) - 1 times p
    o = np.lexsort((-lcp, gid))
    g_sorted, l_sorted = gid[o], lcp[o]
    first_of = np.concatenate(([0], np.flatnonzero(g_sorted[1:] != g_sorted[:-1]) + 1))
    rank = np.arange(o.size) - np.repeat(first_of, np.diff(first_of, append=o.size))
    gain = rank * l_sorted
    best = np.lexsort((rank, gain, g_sorted))  # the last of each group: the best (most members on ties)
    last = np.append(np.flatnonzero(g_sorted[best][1:] != g_sorted[best][:-1]), o.size - 1)
    best_blocks = l_sorted[best[last]]
    groups = []
    for g in np.flatnonzero((gain[best[last]] > 0) & (best_blocks >= max(1, min_blocks))):
        members = np.sort(seqs[(gid == g) & (lcp >= best_blocks[g])])
        groups.append((members, int(best_blocks[g]), int(leaders[g])))
    return groups


def _common_prefix(bt: np.ndarray, members: np.ndarray, leader: int, usable: np.ndarray) -> np.ndarray:
    """How many leading block ids each member's row shares with the leader's (up to the members'
    usable blocks). Rows of a contiguous range of sequences are compared in place."""
    width = int(usable[members].max())
    order = np.argsort(members, kind="stable")
    ordered = members[order]
    if ordered[-1] - ordered[0] + 1 == ordered.size:
        rows = bt[ordered[0] : ordered[-1] + 1, :width]
    else:
        rows = bt[ordered, :width]
    eq = rows == bt[leader, :width]
    full = eq.all(1)
    lcp = np.full(ordered.size, width, dtype=np.int64)
    if not full.all():
        lcp[~full] = eq[~full].argmin(1)
    out = np.empty_like(lcp)
    out[order] = lcp
    return out


def _numpy(table) -> np.ndarray:
    return table.numpy() if isinstance(table, torch.Tensor) else np.asarray(table)


def first_blocks_repeat(block_table) -> bool:
    """Whether two rows start with the same block id: one sort of the first column, the whole
    cost of detection for a batch without sharing."""
    bt = _numpy(block_table)
    if bt.ndim != 2 or bt.shape[0] < 2 or bt.shape[1] == 0:
        return False
    first = np.sort(bt[:, 0])
    return bool((first[1:] == first[:-1]).any())


def told(spec, num_seqs: int, block_table, ctx_lens: np.ndarray, block_size: int):
    """An engine's groups [(members, shared tokens)], checked: [(members, blocks, source row)]."""
    if not isinstance(spec, Sequence) or isinstance(spec, (str, bytes)):
        raise UnsupportedConfigError(
            f"shared_prefix must be None, False or a list of (member sequence indices, shared tokens), got {spec!r}"
        )
    seen = np.zeros(num_seqs, dtype=bool)
    bt = None if block_table is None else np.asarray(block_table)
    groups = []
    for i, entry in enumerate(spec):
        if not (isinstance(entry, Sequence) and len(entry) == 2):
            raise UnsupportedConfigError(f"shared_prefix[{i}] must be (members, shared tokens), got {entry!r}")
        members, tokens = entry
        if not isinstance(tokens, (int, np.integer)) or isinstance(tokens, bool) or tokens < 0:
            raise UnsupportedConfigError(f"shared_prefix[{i}]: shared tokens must be an int >= 0, got {tokens!r}")
        m = np.asarray(members)
        if m.ndim != 1 or m.size == 0 or m.dtype.kind not in "iu":
            raise UnsupportedConfigError(
                f"shared_prefix[{i}]: members must be a non-empty list of sequence indices, got {members!r}"
            )
        if m.min() < 0 or m.max() >= num_seqs:
            raise BatchMetadataError(
                f"shared_prefix[{i}]: member {int(m.min() if m.min() < 0 else m.max())} is out of range "
                f"for a batch of {num_seqs} sequences"
            )
        if np.unique(m).size != m.size or seen[m].any():
            raise BatchMetadataError(f"shared_prefix[{i}]: a sequence is listed twice (each may be in one group)")
        seen[m] = True
        over = m[ctx_lens[m] < tokens]
        if over.size:
            s = int(over[0])
            raise BatchMetadataError(
                f"shared_prefix[{i}]: {tokens} shared tokens, but sequence {s}'s first query token is at "
                f"position {int(ctx_lens[s])} (shared tokens must lie below every member's queries)"
            )
        blocks = int(tokens) // block_size
        if bt is not None and blocks:
            rows = bt[m, :blocks]
            diff = np.argwhere(rows != rows[0])
            if diff.size:
                r, c = diff[0]
                raise BatchMetadataError(
                    f"shared_prefix[{i}]: block_table[{int(m[r])}, {int(c)}] = {int(rows[r, c])} but "
                    f"block_table[{int(m[0])}, {int(c)}] = {int(rows[0, c])}: the shared {blocks} blocks must be "
                    "the same block ids"
                )
        if blocks:
            groups.append((np.sort(m), blocks, int(m[0])))
    return groups


def choose_launch(attn, *, num_tokens: int, capacity: int, max_prefix: int, splits: int | None):
    """The prefix kernel's (BLOCK_M, BLOCK_Q, BLOCK_N, warps, stages, splits): prefill tiles (its
    rows are many queries), and the prefix keys split until the tiles x KV heads fill the SMs."""
    fp32 = attn.dtype == torch.float32 or attn.kv_cache_dtype == torch.float32
    block_m, block_q, block_n, warps, stages = dispatch.choose_tiles(
        decode=False,
        num_queries_per_kv=attn.num_q_heads // attn.num_kv_heads,
        head_size=attn.head_size,
        block_size=attn.block_size,
        fp32=fp32,
        fp8=attn.fp8,
    )
    if splits is None:
        programs = max(1, math.ceil(num_tokens / block_q)) * attn.num_kv_heads
        sms = dispatch.sm_count(attn.device)
        limit = max(1, min(dispatch.MAX_SPLITS, max_prefix // PREFIX_PARTITION_MIN))
        first = max(1, math.ceil(2 * sms / programs))
        candidates = range(min(first, limit), min(max(first, 4 * sms // programs), limit) + 1)
        splits = max(candidates, key=lambda s: (dispatch.spread(s * programs, sms), -s))
    return block_m, block_q, block_n, warps, stages, int(splits)


def pack(groups, capacity: int, cu: np.ndarray, ctx_lens: np.ndarray, num_tokens: int, block_size: int):
    """The int32 group tensor (`kernels.cascade.pack_size` entries: starts, rows, prefix lens,
    tokens, positions) followed by the shared tokens of each sequence."""
    num_seqs = ctx_lens.size
    out = np.zeros(pack_size(capacity, num_tokens) + num_seqs, dtype=np.int32)
    if groups:
        members = np.concatenate([m for m, _, _ in groups])
        qlens = cu[members + 1] - cu[members]
        counts = np.array([int(qlens[i : i + len(m)].sum()) for i, m in _offsets(groups)], dtype=np.int64)
        total = int(qlens.sum())
        tokens = np.arange(total) - np.repeat(np.cumsum(qlens) - qlens - cu[members], qlens)
        positions = tokens + np.repeat(ctx_lens[members] - cu[members], qlens)
        g = len(groups)
        out[1 : g + 1] = np.cumsum(counts)
        out[g + 1 : capacity + 1] = total
        out[capacity + 1 : capacity + 1 + g] = [src for _, _, src in groups]
        out[2 * capacity + 1 : 2 * capacity + 1 + g] = [b * block_size for _, b, _ in groups]
        base = 3 * capacity + 1
        out[base : base + total] = tokens
        out[base + num_tokens : base + num_tokens + total] = positions
        shared = out[pack_size(capacity, num_tokens) :]
        for m, b, _ in groups:
            shared[m] = b * block_size
    return out


def _offsets(groups):
    i = 0
    for m, _, _ in groups:
        yield i, m
        i += len(m)


def plan(
    attn,
    spec,
    *,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    host,
    num_tokens: int | None,
    max_seq_len: int,
    previous: Cascade | None,
    locked: bool = False,
) -> tuple[Cascade | None, str]:
    """(the cascade of this step or None, why not). host: (cu_seqlens_q or None, query lens, seq
    lens, block table) host copies, or None. `previous`: the CUDA-graph plan's cascade, whose
    buffers and launches this step must reuse (None: a fresh cascade). `locked`: a later CUDA-graph
    plan whose first plan had no cascade (its captured launches are the plain ones)."""
    if spec is False:
        return None, "shared_prefix=False"
    if attn.options.sliding_window:
        return None, "a sliding window (shared keys would need per-query masks)"
    if attn.contract != "full":
        return None, "the context-cache contract"
    if locked:
        return None, "the first CUDA-graph plan had no shared prefix (its launches are captured)"
    if host is None or num_tokens is None:
        if spec is not None:
            raise BatchMetadataError(
                "shared_prefix needs host copies of the lengths (query_lens_host and seq_lens_host, or "
                "metadata on the CPU)"
            )
        return None, "no host copies of the lengths and block table to detect sharing on"
    cu_host, query_lens, seqs, bt_host = host
    if spec is None and previous is None:
        if bt_host is None:
            return None, "no host copy of the block table (block_table_host) to detect sharing on"
        if not first_blocks_repeat(bt_host):
            return None, "no two sequences start with the same block"
    query_lens, seqs = np.asarray(query_lens), np.asarray(seqs)
    ctx = seqs - query_lens
    num_seqs = seqs.size
    if spec is None:
        if bt_host is None:
            groups = []
            why = "no host copy of the block table (block_table_host) to detect sharing on"
        else:
            min_blocks = max(1, -(-attn.cascade_min_prefix // attn.block_size))
            groups = detect(bt_host, ctx, attn.block_size, min_blocks)
            saved = sum((len(m) - 1) * b * attn.block_size for m, b, _ in groups)
            why = f"no sequences share {attn.cascade_min_prefix}+ leading tokens"
            if groups and saved < attn.cascade_min_saved_keys:
                groups, why = [], f"sharing saves {saved} key reads < cascade_min_saved_keys"
    else:
        groups = told(spec, num_seqs, bt_host, ctx, attn.block_size)
        why = "no group shares a whole block"
    if not groups and previous is None:
        return None, why
    cu = np.asarray(cu_host) if cu_host is not None else np.concatenate(([0], np.cumsum(query_lens)))
    device = attn.device
    if previous is None:
        capacity = num_seqs if attn.cuda_graph else len(groups)
        max_prefix = max(b for _, b, _ in groups) * attn.block_size
        launch = choose_launch(
            attn, num_tokens=num_tokens, capacity=capacity, max_prefix=max_prefix, splits=attn.cascade_prefix_splits
        )
    else:
        capacity, launch = previous.capacity, previous.launch
    host_pack = torch.from_numpy(pack(groups, capacity, cu, ctx, num_tokens, attn.block_size))
    shared_host = host_pack[pack_size(capacity, num_tokens) :].numpy()
    shift = int(shared_host[0]) // attn.block_size if num_seqs else 0
    if device.type == "cuda":  # pinned: the copy is queued, plan() does not wait for the stream's work
        host_pack = host_pack.pin_memory()
    uniform = not attn.cuda_graph and bool((shared_host == shared_host[0]).all()) and shift > 0
    if previous is None:
        packed = host_pack.to(device, non_blocking=True)
        shared = packed[pack_size(capacity, num_tokens) :]
        if uniform:
            suffix_lens, suffix_table = seq_lens - int(shared_host[0]), block_table[:, shift:]
        else:
            suffix_lens, suffix_table = seq_lens - shared, torch.empty_like(block_table)
    else:
        packed, shared, suffix_lens, suffix_table = (
            previous.packed,
            previous.shared,
            previous.seq_lens,
            previous.block_table,
        )
        packed.copy_(host_pack, non_blocking=True)
        torch.sub(seq_lens, shared, out=suffix_lens)
    if not uniform:
        width = block_table.shape[1]
        cols = torch.arange(width, device=device)[None, :] + (shared // attn.block_size).long()[:, None]
        torch.gather(block_table, 1, cols.clamp_(max=width - 1), out=suffix_table)
    if attn.cuda_graph:
        max_suffix = max_seq_len
    else:
        max_suffix = int((seqs - shared_host).max()) if num_seqs else max_seq_len
    return (
        Cascade(
            groups, capacity, packed, suffix_lens, suffix_table, shared, max_suffix, launch, uniform, attn.block_size
        ),
        "",
    )
