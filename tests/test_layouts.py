"""Strides and views through every entry point, against the reference.

Engines hand over views, not fresh tensors: q, k_new, v_new cut from one fused QKV projection; K and
V caches that are halves of one tensor ([num_blocks, block_size, num_kv_heads, 2 * head_size], or
[2, num_blocks, ...], or [num_blocks, 2, ...]); HND caches, declared (kv_layout="hnd") or passed as
an NHD-shaped view of HND memory; heads that are not contiguous; `out` a view of a wider buffer.
Each must give the reference's answer, or a LayoutError that names the tensor it cannot serve; and
nothing outside the views may change (out's buffer around the view, the caches).

Profiles (PAGEDATTN_FUZZ_PROFILE, default "gpu" with CUDA, else "ci"):
    ci   derandomized, 60 examples at interpreter-sized shapes
    gpu  2000 random examples (PAGEDATTN_FUZZ_EXAMPLES overrides), larger batches, head sizes to 256,
         split into PAGEDATTN_FUZZ_SHARDS (default 8) independent tests so xdist spreads them
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from pagedattn import reference
from pagedattn.errors import LayoutError
from pagedattn.testing import block_table_from, cu_seqlens
from pagedattn.tolerances import TOLERANCES

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.kernels  # skipped without CUDA or TRITON_INTERPRET=1 (tests/conftest.py)

PROFILE = os.environ.get("PAGEDATTN_FUZZ_PROFILE", "gpu" if CUDA else "ci")
if PROFILE not in ("ci", "gpu"):
    raise ValueError(f"PAGEDATTN_FUZZ_PROFILE must be 'ci' or 'gpu', got {PROFILE!r}")
BIG = PROFILE == "gpu"
EXAMPLES = int(os.environ.get("PAGEDATTN_FUZZ_EXAMPLES", 2000 if BIG else 60))
_COMMON = dict(
    deadline=None,
    print_blob=True,
    max_examples=EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SHARDS = int(os.environ.get("PAGEDATTN_FUZZ_SHARDS", 8)) if BIG else 1
_COMMON["max_examples"] = max(1, EXAMPLES // SHARDS)
FUZZ = settings(derandomize=not BIG, **_COMMON)

SENTINEL = 0.5
ENTRIES = (
    "paged_attention",
    "prefix_prefill",
    "attention",
    "planner",
    "planner_context",
    "unified_attention",
    "context_attention_fwd",
    "chunked_prefill_paged_decode",
    "write_kv",
    "reshape_and_cache_flash",
)
CONTEXT = ("prefix_prefill", "planner_context", "context_attention_fwd", "chunked_prefill_paged_decode")
V0 = ("context_attention_fwd", "chunked_prefill_paged_decode")  # vLLM's older cache layout
# how q-like tensors ([num_tokens, heads, head_size]) are laid out
ROW_LAYOUTS = ("contiguous", "fused_qkv", "heads_strided", "head_major", "rows_padded")
# how the K and V caches are laid out (kv_layout, then how the two tensors share memory)
CACHE_LAYOUTS = (
    "nhd",
    "kv_last_dim",
    "kv_stacked",
    "kv_block_interleaved",
    "hnd",
    "hnd_kv_interleaved",
    "hnd_as_nhd_view",
    "offset_in_larger",
)
OUT_LAYOUTS = ("library", "contiguous", "heads_strided", "rows_padded", "head_major")


# ---------------------------------------------------------------------------------------------
# a batch with every tensor in a chosen layout
# ---------------------------------------------------------------------------------------------
@dataclass
class Shape:
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: torch.dtype
    query_lens: tuple[int, ...]
    ctx_lens: tuple[int, ...]


def _empty(*shape, dtype) -> torch.Tensor:
    return torch.full(shape, SENTINEL, device=DEVICE).to(dtype)


def rows_view(values: torch.Tensor, how: str, fused: torch.Tensor | None = None, offset: int = 0):
    """`values` [num_tokens, heads, head_size] copied into a view laid out `how`; returns (view, buffer).
    "fused_qkv": columns [offset, offset + heads * head_size) of `fused` [num_tokens, total]."""
    t, h, d = values.shape
    dtype = values.dtype
    if how == "contiguous":
        buf = _empty(t, h, d, dtype=dtype)
        view = buf
    elif how == "fused_qkv":
        buf = fused
        view = fused[:, offset : offset + h * d].unflatten(1, (h, d))
    elif how == "heads_strided":
        buf = _empty(t, h, 2 * d, dtype=dtype)
        view = buf[:, :, d:]
    elif how == "head_major":
        buf = _empty(h, t, d, dtype=dtype)
        view = buf.transpose(0, 1)
    elif how == "rows_padded":
        buf = _empty(t + 2, h * d + 8, dtype=dtype)
        view = buf[1 : t + 1, 8:].unflatten(1, (h, d))
    else:
        raise ValueError(how)
    view.copy_(values)
    return view, buf


def cache_views(k: torch.Tensor, v: torch.Tensor, how: str):
    """nhd caches [num_blocks, block_size, num_kv_heads, head_size] laid out `how`; returns
    (k view, v view, kv_layout, buffers)."""
    nb, bs, kvh, d = k.shape
    dtype = k.dtype
    layout = "nhd"
    if how == "nhd":
        bufs = (_empty(nb, bs, kvh, d, dtype=dtype), _empty(nb, bs, kvh, d, dtype=dtype))
        kv, vv = bufs
    elif how == "kv_last_dim":
        bufs = (_empty(nb, bs, kvh, 2 * d, dtype=dtype),)
        kv, vv = bufs[0][..., :d], bufs[0][..., d:]
    elif how == "kv_stacked":
        bufs = (_empty(2, nb, bs, kvh, d, dtype=dtype),)
        kv, vv = bufs[0][0], bufs[0][1]
    elif how == "kv_block_interleaved":
        bufs = (_empty(nb, 2, bs, kvh, d, dtype=dtype),)
        kv, vv = bufs[0][:, 0], bufs[0][:, 1]
    elif how == "hnd":
        layout = "hnd"
        bufs = (_empty(nb, kvh, bs, d, dtype=dtype), _empty(nb, kvh, bs, d, dtype=dtype))
        kv, vv = bufs
    elif how == "hnd_kv_interleaved":
        layout = "hnd"
        bufs = (_empty(nb, 2, kvh, bs, d, dtype=dtype),)
        kv, vv = bufs[0][:, 0], bufs[0][:, 1]
    elif how == "hnd_as_nhd_view":  # HND memory, NHD shape: the strides say where things are
        bufs = (_empty(nb, kvh, bs, d, dtype=dtype), _empty(nb, kvh, bs, d, dtype=dtype))
        kv, vv = bufs[0].transpose(1, 2), bufs[1].transpose(1, 2)
    elif how == "offset_in_larger":  # a per-layer slice of an all-layers tensor
        bufs = (_empty(3, nb, bs, kvh, d, dtype=dtype), _empty(3, nb, bs, kvh, d, dtype=dtype))
        kv, vv = bufs[0][1], bufs[1][2]
    else:
        raise ValueError(how)
    (kv.transpose(1, 2) if layout == "hnd" else kv).copy_(k)
    (vv.transpose(1, 2) if layout == "hnd" else vv).copy_(v)
    return kv, vv, layout, bufs


@dataclass
class Example:
    shape: Shape
    q: torch.Tensor  # contiguous values (the reference's inputs)
    k_new: torch.Tensor
    v_new: torch.Tensor
    k_cache: torch.Tensor  # nhd, contiguous
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor  # the write op's: the query tokens' slots


def make_example(shape: Shape, seed: int) -> Example:
    g = torch.Generator().manual_seed(seed)
    bs, kvh, d = shape.block_size, shape.num_kv_heads, shape.head_size
    seq_lens = [c + q for c, q in zip(shape.ctx_lens, shape.query_lens)]
    blocks = [max(1, -(-s // bs)) for s in seq_lens]
    nb = sum(blocks) + 2
    table = block_table_from(torch.randperm(nb, generator=g), blocks)
    k_cache = torch.randn(nb, bs, kvh, d, generator=g)
    v_cache = torch.randn(nb, bs, kvh, d, generator=g)
    slots, k_new, v_new = [], [], []
    for i, (s, ql) in enumerate(zip(seq_lens, shape.query_lens)):
        pos = torch.arange(s - ql, s)
        blk = table[i].long()[pos // bs]
        slots.append(blk * bs + pos % bs)
        k_new.append(k_cache[blk, pos % bs])
        v_new.append(v_cache[blk, pos % bs])
    cu = cu_seqlens(shape.query_lens)
    dt = shape.dtype
    return Example(
        shape,
        torch.randn(cu[-1], shape.num_q_heads, d, generator=g).to(DEVICE, dt),
        torch.cat(k_new).to(DEVICE, dt),
        torch.cat(v_new).to(DEVICE, dt),
        k_cache.to(DEVICE, dt),
        v_cache.to(DEVICE, dt),
        torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        table.to(DEVICE),
        torch.cat(slots).to(DEVICE),
    )


def _outside_unchanged(buf: torch.Tensor, before: torch.Tensor, view: torch.Tensor) -> bool:
    """Every element of `buf` that `view` does not cover still holds its value from `before`."""
    expected = before.clone()
    expected.as_strided(view.shape, view.stride(), view.storage_offset() - buf.storage_offset()).copy_(view)
    return torch.equal(_bits(expected), _bits(buf))


def _note(text: str) -> None:
    from hypothesis.control import _current_build_context

    if _current_build_context.value is not None:  # inside a hypothesis example
        note(text)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# one run: lay the example out, call the entry point, compare
# ---------------------------------------------------------------------------------------------
def run_layout(ex: Example, entry: str, q_layout: str, kv_new_layout: str, cache_layout: str, out_layout: str):
    """Returns None when the answer is right, or the LayoutError the library raised."""
    import pagedattn
    from pagedattn.attention import attention, paged_attention, prefix_prefill
    from pagedattn.compat import vllm
    from pagedattn.kernels.write import write_kv

    s = ex.shape
    t, hq, hkv, d = ex.q.shape[0], s.num_q_heads, s.num_kv_heads, s.head_size
    fused = _empty(t, (hq + 2 * hkv) * d, dtype=s.dtype)
    q, _ = rows_view(ex.q, q_layout, fused, 0)
    if kv_new_layout == "kv_fused":  # k_new a view of a fused K|V buffer, v_new contiguous (the regression)
        kv_buf = _empty(t, 2, hkv, d, dtype=s.dtype)
        k_new = kv_buf[:, 0]
        k_new.copy_(ex.k_new)
        v_new = ex.v_new.clone()
    else:
        k_new, _ = rows_view(ex.k_new, kv_new_layout, fused, hq * d)
        v_new, _ = rows_view(ex.v_new, kv_new_layout, fused, (hq + hkv) * d)
    write = entry in ("write_kv", "reshape_and_cache_flash")
    k_nhd, v_nhd = ex.k_cache, ex.v_cache
    if write:  # the write op fills the query tokens' slots of caches that hold something else there
        k_nhd, v_nhd = k_nhd.clone(), v_nhd.clone()
        for c in (k_nhd, v_nhd):
            c.view(-1, hkv, d)[ex.slot_mapping] = SENTINEL * 3
    if entry in V0:
        x = 16 // ex.k_cache.element_size()
        nb, bs = ex.k_cache.shape[:2]
        kc = k_nhd.reshape(nb, bs, hkv, d // x, x).permute(0, 2, 3, 1, 4).contiguous()
        vc = v_nhd.permute(0, 2, 3, 1).contiguous()
        kv_layout, cache_bufs = "vllm_v0", (kc, vc)
    else:
        kc, vc, kv_layout, cache_bufs = cache_views(k_nhd, v_nhd, cache_layout)
    caches_before = [b.clone() for b in cache_bufs]
    out, out_buf = (
        (None, None) if out_layout == "library" else rows_view(torch.full_like(ex.q, float("nan")), out_layout)
    )
    out_before = None if out_buf is None else out_buf.clone()
    meta = (ex.cu_seqlens_q, ex.seq_lens, ex.block_table)
    sizes = dict(max_query_len=max(s.query_lens), max_seq_len=int(ex.seq_lens.max()))
    _note(
        f"q {tuple(q.stride())}, k_new {tuple(k_new.stride())}, v_new {tuple(v_new.stride())}, k_cache "
        f"{tuple(kc.stride())} ({kv_layout}), out {None if out is None else tuple(out.stride())}"
    )
    try:
        if entry == "paged_attention":
            result = paged_attention(q, kc, vc, *meta, **sizes, kv_layout=kv_layout, out=out)
        elif entry == "prefix_prefill":
            result = prefix_prefill(q, k_new, v_new, kc, vc, *meta, **sizes, kv_layout=kv_layout, out=out)
        elif entry == "attention":
            cache = pagedattn.PagedKVCache(
                kc.shape[0], s.block_size, hkv, d, dtype=s.dtype, device=DEVICE, poison=False
            )
            cache.k, cache.v = kc, vc  # any strides: the cache object hands them on
            result = attention(q, cache, pagedattn.BatchMetadata(*meta, **sizes), out=out, kv_layout=kv_layout)
        elif entry in ("planner", "planner_context"):
            planner = pagedattn.PagedAttention(
                pagedattn.AttentionOptions(kv_layout=kv_layout),
                num_q_heads=hq,
                num_kv_heads=hkv,
                head_size=d,
                block_size=s.block_size,
                dtype=s.dtype,
                device=DEVICE,
                contract="context" if entry == "planner_context" else "full",
            )
            planner.plan(*meta, **sizes)
            news = dict(k_new=k_new, v_new=v_new) if entry == "planner_context" else {}
            result = planner.run(q, kc, vc, out=out, **news)
        elif entry == "unified_attention":
            if kv_layout != "nhd":
                return None  # vLLM's flash layout only
            o = out if out is not None else torch.empty_like(ex.q)
            result = vllm.unified_attention(
                q,
                kc,
                vc,
                o,
                meta[0],
                sizes["max_query_len"],
                meta[1],
                sizes["max_seq_len"],
                d**-0.5,
                True,
                (-1, -1),
                meta[2],
                0,
                None,
                None,
                None,
            )
        elif entry in V0:
            o = out if out is not None else torch.empty_like(ex.q)
            fn = vllm.context_attention_fwd if entry == "context_attention_fwd" else vllm.chunked_prefill_paged_decode
            result = fn(
                q,
                k_new,
                v_new,
                o,
                "auto",
                kc,
                vc,
                meta[2],
                meta[0],
                meta[1],
                sizes["max_seq_len"],
                sizes["max_query_len"],
                1.0,
                1.0,
            )
        elif entry == "write_kv":
            if kv_layout != "nhd":
                return None  # write_kv takes NHD caches (any strides)
            write_kv(k_new, v_new, kc, vc, ex.slot_mapping)
            result = None
        elif entry == "reshape_and_cache_flash":
            if kv_layout != "nhd":
                return None
            vllm.reshape_and_cache_flash(k_new, v_new, kc, vc, ex.slot_mapping, "auto", 1.0, 1.0)
            result = None
        else:
            raise ValueError(entry)
    except LayoutError as e:
        return e
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    if write:  # the buffers, margins and the other half included, are what a fresh layout of the right caches is
        expected = cache_views(ex.k_cache, ex.v_cache, cache_layout)[3]
        for i, (b, e) in enumerate(zip(cache_bufs, expected)):
            wrong = (_bits(b) != _bits(e)).sum()
            assert wrong == 0, f"cache buffer {i}: {int(wrong)} bytes differ from the expected write"
        return None
    for b, before in zip(cache_bufs, caches_before):
        assert torch.equal(_bits(b), _bits(before)), "a cache buffer changed: attention must only read it"
    if out is not None:
        assert result.data_ptr() == out.data_ptr(), "the result is not the `out` given"
        assert _outside_unchanged(out_buf, out_before, out), "written outside `out` (in its buffer)"
    ctx = entry in CONTEXT
    ref = reference.attention(
        ex.q.cpu(),
        ex.k_cache.cpu(),
        ex.v_cache.cpu(),
        *(m.cpu() for m in meta),
        k_new=ex.k_new.cpu() if ctx else None,
        v_new=ex.v_new.cpu() if ctx else None,
        decode_from_cache=entry == "chunked_prefill_paged_decode",
    )
    atol, rtol = TOLERANCES[s.dtype]
    got = result.float().cpu()
    assert not got.isnan().any(), f"{int(got.isnan().sum())} NaN in the output"
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
    return None


def layout_names(entry, q_layout, kv_new_layout, cache_layout, out_layout) -> set[str]:
    """The tensors laid out unusually in this example: a LayoutError must name one of these."""
    names = set()
    if q_layout != "contiguous":
        names.add("q")
    if entry in CONTEXT or entry in ("write_kv", "reshape_and_cache_flash"):
        if kv_new_layout != "contiguous":
            names |= {"k_new", "v_new", "k", "v", "key", "value"}
    if cache_layout != "nhd" and entry not in V0:
        names |= {"k_cache", "v_cache", "key_cache", "value_cache", "k", "v"}
    if out_layout not in ("library", "contiguous"):
        names |= {"out", "o", "output"}
    return names


def check_layout(ex, entry, q_layout, kv_new_layout, cache_layout, out_layout):
    err = run_layout(ex, entry, q_layout, kv_new_layout, cache_layout, out_layout)
    if err is not None:
        names = layout_names(entry, q_layout, kv_new_layout, cache_layout, out_layout)
        assert any(re.search(rf"(?<![a-z_]){n}(?![a-z_])", str(err)) for n in names), (
            f"LayoutError names none of {sorted(names)}: {err}"
        )
    return err


# ---------------------------------------------------------------------------------------------
# the fuzz test
# ---------------------------------------------------------------------------------------------
@st.composite
def shapes(draw) -> Shape:
    num_kv_heads = draw(st.integers(1, 4 if BIG else 2))
    head_sizes = (16, 32, 40, 64, 80, 96, 128, 256) if BIG else (16, 32, 40)
    num_seqs = draw(st.integers(1, 6 if BIG else 3))
    max_q, max_ctx = (200, 1200) if BIG else (6, 40)
    return Shape(
        num_q_heads=num_kv_heads * draw(st.sampled_from((1, 2, 4))),
        num_kv_heads=num_kv_heads,
        head_size=draw(st.sampled_from(head_sizes)),
        block_size=draw(st.sampled_from((8, 16, 32) if BIG else (8, 16))),
        dtype=draw(st.sampled_from((torch.float16, torch.bfloat16, torch.float32))),
        query_lens=tuple(
            draw(st.lists(st.one_of(st.just(1), st.integers(1, max_q)), min_size=num_seqs, max_size=num_seqs))
        ),
        ctx_lens=tuple(draw(st.lists(st.integers(0, max_ctx), min_size=num_seqs, max_size=num_seqs))),
    )


@pytest.mark.parametrize("shard", range(SHARDS))
@FUZZ
@given(
    shape=shapes(),
    entry=st.sampled_from(ENTRIES),
    q_layout=st.sampled_from(ROW_LAYOUTS),
    kv_new_layout=st.sampled_from(ROW_LAYOUTS + ("kv_fused",)),
    cache_layout=st.sampled_from(CACHE_LAYOUTS),
    out_layout=st.sampled_from(OUT_LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_layouts_fuzz(shard, shape, entry, q_layout, kv_new_layout, cache_layout, out_layout, seed):
    # "fused_qkv" views share one [num_tokens, (num_q_heads + 2 * num_kv_heads) * head_size] buffer;
    # decode sequences of chunked_prefill_paged_decode find their own token in the cache (make_example)
    ex = make_example(shape, seed)
    event(f"entry {entry}")
    err = check_layout(ex, entry, q_layout, kv_new_layout, cache_layout, out_layout)
    event("refused with a LayoutError" if err is not None else "served")


# ---------------------------------------------------------------------------------------------
# each documented layout, named: the right answer (no LayoutError allowed)
# ---------------------------------------------------------------------------------------------
SMALL = Shape(4, 2, 32, 16, torch.float16, query_lens=(5, 1, 3), ctx_lens=(12, 20, 0))

NAMED = [
    ("fused-qkv", "fused_qkv", "fused_qkv", "nhd", "library"),
    ("k-new-from-fused-kv", "contiguous", "kv_fused", "nhd", "library"),
    ("kv-halves-last-dim", "contiguous", "contiguous", "kv_last_dim", "library"),
    ("kv-stacked", "contiguous", "contiguous", "kv_stacked", "library"),
    ("kv-block-interleaved", "contiguous", "contiguous", "kv_block_interleaved", "library"),
    ("hnd", "contiguous", "contiguous", "hnd", "library"),
    ("hnd-as-nhd-view", "contiguous", "contiguous", "hnd_as_nhd_view", "library"),
    ("heads-strided", "heads_strided", "heads_strided", "nhd", "heads_strided"),
    ("head-major-q", "head_major", "contiguous", "nhd", "library"),
    ("out-rows-padded", "contiguous", "contiguous", "nhd", "rows_padded"),
]


@pytest.mark.parametrize("entry", ("prefix_prefill", "planner"))
@pytest.mark.parametrize("name, q_layout, kv_new_layout, cache_layout, out_layout", NAMED, ids=[n[0] for n in NAMED])
def test_documented_layout_is_served(entry, name, q_layout, kv_new_layout, cache_layout, out_layout):
    """options.py: "Caches may have any strides (views of a larger buffer, K and V halves of one
    tensor)"; planner.run: q, out "any strides". So none of these may be refused."""
    if entry == "planner" and name == "k-new-from-fused-kv":
        pytest.skip("the full-cache contract takes no k_new")
    err = run_layout(make_example(SMALL, 0), entry, q_layout, kv_new_layout, cache_layout, out_layout)
    assert err is None, f"refused a documented layout: {err}"


