"""Batch metadata: which query tokens belong to which sequence, how long each sequence is, and
where its blocks live. Built once per step; `validate()` checks it against a cache's geometry.

    cu_seqlens_q: [num_seqs + 1] int32   query token offsets (vLLM: query_start_loc)
    seq_lens:     [num_seqs]     int32   tokens each sequence attends to (ctx_len + query_len)
    block_table:  [num_seqs, max_blocks_per_seq] int32   logical block -> physical block

Host mirrors of the lengths (`query_lens_host`, `seq_lens_host`) are kept when the metadata is
built on the host, so dispatch and checks never need a device sync; metadata built from device
tensors alone has none and dispatch then uses only `max_query_len` / `max_seq_len`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import BatchMetadataError
from .validate import check_metadata_tensors


@dataclass
class BatchMetadata:
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_query_len: int
    max_seq_len: int
    query_lens_host: tuple[int, ...] | None = None
    seq_lens_host: tuple[int, ...] | None = None
    seq_ids: tuple[int, ...] | None = None  # the cache's sequence ids, when built by PagedKVCache.batch
    contract: str | None = None  # "full" | "context", when built by PagedKVCache.batch

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_lens(
        cls,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_table: torch.Tensor | Sequence[Sequence[int]],
        device: torch.device | str | None = None,
    ) -> BatchMetadata:
        """Build metadata from host lists. `block_table` rows may be ragged lists (padded with 0)."""
        query_lens = tuple(int(x) for x in query_lens)
        seq_lens = tuple(int(x) for x in seq_lens)
        if len(query_lens) != len(seq_lens):
            raise BatchMetadataError(f"query_lens has {len(query_lens)} entries but seq_lens has {len(seq_lens)}")
        for i, (q, s) in enumerate(zip(query_lens, seq_lens)):
            if q < 0 or s < 0:
                raise BatchMetadataError(f"sequence {i}: lengths must be >= 0, got query_len {q}, seq_len {s}")
            if q > s:
                raise BatchMetadataError(f"sequence {i}: query_len {q} exceeds seq_len {s}")
        if not isinstance(block_table, torch.Tensor):
            rows = [list(r) for r in block_table]
            width = max((len(r) for r in rows), default=0)
            block_table = torch.tensor([r + [0] * (width - len(r)) for r in rows] or [[]], dtype=torch.int32).reshape(
                len(rows), width
            )
        device = torch.device(device) if device is not None else block_table.device
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        return cls(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_table=block_table.to(device=device, dtype=torch.int32),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
        )

    # ------------------------------------------------------------------ derived
    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        if self.query_lens_host is not None:
            return sum(self.query_lens_host)
        return int(self.cu_seqlens_q[-1])

    @property
    def device(self) -> torch.device:
        return self.seq_lens.device

    def host_query_lens(self) -> tuple[int, ...]:
        if self.query_lens_host is None:
            cu = self.cu_seqlens_q.tolist()
            self.query_lens_host = tuple(b - a for a, b in zip(cu, cu[1:]))
        return self.query_lens_host

    def host_seq_lens(self) -> tuple[int, ...]:
        if self.seq_lens_host is None:
            self.seq_lens_host = tuple(self.seq_lens.tolist())
        return self.seq_lens_host

    def host_ctx_lens(self) -> tuple[int, ...]:
        return tuple(s - q for q, s in zip(self.host_query_lens(), self.host_seq_lens()))

    def to(self, device: torch.device | str) -> BatchMetadata:
        return BatchMetadata(
            self.cu_seqlens_q.to(device),
            self.seq_lens.to(device),
            self.block_table.to(device),
            self.max_query_len,
            self.max_seq_len,
            self.query_lens_host,
            self.seq_lens_host,
            self.seq_ids,
            self.contract,
        )

    # ------------------------------------------------------------------ validation
    def validate(
        self, *, num_blocks: int | None = None, block_size: int | None = None, num_tokens: int | None = None
    ) -> BatchMetadata:
        """Check shapes, dtypes, devices and values (this syncs with the device once).

        With `num_blocks` and `block_size`, also check block ids are in range and that each
        sequence has enough blocks for its seq_len; with `num_tokens`, that cu_seqlens_q ends there.
        Returns self; raises BatchMetadataError (or ShapeError/DTypeError/DeviceError) naming the
        argument, the sequence and the values."""
        check_metadata_tensors(self.cu_seqlens_q, self.seq_lens, self.block_table)
        cu = self.cu_seqlens_q.tolist()
        seq_lens = self.seq_lens.tolist()
        if cu[0] != 0:
            raise BatchMetadataError(f"cu_seqlens_q[0] must be 0, got {cu[0]}")
        for i in range(len(seq_lens)):
            q = cu[i + 1] - cu[i]
            if q < 0:
                raise BatchMetadataError(
                    f"cu_seqlens_q must be non-decreasing: cu_seqlens_q[{i}] = {cu[i]} > "
                    f"cu_seqlens_q[{i + 1}] = {cu[i + 1]} (sequence {i})"
                )
            if seq_lens[i] < 0:
                raise BatchMetadataError(f"seq_lens[{i}] = {seq_lens[i]} is negative")
            if q > seq_lens[i]:
                raise BatchMetadataError(
                    f"sequence {i}: query_len {q} (cu_seqlens_q[{i + 1}] - cu_seqlens_q[{i}]) "
                    f"exceeds seq_lens[{i}] = {seq_lens[i]}"
                )
        if num_tokens is not None and cu[-1] != num_tokens:
            raise BatchMetadataError(f"cu_seqlens_q[-1] = {cu[-1]} but the query has {num_tokens} tokens")
        query_lens = [b - a for a, b in zip(cu, cu[1:])]
        if max(query_lens, default=0) > self.max_query_len:
            raise BatchMetadataError(
                f"max_query_len = {self.max_query_len} but sequence {query_lens.index(max(query_lens))} "
                f"has query_len {max(query_lens)}"
            )
        if max(seq_lens, default=0) > self.max_seq_len:
            raise BatchMetadataError(
                f"max_seq_len = {self.max_seq_len} but sequence {seq_lens.index(max(seq_lens))} "
                f"has seq_len {max(seq_lens)}"
            )
        if block_size is not None:
            check_block_table_values(self.block_table, seq_lens, block_size, num_blocks)
        return self


def check_block_table_values(
    block_table: torch.Tensor, seq_lens: Sequence[int], block_size: int, num_blocks: int | None
) -> None:
    """Every block a sequence needs exists in its row and is in [0, num_blocks)."""
    width = block_table.shape[1]
    table = block_table.cpu()
    for i, s in enumerate(seq_lens):
        needed = -(-s // block_size)
        if needed > width:
            raise BatchMetadataError(
                f"sequence {i}: seq_len {s} needs {needed} blocks of {block_size} tokens, "
                f"but block_table has only {width} columns"
            )
        if needed == 0 or num_blocks is None:
            continue
        row = table[i, :needed]
        bad = ((row < 0) | (row >= num_blocks)).nonzero()
        if bad.numel():
            j = int(bad[0, 0])
            raise BatchMetadataError(
                f"block_table[{i}, {j}] = {int(row[j])} is out of range for a cache of {num_blocks} blocks"
            )
