"""pagedattn.compat.vllm, tested the way vLLM's kernel tests are written (test_prefix_prefill.py,
test_triton_unified_attention.py): a random batch of 10 sequences, the last one a decode, a block
table drawn from a random permutation of the cache's blocks, caches filled through the write path
(reshape_and_cache / reshape_and_cache_flash) after being poisoned with NaN, outputs poisoned with
NaN, and every result compared with pagedattn.reference on nhd copies of the caches, in float32.

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1) at small shapes; the
`gpu` tests run the seed's full-size configuration on CUDA."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from pagedattn import reference
from pagedattn.compat.vllm import (
    chunked_prefill_paged_decode,
    context_attention_fwd,
    reshape_and_cache,
    reshape_and_cache_flash,
    unified_attention,
)
from pagedattn.errors import DTypeError, LayoutError, ScaleError, ShapeError, UnsupportedConfigError
from pagedattn.testing import assert_close_to_reference

FP8_NAN = 0x7F  # a NaN bit pattern in both float8_e4m3fn and float8_e5m2
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
DTYPE = torch.float16  # the seed's dtype


# ---------------------------------------------------------------------------------------------
# the batch, as vLLM's tests build it
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    query_lens: list[int]
    ctx_lens: list[int]
    seq_lens: list[int]
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    kv_cache_dtype: str
    query: torch.Tensor  # [num_tokens, num_heads, head_size]
    key: torch.Tensor  # [sum(seq_lens), num_kv_heads, head_size]: every position of every sequence
    value: torch.Tensor
    k: torch.Tensor  # the query tokens' rows of key/value, aligned with query
    v: torch.Tensor
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    b_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    b_seq_len: torch.Tensor  # int32 [num_seqs]
    num_blocks: int
    k_scale: torch.Tensor
    v_scale: torch.Tensor

    @property
    def fp8(self) -> torch.dtype | None:
        return FP8.get(self.kv_cache_dtype)

    @property
    def device(self) -> torch.device:
        return self.query.device


def make_batch(
    *,
    num_heads: int,
    num_queries_per_kv: int,
    head_size: int,
    kv_cache_dtype: str,
    num_seqs: int = 10,
    max_query_len: int = 24,
    max_ctx_len: int = 40,
    min_len: int = 1,
    block_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
) -> Batch:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    query_lens = [rng.randint(min_len, max_query_len) for _ in range(num_seqs)]
    query_lens[-1] = 1  # one sequence in the batch is a decode
    ctx_lens = [rng.randint(min_len, max_ctx_len) for _ in range(num_seqs)]
    seq_lens = [q + c for q, c in zip(query_lens, ctx_lens)]
    num_kv_heads = num_heads // num_queries_per_kv
    max_blocks = -(-max(seq_lens) // block_size)
    num_blocks = num_seqs * max_blocks + 3  # spare blocks stay poisoned
    block_table = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks].view(num_seqs, max_blocks)
    query = torch.randn(sum(query_lens), num_heads, head_size, generator=gen).to(DTYPE)
    kv = torch.randn(sum(seq_lens), 2, num_kv_heads, head_size, generator=gen).to(DTYPE)
    key, value = kv.unbind(dim=1)
    seq_start = [0]
    for s in seq_lens:
        seq_start.append(seq_start[-1] + s)
    new_rows = torch.cat([torch.arange(seq_start[i] + ctx_lens[i], seq_start[i + 1]) for i in range(num_seqs)])
    b_start_loc = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    # non-trivial scales, so a scale that is dropped or applied twice shows
    k_scale, v_scale = torch.tensor(0.37), torch.tensor(0.61)
    to = dict(device=device)
    return Batch(
        query_lens,
        ctx_lens,
        seq_lens,
        num_heads,
        num_kv_heads,
        head_size,
        block_size,
        kv_cache_dtype,
        query.to(**to),
        key.to(**to),
        value.to(**to),
        key[new_rows].contiguous().to(**to),
        value[new_rows].contiguous().to(**to),
        block_table.to(torch.int32).to(**to),
        b_start_loc.to(**to),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        num_blocks,
        k_scale.to(**to),
        v_scale.to(**to),
    )


def x_for(head_size: int, element_size: int) -> int:
    """vLLM's older layout packs x = 16 bytes of head_size together (fewer where head_size needs it)."""
    x = 16 // element_size
    while head_size % x:
        x //= 2
    return x