@pytest.mark.parametrize("entry", ("prefix_prefill", "context_attention_fwd", "planner_context"))
def test_regression_k_new_view_of_fused_kv_with_contiguous_v_new(entry):
    """prefix_prefill read v_new with k_new's strides: with k_new a view of a fused K|V buffer and
    v_new contiguous the output was garbage (max |out - ref| 1e24..1e26), silently."""
    ex = make_example(SMALL, 1)
    err = run_layout(ex, entry, "contiguous", "kv_fused", "nhd", "contiguous")
    assert err is None, f"refused: {err}"


@pytest.mark.parametrize("entry", ("write_kv", "reshape_and_cache_flash"))
@pytest.mark.parametrize("kv_new_layout", ("fused_qkv", "kv_fused", "heads_strided"))
@pytest.mark.parametrize("cache_layout", ("kv_last_dim", "kv_block_interleaved", "hnd_as_nhd_view"))
def test_write_into_strided_caches(entry, kv_new_layout, cache_layout):
    q_layout = "fused_qkv" if kv_new_layout == "fused_qkv" else "contiguous"
    err = run_layout(make_example(SMALL, 2), entry, q_layout, kv_new_layout, cache_layout, "library")
    assert err is None, f"refused: {err}"


@pytest.mark.gpu
def test_gpu_profile_is_the_big_one():
    """On CUDA the default profile is the 2,000-example one (unless asked otherwise)."""
    if "PAGEDATTN_FUZZ_PROFILE" not in os.environ and "PAGEDATTN_FUZZ_EXAMPLES" not in os.environ:
        assert BIG and EXAMPLES == 2000 and SHARDS * _COMMON["max_examples"] == 2000


def test_harness_catches_a_wrong_stride(monkeypatch):
    """The harness itself: an entry point that reads v_new with k_new's strides (the old bug, here
    as reading k_new's values for v_new) must fail it."""
    import importlib

    api = importlib.import_module("pagedattn.attention")  # the module: `pagedattn.attention` is the function
    real = api.prefix_prefill
    monkeypatch.setattr(api, "prefix_prefill", lambda q, k_new, v_new, *a, **k: real(q, k_new, k_new, *a, **k))
    with pytest.raises(AssertionError):
        run_layout(make_example(SMALL, 3), "prefix_prefill", "contiguous", "kv_fused", "nhd", "contiguous")
