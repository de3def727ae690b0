"""PagedAttention: plan once, run per layer; strided and fused layouts; re-planning; CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from pagedattn import AttentionOptions, PagedAttention, reference
from pagedattn.errors import (
    BatchMetadataError,
    DTypeError,
    LayoutError,
    PagedAttentionError,
    ShapeError,
    UnsupportedConfigError,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
HQ, HKV, D, BS, NB = 4, 2, 32, 16, 12
QUERY_LENS, SEQ_LENS = [5, 1, 1], [21, 17, 3]


def batch(query_lens=QUERY_LENS, seq_lens=SEQ_LENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-s // BS) for s in seq_lens)
    table = torch.randperm(NB, generator=g)[: len(seq_lens) * width].reshape(len(seq_lens), width).to(torch.int32)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return cu.to(DEVICE), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), table.to(DEVICE)


def planner(options=None, **kw):
    kw = dict(num_q_heads=HQ, num_kv_heads=HKV, head_size=D, block_size=BS, dtype=torch.float32, device=DEVICE) | kw
    return PagedAttention(options or AttentionOptions(), **kw)


def ref(q, k, v, cu, seq_lens, table, **kw):
    return reference.attention(q, k, v, cu, seq_lens, table, **kw).to(q.dtype)


def test_one_plan_many_layers_each_with_its_own_cache():
    cu, seq_lens, table = batch()
    attn = planner(AttentionOptions(sliding_window=9)).plan(cu, seq_lens, table)
    for layer in range(3):
        torch.manual_seed(layer)
        q = torch.randn(int(cu[-1]), HQ, D, device=DEVICE)
        k, v = torch.randn(NB, BS, HKV, D, device=DEVICE), torch.randn(NB, BS, HKV, D, device=DEVICE)
        out = attn.run(q, k, v)
        torch.testing.assert_close(out, ref(q, k, v, cu, seq_lens, table, sliding_window=9), atol=1e-4, rtol=1e-4)


def test_kv_halves_of_one_buffer_hnd_and_strided_q_out():
    """K|V as the two halves of [num_blocks, num_kv_heads, block_size, 2*head_size] (HND), q a view
    of a fused QKV buffer, out a view of a wider buffer: read and written in place."""
    cu, seq_lens, table = batch()
    n = int(cu[-1])
    kv = torch.randn(NB, HKV, BS, 2 * D, device=DEVICE)
    k, v = kv[..., :D], kv[..., D:]
    qkv = torch.randn(n, (HQ + 2 * HKV) * D, device=DEVICE)
    q = qkv[:, : HQ * D].view(n, HQ, D)
    wide = torch.full((n, HQ, D + 8), float("nan"), device=DEVICE)
    out = wide[..., :D]
    attn = planner(AttentionOptions(kv_layout="hnd")).plan(cu, seq_lens, table)
    attn.run(q, k, v, out=out)
    expect = ref(q, k.transpose(1, 2), v.transpose(1, 2), cu, seq_lens, table)
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)
    assert wide[..., D:].isnan().all(), "the columns beside out were written"


def test_context_contract_k_new_fused_v_new_contiguous():
    """The regression of the review: k_new a view of a fused K|V buffer, v_new contiguous (they were
    read with one stride pair, and the output was 1e24 garbage)."""
    cu, seq_lens, table = batch()
    n = int(cu[-1])
    q = torch.randn(n, HQ, D, device=DEVICE)
    kv_new = torch.randn(n, HKV, 2 * D, device=DEVICE)
    k_new, v_new = kv_new[..., :D], kv_new[..., D:].contiguous()
    k, v = torch.randn(NB, BS, HKV, D, device=DEVICE), torch.randn(NB, BS, HKV, D, device=DEVICE)
    attn = planner(contract="context").plan(cu, seq_lens, table)
    out = attn.run(q, k, v, k_new=k_new, v_new=v_new)
    expect = ref(q, k, v, cu, seq_lens, table, k_new=k_new, v_new=v_new)
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)


def test_replan_changes_the_step():
    attn = planner()
    k, v = torch.randn(NB, BS, HKV, D, device=DEVICE), torch.randn(NB, BS, HKV, D, device=DEVICE)
    for query_lens, seq_lens in (([5, 1, 1], [21, 17, 3]), ([1, 1], [30, 2]), ([7], [7])):
        cu, sl, table = batch(query_lens, seq_lens, seed=len(query_lens))
        q = torch.randn(sum(query_lens), HQ, D, device=DEVICE)
        out = attn.plan(cu, sl, table).run(q, k, v)
        torch.testing.assert_close(out, ref(q, k, v, cu, sl, table), atol=1e-4, rtol=1e-4)


def test_plan_time_errors_name_the_argument():
    cu, seq_lens, table = batch()
    attn = planner(num_blocks=NB)
    with pytest.raises(BatchMetadataError, match=r"seq_lens\[1\]"):
        attn.plan(
            cu,
            torch.tensor([21, -1, 3], dtype=torch.int32, device=DEVICE),
            table,
            query_lens_host=QUERY_LENS,
            seq_lens_host=[21, -1, 3],
        )
    bad = table.clone()
    bad[0, 1] = NB + 3
    with pytest.raises(BatchMetadataError, match=r"block_table\[0, 1\]"):
        attn.plan(cu, seq_lens, bad, query_lens_host=QUERY_LENS, seq_lens_host=SEQ_LENS, block_table_host=bad.cpu())
    with pytest.raises(BatchMetadataError, match="max_query_len"):
        attn.plan(cu, seq_lens, table, query_lens_host=QUERY_LENS, seq_lens_host=SEQ_LENS, max_query_len=2)
    with pytest.raises(BatchMetadataError, match="cu_seqlens_q"):
        attn.plan(
            torch.tensor([0, 5, 4, 7], dtype=torch.int32, device=DEVICE),
            seq_lens,
            table,
            query_lens_host=None,
            seq_lens_host=SEQ_LENS,
            validate=True,
        ) if DEVICE.type == "cpu" else attn.plan(
            torch.tensor([0, 5, 4, 7], dtype=torch.int32, device=DEVICE), seq_lens, table, validate=True
        )


@pytest.mark.gpu
def test_validate_true_checks_the_device_tensors_themselves():
    """validate=True on a GPU reads the device metadata (one sync): host copies that disagree with
    it are refused, and a bad value the host copies cannot show (cu_seqlens_q[0] != 0) is caught."""
    cu, seq_lens, table = batch()
    attn = planner(num_blocks=NB)
    hosts = dict(query_lens_host=QUERY_LENS, seq_lens_host=SEQ_LENS, block_table_host=table.cpu())
    attn.plan(cu, seq_lens, table, **hosts, validate=True)  # consistent: accepted
    with pytest.raises(BatchMetadataError, match="query_lens_host disagrees with cu_seqlens_q"):
        attn.plan(cu, seq_lens, table, **(hosts | dict(query_lens_host=[4, 2, 1])), validate=True)
    with pytest.raises(BatchMetadataError, match="seq_lens_host disagrees with seq_lens"):
        attn.plan(cu, seq_lens, table, **(hosts | dict(seq_lens_host=[21, 17, 4])), validate=True)
    shifted = cu - 2  # differences unchanged: invisible to query_lens_host
    with pytest.raises(BatchMetadataError, match="cu_seqlens_q"):
        attn.plan(shifted, seq_lens, table, **hosts, validate=True)
    attn.plan(shifted, seq_lens, table, **hosts)  # validate=None: the host copies are trusted, no sync


def test_run_checks_what_it_is_handed():
    cu, seq_lens, table = batch()
    attn = planner()
    with pytest.raises(PagedAttentionError, match="before plan"):
        attn.run(torch.randn(7, HQ, D), torch.randn(NB, BS, HKV, D), torch.randn(NB, BS, HKV, D))
    attn.plan(cu, seq_lens, table, query_lens_host=QUERY_LENS, seq_lens_host=SEQ_LENS)  # host copies: q rows known
    k, v = torch.randn(NB, BS, HKV, D, device=DEVICE), torch.randn(NB, BS, HKV, D, device=DEVICE)
    with pytest.raises(ShapeError, match="q has 6 rows"):
        attn.run(torch.randn(6, HQ, D, device=DEVICE), k, v)
    with pytest.raises(DTypeError, match="planned for"):
        attn.run(torch.randn(7, HQ, D, device=DEVICE, dtype=torch.float16), k, v)
    q = torch.randn(7, HQ, D, device=DEVICE)
    with pytest.raises(LayoutError, match="out overlaps q"):
        attn.run(q, k, v, out=q)
    with pytest.raises(ShapeError, match="planned for"):
        attn.run(q, k[:, :8], v[:, :8])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_replay_after_replan():
    """Capture run() once; re-plan other lengths into the same buffers; the replay is right."""
    cu, seq_lens, table = batch()
    q = torch.randn(int(cu[-1]), HQ, D, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(NB, BS, HKV, D, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    attn = planner(dtype=torch.bfloat16, cuda_graph=True)
    bounds = dict(max_query_len=5, max_seq_len=32)
    attn.plan(cu, seq_lens, table, **bounds)
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attn.run(q, k, v, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn.run(q, k, v, out=out)
    for seqs in ([21, 17, 3], [9, 30, 1], [32, 2, 2]):
        sl = torch.tensor(seqs, dtype=torch.int32, device=DEVICE)
        attn.plan(cu, sl, table, **bounds)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, ref(q, k, v, cu, sl, table), atol=2e-2, rtol=2e-2)


def test_new_arguments_are_validated():
    cu, seq_lens, table = batch()
    with pytest.raises(DTypeError, match="kv_cache_dtype"):
        planner(kv_cache_dtype=torch.int8)
    with pytest.raises(UnsupportedConfigError, match="num_blocks"):
        planner(num_blocks=0)
    with pytest.raises(UnsupportedConfigError, match="contract"):
        planner(contract="partial")
    attn = planner()
    with pytest.raises(UnsupportedConfigError, match="validate"):
        attn.plan(cu, seq_lens, table, validate="yes")
    with pytest.raises(UnsupportedConfigError, match="max_query_len"):
        attn.plan(cu, seq_lens, table, max_query_len=-1)
    with pytest.raises(UnsupportedConfigError, match="dispatch_plan"):
        attn.plan(cu, seq_lens, table, dispatch_plan="split")