def poisoned_caches(b: Batch, layout: str, *written: str, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Caches as vLLM allocates them (fp8 as uint8 storage), every slot NaN; then the K/V of each
    `written` set of positions ("ctx", "decode", "all") written through `write` (with `pad`)."""
    nb, bs, kvh, d = b.num_blocks, b.block_size, b.num_kv_heads, b.head_size
    if layout == "flash":
        k_shape = v_shape = (nb, bs, kvh, d)
    else:
        x = x_for(d, 1 if b.fp8 else DTYPE.itemsize)
        k_shape, v_shape = (nb, kvh, d // x, bs, x), (nb, kvh, d, bs)
    poison = dict(fill_value=FP8_NAN, dtype=torch.uint8) if b.fp8 else dict(fill_value=float("nan"), dtype=DTYPE)
    k_cache, v_cache = torch.full(k_shape, **poison, device=b.device), torch.full(v_shape, **poison, device=b.device)
    for which in written:
        write(b, k_cache, v_cache, which, layout, pad=pad)
    return k_cache, v_cache


def positions(b: Batch, which: str) -> list[tuple[int, int]]:
    """(sequence, position) pairs: "ctx" (the cached prefix), "decode" (the decode tokens themselves),
    "all" (every position)."""
    pairs = []
    for i, (q, c, s) in enumerate(zip(b.query_lens, b.ctx_lens, b.seq_lens)):
        if which == "ctx":
            pairs += [(i, p) for p in range(c)]
        elif which == "decode":
            pairs += [(i, s - 1)] if q == 1 else []
        else:
            pairs += [(i, p) for p in range(s)]
    return pairs


def write(b: Batch, k_cache, v_cache, which: str, layout: str, pad: int = 0) -> None:
    """Write the K/V of `which` positions through vLLM's write ops, with a slot mapping built
    from the block table (and `pad` trailing padding tokens: slot -1, as CUDA-graph padding)."""
    seq_start = [0]
    for s in b.seq_lens:
        seq_start.append(seq_start[-1] + s)
    pairs = positions(b, which)
    table = b.block_table.cpu()
    rows = torch.tensor([seq_start[i] + p for i, p in pairs], dtype=torch.long, device=b.device)
    slots = [int(table[i, p // b.block_size]) * b.block_size + p % b.block_size for i, p in pairs]
    slot_mapping = torch.tensor(slots + [-1] * pad, dtype=torch.long, device=b.device)
    key, value = b.key[rows], b.value[rows]
    if pad:
        key = torch.cat([key, torch.randn_like(key[: pad + 2])])  # padded rows beyond the slots too
        value = torch.cat([value, torch.randn_like(value[: pad + 2])])
    op = reshape_and_cache_flash if layout == "flash" else reshape_and_cache
    op(key, value, k_cache, v_cache, slot_mapping, b.kv_cache_dtype, b.k_scale, b.v_scale)


def to_nhd(b: Batch, k_cache, v_cache, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies in [num_blocks, block_size, num_kv_heads, head_size] for the reference (fp8 as fp8)."""
    if b.fp8:
        k_cache, v_cache = k_cache.view(b.fp8), v_cache.view(b.fp8)
    if layout == "flash":
        return k_cache.clone(), v_cache.clone()
    nb, kvh, chunks, bs, x = k_cache.shape
    return (
        k_cache.permute(0, 3, 1, 2, 4).reshape(nb, bs, kvh, chunks * x).clone(),
        v_cache.permute(0, 3, 1, 2).contiguous(),
    )


def ref(b: Batch, k_cache, v_cache, layout: str, *, context: bool, decode_from_cache: bool = False, **options):
    k_nhd, v_nhd = to_nhd(b, k_cache, v_cache, layout)
    scales = dict(k_scale=b.k_scale, v_scale=b.v_scale) if b.fp8 else {}
    return reference.attention(
        b.query,
        k_nhd,
        v_nhd,
        b.b_start_loc,
        b.b_seq_len,
        b.block_table,
        k_new=b.k if context else None,
        v_new=b.v if context else None,
        decode_from_cache=decode_from_cache,
        **scales,
        **options,
    )


def decode_rows(b: Batch) -> torch.Tensor:
    rows = torch.zeros(sum(b.query_lens), dtype=torch.bool)
    for i, q in enumerate(b.query_lens):
        if q == 1:
            rows[int(b.b_start_loc[i])] = True
    return rows.to(b.device)


def context_args(b: Batch, out, k_cache, v_cache, sliding_window: int):
    """vLLM's positional call: (q, k, v, o, kv_cache_dtype, k_cache, v_cache, b_loc, b_start_loc,
    b_seq_len, max_seq_len, max_input_len, k_scale, v_scale), as its test passes them (including
    a max_seq_len below the true maximum: vLLM never relied on it)."""
    return (
        b.query,
        b.k,
        b.v,
        out,
        b.kv_cache_dtype,
        k_cache,
        v_cache,
        b.block_table,
        b.b_start_loc,
        b.b_seq_len,
        max(b.ctx_lens),
        max(b.query_lens),
        b.k_scale,
        b.v_scale,
    )


# ---------------------------------------------------------------------------------------------
# the seed's grid, CPU-sized: num_queries_per_kv {1, 8}, head size {24, 128}, window {0, 16},
# kv dtype {auto, fp8}. 2 query heads for ratio 1 (the seed: 64), 8 for ratio 8.
# ---------------------------------------------------------------------------------------------
GRID = [(qpk, d, sw, kv) for qpk in (1, 8) for d in (24, 128) for sw in (0, 16) for kv in ("auto", "fp8")]
CONTEXT_CASES = [
    (1, 128, 0, "auto"),
    (8, 24, 16, "fp8"),
    (1, 24, 16, "fp8_e5m2"),
    (8, 128, 0, "fp8"),
    (1, 24, 0, "float16"),
]  # vLLM's test spells the model dtype "float16"
# fp8 writes run a per-token kernel, slow in the interpreter: fp8 cases use one KV head here
UNIFIED_CASES = [(1, 128, 0, "auto"), (1, 24, 16, "auto"), (8, 24, 16, "fp8"), (8, 128, 0, "fp8_e5m2")]


def grid_id(p) -> str:
    qpk, d, sw, kv = p
    return f"qpk{qpk}-d{d}-sw{sw}-{kv}"


def small_batch(qpk, d, kv, seed=0) -> Batch:
    return make_batch(num_heads=2 if qpk == 1 else 8, num_queries_per_kv=qpk, head_size=d, kv_cache_dtype=kv, seed=seed)


@pytest.mark.parametrize("params", GRID, ids=grid_id)
def test_chunked_prefill_paged_decode(params):
    """The seed's op: prefills read ctx_len tokens from the cache and their own K/V from key/value;
    the decode reads all seq_len tokens from the cache, so its own token is written there first."""
    qpk, d, sw, kv = params
    b = small_batch(qpk, d, kv)
    k_cache, v_cache = poisoned_caches(b, "older", "ctx", "decode")
    out = torch.full_like(b.query, float("nan"))
    chunked_prefill_paged_decode(*context_args(b, out, k_cache, v_cache, sw), sliding_window=sw)
    expected = ref(b, k_cache, v_cache, "older", context=True, decode_from_cache=True, sliding_window=sw)
    assert_close_to_reference(out, expected, DTYPE, grid_id(params))


@pytest.mark.parametrize("params", CONTEXT_CASES, ids=grid_id)
def test_context_attention_fwd(params):
    qpk, d, sw, kv = params
    b = small_batch(qpk, d, kv, seed=1)
    k_cache, v_cache = poisoned_caches(b, "older", "ctx")
    out = torch.full_like(b.query, float("nan"))
    context_attention_fwd(*context_args(b, out, k_cache, v_cache, sw), sliding_window=sw)
    expected = ref(b, k_cache, v_cache, "older", context=True, sliding_window=sw)
    assert_close_to_reference(out, expected, DTYPE, grid_id(params))


def test_context_attention_fwd_skip_decode_leaves_decode_rows():
    b = small_batch(8, 24, "auto", seed=2)
    k_cache, v_cache = poisoned_caches(b, "older", "ctx")
    sentinel = torch.randn(b.query.shape, generator=torch.Generator().manual_seed(5)).to(DTYPE)
    out = sentinel.clone()
    context_attention_fwd(*context_args(b, out, k_cache, v_cache, 0), skip_decode=True)
    rows = decode_rows(b)
    assert torch.equal(out[rows], sentinel[rows]), "skip_decode=True must leave the decode rows of o untouched"
    expected = ref(b, k_cache, v_cache, "older", context=True)
    assert_close_to_reference(out[~rows], expected[~rows], DTYPE, "non-decode rows")


def test_context_attention_fwd_alibi():
    b = small_batch(8, 24, "auto", seed=3)
    k_cache, v_cache = poisoned_caches(b, "older", "ctx")
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(b.num_heads)])
    out = torch.full_like(b.query, float("nan"))
    context_attention_fwd(*context_args(b, out, k_cache, v_cache, 0), alibi_slopes=slopes)
    assert_close_to_reference(out, ref(b, k_cache, v_cache, "older", context=True, alibi_slopes=slopes), DTYPE, "alibi")


