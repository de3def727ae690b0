"""Edge semantics, each pinned against the reference (and, where the answer is known in closed
form, against that): empty sequences, very long sequences, caches past 2^31 elements, fp8
saturation, a window of 1, decode_from_cache, and split-KV with more splits than keys.

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1) at small shapes; the
tests marked `gpu` need CUDA."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pagedattn import paged_attention, reference
from pagedattn.config import AttentionConfig, BatchShape
from pagedattn.kernels.write import quantize_fp8, write_kv
from pagedattn.options import AttentionOptions
from pagedattn.planner import PagedAttention
from pagedattn.testing import (
    DEVICE,
    assert_close_to_reference,
    dispatch_plan,
    geometry,
    make_inputs,
    poisoned_like,
    run_both,
    split_plan,
)

pytestmark = pytest.mark.kernels

BASE = AttentionConfig(num_q_heads=4, num_kv_heads=2, head_size=32, block_size=16, dtype=torch.float32)
FP8_FORMATS = (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2))


def guarded_out(q: torch.Tensor, guard: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, out): out is q-shaped rows guard..guard+num_tokens of a NaN buffer, so a write
    to any row outside out (an empty sequence's "rows") lands in a guard row and shows."""
    buf = torch.full((q.shape[0] + 2 * guard, *q.shape[1:]), float("nan"), dtype=q.dtype, device=q.device)
    return buf, buf[guard : guard + q.shape[0]]


# ---------------------------------------------------------------------------------------------
# empty sequences
# ---------------------------------------------------------------------------------------------
EMPTY_MIXES = {
    # query_len 0 with context, seq_len 0, then real work between and after them
    "prefill": BatchShape((0, 4, 0, 7, 0), (9, 3, 0, 0, 33)),
    # decode-only (split-KV candidates) with empties first and last
    "decode": BatchShape((0, 1, 0, 1, 0), (0, 600, 17, 40, 0)),
    "one-token-prefill": BatchShape((1, 0), (0, 0)),
}


@pytest.mark.parametrize("contract", ["full", "context", "context-decode"])
@pytest.mark.parametrize("mix", list(EMPTY_MIXES))
def test_empty_sequences_write_only_the_rows_of_others(mix, contract):
    shape = EMPTY_MIXES[mix]
    config = BASE.replace(use_sinks=mix == "decode")
    x = make_inputs(config, shape, device=DEVICE, seed=5, contract=contract)
    buf, out = guarded_out(x.q)
    x.kernel(contract, out)
    ref = x.reference(contract)
    assert out.shape[0] == shape.num_tokens  # an empty sequence owns no rows
    assert torch.isnan(buf[:2]).all() and torch.isnan(buf[-2:]).all(), "a write landed outside out"
    assert_close_to_reference(out, ref, config.dtype, f"{mix} {contract}")


@pytest.mark.parametrize("contract", ["full", "context"])
def test_batch_of_only_empty_queries_writes_nothing(contract):
    shape = BatchShape((0, 0, 0), (5, 0, 40))
    x = make_inputs(BASE, shape, device=DEVICE, contract=contract)
    buf, out = guarded_out(x.q)
    assert out.shape[0] == 0
    x.kernel(contract, out)
    assert torch.isnan(buf).all()


