"""Checked mode: the seed's bug is caught and named; correct batches pass; unchecked costs nothing."""

from __future__ import annotations

import pytest
import torch

import pagedattn.checks as checks
from pagedattn.attention import attention
from pagedattn.batch import BatchMetadata
from pagedattn.cache import PagedKVCache
from pagedattn.checks import check_allocator, check_batch_against_cache, check_cache_finite
from pagedattn.config import BatchShape
from pagedattn.errors import (
    BatchMetadataError,
    ContractError,
    NonFiniteKVError,
    SequenceError,
    SlotConflictError,
    UnwrittenKVError,
)
from pagedattn.poison import POISON_BITS, empty_kv_cache, poison_

HEADS, HEAD, BLOCK = 2, 8, 16
SHAPE = BatchShape.seed_like(num_seqs=4, max_query_len=24, max_ctx_len=40, min_len=1, seed=3)  # last one decodes


def kv(num_tokens, dtype=torch.float16):
    return torch.randn(num_tokens, HEADS, HEAD, dtype=dtype), torch.randn(num_tokens, HEADS, HEAD, dtype=dtype)


def seed_cache(*, write_query_tokens: bool, kv_dtype="auto", poison=True):
    """The seed's set-up: the cache gets each sequence's ctx_len tokens, and (when asked) its
    query tokens too, as an engine following the full-cache contract would."""
    cache = PagedKVCache(
        64,
        block_size=BLOCK,
        num_kv_heads=HEADS,
        head_size=HEAD,
        dtype=torch.float16,
        kv_dtype=kv_dtype,
        k_scale=0.5,
        v_scale=0.5,
        poison=poison,
    )
    seqs = [cache.new_sequence() for _ in range(SHAPE.num_seqs)]
    lens = list(SHAPE.seq_lens if write_query_tokens else SHAPE.ctx_lens)
    cache.append(seqs, *kv(sum(lens)), lens)
    return cache, seqs


def seed_batch(cache, seqs):
    """The seed's batch: seq_len = ctx_len + query_len over a cache holding ctx_len tokens."""
    return cache.batch(seqs, SHAPE.query_lens, contract="context")


def paged_args(cache, batch) -> tuple:
    """(k_cache, v_cache, cu_seqlens_q, seq_lens, block_table) of `batch` over `cache`: check_cache_finite's
    positional arguments, and an attention call's after q."""
    return cache.k, cache.v, batch.cu_seqlens_q, batch.seq_lens, batch.block_table


def decode_position(seqs):
    """(sequence, position) the seed's decode read without a write: its own token, seq_len - 1."""
    return seqs[-1], SHAPE.ctx_lens[-1]