@pytest.mark.parametrize("params", UNIFIED_CASES, ids=grid_id)
def test_unified_attention(params):
    """Full-cache contract over the flash layout, called with vLLM's keywords (scratch buffers and
    a descale expanded to [num_seqs, num_kv_heads] included)."""
    qpk, d, sw, kv = params
    b = small_batch(qpk, d, kv, seed=4)
    k_cache, v_cache = poisoned_caches(b, "flash", "all", pad=3)
    k, v = (k_cache.view(b.fp8), v_cache.view(b.fp8)) if b.fp8 else (k_cache, v_cache)
    descale_shape = (len(b.seq_lens), b.num_kv_heads)
    out = torch.full_like(b.query, float("nan"))
    unified_attention(
        q=b.query,
        k=k,
        v=v,
        out=out,
        cu_seqlens_q=b.b_start_loc,
        max_seqlen_q=max(b.query_lens),
        seqused_k=b.b_seq_len,
        max_seqlen_k=max(b.seq_lens),
        softmax_scale=d**-0.5,
        causal=True,
        window_size=(sw - 1, 0) if sw else (-1, -1),
        block_table=b.block_table,
        softcap=0,
        q_descale=None,
        k_descale=b.k_scale.expand(descale_shape),
        v_descale=b.v_scale.expand(descale_shape),
        seq_threshold_3D=8,
        num_par_softmax_segments=16,
        softmax_segm_output=torch.empty(1),
        softmax_segm_max=torch.empty(1),
        softmax_segm_expsum=torch.empty(1),
    )
    expected = ref(b, k_cache, v_cache, "flash", context=False, sliding_window=sw)
    assert_close_to_reference(out, expected, DTYPE, grid_id(params))


