"""Checked mode: prove, before a kernel runs, that every position it will read was written.

    check_batch_against_cache  a PagedKVCache and its batch: the cache's bookkeeping (which slots
                               were written, which blocks each sequence owns) is the proof
    check_cache_finite         the functional API (no bookkeeping): every position to be read must
                               hold finite K and V, which catches unwritten slots when the cache
                               was poisoned with NaN
    check_allocator            the allocator's invariants (refcounts, free list, block tables)

Which positions a kernel reads (per sequence, seq_len = ctx_len + query_len):
    full-cache contract     0 .. seq_len - 1
    context-cache contract  0 .. ctx_len - 1; with decode_from_cache=True, decode sequences
                            (query_len == 1) read 0 .. seq_len - 1 from the cache (the seed's bug:
                            their own token's K/V was never written there)

Nothing here runs unless asked for (`checked=True`); unchecked calls pay nothing.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Sequence

import torch

from .errors import (BatchMetadataError, ContractError, SlotConflictError, UnsupportedConfigError,
                     UnwrittenKVError)

if TYPE_CHECKING:
    from .cache import PagedKVCache

CONTRACT_NAMES = {"full": "full-cache", "context": "context-cache"}
MAX_LISTED = 4  # positions named in one message
GATHER_ELEMENTS = 1 << 24  # check_cache_finite gathers at most this many elements at a time


def read_lengths(query_lens: torch.Tensor, seq_lens: torch.Tensor, contract: str,
                 decode_from_cache: bool) -> torch.Tensor:
    """Per sequence, how many leading positions the kernel reads from the cache (int64)."""
    if contract not in CONTRACT_NAMES:
        raise UnsupportedConfigError(f"contract must be 'full' or 'context', got {contract!r}")
    seq_lens = seq_lens.long()
    if contract == "full":
        return seq_lens
    reads = seq_lens - query_lens.long()
    if decode_from_cache:
        reads = torch.where(query_lens == 1, seq_lens, reads)
    return reads


# ---------------------------------------------------------------------------------------------
# with a PagedKVCache
# ---------------------------------------------------------------------------------------------
def check_batch_against_cache(cache: "PagedKVCache", batch, contract: str = "full",
                              decode_from_cache: bool = False) -> None:
    """Every position the kernel will read, for every sequence in `batch`, was written through
    `cache`, and the batch's block table rows are the sequences' own blocks.

    Needs `batch.seq_ids` (set by `cache.batch`); without it, falls back to `check_cache_finite`
    when the cache is poisoned. Raises UnwrittenKVError, SlotConflictError (a block the sequence
    does not own) or BatchMetadataError (block ids out of range, rows too short)."""
    seq_ids = getattr(batch, "seq_ids", None)
    if seq_ids is None:
        if cache.poison:
            return check_cache_finite(cache.k, cache.v, batch.cu_seqlens_q, batch.seq_lens, batch.block_table,
                                      contract=contract, decode_from_cache=decode_from_cache)
        raise ContractError(
            "checked mode needs to know which sequences the batch is for: build it with "
            "cache.batch(seq_ids, query_lens) (it records batch.seq_ids), or turn poison on so the "
            "cache contents can be checked instead"
        )
    query_lens, seq_lens = batch.host_query_lens(), batch.host_seq_lens()
    if len(seq_ids) != len(seq_lens):
        raise BatchMetadataError(f"batch.seq_ids has {len(seq_ids)} entries but the batch has {len(seq_lens)} sequences")
    reads = read_lengths(torch.tensor(query_lens), torch.tensor(seq_lens), contract, decode_from_cache).tolist()
    table = batch.block_table.cpu()
    bs = cache.block_size
    violations = []  # (positions, message) per sequence; the first is raised, the rest counted
    for row, (seq_id, q, s, n) in enumerate(zip(seq_ids, query_lens, seq_lens, reads)):
        own = cache.block_table(seq_id)  # SequenceError if freed
        needed = -(-n // bs)
        if needed > table.shape[1]:
            raise BatchMetadataError(
                f"sequence {seq_id} (batch row {row}): reading {n} positions needs {needed} blocks of "
                f"{bs} tokens, but block_table has only {table.shape[1]} columns"
            )
        blocks = table[row, :needed].long()
        out_of_range = ((blocks < 0) | (blocks >= cache.num_blocks)).nonzero()
        if out_of_range.numel():
            j = int(out_of_range[0, 0])
            raise BatchMetadataError(
                f"block_table[{row}, {j}] = {int(blocks[j])} is out of range for a cache of {cache.num_blocks} blocks"
            )
        shared = min(needed, len(own))
        mismatch = (blocks[:shared] != torch.tensor(own[:shared], dtype=torch.long)).nonzero()
        if mismatch.numel():
            j = int(mismatch[0, 0])
            b = int(blocks[j])
            holders = cache.owners(b)
            raise SlotConflictError(
                f"sequence {seq_id} (batch row {row}): block_table[{row}, {j}] = {b}, but logical block "
                f"{j} of sequence {seq_id} is physical block {own[j]}; block {b} "
                + (f"belongs to sequence(s) {holders}" if holders else "is free")
            )
        pos = torch.arange(n)
        logical = pos // bs
        offset = pos % bs
        phys = blocks[logical] if n else pos
        owned = logical < len(own)
        written = torch.zeros(n, dtype=torch.bool)
        written[owned] = cache.written[phys[owned], offset[owned]]
        bad = (~written).nonzero().flatten()
        if bad.numel():
            beyond = int((~owned).sum())
            note = ""
            if beyond:
                note = (f"; positions from {len(own) * bs} on lie past the {len(own)} block(s) sequence {seq_id} "
                        f"holds (its length is {cache.seq_len(seq_id)}), so block_table has padding there")
            violations.append((bad.numel(), _unwritten_message(
                seq_id, row, q, s, bad, phys[bad], offset[bad], bs, ("was never written", "were never written"),
                contract, decode_from_cache, note)))
    if violations:
        message = violations[0][1]
        if len(violations) > 1:
            message += f" ({sum(n for n, _ in violations)} positions in {len(violations)} sequences in all)"
        raise UnwrittenKVError(message)


# ---------------------------------------------------------------------------------------------
# functional API: the cache contents are the only evidence
# ---------------------------------------------------------------------------------------------
def check_cache_finite(k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       seq_lens: torch.Tensor, block_table: torch.Tensor, contract: str = "full",
                       decode_from_cache: bool = False) -> None:
    """Every K and V element the kernel will read is finite. In a poisoned cache (NaN until
    written) a non-finite value means the slot was never written, or was written with NaN/inf;
    in an unpoisoned one, unwritten slots hold whatever was there and may pass.
    Vectorised: one gather per chunk of positions, no Python loop over tokens."""
    cu = cu_seqlens_q.detach().cpu().long()
    lens = seq_lens.detach().cpu().long()
    query_lens = cu[1:] - cu[:-1]
    reads = read_lengths(query_lens, lens, contract, decode_from_cache).clamp_min(0)
    total = int(reads.sum())
    if total == 0:
        return
    num_blocks, bs = k_cache.shape[0], k_cache.shape[1]
    table = block_table.detach().cpu().long()
    needed = -(-reads // bs)
    if int(needed.max()) > table.shape[1]:
        row = int(needed.argmax())
        raise BatchMetadataError(
            f"sequence {row}: reading {int(reads[row])} positions needs {int(needed[row])} blocks of {bs} "
            f"tokens, but block_table has only {table.shape[1]} columns"
        )
    # every (sequence, position) read, flattened
    seq = torch.repeat_interleave(torch.arange(len(reads)), reads)
    pos = torch.arange(total) - torch.repeat_interleave(reads.cumsum(0) - reads, reads)
    blocks = table[seq, pos // bs]
    offsets = pos % bs
    out_of_range = ((blocks < 0) | (blocks >= num_blocks)).nonzero().flatten()
    if out_of_range.numel():
        i = int(out_of_range[0])
        raise BatchMetadataError(
            f"block_table[{int(seq[i])}, {int(pos[i]) // bs}] = {int(blocks[i])} is out of range for a "
            f"cache of {num_blocks} blocks"
        )
    k_bad = _nonfinite_rows(k_cache, blocks, offsets)
    v_bad = _nonfinite_rows(v_cache, blocks, offsets)
    bad = (k_bad | v_bad).nonzero().flatten()
    if not bad.numel():
        return
    first_seq = int(seq[bad[0]])
    mine = bad[seq[bad] == first_seq]
    in_k, in_v = bool(k_bad[mine].any()), bool(v_bad[mine].any())
    where = "k_cache and v_cache" if in_k and in_v else ("k_cache" if in_k else "v_cache")
    reason = f"non-finite values in {where}: never written (poisoned NaN) or holds NaN/inf"
    what = (f"holds {reason}", f"hold {reason}")
    others = len(torch.unique(seq[bad]))
    message = _unwritten_message(first_seq, first_seq, int(query_lens[first_seq]), int(lens[first_seq]),
                                 pos[mine], blocks[mine], offsets[mine], bs, what, contract, decode_from_cache)
    if others > 1:
        message += f" ({bad.numel()} positions in {others} sequences in all)"
    raise UnwrittenKVError(message)


def _nonfinite_rows(cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[len(blocks)] bool (host): slot (block, offset) holds a non-finite value in some head/dim."""
    fp8 = cache.dtype.itemsize == 1 and cache.dtype.is_floating_point
    raw = cache.view(torch.uint8) if fp8 else cache  # fp8 advanced indexing is not implemented everywhere
    per_slot = max(1, cache.shape[2] * cache.shape[3])
    chunk = max(1, GATHER_ELEMENTS // per_slot)
    blocks, offsets = blocks.to(cache.device), offsets.to(cache.device)
    out = []
    for start in range(0, blocks.numel(), chunk):
        values = raw[blocks[start:start + chunk], offsets[start:start + chunk]]
        if fp8:
            values = values.view(cache.dtype).float()
        out.append((~torch.isfinite(values)).flatten(1).any(1).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------------
def _unwritten_message(seq_id, row, query_len, seq_len, positions, blocks, offsets, block_size, what,
                       contract, decode_from_cache, note="") -> str:
    """`what`: (verb phrase for one position, for several), e.g. ("was never written", "were never written")."""
    positions, blocks, offsets = (t.tolist() for t in (positions, blocks, offsets))
    kind = "decode" if query_len == 1 else "prefill"
    head = f"sequence {seq_id} ({kind}, query_len {query_len}, seq_len {seq_len}"
    head += ")" if row == seq_id else f", batch row {row})"
    items = [f"position {p} (block {b}, slot {b * block_size + o})"
             for p, b, o in zip(positions[:MAX_LISTED], blocks, offsets)]
    if len(positions) == 1:
        body = f"{items[0]} {what[0]}"
    else:
        more = ", ..." if len(positions) > MAX_LISTED else ""
        body = f"{len(positions)} positions ({_runs(positions)}) {what[1]}: {', '.join(items)}{more}"
    return f"{head}: {body}{note}; {_advice(query_len, seq_len, positions, contract, decode_from_cache)}"


def _runs(positions: Sequence[int], limit: int = MAX_LISTED) -> str:
    """Sorted positions as runs: "0..19, 37, 40..45"."""
    runs = []
    for p in positions:
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    text = [f"{a}..{b}" if b > a else f"{a}" for a, b in runs[:limit]]
    return ", ".join(text) + (", ..." if len(runs) > limit else "")


def _advice(query_len: int, seq_len: int, positions: Sequence[int], contract: str, decode_from_cache: bool) -> str:
    ctx_len = seq_len - query_len
    new_tokens = all(p >= ctx_len for p in positions)
    if contract == "full":
        if new_tokens:
            which = "the new token's K/V" if query_len == 1 else "the query tokens' K/V"
            return (f"under the full-cache contract {which} must be written before attention "
                    "(cache.append / write_kv them first)")
        return (f"under the full-cache contract all {seq_len} tokens of the sequence must be in the cache "
                f"before attention, its context (positions 0..{ctx_len - 1}) included")
    if decode_from_cache and query_len == 1 and new_tokens:
        return ("under the context-cache contract with decode_from_cache=True a decode sequence reads all "
                f"seq_len = {seq_len} tokens from the cache, so its new token's K/V must be written to the "
                "cache before attention (append it first, or pass decode_from_cache=False to read it "
                "from k_new/v_new)")
    return (f"under the context-cache contract the cache must hold the first ctx_len = {ctx_len} tokens "
            "of the sequence before attention (the query tokens' K/V come from k_new/v_new)")


# ---------------------------------------------------------------------------------------------
# allocator invariants
# ---------------------------------------------------------------------------------------------
def check_allocator(cache: "PagedKVCache") -> None:
    """Refcount of every block = the number of block tables holding it; free blocks are exactly the
    blocks at refcount 0, each listed once; no table holds a block twice; every table covers its
    sequence's length exactly. Raises ContractError naming the first violation."""
    held = Counter()
    for seq_id in cache.sequences:
        table = cache.block_table(seq_id)
        length = cache.seq_len(seq_id)
        if len(set(table)) != len(table):
            raise ContractError(f"sequence {seq_id}: its block table {table} lists a block twice")
        if len(table) != -(-length // cache.block_size):
            raise ContractError(
                f"sequence {seq_id}: length {length} needs {-(-length // cache.block_size)} blocks of "
                f"{cache.block_size}, its block table has {len(table)}"
            )
        held.update(table)
    free = list(cache.free_blocks)
    if len(set(free)) != len(free):
        raise ContractError(f"the free list holds a block twice: {sorted(b for b, n in Counter(free).items() if n > 1)}")
    for block in range(cache.num_blocks):
        rc = cache.refcount(block)
        if rc != held[block]:
            raise ContractError(f"block {block}: refcount {rc} but {held[block]} block table(s) hold it")
    in_use_and_free = set(free) & set(held)
    if in_use_and_free:
        raise ContractError(f"blocks {sorted(in_use_and_free)[:8]} are both free and in a block table")
    if len(free) + len(held) != cache.num_blocks:
        leaked = sorted(set(range(cache.num_blocks)) - set(free) - set(held))
        raise ContractError(f"blocks {leaked[:8]} are neither free nor in any block table (leaked)")
