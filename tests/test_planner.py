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
from pagedattn.testing import capture_graph, cu_seqlens

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
HQ, HKV, D, BS, NB = 4, 2, 32, 16, 12
QUERY_LENS, SEQ_LENS = [5, 1, 1], [21, 17, 3]


def batch(query_lens=QUERY_LENS, seq_lens=SEQ_LENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-s // BS) for s in seq_lens)
    table = torch.randperm(NB, generator=g)[: len(seq_lens) * width].reshape(len(seq_lens), width).to(torch.int32)
    cu = torch.tensor(cu_seqlens(query_lens), dtype=torch.int32)
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
    graph, _ = capture_graph(lambda: attn.run(q, k, v, out=out))
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


def test_out_overlap_is_refused_on_a_bound_layout_too():
    """run()'s per-call overlap test (addresses against the binding's spans): an out that shares
    memory with q is refused even when its layout was bound by an earlier, disjoint call."""
    cu, seq_lens, table = batch()
    n = int(cu[-1])
    attn = planner().plan(cu, seq_lens, table)
    k, v = torch.randn(NB, BS, HKV, D, device=DEVICE), torch.randn(NB, BS, HKV, D, device=DEVICE)
    buf = torch.randn(2 * n, HQ, D, device=DEVICE)
    q = buf[:n]
    attn.run(q, k, v, out=buf[n:])  # disjoint: binds the layout
    torch.testing.assert_close(buf[n:], ref(q, k, v, cu, seq_lens, table), atol=1e-4, rtol=1e-4)
    for start in (1, n - 1):  # same shape and strides as buf[n:], overlapping q's last rows
        with pytest.raises(LayoutError, match="out overlaps q"):
            attn.run(q, k, v, out=buf[start : start + n])
    kv = torch.randn(NB * BS * HKV * D + n * HQ * D, device=DEVICE)
    k2 = kv[: NB * BS * HKV * D].view(NB, BS, HKV, D)
    with pytest.raises(LayoutError, match="out overlaps k_cache"):
        attn.run(q, k2, v, out=kv[NB * BS * HKV * D - HQ * D :][: n * HQ * D].view(n, HQ, D))


def _stubbed_launches(monkeypatch):
    """Every Triton launch recorded instead of run: (grid, launcher arguments)."""
    from pagedattn.kernels import launch

    calls = []

    class Recorder:
        function = packed_metadata = None

        @staticmethod
        def run(*args):
            calls.append(args)

    def fake_launch(self, grid, args, kwargs):
        calls.append(("triton", grid, args))
        names = self.fn.arg_names[len(args) :]
        return launch.Compiled(Recorder, tuple(kwargs.get(n) for n in names), 0)

    monkeypatch.setattr(launch.FastKernel, "launch", fake_launch)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # plans the Triton kernel on the CPU
    return calls


@pytest.mark.skipif(CUDA, reason="the launch stub stands in for a GPU")
def test_run_passes_addresses_of_the_tensors_it_is_handed(monkeypatch):
    """The fast path hands the launcher ints: each per-call tensor's data_ptr in its slot, and the
    bound tensors' addresses (no tensor, so Triton's launcher asks the driver nothing)."""
    from pagedattn.kernels import unified

    calls = _stubbed_launches(monkeypatch)
    cu, seq_lens, table = batch()
    attn = planner().plan(cu, seq_lens, table, query_lens_host=QUERY_LENS, seq_lens_host=SEQ_LENS)
    n = int(cu[-1])
    for layer in range(3):  # a new cache (and q, out) per layer: one binding, new addresses
        q, out = torch.randn(n, HQ, D), torch.empty(n, HQ, D)
        k, v = torch.randn(NB, BS, HKV, D), torch.randn(NB, BS, HKV, D)
        calls.clear()
        attn.run(q, k, v, out=out)
        launched = [c for c in calls if c[0] != "triton"]
        if layer == 0:
            assert [c[0] for c in calls if c[0] == "triton"] == ["triton"] * len(calls)  # compiled: Triton's path
            continue
        assert len(launched) == len(calls) >= 1
        args = launched[0][4 + 5 :]  # grid (3), stream, function, packed metadata, 3 hooks
        for slot, t in zip(unified.ATTENTION_SLOTS, (q, out, k, v, q, q)):
            assert args[slot] == t.data_ptr()
        assert not any(isinstance(a, torch.Tensor) for a in args)
        assert cu.data_ptr() in args and seq_lens.data_ptr() in args and table.data_ptr() in args


@pytest.mark.skipif(CUDA, reason="the launch stub stands in for a GPU")
def test_one_shot_calls_share_bindings_and_read_the_values_at_launch(monkeypatch):
    """paged_attention builds a PagedAttention per call; a later call with the same tensors (same
    addresses, shapes, strides), options and launches takes the cached binding: nothing is bound
    again. Values are never part of it: the metadata is validated per call on host copies."""
    from pagedattn import paged_attention
    from pagedattn import planner as planner_mod
    from pagedattn.kernels import unified

    _stubbed_launches(monkeypatch)
    planner_mod.clear_shared_bindings()
    binds = []
    real = unified.bind_attention
    monkeypatch.setattr(unified, "bind_attention", lambda *a, **k: binds.append(1) or real(*a, **k))
    cu, seq_lens, table = batch()
    n = int(cu[-1])
    q, out = torch.randn(n, HQ, D), torch.empty(n, HQ, D)
    k, v = torch.randn(NB, BS, HKV, D), torch.randn(NB, BS, HKV, D)
    bounds = dict(max_query_len=max(QUERY_LENS), max_seq_len=max(SEQ_LENS))
    for _ in range(3):
        paged_attention(q, k, v, cu, seq_lens, table, out=out, query_lens_host=QUERY_LENS, **bounds)
    assert len(binds) == 1
    paged_attention(q, k, v, cu, seq_lens, table, out=out, sliding_window=4, **bounds)  # other options
    paged_attention(q.clone(), k, v, cu, seq_lens, table, query_lens_host=QUERY_LENS, **bounds)  # out allocated
    assert len(binds) == 3
    seq_lens[2] = 99  # the same tensor, now invalid: refused at plan time, cache or not
    with pytest.raises(BatchMetadataError):
        paged_attention(q, k, v, cu, seq_lens, table, out=out, query_lens_host=QUERY_LENS, **bounds)
    planner_mod.clear_shared_bindings()
    assert not planner_mod._SHARED_BINDINGS


def test_one_shot_output_follows_metadata_changed_in_place():
    """A cached binding reads the metadata at launch: change seq_lens and the block table in
    place between two one-shot calls and the second output is the new batch's."""
    from pagedattn import paged_attention

    cu, seq_lens, table = batch()
    n = int(cu[-1])
    torch.manual_seed(3)
    q = torch.randn(n, HQ, D, device=DEVICE)
    k, v = torch.randn(NB, BS, HKV, D, device=DEVICE), torch.randn(NB, BS, HKV, D, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    bounds = dict(max_query_len=max(QUERY_LENS), max_seq_len=max(SEQ_LENS))
    paged_attention(q, k, v, cu, seq_lens, table, out=out, **bounds)
    torch.testing.assert_close(out, ref(q, k, v, cu, seq_lens, table), atol=1e-4, rtol=1e-4)
    seq_lens.copy_(torch.tensor([19, 9, 2], dtype=torch.int32))
    table.copy_(table.flip(0))
    out.fill_(float("nan"))
    paged_attention(q, k, v, cu, seq_lens, table, out=out, **bounds)
    torch.testing.assert_close(out, ref(q, k, v, cu, seq_lens, table), atol=1e-4, rtol=1e-4)