def test_unified_attention_softcap_sinks():
    b = small_batch(8, 24, "auto", seed=6)
    k_cache, v_cache = poisoned_caches(b, "flash", "all")
    sinks = torch.randn(b.num_heads, generator=torch.Generator().manual_seed(7))
    out = torch.full_like(b.query, float("nan"))
    unified_attention(
        b.query,
        k_cache,
        v_cache,
        out,
        b.b_start_loc,
        max(b.query_lens),
        b.b_seq_len,
        max(b.seq_lens),
        24**-0.5,
        True,
        (7, 0),
        b.block_table,
        5.0,
        None,
        None,
        None,
        sinks=sinks,
    )
    expected = ref(b, k_cache, v_cache, "flash", context=False, sliding_window=8, softcap=5.0, sinks=sinks)
    assert_close_to_reference(out, expected, DTYPE, "softcap + sinks + window (7, 0)")


@pytest.mark.parametrize("op", ["context", "chunked", "unified"])
def test_caches_are_passed_in_place(op, monkeypatch):
    """No cache copy on the way to the kernels: the same memory (uint8 fp8 storage only re-viewed),
    with the layout named."""
    import pagedattn.compat.vllm as compat

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs, caches=[a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 4])

    b = small_batch(8, 24, "fp8", seed=9)
    layout = "flash" if op == "unified" else "older"
    k_cache, v_cache = poisoned_caches(b, layout)
    out = torch.empty_like(b.query)
    if op == "unified":
        monkeypatch.setattr(compat, "paged_attention", spy)
        unified_attention(
            b.query,
            k_cache.view(b.fp8),
            v_cache.view(b.fp8),
            out,
            b.b_start_loc,
            24,
            b.b_seq_len,
            64,
            0.2,
            True,
            (-1, -1),
            b.block_table,
            0,
            None,
            b.k_scale,
            b.v_scale,
        )
    else:
        monkeypatch.setattr(compat, "prefix_prefill", spy)
        fn = context_attention_fwd if op == "context" else chunked_prefill_paged_decode
        fn(*context_args(b, out, k_cache, v_cache, 0))
        assert seen["decode_from_cache"] == (op == "chunked")
    assert seen["kv_layout"] == ("nhd" if op == "unified" else "vllm_v0")
    assert [c.data_ptr() for c in seen["caches"]] == [k_cache.data_ptr(), v_cache.data_ptr()]
    assert all(c.dtype == b.fp8 for c in seen["caches"])


