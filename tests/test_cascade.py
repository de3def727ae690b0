"""Shared-prefix (cascade) attention through the planner, against the float64 reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from pagedattn import AttentionOptions, PagedAttention, reference
from pagedattn import shared_prefix as sharing
from pagedattn.errors import BatchMetadataError, UnsupportedConfigError
from pagedattn.testing import capture_graph
from pagedattn.tolerances import default_tolerance

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.kernels


def shared_batch(query_lens, seq_lens, groups, *, block_size, seed=0, spare_columns=1, device=DEVICE):
    """(cu_seqlens_q, seq_lens, block_table) on the host: groups = [(members, shared blocks)], the
    members' first blocks the same ids, every other block a fresh one, in a shuffled cache."""
    rng = np.random.default_rng(seed)
    need = [-(-s // block_size) for s in seq_lens]
    width = max(need) + spare_columns
    rows = [[] for _ in seq_lens]
    next_id = 0
    for members, blocks in groups:
        ids = list(range(next_id, next_id + blocks))
        next_id += blocks
        for m in members:
            rows[m] = list(ids)
    for i, n in enumerate(need):
        own = n - len(rows[i])
        rows[i] += list(range(next_id, next_id + own))
        next_id += own
    num_blocks = next_id + 3
    perm = rng.permutation(num_blocks)
    table = np.full((len(seq_lens), width), num_blocks + 7, dtype=np.int64)  # past the used columns: garbage
    for i, r in enumerate(rows):
        table[i, : len(r)] = perm[r]
    cu = np.r_[0, np.cumsum(query_lens)]
    return (
        torch.tensor(cu, dtype=torch.int32, device=device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        torch.tensor(table, dtype=torch.int32, device=device),
        num_blocks,
    )


def host_copies(query_lens, seq_lens, block_table) -> dict:
    """plan()'s host copies of the lengths and the block table (given the table, plan detects sharing)."""
    return dict(query_lens_host=list(query_lens), seq_lens_host=list(seq_lens), block_table_host=block_table.cpu())


def planner(options=None, *, hq=4, hkv=2, d=16, bs=4, **kwargs) -> PagedAttention:
    """A PagedAttention of hq query heads, hkv KV heads, head size d, blocks of bs (fp32 on DEVICE
    unless kwargs say otherwise)."""
    kwargs = dict(dtype=torch.float32, device=DEVICE) | kwargs
    return PagedAttention(options, num_q_heads=hq, num_kv_heads=hkv, head_size=d, block_size=bs, **kwargs)


def run_case(
    query_lens,
    seq_lens,
    groups,
    *,
    hq=4,
    hkv=2,
    d=16,
    bs=4,
    dtype=torch.float32,
    options=None,
    shared_prefix=None,
    splits=2,
    seed=0,
    expect_cascade=True,
    kv_dtype=None,
    kv_scales=(0.05, 0.04),
):
    cu, sl, bt, nb = shared_batch(query_lens, seq_lens, groups, block_size=bs, seed=seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(int(cu[-1]), hq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(nb, bs, hkv, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(nb, bs, hkv, d, generator=g).to(DEVICE, dtype)
    options = options or AttentionOptions()
    if kv_dtype is not None:  # fp8 caches hold x / scale
        ks, vs = (torch.as_tensor(x, dtype=torch.float32) for x in kv_scales)  # one, or one per KV head
        k = (k.float().cpu() / ks.view(-1, 1)).to(DEVICE, kv_dtype)
        v = (v.float().cpu() / vs.view(-1, 1)).to(DEVICE, kv_dtype)
        options = options.replace(k_scale=ks.to(DEVICE), v_scale=vs.to(DEVICE))
    attn = planner(options, hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype, kv_cache_dtype=kv_dtype)
    attn.cascade_min_prefix, attn.cascade_min_saved_keys, attn.cascade_prefix_splits = 1, 1, splits
    attn.plan(cu, sl, bt, **host_copies(query_lens, seq_lens, bt), shared_prefix=shared_prefix)
    assert (attn._cascade is not None) == expect_cascade, attn.explain()
    assert ("cascade:" in attn.explain()) == expect_cascade
    out = torch.full_like(q, float("nan"))
    attn.run(q, k, v, out=out)
    ref = reference_of(q, k, v, cu, sl, bt, options)
    assert not out.isnan().any(), "rows left unwritten"
    atol, rtol = default_tolerance(dtype)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    return attn


def reference_of(q, k, v, cu, sl, bt, options):
    return reference.attention(
        q,
        k,
        v,
        cu,
        sl,
        bt,
        scale=options.scale,
        alibi_slopes=options.alibi_slopes,
        softcap=options.softcap,
        sinks=options.sinks,
        k_scale=options.k_scale,
        v_scale=options.v_scale,
        compute_dtype=torch.float64,
    )


# ---- shapes of sharing -------------------------------------------------------------------------
def test_decode_one_group_many_blocks_takes_a_view_of_the_table():
    attn = run_case([1] * 5, [23, 30, 21, 27, 40], [([0, 1, 2, 3, 4], 5)])
    assert len(attn._cascade.groups) == 1 and attn._cascade.shift_view


def test_prefix_of_exactly_one_block():
    """Sequence 0's first query token sits right after the shared block (ctx_len = block_size)."""
    attn = run_case([1, 1, 1], [5, 9, 7], [([0, 1, 2], 1)], splits=1)
    assert [b for _, b, _ in attn._cascade.groups] == [1]


def test_prefix_shorter_than_a_block_takes_the_plain_path():
    # sharing only the block the queries sit in: no whole block below the first query position
    run_case([1, 1, 1], [3, 4, 2], [([0, 1, 2], 1)], expect_cascade=False)
    # told 3 shared tokens with blocks of 4: rounds down to no block
    run_case([1, 1, 1], [9, 10, 7], [([0, 1, 2], 1)], shared_prefix=[([0, 1, 2], 3)], expect_cascade=False)


def test_told_tokens_round_down_to_whole_blocks():
    """6 shared tokens with blocks of 4: the whole block is the prefix, the 2 others are read
    with each suffix."""
    attn = run_case([1, 1, 1], [9, 10, 13], [([0, 1, 2], 1)], shared_prefix=[([0, 1, 2], 6)])
    assert attn._cascade.groups[0][1] == 1


def test_prefix_shared_by_a_subset_detected():
    attn = run_case([1] * 5, [14, 33, 9, 30, 26], [([1, 3, 4], 6)], seed=3)
    ((members, blocks, _),) = attn._cascade.groups
    assert members.tolist() == [1, 3, 4] and blocks == 6 and not attn._cascade.shift_view


def test_two_groups_detected():
    attn = run_case([1] * 6, [14, 25, 13, 22, 23, 6], [([0, 2], 3), ([1, 3, 4], 5)], seed=4)
    found = sorted((m.tolist(), b) for m, b, _ in attn._cascade.groups)
    assert found == [([0, 2], 3), ([1, 3, 4], 5)]


def test_group_prefix_is_the_most_saving_length():
    """Four sequences share 2 blocks, three of them 5: the prefix is 5 blocks for those three
    (saves 2 x 5 key blocks) rather than 2 blocks for all four (3 x 2); the fourth runs plain."""
    cu, sl, bt, _ = shared_batch([1] * 4, [30, 29, 31, 12], [([0, 1, 2, 3], 2)], block_size=4)
    bt[1, 2:5] = bt[0, 2:5]
    bt[2, 2:5] = bt[0, 2:5]
    groups = sharing.detect(bt.cpu().numpy(), (sl - 1).cpu().numpy(), 4)
    assert [(m.tolist(), b) for m, b, _ in groups] == [([0, 1, 2], 5)]


@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)], ids=["gqa2", "mha"])
def test_mixed_prefill_and_decode(hq, hkv):
    """Prefill members (query tokens after the shared blocks), decodes and a non-member; the
    prefill launch and the decode launch each merge their own sequences."""
    attn = run_case([1, 18, 1, 3, 1], [25, 38, 23, 24, 9], [([0, 1, 2, 3], 5)], hq=hq, hkv=hkv, seed=5, splits=3)
    assert "decode launch" in attn.explain()


@pytest.mark.parametrize(
    "what",
    ["sinks", "alibi", "softcap", "all"],
)
def test_options(what):
    g = torch.Generator().manual_seed(7)
    hq = 4
    opts = {}
    if what in ("sinks", "all"):
        opts["sinks"] = (torch.randn(hq, generator=g) * 2).to(DEVICE)
    if what in ("alibi", "all"):
        opts["alibi_slopes"] = torch.rand(hq, generator=g).to(DEVICE) * 0.5
    if what in ("softcap", "all"):
        opts["softcap"] = 3.0
    options = AttentionOptions(scale=0.4, **opts)
    run_case([1, 5, 1, 1], [29, 31, 25, 28], [([0, 1, 2, 3], 6)], hq=hq, options=options, seed=8, splits=2)


def test_bf16():
    run_case([1, 1, 1, 1], [33, 30, 41, 29], [([0, 1, 2, 3], 6)], dtype=torch.bfloat16, seed=9)


def test_fp8_cache():
    run_case([1, 4, 1], [33, 30, 41], [([0, 1, 2], 6)], kv_dtype=torch.float8_e4m3fn, seed=10)


def test_fp8_cache_per_kv_head_scales():
    """One k/v scale per KV head: the prefix kernel reads each head's (a per-tensor read of
    head 0's scale for every head would fail this)."""
    scales = ([0.05, 0.11], [0.04, 0.09])
    run_case([1, 3, 1], [33, 30, 41], [([0, 1, 2], 6)], kv_dtype=torch.float8_e4m3fn, kv_scales=scales, seed=12)


def test_fp8_queries_take_the_plain_path():
    cu, sl, bt, _ = shared_batch([1] * 3, [30, 29, 31], [([0, 1, 2], 6)], block_size=4)
    options = AttentionOptions(q_scale=0.5, k_scale=0.1, v_scale=0.1)
    attn = planner(options, dtype=torch.float8_e4m3fn, kv_cache_dtype=torch.float8_e4m3fn)
    attn.plan(cu, sl, bt, query_lens_host=[1] * 3, seq_lens_host=[30, 29, 31], shared_prefix=[([0, 1, 2], 24)])
    assert attn._cascade is None and "fp8 queries" in attn.explain()


def test_no_sharing_takes_the_plain_path_with_the_plain_launches():
    attn = run_case([1, 3, 1], [13, 22, 9], [], expect_cascade=False)
    assert "no shared prefix" in attn.explain()
    assert all(launch.kernel.fn.__name__ != "_prefix_kernel" for b in attn._bindings.values() for launch in b.launches)


def test_default_thresholds_keep_small_sharing_plain():
    cu, sl, bt, _ = shared_batch([1] * 3, [30, 29, 31], [([0, 1, 2], 6)], block_size=4)
    attn = planner()
    attn.plan(cu, sl, bt, **host_copies([1] * 3, [30, 29, 31], bt))
    assert attn._cascade is None and "256+" in attn._cascade_why
    attn.plan(cu, sl, bt, query_lens_host=[1] * 3, seq_lens_host=[30, 29, 31], shared_prefix=[([0, 1, 2], 24)])
    assert attn._cascade is not None, "told groups need no threshold"


def test_sliding_window_and_context_contract_take_the_plain_path():
    cu, sl, bt, _ = shared_batch([1] * 3, [30, 29, 31], [([0, 1, 2], 6)], block_size=4)
    host = dict(query_lens_host=[1] * 3, seq_lens_host=[30, 29, 31], shared_prefix=[([0, 1, 2], 24)])
    attn = planner(AttentionOptions(sliding_window=8)).plan(cu, sl, bt, **host)
    assert attn._cascade is None and "sliding window" in attn.explain()
    attn = planner(contract="context").plan(cu, sl, bt, **host)
    assert attn._cascade is None and "context" in attn._cascade_why


# ---- told groups are checked -------------------------------------------------------------------
def test_told_groups_are_checked():
    cu, sl, bt, _ = shared_batch([1, 1, 2], [30, 29, 31], [([0, 1], 6)], block_size=4)
    attn = planner()
    host = host_copies([1, 1, 2], [30, 29, 31], bt)
    with pytest.raises(BatchMetadataError, match=r"block_table\[2, 0\]"):
        attn.plan(cu, sl, bt, **host, shared_prefix=[([0, 1, 2], 8)])
    with pytest.raises(BatchMetadataError, match="first query token is at position 28"):
        attn.plan(cu, sl, bt, **host, shared_prefix=[([0, 1], 29)])
    with pytest.raises(BatchMetadataError, match="listed twice"):
        attn.plan(cu, sl, bt, **host, shared_prefix=[([0, 1], 8), ([1], 4)])
    with pytest.raises(BatchMetadataError, match="out of range"):
        attn.plan(cu, sl, bt, **host, shared_prefix=[([0, 3], 8)])
    with pytest.raises(UnsupportedConfigError, match="shared tokens"):
        attn.plan(cu, sl, bt, **host, shared_prefix=[([0, 1], -4)])


def test_unvalidated_bad_shared_block_gives_nan_rows_to_its_group_only():
    """validate=False: a shared block id outside the cache makes every member's rows NaN (never
    plausible numbers); the sequence outside the group is right."""
    hq, hkv, d, bs = 4, 2, 16, 4
    cu, sl, bt, nb = shared_batch([1, 1, 1], [21, 22, 19], [([0, 1], 4)], block_size=bs)
    bt[:2, 2] = nb + 100
    g = torch.Generator().manual_seed(12)
    q = torch.randn(3, hq, d, generator=g).to(DEVICE)
    k, v = (torch.randn(nb, bs, hkv, d, generator=g).to(DEVICE) for _ in range(2))
    attn = planner(hq=hq, hkv=hkv, d=d, bs=bs)
    attn.plan(
        cu, sl, bt, query_lens_host=[1, 1, 1], seq_lens_host=[21, 22, 19], validate=False, shared_prefix=[([0, 1], 16)]
    )
    assert attn._cascade is not None
    out = attn.run(q, k, v)
    assert out[:2].isnan().all()
    ref = reference.attention(
        q[2:], k, v, torch.tensor([0, 1], dtype=torch.int32, device=DEVICE), sl[2:], bt[2:], compute_dtype=torch.float64
    )
    torch.testing.assert_close(out[2:].double(), ref, atol=2e-5, rtol=2e-5)


# ---- CUDA-graph style: re-planning into the same buffers ---------------------------------------
def test_replan_into_the_same_buffers():
    """cuda_graph=True: the first plan's launches stay bound (no new binding) while later plans
    change the groups, drop the sharing, or share differently; every run is right."""
    hq, hkv, d, bs = 4, 2, 16, 4
    seq_lens = [22, 26, 19, 24]
    nb_max = 64
    g = torch.Generator().manual_seed(11)
    q = torch.randn(4, hq, d, generator=g).to(DEVICE)
    k = torch.randn(nb_max, bs, hkv, d, generator=g).to(DEVICE)
    v = torch.randn(nb_max, bs, hkv, d, generator=g).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    attn = planner(hq=hq, hkv=hkv, d=d, bs=bs, cuda_graph=True)
    attn.cascade_min_prefix, attn.cascade_min_saved_keys, attn.cascade_prefix_splits = 1, 1, 2
    steps = [
        [([0, 1, 2, 3], 4)],
        [([1, 3], 5), ([0, 2], 2)],
        [],
        [([0, 1, 2], 3)],
    ]
    for i, groups in enumerate(steps):
        cu, sl, bt, _ = shared_batch([1] * 4, seq_lens, groups, block_size=bs, seed=20 + i, spare_columns=0)
        bt = torch.nn.functional.pad(bt, (0, 8 - bt.shape[1]), value=0) if bt.shape[1] < 8 else bt
        attn.plan(cu, sl, bt, **host_copies([1] * 4, seq_lens, bt), max_query_len=1, max_seq_len=32)
        assert attn._cascade is not None, "the first plan cascaded: every later one keeps its launches"
        out.fill_(float("nan"))
        attn.run(q, k, v, out=out)
        assert len(attn._bindings) == 1
        ref = reference_of(q, k, v, cu, sl, bt, AttentionOptions())
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_graph_plan_without_sharing_at_first_stays_plain():
    bs = 4
    attn = planner(bs=bs, cuda_graph=True)
    attn.cascade_min_prefix, attn.cascade_min_saved_keys = 1, 1
    for groups in ([], [([0, 1, 2], 4)]):
        cu, sl, bt, _ = shared_batch([1] * 3, [22, 26, 19], groups, block_size=bs, spare_columns=2)
        bt = bt[:, :8]
        attn.plan(cu, sl, bt, **host_copies([1] * 3, [22, 26, 19], bt), max_query_len=1, max_seq_len=32)
        assert attn._cascade is None
    assert "first CUDA-graph plan" in attn.explain()


# ---- detection is cheap for a batch without sharing --------------------------------------------
def test_detection_stops_at_the_first_column_without_sharing():
    rng = np.random.default_rng(0)
    table = rng.permutation(256 * 64).reshape(256, 64).astype(np.int32)
    assert sharing.detect(table, np.full(256, 1000), 16) == []
    table[5, :10] = table[9, :10]
    ((members, blocks, _),) = sharing.detect(table, np.full(256, 1000), 16)
    assert members.tolist() == [5, 9] and blocks == 10


# ---- GPU, realistic shapes ---------------------------------------------------------------------
def gpu_case(query_lens, seq_lens, groups, *, options=None, dtype=torch.bfloat16, seed=0, **plan_kw):
    hq, hkv, d, bs = 32, 8, 128, 16
    cu, sl, bt, nb = shared_batch(query_lens, seq_lens, groups, block_size=bs, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(int(cu[-1]), hq, d, generator=g, device="cuda").to(dtype)
    k = torch.randn(nb, bs, hkv, d, generator=g, device="cuda").to(dtype)
    v = torch.randn(nb, bs, hkv, d, generator=g, device="cuda").to(dtype)
    options = options or AttentionOptions()
    attn = PagedAttention(options, num_q_heads=hq, num_kv_heads=hkv, head_size=d, block_size=bs, dtype=dtype)
    attn.plan(cu, sl, bt, **host_copies(query_lens, seq_lens, bt), **plan_kw)
    return attn, (q, k, v, cu, sl, bt, options)


@pytest.mark.gpu
@pytest.mark.parametrize("what", ["plain", "sinks+alibi+softcap"])
def test_gpu_decode_and_prefill_sharing_a_4k_prefix(what):
    """48 decodes and 2 chunked prefills sharing 4096 tokens (detected), 8 sequences alone."""
    options = None
    if what != "plain":
        g = torch.Generator().manual_seed(1)
        options = AttentionOptions(
            sinks=torch.randn(32, generator=g).cuda(),
            alibi_slopes=torch.rand(32, generator=g).cuda() * 0.05,
            softcap=20.0,
        )
    rng = np.random.default_rng(0)
    query_lens = [1] * 48 + [300, 77] + [1] * 8
    seq_lens = (
        [4096 + int(x) for x in rng.integers(1, 400, 48)]
        + [4096 + 300, 4096 + 500]
        + [int(x) for x in rng.integers(100, 5000, 8)]
    )
    attn, (q, k, v, cu, sl, bt, options) = gpu_case(query_lens, seq_lens, [(list(range(50)), 256)], options=options)
    assert attn._cascade is not None and attn._cascade.groups[0][0].tolist() == list(range(50)), attn.explain()
    out = torch.full_like(q, float("nan"))
    attn.run(q, k, v, out=out)
    ref = reference_of(q, k, v, cu, sl, bt, options)
    assert not out.isnan().any()
    atol, rtol = default_tolerance(q.dtype)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_after_replan():
    """Capture run() with a cascade; re-plan other sharing (and none) into the same buffers; replay."""
    query_lens, seq_lens = [1] * 16, [2048 + 37 * i for i in range(16)]
    steps = [[(list(range(16)), 128)], [(list(range(0, 16, 2)), 100), (list(range(1, 16, 2)), 64)], []]
    attn = PagedAttention(num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16, cuda_graph=True)
    bounds = dict(max_query_len=1, max_seq_len=4096)
    graph, out = None, None
    for i, groups in enumerate(steps):
        cu, sl, bt, nb = shared_batch(query_lens, seq_lens, groups, block_size=16, seed=i, spare_columns=0)
        bt = torch.nn.functional.pad(bt, (0, 256 - bt.shape[1]))
        if graph is None:
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(16, 32, 128, generator=g, device="cuda").to(torch.bfloat16)
            k = torch.randn(4096, 16, 8, 128, generator=g, device="cuda").to(torch.bfloat16)
            v = torch.randn_like(k)
            out = torch.empty_like(q)
        attn.plan(cu, sl, bt, **host_copies(query_lens, seq_lens, bt), **bounds)
        if graph is None:
            assert attn._cascade is not None, attn.explain()
            graph, _ = capture_graph(functools.partial(attn.run, q, k, v, out=out))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference_of(q, k, v, cu, sl, bt, AttentionOptions())
        torch.testing.assert_close(out.double(), ref, atol=1.5e-2, rtol=1.5e-2)


@pytest.mark.gpu
def test_gpu_shared_prefix_workload_subset_matches_the_plain_path():
    """The benchmark's batch at 64 sequences x (8k shared + 512 own): cascade equals the plain path."""
    from pagedattn.bench.workloads import build_shared_prefix, shared_prefix_workload

    w = shared_prefix_workload(num_seqs=64, prefix_len=8192, own_len=512)
    x = build_shared_prefix(w, "cuda", num_sets=1)
    s = x.sets[0]
    outs = []
    for spec in (None, False):
        attn = PagedAttention(num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16)
        host = host_copies(w.shape.query_lens, w.shape.seq_lens, s.block_table)
        attn.plan(s.cu_seqlens_q, s.seq_lens, s.block_table, **host, shared_prefix=spec)
        assert (attn._cascade is not None) == (spec is None), attn.explain()
        outs.append(attn.run(s.q, x.k_cache, x.v_cache))
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], atol=1.5e-2, rtol=1.5e-2)


@pytest.mark.parametrize("seed", range(6))
def test_detected_groups_are_valid_on_random_tables(seed):
    """Random tables with planted sharing (nested prefixes, short members, padding rows): every
    group found has 2+ disjoint members whose rows start with the source row's `blocks` ids, all
    below each member's first query position."""
    rng = np.random.default_rng(seed)
    n, width = int(rng.integers(2, 40)), int(rng.integers(1, 30))
    table = rng.permutation(n * width * 2)[: n * width].reshape(n, width).astype(np.int32)
    for _ in range(int(rng.integers(0, 4))):  # plant prefixes shared by random subsets
        members = rng.choice(n, size=int(rng.integers(2, n + 1)), replace=False)
        length = int(rng.integers(1, width + 1))
        table[members, :length] = table[members[0], :length]
    table[rng.random(n) < 0.1] = 0  # padding rows (an engine's unused batch slots)
    ctx = rng.integers(0, width * 4 + 8, n)
    groups = sharing.detect(table, ctx, 4)
    seen = set()
    for members, blocks, src in groups:
        assert len(members) >= 2 and blocks >= 1 and not (seen & set(members.tolist()))
        seen |= set(members.tolist())
        assert (table[members, :blocks] == table[src, :blocks]).all()
        assert (ctx[members] >= blocks * 4).all()


def test_shared_prefix_workload_inputs():
    """The bench workload's batch: every row starts with the same prefix blocks, the rest of the
    blocks (across sets too) are each used once; the accounting counts the prefix once."""
    from pagedattn.bench.workloads import SHARED_PREFIX, build_shared_prefix, shared_prefix_workload

    assert shared_prefix_workload().name == SHARED_PREFIX
    w = shared_prefix_workload(num_seqs=5, prefix_len=64, own_len=20, num_q_heads=4, num_kv_heads=2, head_size=16)
    x = build_shared_prefix(w, "cpu", num_sets=2)
    prefix_blocks = 64 // 16
    used = []
    for s in x.sets:
        t = s.block_table
        assert (t[:, :prefix_blocks] == t[0, :prefix_blocks]).all()
        used += t[0, :prefix_blocks].tolist() + t[:, prefix_blocks:].flatten().tolist()
        assert s.seq_lens.tolist() == [84] * 5 and s.out.isnan().all()
    assert len(used) == len(set(used)) == x.k_cache.shape[0]
    assert w.kv_bytes == 2 * 5 * 84 * 2 * 16 * 2 and w.kv_bytes_unique == 2 * (64 + 5 * 20) * 2 * 16 * 2
    groups = sharing.detect(x.sets[0].block_table, (x.sets[0].seq_lens - 1).numpy(), 16)
    assert [(m.tolist(), b) for m, b, _ in groups] == [(list(range(5)), prefix_blocks)]
