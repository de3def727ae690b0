"""PagedKVCache: allocator, copy-on-write, poison, append across block boundaries, batch metadata."""

from __future__ import annotations

import random

import pytest
import torch

from pagedattn.cache import PagedKVCache
from pagedattn.checks import check_allocator
from pagedattn.errors import (
    BatchMetadataError,
    CacheFullError,
    DTypeError,
    ScaleError,
    SequenceError,
    ShapeError,
    SlotConflictError,
    UnsupportedConfigError,
)
from pagedattn.kernels.write import quantize_fp8
from pagedattn.reference import gather_sequence

HEADS, HEAD = 2, 8


def small_cache(num_blocks=16, block_size=4, **kw) -> PagedKVCache:
    kw.setdefault("dtype", torch.float32)
    return PagedKVCache(num_blocks, block_size=block_size, num_kv_heads=HEADS, head_size=HEAD, **kw)


def kv(num_tokens, dtype=torch.float32):
    return torch.randn(num_tokens, HEADS, HEAD).to(dtype), torch.randn(num_tokens, HEADS, HEAD).to(dtype)


def gathered(cache, seq_id, which="k"):
    t = cache.k if which == "k" else cache.v
    return (
        gather_sequence(t, torch.tensor(cache.block_table(seq_id)), cache.seq_len(seq_id), dtype=t.dtype)
        if not cache.is_fp8
        else gather_sequence(t, torch.tensor(cache.block_table(seq_id)), cache.seq_len(seq_id))
    )


def snapshot(cache):
    """Everything an error must leave unchanged, bit for bit."""
    return (
        {s: (cache.block_table(s), cache.seq_len(s)) for s in cache.sequences},
        [cache.refcount(b) for b in range(cache.num_blocks)],
        cache.free_blocks,
        cache.k.view(torch.uint8).clone() if cache.is_fp8 else cache.k.clone(),
        cache.v.view(torch.uint8).clone() if cache.is_fp8 else cache.v.clone(),
        cache.written.clone(),
    )


def assert_same(a, b):
    assert a[:3] == b[:3]
    for x, y in zip(a[3:], b[3:]):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------------
def test_construction_and_attributes():
    cache = PagedKVCache(8, block_size=16, num_kv_heads=4, head_size=24, dtype=torch.float16)
    assert cache.k.shape == cache.v.shape == (8, 16, 4, 24)
    assert cache.k.dtype == cache.cache_dtype == cache.dtype == torch.float16 and not cache.is_fp8
    assert (cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_size) == (8, 16, 4, 24)
    assert cache.device == torch.device("cpu") and cache.poison and not cache.checked
    assert cache.num_free_blocks == 8 and torch.isnan(cache.k).all() and torch.isnan(cache.v).all()
    fp8 = PagedKVCache(4, block_size=8, num_kv_heads=1, head_size=16, kv_dtype="fp8_e5m2", k_scale=0.5, v_scale=2.0)
    assert fp8.is_fp8 and fp8.k.dtype == fp8.cache_dtype == torch.float8_e5m2 and fp8.dtype == torch.bfloat16
    assert (fp8.k_scale, fp8.v_scale) == (0.5, 2.0)
    assert torch.isnan(fp8.k.float()).all() and torch.isnan(fp8.v.float()).all()


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(num_blocks=0), UnsupportedConfigError),
        (dict(num_blocks=4, block_size=3), UnsupportedConfigError),
        (dict(num_blocks=4, head_size=512), UnsupportedConfigError),
        (dict(num_blocks=4, dtype=torch.int8), DTypeError),
        (dict(num_blocks=4, kv_dtype="int4"), UnsupportedConfigError),
        (dict(num_blocks=4, kv_dtype="fp8", k_scale=0.0), ScaleError),
        (dict(num_blocks=4, v_scale=float("nan")), ScaleError),
    ],
)
def test_construction_validates(kwargs, error):
    with pytest.raises(error):
        PagedKVCache(**kwargs)