# ---------------------------------------------------------------------------------------------
# the seed's bug, as a test
# ---------------------------------------------------------------------------------------------
def test_seed_bug_unwritten_decode_token_poisons_exactly_its_rows():
    """The seed's configuration (num_queries_per_kv 1, head size 128, no window, auto), its test's
    mistake: only ctx_len tokens written, so the decode reads one unwritten slot. With the cache
    poisoned, exactly the decode token's rows (every head, every dim) are NaN; writing the decode
    token (the seed's Option 1 fix) makes the whole output match."""
    b = small_batch(1, 128, "auto", seed=0)
    k_cache, v_cache = poisoned_caches(b, "older", "ctx")  # the seed's test: ctx_len tokens only
    out = torch.full_like(b.query, float("nan"))
    chunked_prefill_paged_decode(*context_args(b, out, k_cache, v_cache, 0))
    rows = decode_rows(b)
    nan_rows = torch.isnan(out).flatten(1).any(dim=1)
    hint = (
        " (the decode rows are all 0: the kernel read the NaN slot and its final division turned NaN "
        "into 0, e.g. where(l > 0, acc / l, 0); use where(l == 0, 0, acc / l) so poison surfaces)"
        if not nan_rows.any() and bool((out[rows] == 0).all())
        else ""
    )
    assert torch.equal(nan_rows, rows), (
        f"NaN rows {nan_rows.nonzero().flatten().tolist()}, decode rows {rows.nonzero().flatten().tolist()}{hint}"
    )
    assert torch.isnan(out[rows]).all(), "every head and dim of the decode token reads the unwritten slot"
    expected = ref(b, k_cache, v_cache, "older", context=True, decode_from_cache=True)
    assert_close_to_reference(out[~rows], expected[~rows], DTYPE, "rows that read only written slots")

    write(b, k_cache, v_cache, "decode", "older")  # the fix
    out.fill_(float("nan"))
    chunked_prefill_paged_decode(*context_args(b, out, k_cache, v_cache, 0))
    expected = ref(b, k_cache, v_cache, "older", context=True, decode_from_cache=True)
    assert_close_to_reference(out, expected, DTYPE, "after writing the decode token")
    # and the decode token's output is the attention over the whole sequence, its own token included
    context_only = ref(b, k_cache, v_cache, "older", context=True)  # its own K/V from `key` instead
    assert_close_to_reference(out[rows], context_only[rows], DTYPE, "decode row vs context path")


