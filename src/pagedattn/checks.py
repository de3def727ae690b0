"""Checked mode: prove, before a kernel runs, that every position it will read was written.

    check_batch_against_cache  a PagedKVCache and its batch: the cache's bookkeeping (which slots
                               were written, which blocks each sequence owns) is the proof
    check_cache_finite         raw caches (no bookkeeping): no position to be read holds the poison
                               pattern (never written; `pagedattn.poison`) or, by default, a NaN/inf
                               the user wrote (a different error); one device pass, one sync
    scan_reads                 the same pass, returning the flagged reads (forensics uses it)
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
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import (
    BatchMetadataError,
    ContractError,
    LayoutError,
    NonFiniteKVError,
    SlotConflictError,
    UnsupportedConfigError,
    UnwrittenKVError,
)
from .poison import int_view, nonfinite_mask_value, poison_fill_value
from .text import runs

CONTRACT_NAMES = {"full": "full-cache", "context": "context-cache"}
MAX_LISTED = 4  # positions named in one message
GATHER_ELEMENTS = 1 << 24  # check_cache_finite gathers at most this many elements at a time


def read_lengths(
    query_lens: torch.Tensor, seq_lens: torch.Tensor, contract: str, decode_from_cache: bool
) -> torch.Tensor:
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
def check_batch_against_cache(cache, batch, contract: str = "full", decode_from_cache: bool = False) -> None:
    """Every position the kernel will read, for every sequence in `batch`, was written through
    `cache`, and the batch's block table rows are the sequences' own blocks.

    Needs `batch.seq_ids` (set by `cache.batch`); without it, falls back to `check_cache_finite`
    when the cache is poisoned. Raises UnwrittenKVError, SlotConflictError (a block the sequence
    does not own) or BatchMetadataError (block ids out of range, rows too short)."""
    seq_ids = getattr(batch, "seq_ids", None)
    if seq_ids is None:
        if cache.poison:
            return check_cache_finite(
                cache.k,
                cache.v,
                batch.cu_seqlens_q,
                batch.seq_lens,
                batch.block_table,
                contract=contract,
                decode_from_cache=decode_from_cache,
            )
        raise ContractError(
            "checked mode needs to know which sequences the batch is for: build it with "
            "cache.batch(seq_ids, query_lens) (it records batch.seq_ids), or turn poison on so the "
            "cache contents can be checked instead"
        )
    query_lens, seq_lens = batch.host_query_lens(), batch.host_seq_lens()
    if len(seq_ids) != len(seq_lens):
        raise BatchMetadataError(
            f"batch.seq_ids has {len(seq_ids)} entries but the batch has {len(seq_lens)} sequences"
        )
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
                note = (
                    f"; positions from {len(own) * bs} on lie past the {len(own)} block(s) sequence {seq_id} "
                    f"holds (its length is {cache.seq_len(seq_id)}), so block_table has padding there"
                )
            violations.append(
                (
                    bad.numel(),
                    _unwritten_message(
                        seq_id,
                        row,
                        q,
                        s,
                        bad,
                        phys[bad],
                        offset[bad],
                        bs,
                        ("was never written", "were never written"),
                        contract,
                        decode_from_cache,
                        note,
                    ),
                )
            )
    if violations:
        message = violations[0][1]
        if len(violations) > 1:
            message += f" ({sum(n for n, _ in violations)} positions in {len(violations)} sequences in all)"
        raise UnwrittenKVError(message)


# ---------------------------------------------------------------------------------------------
# functional API: the cache contents are the only evidence
# ---------------------------------------------------------------------------------------------
K_POISON, V_POISON, K_NONFINITE, V_NONFINITE, BAD_BLOCK = 1, 2, 4, 8, 16


@dataclass
class ReadScan:
    """The reads `scan_reads` flagged, one entry each (host tensors, in read order): the batch row,
    the position in the sequence, the physical block, the offset in the block and the flags
    (K_POISON | V_POISON: never written; K_NONFINITE | V_NONFINITE: NaN/inf that is not the poison,
    i.e. written with non-finite values; BAD_BLOCK: the block id is outside the cache)."""

    seq: torch.Tensor
    pos: torch.Tensor
    block: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor
    block_size: int

    def select(self, mask: torch.Tensor) -> ReadScan:
        return ReadScan(
            self.seq[mask], self.pos[mask], self.block[mask], self.offset[mask], self.code[mask], self.block_size
        )

    def __len__(self) -> int:
        return self.seq.numel()


def scan_reads(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    contract: str = "full",
    decode_from_cache: bool = False,
    *,
    query_lens_host: Sequence[int] | None = None,
    seq_lens_host: Sequence[int] | None = None,
) -> ReadScan | None:
    """Classify every (sequence, position) the kernel will read: poisoned (never written), written
    with NaN/inf, or fine. None when every read is fine.

    k_cache, v_cache: NHD views [num_blocks, block_size, num_kv_heads, head_size], any strides, any
    cache dtype (fp8 as torch fp8 dtypes). Cost: the read positions are built on the cache's device
    from the device metadata; one gather of the slots to be read (chunked to GATHER_ELEMENTS
    elements at a time, all on the device), integer compares against the poison bits, and one
    device -> host sync for the verdict. Without `query_lens_host` / `seq_lens_host` (host copies of
    the lengths, which a planner already holds) the lengths are copied to the host first: one more
    sync. Only when something is flagged do the flagged reads come back to the host."""
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, torch.Tensor) or c.dim() != 4:
            raise LayoutError(
                f"{name} must be an NHD view [num_blocks, block_size, num_kv_heads, head_size], "
                f"got {getattr(c, 'shape', type(c).__name__)}"
            )
    num_blocks, bs = k_cache.shape[0], k_cache.shape[1]
    device = k_cache.device
    if query_lens_host is None or seq_lens_host is None:
        both = torch.cat([cu_seqlens_q.detach().reshape(-1).long(), seq_lens.detach().reshape(-1).long()]).cpu()
        cu, lens = both[: cu_seqlens_q.numel()], both[cu_seqlens_q.numel() :]
        query_lens_host, seq_lens_host = (cu[1:] - cu[:-1]).tolist(), lens.tolist()
    reads_host = read_lengths(
        torch.tensor(query_lens_host, dtype=torch.long),
        torch.tensor(seq_lens_host, dtype=torch.long),
        contract,
        decode_from_cache,
    ).clamp_min(0)
    total = int(reads_host.sum())
    if total == 0:
        return None
    needed = -(-reads_host // bs)
    if int(needed.max()) > block_table.shape[1]:
        row = int(needed.argmax())
        raise BatchMetadataError(
            f"sequence {row}: reading {int(reads_host[row])} positions needs {int(needed[row])} blocks of {bs} "
            f"tokens, but block_table has only {block_table.shape[1]} columns"
        )
    # every (sequence, position) read, flattened, built on the device (no host round trip)
    cu_d = cu_seqlens_q.detach().to(device).long()
    reads = read_lengths(
        cu_d[1:] - cu_d[:-1], seq_lens.detach().to(device).long(), contract, decode_from_cache
    ).clamp_min(0)
    seq = torch.repeat_interleave(torch.arange(reads.numel(), device=device), reads, output_size=total)
    pos = torch.arange(total, device=device) - (reads.cumsum(0) - reads)[seq]
    blocks = block_table.detach().to(device).long()[seq, pos // bs]
    offsets = pos % bs
    code = ((blocks < 0) | (blocks >= num_blocks)).to(torch.uint8) * BAD_BLOCK
    safe = blocks.clamp(0, num_blocks - 1)
    per_slot = max(1, k_cache.shape[2] * k_cache.shape[3])
    chunk = max(1, GATHER_ELEMENTS // per_slot)
    for cache, poison_flag, nonfinite_flag in ((k_cache, K_POISON, K_NONFINITE), (v_cache, V_POISON, V_NONFINITE)):
        raw = int_view(cache)
        bits, exponent = poison_fill_value(cache.dtype), nonfinite_mask_value(cache.dtype)
        for start in range(0, total, chunk):
            values = raw[safe[start : start + chunk], offsets[start : start + chunk]].flatten(1)
            poisoned = (values == bits).any(1)
            other = (((values & exponent) == exponent) & (values != bits)).any(1)
            code[start : start + chunk] |= (
                poisoned.to(torch.uint8) * poison_flag | other.to(torch.uint8) * nonfinite_flag
            )
    if not bool(code.any()):  # the one sync of the clean path
        return None
    flagged = code.nonzero().flatten()
    return ReadScan(*(t[flagged].cpu() for t in (seq, pos, blocks, offsets, code)), block_size=bs)


def check_cache_finite(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    contract: str = "full",
    decode_from_cache: bool = False,
    *,
    nonfinite: str = "raise",
    query_lens_host: Sequence[int] | None = None,
    seq_lens_host: Sequence[int] | None = None,
) -> None:
    """Checked reads over raw caches: no slot the kernel will read holds poison (was never written)
    and, with nonfinite="raise" (the default), none holds a NaN/inf the user wrote.

    The entry point checked mode calls before launching, for every entry point and the compat ops:
    k_cache, v_cache as NHD views [num_blocks, block_size, num_kv_heads, head_size] (any strides,
    fp8 as torch fp8 dtypes), the batch metadata on any device, the contract ("full" or "context")
    and decode_from_cache. Raises, in this order:
      BatchMetadataError  a block id the read needs is outside the cache, or the table is too narrow
      UnwrittenKVError    a read slot holds pagedattn's poison pattern: never written since it was
                          poisoned (`poison_`, `empty_kv_cache`, `PagedKVCache(poison=True)`); the
                          message names sequence, position, block, slot and the contract
      NonFiniteKVError    a read slot holds NaN/inf that is NOT the poison: it was written, with
                          non-finite values (nonfinite="ignore" lets those through: NaN in K/V is
                          then the caller's data, and the kernel propagates it as torch would)
    A cache that was never poisoned holds whatever memory held, and unwritten slots pass unseen.
    Cost: see `scan_reads` (one device pass over the slots to be read, one sync when clean; pass
    `query_lens_host` / `seq_lens_host` to save the sync that copies the lengths)."""
    if nonfinite not in ("raise", "ignore"):
        raise UnsupportedConfigError(f"nonfinite must be 'raise' or 'ignore', got {nonfinite!r}")
    scan = scan_reads(
        k_cache,
        v_cache,
        cu_seqlens_q,
        seq_lens,
        block_table,
        contract,
        decode_from_cache,
        query_lens_host=query_lens_host,
        seq_lens_host=seq_lens_host,
    )
    if scan is None:
        return
    bad_block = (scan.code & BAD_BLOCK) != 0
    if bool(bad_block.any()):
        i = int(bad_block.nonzero()[0])
        raise BatchMetadataError(
            f"block_table[{int(scan.seq[i])}, {int(scan.pos[i]) // scan.block_size}] = {int(scan.block[i])} "
            f"is out of range for a cache of {k_cache.shape[0]} blocks"
        )
    lens = torch.cat([cu_seqlens_q.detach().reshape(-1).long(), seq_lens.detach().reshape(-1).long()]).cpu()
    cu, lens = lens[: cu_seqlens_q.numel()], lens[cu_seqlens_q.numel() :]
    query_lens = cu[1:] - cu[:-1]
    poisoned = (scan.code & (K_POISON | V_POISON)) != 0
    if bool(poisoned.any()):
        raise UnwrittenKVError(
            _scan_message(
                scan.select(poisoned),
                query_lens,
                lens,
                K_POISON,
                V_POISON,
                "never written (poisoned NaN)",
                contract,
                decode_from_cache,
            )
        )
    written_nan = (scan.code & (K_NONFINITE | V_NONFINITE)) != 0
    if nonfinite == "raise" and bool(written_nan.any()):
        raise NonFiniteKVError(
            _scan_message(
                scan.select(written_nan),
                query_lens,
                lens,
                K_NONFINITE,
                V_NONFINITE,
                "written with non-finite values (NaN/inf that is not the poison pattern, so not an unwritten slot)",
                contract,
                decode_from_cache,
                advice=(
                    f"the kernel would read them under the {CONTRACT_NAMES[contract]} contract; check the K/V "
                    "written there, or pass nonfinite='ignore' if NaN/inf in K/V is expected"
                ),
            )
        )


def _scan_message(
    scan: ReadScan, query_lens, seq_lens, k_flag, v_flag, state, contract, decode_from_cache, advice=None
) -> str:
    """The message for the first flagged sequence, with a count of the rest."""
    first = int(scan.seq[0])
    mine = scan.seq == first
    in_k, in_v = bool((scan.code[mine] & k_flag).any()), bool((scan.code[mine] & v_flag).any())
    where = "k_cache and v_cache" if in_k and in_v else ("k_cache" if in_k else "v_cache")
    what = (f"in {where} was {state}", f"in {where} were {state}")
    message = _unwritten_message(
        first,
        first,
        int(query_lens[first]),
        int(seq_lens[first]),
        scan.pos[mine],
        scan.block[mine],
        scan.offset[mine],
        scan.block_size,
        what,
        contract,
        decode_from_cache,
        advice=advice,
    )
    others = len(torch.unique(scan.seq))
    if others > 1:
        message += f" ({len(scan)} positions in {others} sequences in all)"
    return message


# ---------------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------------
def _unwritten_message(
    seq_id,
    row,
    query_len,
    seq_len,
    positions,
    blocks,
    offsets,
    block_size,
    what,
    contract,
    decode_from_cache,
    note="",
    advice=None,
) -> str:
    """`what`: (verb phrase for one position, for several), e.g. ("was never written", "were never written")."""
    positions, blocks, offsets = (t.tolist() for t in (positions, blocks, offsets))
    kind = "decode" if query_len == 1 else "prefill"
    head = f"sequence {seq_id} ({kind}, query_len {query_len}, seq_len {seq_len}"
    head += ")" if row == seq_id else f", batch row {row})"
    items = [
        f"position {p} (block {b}, slot {b * block_size + o})"
        for p, b, o in zip(positions[:MAX_LISTED], blocks, offsets)
    ]
    if len(positions) == 1:
        body = f"{items[0]} {what[0]}"
    else:
        more = ", ..." if len(positions) > MAX_LISTED else ""
        body = f"{len(positions)} positions ({runs(positions, MAX_LISTED)}) {what[1]}: {', '.join(items)}{more}"
    advice = advice or _advice(query_len, seq_len, positions, contract, decode_from_cache)
    return f"{head}: {body}{note}; {advice}"


def _advice(query_len: int, seq_len: int, positions: Sequence[int], contract: str, decode_from_cache: bool) -> str:
    ctx_len = seq_len - query_len
    new_tokens = all(p >= ctx_len for p in positions)
    if contract == "full":
        if new_tokens:
            which = "the new token's K/V" if query_len == 1 else "the query tokens' K/V"
            return (
                f"under the full-cache contract {which} must be written before attention "
                "(cache.append / write_kv them first)"
            )
        return (
            f"under the full-cache contract all {seq_len} tokens of the sequence must be in the cache "
            f"before attention, its context (positions 0..{ctx_len - 1}) included"
        )
    if decode_from_cache and query_len == 1 and new_tokens:
        return (
            "under the context-cache contract with decode_from_cache=True a decode sequence reads all "
            f"seq_len = {seq_len} tokens from the cache, so its new token's K/V must be written to the "
            "cache before attention (append it first, or pass decode_from_cache=False to read it "
            "from k_new/v_new)"
        )
    return (
        f"under the context-cache contract the cache must hold the first ctx_len = {ctx_len} tokens "
        "of the sequence before attention (the query tokens' K/V come from k_new/v_new)"
    )


# ---------------------------------------------------------------------------------------------
# allocator invariants
# ---------------------------------------------------------------------------------------------
def check_allocator(cache) -> None:
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
        raise ContractError(
            f"the free list holds a block twice: {sorted(b for b, n in Counter(free).items() if n > 1)}"
        )
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