# ---------------------------------------------------------------------------------------------
# the seed's bug
# ---------------------------------------------------------------------------------------------
def test_seed_bug_is_named_by_the_cache_bookkeeping():
    cache, seqs = seed_cache(write_query_tokens=False)
    batch = seed_batch(cache, seqs)
    check_batch_against_cache(cache, batch, "context", decode_from_cache=False)  # the contract it did follow
    with pytest.raises(UnwrittenKVError) as info:
        check_batch_against_cache(cache, batch, "context", decode_from_cache=True)
    seq, position = decode_position(seqs)
    block = int(batch.block_table[-1, position // BLOCK])
    slot = block * BLOCK + position % BLOCK
    message = str(info.value)
    assert message.startswith(f"sequence {seq} (decode, query_len 1, seq_len {position + 1})")
    assert f"position {position} (block {block}, slot {slot})" in message
    assert "never written" in message and "decode_from_cache=True" in message and "context-cache" in message


def test_seed_bug_is_named_by_the_poisoned_cache_contents():
    cache, seqs = seed_cache(write_query_tokens=False)
    batch = seed_batch(cache, seqs)
    args = paged_args(cache, batch)
    check_cache_finite(*args, contract="context", decode_from_cache=False)
    with pytest.raises(UnwrittenKVError) as info:
        check_cache_finite(*args, contract="context", decode_from_cache=True)
    seq, position = decode_position(seqs)
    block = int(batch.block_table[-1, position // BLOCK])
    message = str(info.value)
    assert f"sequence {seq} (decode, query_len 1" in message
    assert f"position {position} (block {block}, slot {block * BLOCK + position % BLOCK})" in message
    assert "never written (poisoned NaN)" in message


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
def test_correctly_written_batch_passes_every_check(kv_dtype):
    cache, seqs = seed_cache(write_query_tokens=True, kv_dtype=kv_dtype)
    batch = cache.batch(seqs, SHAPE.query_lens)  # full: the cache holds every token
    for contract, from_cache in (("full", False), ("context", False), ("context", True)):
        check_batch_against_cache(cache, batch, contract, decode_from_cache=from_cache)
        check_cache_finite(*paged_args(cache, batch), contract=contract, decode_from_cache=from_cache)


def test_full_contract_names_the_unwritten_query_tokens():
    cache = PagedKVCache(16, block_size=4, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float16)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append([a, b], *kv(9), [6, 3])
    cache.reserve([a, b], [3, 1])  # grown, never written
    cache.write([a], *kv(3), [3])
    batch = cache.batch([a, b], [3, 1])
    with pytest.raises(UnwrittenKVError) as info:
        check_batch_against_cache(cache, batch, "full")
    block = cache.block_table(b)[0]
    assert str(info.value) == (
        f"sequence {b} (decode, query_len 1, seq_len 4): position 3 (block {block}, slot {block * 4 + 3}) "
        "was never written; under the full-cache contract the new token's K/V must be written before "
        "attention (cache.append / write_kv them first)"
    )


def test_several_positions_are_summarised():
    cache = PagedKVCache(16, block_size=4, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float16)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.reserve([a, b], [10, 3])
    cache.write([a], *kv(2), [2])
    with pytest.raises(UnwrittenKVError) as info:
        check_batch_against_cache(cache, cache.batch([a, b], [2, 1]), "full")
    message = str(info.value)
    assert message.startswith(f"sequence {a} (prefill, query_len 2, seq_len 10): 8 positions (0..7) were never written")
    assert "its context (positions 0..7) included" in message
    assert message.endswith("(11 positions in 2 sequences in all)")


def test_context_past_the_sequences_blocks_is_reported_as_padding():
    cache = PagedKVCache(16, block_size=4, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float16)
    a = cache.new_sequence()
    cache.append([a], *kv(8), [8])
    batch = cache.batch([a], [1], contract="context")  # seq_len 9: position 8 needs a third block
    with pytest.raises(
        UnwrittenKVError,
        match="position 8 \\(block 0, slot 0\\) was never written; positions from 8 on lie past the 2 block\\(s\\)",
    ):
        check_batch_against_cache(cache, batch, "context", decode_from_cache=True)


# ---------------------------------------------------------------------------------------------
# block ownership and ranges
# ---------------------------------------------------------------------------------------------
def test_block_not_owned_is_a_slot_conflict():
    cache = PagedKVCache(16, block_size=4, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float16)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append([a, b], *kv(16), [8, 8])
    batch = cache.batch([a, b], [1, 1])
    batch.block_table[1, 1] = cache.block_table(a)[0]
    with pytest.raises(SlotConflictError) as info:
        check_batch_against_cache(cache, batch, "full")
    assert str(info.value).startswith(
        f"sequence {b} (batch row 1): block_table[1, 1] = {cache.block_table(a)[0]}, but logical block 1 of "
        f"sequence {b} is physical block {cache.block_table(b)[1]}; block {cache.block_table(a)[0]} belongs to "
        f"sequence(s) [{a}]"
    )


def test_stale_batch_after_copy_on_write_is_caught():
    cache = PagedKVCache(16, block_size=4, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float16)
    a = cache.new_sequence()
    cache.append([a], *kv(6), [6])
    b = cache.fork(a)
    stale = cache.batch([b], [1])
    cache.append([b], *kv(1), [1])  # b copies its last block out
    with pytest.raises(SlotConflictError, match="logical block 1"):
        check_batch_against_cache(cache, stale, "full")


def test_out_of_range_blocks_and_freed_sequences():
    cache = PagedKVCache(16, block_size=4, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float16)
    a = cache.new_sequence()
    cache.append([a], *kv(5), [5])
    batch = cache.batch([a], [1])
    batch.block_table[0, 1] = 99
    with pytest.raises(BatchMetadataError, match="block_table\\[0, 1\\] = 99 is out of range for a cache of 16 blocks"):
        check_batch_against_cache(cache, batch, "full")
    with pytest.raises(BatchMetadataError, match="block_table\\[0, 1\\] = 99 is out of range"):
        check_cache_finite(*paged_args(cache, batch))
    cache.free(a)
    with pytest.raises(SequenceError, match="was freed"):
        check_batch_against_cache(cache, batch, "full")


def test_batch_without_seq_ids_falls_back_to_the_cache_contents():
    cache, seqs = seed_cache(write_query_tokens=False)
    b = seed_batch(cache, seqs)
    plain = BatchMetadata(b.cu_seqlens_q, b.seq_lens, b.block_table, b.max_query_len, b.max_seq_len)
    with pytest.raises(UnwrittenKVError, match="poisoned NaN"):
        check_batch_against_cache(cache, plain, "context", decode_from_cache=True)
    quiet, seqs = seed_cache(write_query_tokens=True, poison=False)
    with pytest.raises(ContractError, match="cache.batch"):
        check_batch_against_cache(quiet, plain, "full")


# ---------------------------------------------------------------------------------------------
# check_cache_finite details
# ---------------------------------------------------------------------------------------------
def test_a_written_inf_is_not_an_unwritten_slot():
    """+inf in v (e5m2): not the poison pattern, so a NonFiniteKVError naming the slot, not UnwrittenKVError."""
    cache, seqs = seed_cache(write_query_tokens=True, kv_dtype="fp8_e5m2")
    batch = cache.batch(seqs, SHAPE.query_lens)
    block = cache.block_table(seqs[1])[0]
    cache.v.view(torch.uint8)[block, 2, 1, 5] = 0x7C  # +inf in e5m2
    args = paged_args(cache, batch)
    with pytest.raises(NonFiniteKVError) as info:
        check_cache_finite(*args)
    message = str(info.value)
    assert not isinstance(info.value, UnwrittenKVError)
    assert "sequence 1 (" in message
    assert f"position 2 (block {block}, slot {block * BLOCK + 2}) in v_cache was written with non-finite" in message
    assert "not the poison pattern" in message and "full-cache contract" in message
    check_cache_finite(*args, nonfinite="ignore")  # the caller's data: let it through


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("user_nan", ["nan", "-nan", "0*inf"])
def test_a_user_nan_is_never_reported_as_unwritten(kv_dtype, user_nan):
    """NaN written through the cache's write path (quantized for fp8) is told apart from poison.
    (e4m3fn has two NaN codes: a negative NaN quantizes to 0xFF, the poison; see pagedattn.poison.)"""
    cache, seqs = seed_cache(write_query_tokens=True, kv_dtype=kv_dtype)
    batch = cache.batch(seqs, SHAPE.query_lens)
    k, v = kv(3)
    x = torch.tensor([0.0, float("inf")])
    k[1, 0, 3] = {"nan": float("nan"), "-nan": -float("nan"), "0*inf": float(x[0] * x[1])}[user_nan]
    extra = cache.new_sequence()
    cache.append([extra], k, v, [3])
    batch = cache.batch([*seqs, extra], [*SHAPE.query_lens, 3])
    args = paged_args(cache, batch)
    negative_e4m3 = kv_dtype == "fp8_e4m3" and user_nan != "nan"
    expected = UnwrittenKVError if negative_e4m3 else NonFiniteKVError
    with pytest.raises(expected, match=f"sequence {extra} .*position 1 "):
        check_cache_finite(*args)
    if not negative_e4m3:
        check_cache_finite(*args, nonfinite="ignore")


def test_poison_is_reported_before_a_user_nan():
    cache, seqs = seed_cache(write_query_tokens=False)
    batch = seed_batch(cache, seqs)
    cache.k[cache.block_table(seqs[0])[0], 0, 0, 0] = float("nan")  # the user's NaN in sequence 0
    with pytest.raises(UnwrittenKVError, match=f"sequence {seqs[-1]} \\(decode"):
        check_cache_finite(*paged_args(cache, batch), contract="context", decode_from_cache=True)
    with pytest.raises(NonFiniteKVError, match=f"sequence {seqs[0]} "):
        check_cache_finite(*paged_args(cache, batch), contract="context", decode_from_cache=False)


@pytest.mark.parametrize("dtype", list(POISON_BITS))
@pytest.mark.parametrize("layout", ["halves", "stacked", "hnd"])
def test_raw_cache_views_are_checked_in_place(dtype, layout):
    """Raw caches as views of larger buffers, any cache dtype: the unwritten slot is named, the
    written ones pass; host copies of the lengths give the same verdict."""
    nb, kvh = 6, HEADS
    if layout == "halves":  # [num_blocks, block_size, num_kv_heads, 2 * head_size]: K | V
        buf = torch.zeros(nb, BLOCK, kvh, 2 * HEAD).to(dtype)
        k, v = buf[..., :HEAD], buf[..., HEAD:]
    elif layout == "stacked":  # [2, num_blocks, ...]
        buf = torch.zeros(2, nb, BLOCK, kvh, HEAD).to(dtype)
        k, v = buf[0], buf[1]
    else:  # HND storage, read through an NHD view
        buf = torch.zeros(2, nb, kvh, BLOCK, HEAD).to(dtype)
        k, v = buf[0].transpose(1, 2), buf[1].transpose(1, 2)
    poison_(k), poison_(v)
    table = torch.tensor([[4, 1], [2, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([20, 5], dtype=torch.int32)
    cu = torch.tensor([0, 4, 5], dtype=torch.int32)
    for b, n in ((4, BLOCK), (1, 4), (2, 4)):  # sequence 1's position 4 is left unwritten
        k.view(torch.uint8 if dtype.itemsize == 1 else dtype)[b, :n] = 0
        v.view(torch.uint8 if dtype.itemsize == 1 else dtype)[b, :n] = 0
    for host in (None, dict(query_lens_host=[4, 1], seq_lens_host=[20, 5])):
        with pytest.raises(UnwrittenKVError) as info:
            check_cache_finite(k, v, cu, seq_lens, table, **(host or {}))
        assert str(info.value).startswith(
            "sequence 1 (decode, query_len 1, seq_len 5): position 4 "
            f"(block 2, slot {2 * BLOCK + 4}) in k_cache and v_cache was never written"
        )
        assert "full-cache contract" in str(info.value)
    check_cache_finite(k, v, cu, seq_lens, table, contract="context")  # reads 16 + 4 positions: all written
    assert (buf == 0).sum() == 2 * (BLOCK + 4 + 4) * kvh * HEAD  # nothing outside the views was poisoned


def test_raw_caches_from_empty_kv_cache():
    k, v = empty_kv_cache(4, BLOCK, HEADS, HEAD, dtype=torch.bfloat16)
    cu, lens, table = (torch.tensor(x, dtype=torch.int32) for x in ([0, 1], [3], [[2]]))
    k[2, :2] = 1.0
    v[2, :3] = 1.0
    with pytest.raises(UnwrittenKVError, match=r"position 2 \(block 2, slot 34\) in k_cache was never written"):
        check_cache_finite(k, v, cu, lens, table)
    k[2, 2] = 1.0
    check_cache_finite(k, v, cu, lens, table)
    table[0, 0] = 9
    with pytest.raises(BatchMetadataError, match=r"block_table\[0, 0\] = 9 is out of range for a cache of 4"):
        check_cache_finite(k, v, cu, lens, table)


def test_finite_check_reads_only_what_the_kernel_reads():
    cache, seqs = seed_cache(write_query_tokens=False)
    batch = seed_batch(cache, seqs)
    # the context contract reads ctx_len tokens; everything past them is poison and must not matter
    check_cache_finite(*paged_args(cache, batch), contract="context")
    # (positions past a sequence's blocks read block_table padding, block 0, which holds finite data:
    # only the poisoned tails of the last blocks show; the bookkeeping check sees all of them)
    with pytest.raises(UnwrittenKVError, match=f"positions in {SHAPE.num_seqs} sequences in all"):
        check_cache_finite(*paged_args(cache, batch), contract="full")


# ---------------------------------------------------------------------------------------------
# through attention(), and the cost of unchecked mode
# ---------------------------------------------------------------------------------------------
def test_attention_in_checked_mode_catches_the_seed_bug():
    cache, seqs = seed_cache(write_query_tokens=False)
    batch = seed_batch(cache, seqs)
    q = torch.randn(SHAPE.num_tokens, 2 * HEADS, HEAD, dtype=torch.float16)
    k_new, v_new = kv(SHAPE.num_tokens)
    with pytest.raises(UnwrittenKVError, match=f"sequence {seqs[-1]} \\(decode, query_len 1"):
        attention(q, cache, batch, k_new=k_new, v_new=v_new, decode_from_cache=True, checked=True, backend="reference")
    out = attention(q, cache, batch, k_new=k_new, v_new=v_new, checked=True, backend="reference")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("with_seq_ids", [True, False])
def test_attention_in_checked_mode_proves_the_reads_once(monkeypatch, with_seq_ids):
    """attention(checked=True) proves the reads once: by the bookkeeping (no cache scan), or,
    for a batch that does not name its sequences, by one scan of the poisoned cache; the planner
    under it does not scan again. The output is still right."""
    from pagedattn import paged_attention, reference
    from pagedattn.batch import BatchMetadata

    cache, seqs = seed_cache(write_query_tokens=True)
    batch = cache.batch(seqs, SHAPE.query_lens)
    if not with_seq_ids:
        batch = BatchMetadata.from_lens(SHAPE.query_lens, SHAPE.seq_lens, batch.block_table)
        assert getattr(batch, "seq_ids", None) is None
    scans, proofs = [], []
    real_scan, real_proof = checks.check_cache_finite, checks.check_batch_against_cache
    monkeypatch.setattr(checks, "check_cache_finite", lambda *a, **k: scans.append(1) or real_scan(*a, **k))
    monkeypatch.setattr(checks, "check_batch_against_cache", lambda *a, **k: proofs.append(1) or real_proof(*a, **k))
    q = torch.randn(SHAPE.num_tokens, 2 * HEADS, HEAD, dtype=torch.float16)
    out = attention(q, cache, batch, checked=True, backend="reference")
    assert (len(proofs), len(scans)) == (1, 0 if with_seq_ids else 1)
    expect = reference.attention(q, *paged_args(cache, batch))
    torch.testing.assert_close(out, expect.to(q.dtype), atol=2e-3, rtol=2e-3)
    scans.clear()  # the planner alone in checked mode scans the reads itself, once
    paged_attention(q, *paged_args(cache, batch), checked=True, backend="reference")
    assert scans == [1]


def test_unchecked_mode_runs_no_checks(monkeypatch):
    from pagedattn.kernels import write as write_kernels

    def forbidden(*args, **kwargs):
        raise AssertionError("a check ran in unchecked mode")

    for name in ("check_batch_against_cache", "check_cache_finite", "check_allocator"):
        monkeypatch.setattr(checks, name, forbidden)
    real_slot_check = write_kernels.check_slot_values

    def range_only(slot_mapping, *, num_slots, duplicates=True):
        # slot ranges are validated by default on CPU (free there); the checked-mode scan is not
        if duplicates:
            forbidden()
        return real_slot_check(slot_mapping, num_slots=num_slots, duplicates=False)

    monkeypatch.setattr(write_kernels, "check_slot_values", range_only)
    cache, seqs = seed_cache(write_query_tokens=True)
    other = cache.fork(seqs[0])
    cache.append([other], *kv(3), [3])
    cache.free(other)
    batch = cache.batch(seqs, SHAPE.query_lens)
    q = torch.randn(SHAPE.num_tokens, 2 * HEADS, HEAD, dtype=torch.float16)
    attention(q, cache, batch, backend="reference")


def test_check_allocator_finds_corruption():
    cache = PagedKVCache(8, block_size=4, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float16)
    a = cache.new_sequence()
    cache.append([a], *kv(5), [5])
    check_allocator(cache)
    cache._refcounts[cache.block_table(a)[0]] += 1
    with pytest.raises(ContractError, match="refcount 2 but 1 block table"):
        check_allocator(cache)