# ---------------------------------------------------------------------------------------------
# the write path, checked against an independent scatter
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["older", "flash"])
@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
def test_reshape_and_cache_writes_exactly_the_mapped_slots(layout, kv):
    b = make_batch(num_heads=4, num_queries_per_kv=2, head_size=24, kv_cache_dtype=kv, num_seqs=4, seed=8)
    k_cache, v_cache = poisoned_caches(b, layout, "ctx", pad=2)
    k_nhd, v_nhd = to_nhd(b, k_cache, v_cache, layout)
    written = torch.zeros(b.num_blocks, b.block_size, dtype=torch.bool)
    seq_start = 0
    for i, (p_list, s) in enumerate(zip([range(c) for c in b.ctx_lens], b.seq_lens)):
        for p in p_list:
            blk, off = int(b.block_table[i, p // b.block_size]), p % b.block_size
            written[blk, off] = True
            for cache, src, scale in ((k_nhd, b.key, b.k_scale), (v_nhd, b.value, b.v_scale)):
                want = src[seq_start + p].float()
                if b.fp8:  # stored value = x / scale, saturated, round to nearest even
                    lim = torch.finfo(b.fp8).max
                    want = (want / scale).clamp(-lim, lim).to(b.fp8).float()
                torch.testing.assert_close(cache[blk, off].float(), want, atol=0, rtol=0)
        seq_start += s
    assert torch.isnan(k_nhd[~written].float()).all() and torch.isnan(v_nhd[~written].float()).all(), (
        "a slot outside the mapping was written"
    )


# ---------------------------------------------------------------------------------------------
# bad inputs: a specific error naming the argument
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    b = make_batch(
        num_heads=2,
        num_queries_per_kv=1,
        head_size=16,
        kv_cache_dtype="auto",
        num_seqs=2,
        max_query_len=3,
        max_ctx_len=3,
    )
    older = poisoned_caches(b, "older")
    flash = poisoned_caches(b, "flash")
    return b, older, flash


def _context(b, older, **kw):
    args = list(context_args(b, torch.empty_like(b.query), *older, 0))
    for i, name in (
        (1, "k"),
        (4, "kv_cache_dtype"),
        (5, "k_cache"),
        (6, "v_cache"),
        (8, "b_start_loc"),
        (12, "k_scale"),
        (13, "v_scale"),
    ):
        if name in kw:
            args[i] = kw.pop(name)
    return context_attention_fwd(*args, **kw)


def _unified(b, flash, **kw):
    args = dict(
        q=b.query,
        k=flash[0],
        v=flash[1],
        out=torch.empty_like(b.query),
        cu_seqlens_q=b.b_start_loc,
        max_seqlen_q=max(b.query_lens),
        seqused_k=b.b_seq_len,
        max_seqlen_k=max(b.seq_lens),
        softmax_scale=0.25,
        causal=True,
        window_size=(-1, -1),
        block_table=b.block_table,
        softcap=0,
        q_descale=None,
        k_descale=None,
        v_descale=None,
    )
    args.update(kw)
    return unified_attention(**args)


def _uint8_older(b, o, f):
    """fp8 caches in the older layout as vLLM allocates them: uint8, x = 16."""
    nb, kvh, bs, d = b.num_blocks, b.num_kv_heads, b.block_size, b.head_size
    return dict(
        k_cache=torch.zeros(nb, kvh, d // 16, bs, 16, dtype=torch.uint8),
        v_cache=torch.zeros(nb, kvh, d, bs, dtype=torch.uint8),
    )


# case: (error, words its message must contain, the arguments changed from a valid call)
BAD_CONTEXT = {
    "flash layout to the older-layout op": (
        LayoutError,
        "older cache layout",
        lambda b, o, f: dict(k_cache=f[0], v_cache=f[1]),
    ),
    "fp8 without k_scale": (
        ScaleError,
        "k_scale",
        lambda b, o, f: dict(kv_cache_dtype="fp8", k_scale=None, **_uint8_older(b, o, f)),
    ),
    "auto with uint8 storage": (DTypeError, "kv_cache_dtype", _uint8_older),
    "fp8 name with fp16 cache": (DTypeError, "k_cache", lambda b, o, f: dict(kv_cache_dtype="fp8")),
    "unknown kv_cache_dtype": (UnsupportedConfigError, "kv_cache_dtype", lambda b, o, f: dict(kv_cache_dtype="int4")),
    "fp8 output": (UnsupportedConfigError, "fp8_out_scale", lambda b, o, f: dict(fp8_out_scale=torch.tensor(1.0))),
    "alibi with sinks": (
        UnsupportedConfigError,
        "sinks",
        lambda b, o, f: dict(alibi_slopes=torch.ones(2), sinks=torch.ones(2)),
    ),
    "k_cache and v_cache head sizes differ": (
        ShapeError,
        "head_size",
        lambda b, o, f: dict(k_cache=o[0][:, :, :1].contiguous()),
    ),
    "k with the wrong number of kv heads": (ShapeError, "k_new = k", lambda b, o, f: dict(k=b.k[:, :1])),
    "b_start_loc without the total (old API)": (
        ShapeError,
        "b_start_loc",
        lambda b, o, f: dict(b_start_loc=b.b_start_loc[:-1]),
    ),
}


@pytest.mark.parametrize("case", BAD_CONTEXT, ids=list(BAD_CONTEXT))
def test_context_attention_fwd_rejects(tiny, case):
    b, older, flash = tiny
    error, words, change = BAD_CONTEXT[case]
    with pytest.raises(error, match=words):
        _context(b, older, **change(b, older, flash))


BAD_UNIFIED = {
    "causal=False": (UnsupportedConfigError, "causal", dict(causal=False)),
    "q_descale": (UnsupportedConfigError, "q_descale is for fp8 queries", dict(q_descale=torch.tensor(1.0))),
    "fp8 q without q_descale": (ScaleError, "q_descale is required", "fp8-q"),
    "q_descale per KV head": (ScaleError, "q_descale must hold one per-tensor scale", "fp8-q-per-head"),
    "qq_bias": (UnsupportedConfigError, "qq_bias", dict(qq_bias=torch.zeros(4, 4))),
    "output_scale": (UnsupportedConfigError, "output_scale", dict(output_scale=torch.tensor(1.0))),
    "right window": (UnsupportedConfigError, r"window_size\[1\]", dict(window_size=(-1, 4))),
    "window not a pair": (UnsupportedConfigError, "window_size", dict(window_size=16)),
    "unknown feature keyword": (UnsupportedConfigError, "mm_prefix_range", dict(mm_prefix_range=torch.zeros(1, 1, 2))),
    "older layout": (LayoutError, "flash-layout", "older"),
    "uint8 cache": (DTypeError, "float8", "uint8"),
    "fp8 without k_descale": (ScaleError, "k_scale", "fp8"),
    "different per-seq scales": (ScaleError, "k_descale", "fp8-per-seq"),
}


@pytest.mark.parametrize("case", BAD_UNIFIED, ids=list(BAD_UNIFIED))
def test_unified_attention_rejects(tiny, case):
    b, older, flash = tiny
    error, words, change = BAD_UNIFIED[case]
    if change == "older":
        change = dict(k=older[0], v=older[1])
    elif change == "uint8":
        change = dict(k=flash[0].view(torch.uint8)[..., :16], v=flash[1].view(torch.uint8)[..., :16])
    elif isinstance(change, str) and change.startswith("fp8-q"):  # q_descale: read for fp8 q only
        change = dict(q=b.query.to(torch.float8_e4m3fn), out=torch.empty_like(b.query))
        if case == "q_descale per KV head":
            change["q_descale"] = torch.tensor([[0.5, 1.0]]).expand(b.b_seq_len.shape[0], 2)
    elif change in ("fp8", "fp8-per-seq"):
        k8, v8 = flash[0].to(torch.float8_e4m3fn), flash[1].to(torch.float8_e4m3fn)
        change = dict(k=k8, v=v8, v_descale=torch.tensor(1.0))
        if case == "different per-seq scales":
            change["k_descale"] = torch.tensor([[1.0, 1.0], [1.0, 2.0]])
    with pytest.raises(error, match=words):
        _unified(b, flash, **change)


def test_write_ops_reject(tiny):
    b, older, flash = tiny
    slots = torch.arange(b.k.shape[0], dtype=torch.long)
    with pytest.raises(ScaleError, match="k_scale"):
        reshape_and_cache_flash(
            b.k, b.v, flash[0].to(torch.float8_e4m3fn), flash[1].to(torch.float8_e4m3fn), slots, "fp8", None, 1.0
        )
    with pytest.raises(DTypeError, match="key_cache"):
        reshape_and_cache_flash(b.k.float(), b.v.float(), *flash, slots, "auto", 1.0, 1.0)
    with pytest.raises(ShapeError, match="slot_mapping"):
        reshape_and_cache(b.k, b.v, *older, torch.arange(b.k.shape[0] + 1), "auto", 1.0, 1.0)
    with pytest.raises(LayoutError, match="flash-layout"):
        reshape_and_cache_flash(b.k, b.v, *older, slots, "auto", 1.0, 1.0)
    with pytest.raises(LayoutError, match="older cache layout"):
        reshape_and_cache(b.k, b.v, *flash, slots, "auto", 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# full size on a GPU: the seed's test, every configuration of its grid
# ---------------------------------------------------------------------------------------------
FULL = [(qpk, d, sw, kv) for qpk in (1, 8, 64) for d in (24, 128) for sw in (0, 16) for kv in ("auto", "fp8")]


@pytest.mark.parametrize("op", ["chunked_prefill_paged_decode", "context_attention_fwd", "unified_attention"])
@pytest.mark.parametrize("params", FULL, ids=grid_id)
@pytest.mark.gpu
def test_full_size_seed_grid(params, op):
    qpk, d, sw, kv = params
    b = make_batch(
        num_heads=64,
        num_queries_per_kv=qpk,
        head_size=d,
        kv_cache_dtype=kv,
        max_query_len=1024,
        max_ctx_len=1024,
        min_len=16,
        block_size=32,
        device="cuda",
    )
    layout = "flash" if op == "unified_attention" else "older"
    k_cache, v_cache = poisoned_caches(b, layout)
    out = torch.full_like(b.query, float("nan"))
    if op == "unified_attention":
        write(b, k_cache, v_cache, "all", layout)
        k, v = (k_cache.view(b.fp8), v_cache.view(b.fp8)) if b.fp8 else (k_cache, v_cache)
        unified_attention(
            b.query,
            k,
            v,
            out,
            b.b_start_loc,
            max(b.query_lens),
            b.b_seq_len,
            max(b.seq_lens),
            d**-0.5,
            True,
            (sw - 1, 0) if sw else (-1, -1),
            b.block_table,
            0,
            None,
            b.k_scale,
            b.v_scale,
        )
        expected = ref(b, k_cache, v_cache, layout, context=False, sliding_window=sw)
    else:
        write(b, k_cache, v_cache, "ctx", layout)
        chunked = op == "chunked_prefill_paged_decode"
        if chunked:
            write(b, k_cache, v_cache, "decode", layout)
        fn = chunked_prefill_paged_decode if chunked else context_attention_fwd
        fn(*context_args(b, out, k_cache, v_cache, sw), sliding_window=sw)
        expected = ref(b, k_cache, v_cache, layout, context=True, decode_from_cache=chunked, sliding_window=sw)
    assert_close_to_reference(out, expected, DTYPE, f"{op} {grid_id(params)}")