# ---------------------------------------------------------------------------------------------
# append
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 2, 4, 8, 16, 32])
def test_append_across_block_boundaries(block_size):
    rng = random.Random(block_size)
    cache = small_cache(num_blocks=96 // block_size + 8, block_size=block_size, checked=True)
    seqs = [cache.new_sequence() for _ in range(3)]
    want_k = {s: [] for s in seqs}
    want_v = {s: [] for s in seqs}
    for _ in range(4):
        lens = [rng.choice([0, 1, rng.randint(1, 2 * block_size + 1)]) for _ in seqs]
        k, v = kv(sum(lens))
        cache.append(seqs, k, v, lens)
        for s, part_k, part_v in zip(seqs, k.split(lens), v.split(lens)):
            want_k[s].append(part_k)
            want_v[s].append(part_v)
    for s in seqs:
        length = sum(p.shape[0] for p in want_k[s])
        assert cache.seq_len(s) == length
        assert len(cache.block_table(s)) == -(-length // block_size)
        assert torch.equal(gathered(cache, s, "k"), torch.cat(want_k[s]))
        assert torch.equal(gathered(cache, s, "v"), torch.cat(want_v[s]))
        assert cache.written_mask(s).all()
    # nothing else was written: every slot outside the sequences still holds the poison
    written = cache.written.sum().item()
    assert written == sum(cache.seq_len(s) for s in seqs)
    assert torch.isnan(cache.k[~cache.written]).all()


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_append_fp8_quantizes_with_scales(kv_dtype):
    cache = small_cache(kv_dtype=kv_dtype, k_scale=0.25, v_scale=4.0, dtype=torch.float16)
    s = cache.new_sequence()
    k, v = kv(11, torch.float16)
    k[0, 0, 0] = 6e4  # far beyond the fp8 range once divided by 0.25: saturates
    cache.append([s], k, v, [11])
    table = torch.tensor(cache.block_table(s))
    got_k = gather_sequence(cache.k.view(torch.uint8), table, 11, dtype=torch.uint8)
    assert torch.equal(got_k, quantize_fp8(k, 0.25, cache.cache_dtype).view(torch.uint8))
    dequant = gather_sequence(cache.k, table, 11, scale=0.25)
    assert dequant[0, 0, 0] == torch.finfo(cache.cache_dtype).max * 0.25
    assert torch.isfinite(dequant).all()
    torch.testing.assert_close(gather_sequence(cache.v, table, 11, scale=4.0), v.float(), rtol=0.13, atol=1e-2)


def test_append_validates_before_mutating():
    cache = small_cache()
    s = cache.new_sequence()
    cache.append([s], *kv(3), [3])
    before = snapshot(cache)
    k, v = kv(4)
    with pytest.raises(ShapeError, match="sum\\(query_lens\\)"):
        cache.append([s], k, v, [5])
    with pytest.raises(DTypeError, match="query dtype"):
        cache.append([s], k.half(), v.half(), [4])
    with pytest.raises(BatchMetadataError, match="more than once"):
        cache.append([s, s], k, v, [2, 2])
    with pytest.raises(BatchMetadataError, match="query_lens\\[0\\] must be an int >= 0"):
        cache.append([s], k, v, [-4])
    with pytest.raises(SequenceError, match="sequence 7 is unknown"):
        cache.append([7], k, v, [4])
    assert_same(before, snapshot(cache))


def test_cache_full_leaves_everything_unchanged():
    cache = small_cache(num_blocks=6, block_size=4)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append([a, b], *kv(10), [6, 4])  # a: 2 blocks, b: 1 block
    c = cache.fork(a)  # shares a's partial last block
    before = snapshot(cache)
    # a: copy-on-write (1) + 2 more blocks; b: 2 blocks; c: none (a copied out, so c owns the
    # partial block alone and 2 tokens fit in it) -> 5 needed, 3 free
    with pytest.raises(CacheFullError) as info:
        cache.append([a, b, c], *kv(15), [7, 6, 2])
    assert "needs 5 free blocks" in str(info.value) and "only 3 of 6 are free" in str(info.value)
    assert_same(before, snapshot(cache))
    check_allocator(cache)


# ---------------------------------------------------------------------------------------------
# allocator: refcounts, fork, free, copy-on-write
# ---------------------------------------------------------------------------------------------
def test_fork_shares_blocks_and_free_returns_them():
    cache = small_cache(num_blocks=8, block_size=4)
    a = cache.new_sequence()
    cache.append([a], *kv(9), [9])  # 3 blocks
    b = cache.fork(a)
    assert cache.block_table(b) == cache.block_table(a) and cache.seq_len(b) == 9
    assert all(cache.refcount(x) == 2 for x in cache.block_table(a))
    assert cache.num_free_blocks == 5
    cache.free(a)
    assert all(cache.refcount(x) == 1 for x in cache.block_table(b)) and cache.num_free_blocks == 5
    blocks = cache.block_table(b)
    cache.free(b)
    assert cache.num_free_blocks == 8 and all(cache.refcount(x) == 0 for x in blocks)
    # freed blocks are poisoned and no longer marked written
    assert torch.isnan(cache.k[blocks]).all() and torch.isnan(cache.v[blocks]).all()
    assert not cache.written[blocks].any()
    for call in (cache.seq_len, cache.block_table, cache.free, cache.fork, cache.written_mask):
        with pytest.raises(SequenceError, match="sequence 1 was freed"):
            call(b)


def test_copy_on_write_leaves_the_other_sequence_bit_identical():
    cache = small_cache(num_blocks=8, block_size=4, checked=True)
    a = cache.new_sequence()
    cache.append([a], *kv(6), [6])  # last block half full
    b = cache.fork(a)
    a_k, a_v, a_table = gathered(cache, a, "k").clone(), gathered(cache, a, "v").clone(), cache.block_table(a)
    shared_last = a_table[-1]
    k, v = kv(3)
    cache.append([b], k, v, [3])
    assert cache.block_table(a) == a_table
    assert torch.equal(gathered(cache, a, "k"), a_k) and torch.equal(gathered(cache, a, "v"), a_v)
    assert cache.block_table(b)[0] == a_table[0] and cache.block_table(b)[1] != shared_last
    assert cache.refcount(a_table[0]) == 2 and cache.refcount(shared_last) == 1
    assert torch.equal(gathered(cache, b, "k"), torch.cat([a_k, k]))
    # a now owns its last block alone: appending to it writes in place
    cache.append([a], *kv(1), [1])
    assert cache.block_table(a) == a_table
    assert torch.equal(gathered(cache, b, "k"), torch.cat([a_k, k]))


def test_copy_on_write_when_both_sharers_append_in_one_call():
    cache = small_cache(num_blocks=8, block_size=4, checked=True)
    a = cache.new_sequence()
    cache.append([a], *kv(5), [5])
    b = cache.fork(a)
    free_before = cache.num_free_blocks
    k, v = kv(2)
    cache.append([a, b], k, v, [1, 1])
    # a copies out of the shared block; b then owns it alone and writes in place
    assert cache.num_free_blocks == free_before - 1
    assert cache.block_table(a)[-1] != cache.block_table(b)[-1]
    assert gathered(cache, a, "k")[5].equal(k[0]) and gathered(cache, b, "k")[5].equal(k[1])


def test_no_block_is_handed_out_twice():
    cache = small_cache(num_blocks=12, block_size=2)
    seqs = [cache.new_sequence() for _ in range(4)]
    cache.append(seqs, *kv(12), [3, 3, 3, 3])
    owned = [b for s in seqs for b in cache.block_table(s)]
    assert len(owned) == len(set(owned)) == 8
    assert not set(owned) & set(cache.free_blocks)


def test_refcount_rejects_bad_blocks():
    cache = small_cache(num_blocks=4)
    with pytest.raises(BatchMetadataError, match="block 4 is out of range for a cache of 4 blocks"):
        cache.refcount(4)


# ---------------------------------------------------------------------------------------------
# reserve / write / slot mapping
# ---------------------------------------------------------------------------------------------
def test_reserve_writes_nothing_and_slot_mapping_addresses_it():
    cache = small_cache(num_blocks=8, block_size=4)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.reserve([a, b], [5, 2])
    assert (cache.seq_len(a), cache.seq_len(b)) == (5, 2)
    assert not cache.written_mask(a).any() and torch.isnan(gathered(cache, a)).all()
    slots = cache.slot_mapping([a, b], [2, 2])
    ta, tb = cache.block_table(a), cache.block_table(b)
    assert slots.tolist() == [ta[0] * 4 + 3, ta[1] * 4 + 0, tb[0] * 4 + 0, tb[0] * 4 + 1]
    k, v = kv(4)
    cache.write([a, b], k, v, [2, 2])
    assert cache.written_mask(a).tolist() == [False, False, False, True, True]
    assert torch.equal(gathered(cache, a)[3:], k[:2])
    with pytest.raises(BatchMetadataError, match="query_len 3 exceeds its 2 reserved tokens"):
        cache.slot_mapping([b], [3])


def test_write_refuses_shared_blocks():
    cache = small_cache(num_blocks=8, block_size=4)
    a = cache.new_sequence()
    cache.reserve(a, 3)
    cache.fork(a)  # a second owner of the blocks
    before = snapshot(cache)
    with pytest.raises(SlotConflictError, match="shared with sequences \\[1\\]"):
        cache.write([a], *kv(1), [1])
    assert_same(before, snapshot(cache))


# ---------------------------------------------------------------------------------------------
# poison
# ---------------------------------------------------------------------------------------------
def test_poison_makes_unwritten_reads_nan_and_can_be_turned_off():
    cache = small_cache(num_blocks=4, block_size=4)
    s = cache.new_sequence()
    cache.append([s], *kv(2), [2])
    block = cache.block_table(s)[0]
    assert torch.isfinite(cache.k[block, :2]).all() and torch.isnan(cache.k[block, 2:]).all()
    quiet = small_cache(num_blocks=4, block_size=4, poison=False)
    quiet.k.zero_()
    t = quiet.new_sequence()
    quiet.append([t], *kv(2), [2])
    quiet.free(t)
    assert not torch.isnan(quiet.k).any()  # no fill on allocate or free


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3", "fp8_e5m2"])
def test_cache_poison_is_the_raw_poison_pattern(kv_dtype):
    """PagedKVCache poisons with pagedattn.poison's bits, so check_cache_finite and forensics read
    its unwritten slots as unwritten and a NaN written through it as the user's."""
    from pagedattn.poison import is_poison

    cache = small_cache(num_blocks=4, block_size=4, kv_dtype=kv_dtype, k_scale=0.5, v_scale=0.5)
    assert is_poison(cache.k).all() and is_poison(cache.v).all()
    s = cache.new_sequence()
    k, v = kv(3)
    k[1] = float("nan")
    cache.append([s], k, v, [3])
    block = cache.block_table(s)[0]
    assert not is_poison(cache.k[block, :3]).any() and torch.isnan(cache.k[block, 1].float()).all()
    assert is_poison(cache.k[block, 3:]).all()
    cache.free(s)
    assert is_poison(cache.k).all() and is_poison(cache.v).all()


def test_reused_block_is_repoisoned():
    cache = small_cache(num_blocks=1, block_size=4)
    a = cache.new_sequence()
    cache.append([a], *kv(4), [4])
    cache.free(a)
    b = cache.new_sequence()
    cache.reserve(b, 1)
    assert cache.block_table(b) == [0] and torch.isnan(cache.k[0]).all() and not cache.written[0].any()


# ---------------------------------------------------------------------------------------------
# batch metadata
# ---------------------------------------------------------------------------------------------
def test_batch_full_contract():
    cache = small_cache(num_blocks=16, block_size=4)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append([a, b], *kv(14), [13, 1])
    batch = cache.batch([a, b], [5, 1])
    assert batch.cu_seqlens_q.tolist() == [0, 5, 6] and batch.seq_lens.tolist() == [13, 1]
    assert batch.block_table.tolist() == [cache.block_table(a), cache.block_table(b) + [0, 0, 0]]
    assert batch.block_table.dtype == torch.int32 and batch.seq_lens.device == cache.device
    assert batch.seq_ids == (a, b) and batch.contract == "full"
    assert batch.query_lens_host == (5, 1) and (batch.max_query_len, batch.max_seq_len) == (5, 13)
    batch.validate(num_blocks=cache.num_blocks, block_size=cache.block_size, num_tokens=6)
    with pytest.raises(BatchMetadataError, match="query_len 2 exceeds its 1 tokens"):
        cache.batch([a, b], [1, 2])


def test_batch_context_contract():
    cache = small_cache(num_blocks=16, block_size=4)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append([a, b], *kv(12), [8, 4])
    batch = cache.batch([a, b], [3, 1], contract="context")
    assert batch.seq_lens.tolist() == [11, 5] and batch.host_ctx_lens() == (8, 4)
    assert cache.seq_len(a) == 8 and len(cache.block_table(a)) == 2  # not extended
    assert batch.block_table.shape == (2, 3)  # wide enough for ceil(11 / 4) blocks, padded with 0
    assert batch.block_table[0].tolist() == cache.block_table(a) + [0]
    batch.validate(num_blocks=cache.num_blocks, block_size=cache.block_size, num_tokens=4)
    with pytest.raises(UnsupportedConfigError, match="contract"):
        cache.batch([a], [1], contract="partial")


def test_context_batch_with_decode_from_cache_counts_the_appended_token_once():
    cache = PagedKVCache(16, block_size=4, num_kv_heads=1, head_size=8, dtype=torch.float32)
    prefill, decode = cache.new_sequence(), cache.new_sequence()
    cache.append([prefill, decode], torch.randn(9, 1, 8), torch.randn(9, 1, 8), [3, 6])
    # the prefill's 5 new tokens come as k_new/v_new; the decode token was appended (6 -> 7)
    cache.append([decode], torch.randn(1, 1, 8), torch.randn(1, 1, 8), [1])
    plain = cache.batch([prefill, decode], [5, 1], contract="context")
    from_cache = cache.batch([prefill, decode], [5, 1], contract="context", decode_from_cache=True)
    assert plain.host_seq_lens() == (8, 8)
    assert from_cache.host_seq_lens() == (8, 7)
    empty = cache.new_sequence()
    with pytest.raises(BatchMetadataError, match="decode_from_cache"):
        cache.batch([empty], [1], contract="context", decode_from_cache=True)
