"""The block allocator under random sequences of new / append / fork / free, against a shadow model.

The shadow keeps every live sequence's expected K and V per position; after every step the cache's
gathered contents must equal it bit for bit (so copy-on-write never leaks a write into another
sequence), and the allocator's invariants must hold (refcounts = block tables holding the block,
free list = blocks at refcount 0, tables cover lengths exactly). Writes take the PyTorch path:
the kernel itself is tested in test_write.py, and the interpreter would make this take minutes.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedattn.cache import PagedKVCache
from pagedattn.checks import check_allocator
from pagedattn.errors import CacheFullError, SequenceError
from pagedattn.reference import gather_sequence

NUM_BLOCKS, HEADS, HEAD = 12, 1, 4


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._saved_env = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"  # CPU tensors: write_kv takes the PyTorch path
        self.block_size = 0
        self.cache: PagedKVCache | None = None
        self.shadow: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.freed: list[int] = []
        self.counter = 0

    def teardown(self) -> None:
        if self._saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = self._saved_env

    # ------------------------------------------------------------------ rules
    @precondition(lambda self: self.cache is None)
    @rule(block_size=st.sampled_from([1, 2, 4, 8]))
    def start(self, block_size):
        self.block_size = block_size
        self.cache = PagedKVCache(
            NUM_BLOCKS, block_size=block_size, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float32
        )

    @precondition(lambda self: self.cache is not None)
    @rule()
    def new_sequence(self):
        seq = self.cache.new_sequence()
        empty = torch.zeros(0, HEADS, HEAD)
        self.shadow[seq] = (empty, empty)

    @precondition(lambda self: self.cache is not None and self.shadow)
    @rule(data=st.data())
    def append(self, data):
        live = sorted(self.shadow)
        seqs = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=3, unique=True))
        lens = data.draw(st.lists(st.integers(0, 2 * self.block_size + 1), min_size=len(seqs), max_size=len(seqs)))
        # distinct values per token so any misplaced write shows; never zeros
        n = sum(lens)
        base = self.counter + 1 + torch.arange(n, dtype=torch.float32)
        self.counter += n
        k = (base[:, None, None] + torch.rand(n, HEADS, HEAD)).contiguous()
        v = -k
        free_before = self.cache.num_free_blocks
        try:
            self.cache.append(seqs, k, v, lens)
        except CacheFullError:
            assert self.cache.num_free_blocks == free_before
            return  # the invariants check the cache is unchanged (shadow untouched)
        for seq, part_k, part_v in zip(seqs, k.split(lens), v.split(lens)):
            old_k, old_v = self.shadow[seq]
            self.shadow[seq] = (torch.cat([old_k, part_k]), torch.cat([old_v, part_v]))

    @precondition(lambda self: self.cache is not None and self.shadow)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.shadow)))
        child = self.cache.fork(parent)
        self.shadow[child] = self.shadow[parent]

    @precondition(lambda self: self.cache is not None and self.shadow)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.shadow)))
        self.cache.free(seq)
        del self.shadow[seq]
        self.freed.append(seq)

    @precondition(lambda self: self.cache is not None and self.freed)
    @rule(data=st.data())
    def use_freed_sequence(self, data):
        seq = data.draw(st.sampled_from(self.freed))
        try:
            self.cache.seq_len(seq)
        except SequenceError:
            return
        raise AssertionError(f"sequence {seq} was freed but is still usable")

    @precondition(lambda self: self.cache is not None)
    @rule()
    def free_everything(self):
        for seq in list(self.shadow):
            self.cache.free(seq)
            del self.shadow[seq]
        assert self.cache.num_free_blocks == NUM_BLOCKS, "blocks leaked after every sequence was freed"
        assert all(self.cache.refcount(b) == 0 for b in range(NUM_BLOCKS))
        assert not self.cache.written.any()
        assert torch.isnan(self.cache.k).all() and torch.isnan(self.cache.v).all()

    # ------------------------------------------------------------------ invariants
    @invariant()
    def allocator_is_consistent(self):
        if self.cache is None:
            return
        check_allocator(self.cache)  # refcounts, free list, no leaks, tables cover lengths
        assert self.cache.sequences == tuple(sorted(self.shadow))
        owners: dict[int, int] = {}
        for seq in self.shadow:
            for block in self.cache.block_table(seq):
                owners[block] = owners.get(block, 0) + 1
        for block, count in owners.items():
            # a block held by several tables is shared, with exactly that refcount
            assert self.cache.refcount(block) == count
        assert sum(self.cache.refcount(b) for b in range(NUM_BLOCKS)) == sum(
            len(self.cache.block_table(s)) for s in self.shadow
        )

    @invariant()
    def contents_match_the_shadow(self):
        if self.cache is None:
            return
        for seq, (want_k, want_v) in self.shadow.items():
            length = self.cache.seq_len(seq)
            assert length == want_k.shape[0]
            table = torch.tensor(self.cache.block_table(seq), dtype=torch.long)
            assert torch.equal(gather_sequence(self.cache.k, table, length), want_k)
            assert torch.equal(gather_sequence(self.cache.v, table, length), want_v)
            assert self.cache.written_mask(seq).all()


AllocatorMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorStateMachine = AllocatorMachine.TestCase