# ---------------------------------------------------------------------------------------------
# long sequences: positions past 2^17, and a cache past 2^31 elements
# ---------------------------------------------------------------------------------------------
def test_decode_over_131k_tokens():
    """One decode sequence of 131072 keys through split-KV (positions past 2^17, many partitions
    merged). A GPU runs the plan dispatch chooses; the interpreter runs that plan with 256-key
    tiles (a quarter of the interpreted iterations: this test took 2 of CI's 15 minutes)."""
    config = AttentionConfig(num_q_heads=2, num_kv_heads=1, head_size=16, block_size=256, dtype=torch.float32)
    shape = BatchShape((1,), (131072,))
    if torch.device(DEVICE).type == "cuda":
        out, ref = run_both(config, shape, "full", seed=1)
        assert_close_to_reference(out, ref, config.dtype, "decode at 131k")
        return
    x = make_inputs(config, shape, device=DEVICE, seed=1)
    base = dispatch_plan(config, shape, max_seq_len=131072)
    assert base.num_splits > 8, base  # the point: a long sequence split into many partitions
    wide = dataclasses.replace(base, block_n=256, partition_size=-(-base.partition_size // 256) * 256)
    attn = PagedAttention(**geometry(config), dtype=torch.float32, device=DEVICE)
    attn.plan(x.cu_seqlens_q, x.seq_lens, x.block_table, dispatch_plan=wide)
    out = attn.run(x.q, x.k_cache, x.v_cache, out=poisoned_like(x.q))
    ref = x.reference()
    assert_close_to_reference(out, ref, config.dtype, f"decode at 131k [{wide.params()}]")


def test_windowed_prefill_and_decode_at_131k_positions():
    """Cheap on the interpreter: a window keeps the keys read few, the positions stay past 2^17."""
    config = AttentionConfig(
        num_q_heads=4,
        num_kv_heads=1,
        head_size=16,
        block_size=256,
        dtype=torch.float16,
        sliding_window=100,
        use_alibi=True,
    )
    shape = BatchShape((3, 1), (131069, 131100))
    for contract in ("full", "context-decode"):
        out, ref = run_both(config, shape, contract, seed=2)
        assert_close_to_reference(out, ref, config.dtype, f"window at 131k {contract}")


@pytest.mark.bigmem
@pytest.mark.gpu
@pytest.mark.parametrize("query_lens", [(1, 1), (37, 1)], ids=["decode", "mixed"])
def test_cache_past_2_31_elements(query_lens):
    """An fp8 cache of 2^31 + elements (k and v ~2.2 GB each): the launcher switches to 64-bit
    offsets; the sequences' blocks sit at the end, so every slot read lies past element 2^31."""
    block_size, num_kv_heads, head_size = 16, 1, 128
    per_block = block_size * num_kv_heads * head_size
    num_blocks = 2**31 // per_block + 64
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    fp8 = torch.float8_e4m3fn
    k_cache = torch.empty(shape, dtype=fp8, device="cuda")
    v_cache = torch.empty(shape, dtype=fp8, device="cuda")
    assert k_cache.numel() >= 2**31
    ctx_lens = (300, 555)
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    need = [math.ceil(s / block_size) for s in seq_lens]
    ids = torch.arange(num_blocks - sum(need), num_blocks, device="cuda", dtype=torch.int32).flip(0)
    assert int(ids.min()) * per_block >= 2**31
    block_table = torch.zeros(2, max(need), dtype=torch.int32, device="cuda")
    block_table[0, : need[0]] = ids[: need[0]]
    block_table[1, : need[1]] = ids[need[0] :]
    g = torch.Generator(device="cuda").manual_seed(0)
    k_scale, v_scale = 0.05, 0.07
    for i, s in enumerate(seq_lens):
        pos = torch.arange(s, device="cuda")
        slots = block_table[i].long()[pos // block_size] * block_size + pos % block_size
        k = torch.randn(s, num_kv_heads, head_size, device="cuda", generator=g, dtype=torch.float16)
        v = torch.randn(s, num_kv_heads, head_size, device="cuda", generator=g, dtype=torch.float16)
        write_kv(k, v, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, 8, head_size, device="cuda", dtype=torch.float16, generator=g)
    cu = torch.tensor([0, query_lens[0], num_tokens], dtype=torch.int32, device="cuda")
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    paged_attention(
        q,
        k_cache,
        v_cache,
        cu,
        seq_lens_t,
        block_table,
        k_scale=k_scale,
        v_scale=v_scale,
        out=out,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        backend="triton",
    )
    ref = reference.attention(q, k_cache, v_cache, cu, seq_lens_t, block_table, k_scale=k_scale, v_scale=v_scale)
    assert_close_to_reference(out, ref, torch.float16, "cache past 2^31 elements")


# ---------------------------------------------------------------------------------------------
# fp8 saturation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype, fp8", FP8_FORMATS)
def test_fp8_write_saturates_large_values_never_inf(kv_dtype, fp8):
    fp8_max = torch.finfo(fp8).max
    k = torch.tensor([1e6, -1e6, 3e38, -3e38]).repeat_interleave(16).reshape(4, 1, 16)
    k_cache = torch.full((1, 16, 1, 16), float("nan")).to(fp8).to(DEVICE)
    v_cache = torch.full((1, 16, 1, 16), float("nan")).to(fp8).to(DEVICE)
    write_kv(k.to(DEVICE), (-k).to(DEVICE), k_cache, v_cache, torch.arange(4, device=DEVICE), k_scale=1.0, v_scale=1.0)
    stored = k_cache[0, :4].float().cpu()
    assert torch.isfinite(stored).all(), f"{kv_dtype}: saturation produced inf/NaN"
    expected = torch.tensor([fp8_max, -fp8_max, fp8_max, -fp8_max]).reshape(4, 1, 1).expand(4, 1, 16)
    assert torch.equal(stored, expected)
    assert torch.equal(v_cache[0, :4].float().cpu(), -expected)
    assert torch.equal(k_cache[0, :4].cpu().view(torch.uint8), quantize_fp8(k, 1.0, fp8).view(torch.uint8))


@pytest.mark.parametrize("contract", ["full", "context"])
@pytest.mark.parametrize("kv_dtype, fp8", FP8_FORMATS)
def test_attention_over_saturated_fp8_cache_stays_finite(kv_dtype, fp8, contract):
    """K/V written at 1e6 x scale saturate; attention over them is finite and equals the
    reference on the dequantized (saturated) cache."""
    config = BASE.replace(kv_dtype=kv_dtype, dtype=torch.float16, num_q_heads=4, num_kv_heads=1, head_size=16)
    shape = BatchShape((3, 1), (20, 40))
    x = make_inputs(config, shape, device=DEVICE, seed=9, contract=contract)
    # rewrite every written slot with huge values through write_kv (the saturating path)
    bs = config.block_size
    fp8_max = torch.finfo(fp8).max
    for i, (ql, sl) in enumerate(zip(shape.query_lens, shape.seq_lens)):
        n = sl if contract == "full" else sl - ql
        pos = torch.arange(n, device=DEVICE)
        slots = x.block_table[i].long()[pos // bs] * bs + pos % bs
        big = torch.randn(n, 1, 16, device=DEVICE).sign().half() * 6e4  # fp16 max is 65504
        write_kv(
            big, big.abs(), x.k_cache, x.v_cache, slots, k_scale=x.options["k_scale"], v_scale=x.options["v_scale"]
        )
    x.q = x.q * 1e-4  # keeps logits moderate: the saturated keys are ~1e5 after dequantization
    assert torch.isfinite(x.k_cache[x.block_table[1, 0].long()].float()).all()
    out = poisoned_like(x.q)
    x.kernel(contract, out)
    ref = x.reference(contract)
    assert torch.isfinite(out.float()).all()
    saturated_v = fp8_max * x.options["v_scale"]  # every cached V element dequantizes to this
    if contract == "full":  # the weights sum to 1 over keys that all hold saturated_v
        assert torch.allclose(out.float(), torch.full_like(out.float(), saturated_v), rtol=2e-3)
    assert float(ref.max()) > 0.5 * saturated_v
    assert_close_to_reference(out.float() / saturated_v, ref / saturated_v, config.dtype, f"saturated {kv_dtype}")


# ---------------------------------------------------------------------------------------------
# window of 1, decode_from_cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("contract", ["full", "context", "context-decode"])
def test_window_1_sees_only_itself(contract):
    config = BASE.replace(sliding_window=1)
    shape = BatchShape((5, 1, 17, 1), (11, 40, 0, 0))
    x = make_inputs(config, shape, device=DEVICE, seed=4, contract=contract)
    out = poisoned_like(x.q)
    x.kernel(contract, out)
    ref = x.reference(contract)
    assert_close_to_reference(out, ref, config.dtype, f"window 1 {contract}")
    # closed form: each row's output is its own token's V, repeated over the query heads of its KV head
    own_v = x.v_new.float().repeat_interleave(config.num_queries_per_kv, dim=1)
    assert_close_to_reference(out, own_v, config.dtype, "window 1 = own V")


def test_decode_from_cache_reads_the_cache_not_k_new():
    """decode_from_cache=True: a decode sequence reads its own token from the cache (written with
    different values than k_new/v_new); prefill sequences still take theirs from k_new/v_new and
    never read their query tokens' cache slots (left NaN)."""
    shape = BatchShape((1, 6, 1), (30, 9, 0))
    x = make_inputs(BASE, shape, device=DEVICE, seed=6, contract="context")
    other_k, other_v = torch.randn_like(x.k_new), torch.randn_like(x.v_new)
    x.write_decode_tokens(other_k, other_v)
    decode_rows = torch.tensor([0, 7])
    out = poisoned_like(x.q)
    x.kernel("context-decode", out)
    assert torch.isfinite(out).all(), "a prefill row read an unwritten (NaN) cache slot"
    assert_close_to_reference(out, x.reference("context-decode"), BASE.dtype, "decode_from_cache")
    # the closed form of the decode rows: the reference over a cache that holds other_k/other_v
    swapped = dataclasses.replace(x, k_new=x.k_new.clone(), v_new=x.v_new.clone())
    swapped.k_new[decode_rows], swapped.v_new[decode_rows] = other_k[decode_rows], other_v[decode_rows]
    assert_close_to_reference(
        out[decode_rows],
        swapped.reference("context")[decode_rows],
        BASE.dtype,
        "decode rows = context contract with the cached K/V",
    )
    # and without decode_from_cache the decode rows use k_new/v_new: a different answer
    plain = poisoned_like(x.q)
    x.kernel("context", plain)
    assert_close_to_reference(plain, x.reference("context"), BASE.dtype, "context contract")
    assert not torch.allclose(plain[decode_rows], out[decode_rows])
    assert torch.equal(plain[1:7], out[1:7])  # prefill rows are the same either way


def test_decode_from_cache_with_unwritten_decode_token_reads_nan():
    """The seed's bug, pinned: with decode_from_cache=True and the decode token's K/V never
    written to the cache, exactly that sequence's rows read the poison (the reference agrees)."""
    shape = BatchShape((4, 1), (10, 25))
    x = make_inputs(BASE, shape, device=DEVICE, seed=8, contract="context")
    out = poisoned_like(x.q)
    x.kernel("context-decode", out)
    ref = x.reference("context-decode")
    assert torch.isnan(ref[4]).all() and torch.isnan(out[4]).all()
    assert_close_to_reference(out[:4], ref[:4], BASE.dtype, "prefill rows unaffected")


# ---------------------------------------------------------------------------------------------
# split-KV with more splits than keys
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [{}, dict(use_sinks=True), dict(sliding_window=5, use_alibi=True)],
    ids=["plain", "sinks", "window-alibi"],
)
def test_split_kv_with_more_partitions_than_keys(options):
    """max_seq_len is an upper bound: a far larger one plans many partitions; sequences shorter
    than one partition leave most splits empty (and a 1-token sequence all but the first)."""
    config = BASE.replace(**options)
    shape = BatchShape((1, 1, 1, 0), (300, 4, 0, 12))
    x = make_inputs(config, shape, device=DEVICE, seed=12)
    plan = dispatch_plan(BASE, shape, max_seq_len=16384)  # planned without the options, as for plain decode
    assert plan.kernel == "split_kv" and plan.num_splits * plan.partition_size > 4 * 301, plan
    out = poisoned_like(x.q)
    x.kernel("full", out, max_seq_len=16384)
    assert_close_to_reference(out, x.reference(), config.dtype, f"{plan.num_splits} splits")


def test_split_kv_forced_tiny_partitions():
    """A hand-made plan: 16 partitions of one key tile each over sequences of 1..70 keys."""
    config = BASE.replace(use_sinks=True)
    shape = BatchShape((1, 1, 1), (69, 0, 16))
    x = make_inputs(config, shape, device=DEVICE, seed=13)
    plan = split_plan(config, shape, 16)
    out = poisoned_like(x.q)
    options = AttentionOptions(scale=1 / math.sqrt(32), sinks=x.options["sinks"])
    attn = PagedAttention(options, **geometry(config), dtype=torch.float32, device=DEVICE)
    attn.plan(x.cu_seqlens_q, x.seq_lens, x.block_table, dispatch_plan=plan).run(x.q, x.k_cache, x.v_cache, out=out)
    assert_close_to_reference(out, x.reference(), config.dtype, "16 tiny partitions")


# ---------------------------------------------------------------------------------------------
# max_seq_len is a planning hint
# ---------------------------------------------------------------------------------------------
def test_understated_max_seq_len_still_exact():
    """Unchecked mode trusts max_seq_len only for planning: a hint below the true maximum plans
    too few split-KV partitions, and the last split must still run to the sequence's end
    (compat.vllm.unified_attention passes vLLM's max_seqlen_k straight through)."""
    shape = BatchShape((1, 1), (1500, 20))
    x = make_inputs(BASE, shape, device=DEVICE, seed=14)
    plan = dispatch_plan(BASE, shape, max_seq_len=700)
    assert plan.num_splits * plan.partition_size < 1501, plan  # the hint plans too few keys
    out = poisoned_like(x.q)
    x.kernel("full", out, max_seq_len=700, validate=False)  # on CPU the hint would be refused
    assert_close_to_reference(out, x.reference(), BASE.dtype, "max_seq_len hint 700 for 1501 keys")
