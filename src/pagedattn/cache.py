"""PagedKVCache: K and V tensors in the paged layout, a reference-counted block allocator, per-sequence
block tables and lengths, and the bookkeeping checked mode needs.

    k, v:     [num_blocks, block_size, num_kv_heads, head_size]   (query dtype, or fp8 holding x / scale)
    written:  [num_blocks, block_size] bool, on the host: which slots hold K/V written through this cache

A sequence is a list of physical blocks (its block table) and a length. `fork` shares every block
with a new sequence (refcount + 1); `free` drops them (a block at refcount 0 returns to the free
list). Copy-on-write: a sequence that grows into a partially filled block it shares gets a fresh
copy of that block first, so no write ever lands in a block another sequence can read.

Every operation checks first and mutates after: an error (CacheFullError, SequenceError, ...) leaves
tables, lengths, refcounts, the free list and the data exactly as they were.

Poison mode (default): the cache starts poisoned, and blocks are re-poisoned when they are handed
out and when they are freed, so a read of a slot nobody wrote surfaces as NaN. The poison is
`pagedattn.poison`'s NaN bit pattern (the same one `poison_` and `empty_kv_cache` write into raw
tensors), which checked mode and forensics tell apart from a NaN the user wrote.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import torch

from . import checks
from .batch import BatchMetadata
from .config import MAX_HEAD_SIZE, QUERY_DTYPES, SUPPORTED_BLOCK_SIZES, fp8_dtype_of
from .errors import (
    BatchMetadataError,
    CacheFullError,
    DeviceError,
    DTypeError,
    LayoutError,
    ScaleError,
    SequenceError,
    ShapeError,
    SlotConflictError,
    UnsupportedConfigError,
)
from .kernels.write import write_kv
from .poison import int_view, poison_fill_value

CONTRACTS = ("full", "context")


class PagedKVCache:
    """K/V cache in pages: a pool of `num_blocks` blocks of `block_size` token slots, handed out to
    sequences.

    k, v: [num_blocks, block_size, num_kv_heads, head_size]. `dtype` is the query dtype
    (fp16/bf16/fp32); `kv_dtype` is "auto" (= dtype) or "fp8"/"fp8_e4m3"/"fp8_e5m2", stored as
    x / k_scale (x / v_scale; a scale is one float or a [num_kv_heads] tensor, one per KV head).
    `checked=True` tracks written slots, so attention over this cache
    refuses a read of an unwritten slot (UnwrittenKVError). `poison=True` (default) fills unwritten
    and freed blocks with pagedattn's NaN bit pattern (`pagedattn.poison_`).

    `new_sequence()` returns an id; `append(ids, k, v, query_lens)` grows sequences and writes their
    K/V; `reserve()` grows without writing (for engines writing through `write_kv`);
    `batch(ids, query_lens, contract)` gives one step's BatchMetadata; `fork(id)` shares all blocks;
    `free(id)` releases them. Copy-on-write: the sequence that grows into a shared, partly filled
    block gets a fresh copy; the others keep the original. Every method checks before it mutates;
    an error leaves the cache unchanged.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        num_kv_heads: int = 8,
        head_size: int = 128,
        dtype: torch.dtype = torch.bfloat16,
        kv_dtype: str = "auto",
        device: torch.device | str = "cpu",
        k_scale: float | torch.Tensor = 1.0,
        v_scale: float | torch.Tensor = 1.0,
        checked: bool = False,
        poison: bool = True,
    ) -> None:
        for name, value in (("num_blocks", num_blocks), ("num_kv_heads", num_kv_heads), ("head_size", head_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UnsupportedConfigError(f"{name} must be a positive int, got {value!r}")
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise UnsupportedConfigError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
        if head_size > MAX_HEAD_SIZE:
            raise UnsupportedConfigError(f"head_size must be <= {MAX_HEAD_SIZE}, got {head_size}")
        if dtype not in QUERY_DTYPES:
            raise DTypeError(f"dtype (the query dtype) must be one of {QUERY_DTYPES}, got {dtype}")
        fp8 = fp8_dtype_of(kv_dtype)
        scales = []
        for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
            if isinstance(value, torch.Tensor) and value.numel() > 1:  # one scale per KV head
                if tuple(value.shape) != (num_kv_heads,) or not value.dtype.is_floating_point:
                    raise ScaleError(
                        f"{name} must be a float, a one-element tensor or a [num_kv_heads] = [{num_kv_heads}] "
                        f"float tensor (one scale per KV head), got {value.dtype} of shape {tuple(value.shape)}"
                    )
                bad = [float(x) for x in value.detach().double().cpu() if not (math.isfinite(x) and x > 0)]
                if bad:
                    raise ScaleError(f"{name} must hold finite values > 0, got {bad[0]!r}")
                scales.append(value.detach().to(device=device, dtype=torch.float32).contiguous())
                continue
            if isinstance(value, torch.Tensor):
                value = float(value)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ScaleError(f"{name} must be a finite float > 0, got {value!r}")
            scales.append(float(value))

        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.dtype = dtype
        self.kv_dtype = kv_dtype
        self.cache_dtype = fp8 or dtype
        self.is_fp8 = fp8 is not None
        self.device = torch.device(device)
        # floats, or [num_kv_heads] float32 tensors on the cache's device (one scale per KV head)
        self.k_scale, self.v_scale = scales
        self.checked = bool(checked)
        self.poison = bool(poison)

        shape = (num_blocks, block_size, num_kv_heads, head_size)
        self.k = torch.empty(shape, dtype=self.cache_dtype, device=self.device)
        self.v = torch.empty(shape, dtype=self.cache_dtype, device=self.device)
        self.device = self.k.device  # "cuda" -> "cuda:0", so device comparisons hold
        self.written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
        self._free: deque[int] = deque(range(num_blocks))
        self._refcounts = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        self._next_seq_id = 0
        if self.poison:
            self._poison(list(range(num_blocks)))

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def free_blocks(self) -> tuple[int, ...]:
        """The free list, in the order blocks will be handed out."""
        return tuple(self._free)

    @property
    def sequences(self) -> tuple[int, ...]:
        """Live sequence ids, in creation order."""
        return tuple(self._tables)

    def seq_len(self, seq_id: int) -> int:
        """Tokens the sequence holds (reserved or written)."""
        self._check_seq(seq_id)
        return self._lens[seq_id]

    def block_table(self, seq_id: int) -> list[int]:
        self._check_seq(seq_id)
        return list(self._tables[seq_id])

    def refcount(self, block: int) -> int:
        self._check_block(block)
        return self._refcounts[block]

    def owners(self, block: int) -> list[int]:
        """Sequences whose block table holds `block` (for error messages; a scan)."""
        self._check_block(block)
        return [s for s, table in self._tables.items() if block in table]

    def written_mask(self, seq_id: int) -> torch.Tensor:
        """[seq_len] bool (host): which of the sequence's positions hold K/V written through the cache."""
        self._check_seq(seq_id)
        pos = torch.arange(self._lens[seq_id])
        table = torch.tensor(self._tables[seq_id], dtype=torch.long)
        return (
            self.written[table[pos // self.block_size], pos % self.block_size]
            if pos.numel()
            else torch.zeros(0, dtype=torch.bool)
        )

    def __repr__(self) -> str:
        return (
            f"PagedKVCache({self.num_blocks} blocks x {self.block_size} tokens, {self.num_kv_heads} KV heads "
            f"x {self.head_size}, {str(self.cache_dtype).replace('torch.', '')} on {self.device}, "
            f"{len(self._tables)} sequences, {self.num_free_blocks} free blocks)"
        )

    # ------------------------------------------------------------------ sequences
    def new_sequence(self) -> int:
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        self._tables[seq_id] = []
        self._lens[seq_id] = 0
        return seq_id

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing all of `seq_id`'s blocks (and length); refcounts + 1."""
        self._check_seq(seq_id)
        child = self.new_sequence()
        self._tables[child] = list(self._tables[seq_id])
        self._lens[child] = self._lens[seq_id]
        for block in self._tables[child]:
            self._refcounts[block] += 1
        self._after_mutation()
        return child

    def free(self, seq_id: int) -> None:
        """Drop the sequence; its blocks at refcount 0 are poisoned and return to the free list."""
        self._check_seq(seq_id)
        released = []
        for block in self._tables.pop(seq_id):
            self._refcounts[block] -= 1
            if self._refcounts[block] == 0:
                released.append(block)
        del self._lens[seq_id]
        if released:
            self._clear(released)
            self._free.extend(released)
        self._after_mutation()

    # ------------------------------------------------------------------ growing and writing
    def reserve(self, seq_ids: int | Sequence[int], num_tokens: int | Sequence[int]) -> None:
        """Grow sequences by `num_tokens` positions each WITHOUT writing K/V: for engines that write
        K/V themselves through `write_kv(..., cache.slot_mapping(seq_ids, num_tokens))`, or through
        `write`. Nothing is marked written. All or nothing: CacheFullError leaves the cache unchanged."""
        seq_ids, counts = self._as_lists(seq_ids, num_tokens, "num_tokens")
        self._check_batch_ids(seq_ids, counts, "num_tokens")
        plan, needed = self._plan_reserve(seq_ids, counts)
        if needed > len(self._free):
            raise CacheFullError(
                f"growing {len(seq_ids)} sequence(s) by {sum(counts)} tokens needs {needed} free blocks "
                f"(copy-on-write copies included) but only {len(self._free)} of {self.num_blocks} are free; "
                "the cache is unchanged"
            )
        fresh = [self._free.popleft() for _ in range(needed)]
        for block in fresh:
            self._refcounts[block] = 1
        self._clear(fresh)
        take = iter(fresh)
        for seq_id, shared_last, new_blocks, count in plan:
            table = self._tables[seq_id]
            if shared_last is not None:
                self._copy_on_write(seq_id, shared_last, next(take))
            table.extend(next(take) for _ in range(new_blocks))
            self._lens[seq_id] += count
        self._after_mutation()

    def write(self, seq_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor, query_lens: Sequence[int]) -> None:
        """Write K/V for the last query_lens[i] positions of each sequence (already reserved), through
        write_kv, and mark them written. k, v: [sum(query_lens), num_kv_heads, head_size], rows grouped
        by sequence in seq_ids order, in the query dtype."""
        seq_ids, query_lens = self._as_lists(seq_ids, query_lens, "query_lens")
        self._check_batch_ids(seq_ids, query_lens, "query_lens")
        self._check_kv(k, v, sum(query_lens))
        slots = self._slots_host(seq_ids, query_lens)
        for seq_id, q in zip(seq_ids, query_lens):
            if q:
                self._check_unshared(seq_id, q)
        write_kv(
            k,
            v,
            self.k,
            self.v,
            slots.to(self.device),
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            checked=self.checked,
        )
        self.written.view(-1)[slots] = True

    def append(self, seq_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor, query_lens: Sequence[int]) -> None:
        """reserve + write: grow each sequence by query_lens[i] tokens and write their K/V.
        k, v: [sum(query_lens), num_kv_heads, head_size] in the query dtype, rows grouped by sequence
        in seq_ids order. Out of blocks: CacheFullError, and the cache is unchanged."""
        seq_ids, query_lens = self._as_lists(seq_ids, query_lens, "query_lens")
        self._check_batch_ids(seq_ids, query_lens, "query_lens")
        self._check_kv(k, v, sum(query_lens))
        self.reserve(seq_ids, query_lens)
        self.write(seq_ids, k, v, query_lens)

    def slot_mapping(self, seq_ids: Sequence[int], query_lens: Sequence[int]) -> torch.Tensor:
        """[sum(query_lens)] int64 on the cache's device: the slots (block * block_size + offset) of
        the last query_lens[i] positions of each sequence, in seq_ids order."""
        seq_ids, query_lens = self._as_lists(seq_ids, query_lens, "query_lens")
        self._check_batch_ids(seq_ids, query_lens, "query_lens", unique=False)
        return self._slots_host(seq_ids, query_lens).to(self.device)

    # ------------------------------------------------------------------ batch metadata
    def batch(
        self, seq_ids: Sequence[int], query_lens: Sequence[int], contract: str = "full", decode_from_cache: bool = False
    ) -> BatchMetadata:
        """Metadata for one attention step over these sequences, on the cache's device.

        contract="full": the query tokens are each sequence's last query_len tokens, already in the
        cache; seq_len = the sequence's length. contract="context": the cache holds ctx_len tokens
        and the query tokens' K/V come separately; seq_len = length + query_len, block tables are not
        extended. With contract="context" and decode_from_cache=True, decode sequences (query_len 1)
        have already appended their token and read all of it from the cache (seq_len = length), as
        `prefix_prefill(..., decode_from_cache=True)` expects.
        The block table is as wide as the widest row needs (ceil(seq_len / block_size)
        columns, or the blocks a sequence holds if more), padded with 0.

        The result carries `seq_ids` (a tuple) and `contract` as plain attributes for checked mode."""
        if contract not in CONTRACTS:
            raise UnsupportedConfigError(f"contract must be one of {CONTRACTS}, got {contract!r}")
        seq_ids, query_lens = self._as_lists(seq_ids, query_lens, "query_lens")
        if not seq_ids:
            raise BatchMetadataError("seq_ids is empty: a batch needs at least one sequence")
        self._check_batch_ids(seq_ids, query_lens, "query_lens", unique=False)
        seq_lens = []
        for seq_id, q in zip(seq_ids, query_lens):
            length = self._lens[seq_id]
            if contract == "context" and decode_from_cache and q == 1:
                # chunked_prefill_paged_decode: the decode token was appended; it reads it from here
                if length < 1:
                    raise BatchMetadataError(
                        f"sequence {seq_id}: decode_from_cache=True but the sequence holds no token; "
                        "append the decode token's K/V before building the batch"
                    )
                seq_lens.append(length)
            elif contract == "context":
                seq_lens.append(length + q)
            elif q > length:
                raise BatchMetadataError(
                    f"sequence {seq_id}: query_len {q} exceeds its {length} tokens in the cache; under the "
                    "full-cache contract the query tokens' K/V are appended before the batch is built "
                    "(or use contract='context' and pass them as k_new/v_new)"
                )
            else:
                seq_lens.append(length)
        width = max(max(len(self._tables[s]), -(-n // self.block_size)) for s, n in zip(seq_ids, seq_lens))
        rows = [self._tables[s] + [0] * (width - len(self._tables[s])) for s in seq_ids]
        batch = BatchMetadata.from_lens(query_lens, seq_lens, rows, device=self.device)
        batch.seq_ids = tuple(seq_ids)
        batch.contract = contract
        return batch

    # ------------------------------------------------------------------ internals
    def _plan_reserve(self, seq_ids, counts):
        """[(seq_id, shared last block to copy or None, new blocks, count)], blocks needed. Pure."""
        plan, needed, moved = [], 0, {}
        for seq_id, count in zip(seq_ids, counts):
            if count == 0:
                plan.append((seq_id, None, 0, 0))
                continue
            length, table = self._lens[seq_id], self._tables[seq_id]
            shared_last = None
            if length % self.block_size:  # the next token lands in the last, partial block
                last = table[-1]
                # an earlier sequence of this call may already have copied its way out of `last`
                if self._refcounts[last] - moved.get(last, 0) > 1:
                    shared_last = last
                    moved[last] = moved.get(last, 0) + 1
                    needed += 1
            new_blocks = -(-(length + count) // self.block_size) - len(table)
            needed += new_blocks
            plan.append((seq_id, shared_last, new_blocks, count))
        return plan, needed

    def _copy_on_write(self, seq_id: int, shared: int, fresh: int) -> None:
        filled = self._lens[seq_id] % self.block_size
        k, v = self._raw(self.k), self._raw(self.v)
        k[fresh, :filled] = k[shared, :filled]
        v[fresh, :filled] = v[shared, :filled]
        self.written[fresh, :filled] = self.written[shared, :filled]
        self._refcounts[shared] -= 1
        self._tables[seq_id][-1] = fresh

    def _slots_host(self, seq_ids, query_lens) -> torch.Tensor:
        parts = []
        for seq_id, q in zip(seq_ids, query_lens):
            length = self._lens[seq_id]
            if q > length:
                raise BatchMetadataError(
                    f"sequence {seq_id}: query_len {q} exceeds its {length} reserved tokens (reserve them first)"
                )
            pos = torch.arange(length - q, length)
            table = torch.tensor(self._tables[seq_id], dtype=torch.long)
            parts.append(table[pos // self.block_size] * self.block_size + pos % self.block_size if q else pos)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def _check_unshared(self, seq_id: int, q: int) -> None:
        length, table = self._lens[seq_id], self._tables[seq_id]
        for j in range((length - q) // self.block_size, -(-length // self.block_size)):
            if self._refcounts[table[j]] > 1:
                raise SlotConflictError(
                    f"sequence {seq_id}: logical block {j} (physical block {table[j]}) is shared with "
                    f"sequences {[s for s in self.owners(table[j]) if s != seq_id]}; writing it would "
                    "change their K/V too (reserve before fork, or write before forking)"
                )

    def _clear(self, blocks: list[int]) -> None:
        """Blocks entering or leaving use: nothing written, and NaN in poison mode."""
        if not blocks:
            return
        self.written[torch.tensor(blocks, dtype=torch.long)] = False
        if self.poison:
            self._poison(blocks)

    def _poison(self, blocks: list[int]) -> None:
        index = torch.tensor(blocks, dtype=torch.long, device=self.device)
        bits = poison_fill_value(self.cache_dtype)
        for t in (self.k, self.v):
            int_view(t).index_fill_(0, index, bits)  # the bit pattern: a float fill would lose the payload

    def _raw(self, t: torch.Tensor) -> torch.Tensor:
        # fp8 tensors lack index_fill_/index_put_ on some backends: move their bytes instead
        return t.view(torch.uint8) if self.is_fp8 else t

    def _after_mutation(self) -> None:
        if self.checked:
            checks.check_allocator(self)

    def _check_seq(self, seq_id) -> None:
        if seq_id not in self._tables:
            state = "was freed" if isinstance(seq_id, int) and 0 <= seq_id < self._next_seq_id else "is unknown"
            raise SequenceError(f"sequence {seq_id!r} {state}; live sequences: {list(self._tables)[:16]}")

    def _check_block(self, block) -> None:
        if not isinstance(block, int) or not 0 <= block < self.num_blocks:
            raise BatchMetadataError(f"block {block!r} is out of range for a cache of {self.num_blocks} blocks")

    @staticmethod
    def _as_lists(seq_ids, counts, counts_name):
        if isinstance(seq_ids, int):
            seq_ids = [seq_ids]
        if isinstance(counts, int):
            counts = [counts]
        seq_ids = list(seq_ids)
        counts = [c.item() if isinstance(c, torch.Tensor) else c for c in counts]
        if len(seq_ids) != len(counts):
            raise BatchMetadataError(f"seq_ids has {len(seq_ids)} entries but {counts_name} has {len(counts)}")
        for i, c in enumerate(counts):
            if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise BatchMetadataError(f"{counts_name}[{i}] must be an int >= 0, got {c!r}")
        return seq_ids, counts

    def _check_batch_ids(self, seq_ids, counts, counts_name, unique=True) -> None:
        for seq_id in seq_ids:
            self._check_seq(seq_id)
        if unique and len(set(seq_ids)) != len(seq_ids):
            dup = next(s for s in seq_ids if seq_ids.count(s) > 1)
            raise BatchMetadataError(f"seq_ids lists sequence {dup} more than once")

    def _check_kv(self, k, v, num_tokens: int) -> None:
        expected = (num_tokens, self.num_kv_heads, self.head_size)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != expected:
                raise ShapeError(
                    f"{name} must be [sum(query_lens), num_kv_heads, head_size] = {list(expected)}, got {list(t.shape)}"
                )
            if t.dtype != self.dtype:
                raise DTypeError(f"{name} must be in the cache's query dtype {self.dtype}, got {t.dtype}")
            if t.device != self.device:
                raise DeviceError(f"{name} is on {t.device}, expected {self.device} (the cache's device)")
            if t.numel() and t.stride(-1) != 1:
                raise LayoutError(f"{name} must be contiguous in head_size, got strides {t.stride()}")
