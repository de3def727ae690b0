"""A catalogue of bad inputs across the public API, one distinct case a row.

Each row is (call, expected exception type, words the message must contain). Every call gets a
fresh `Env` (a small fp32 cache with live and freed sequences, an fp8 cache, older-layout copies,
a valid batch) and changes exactly one thing. For every row the test checks that:
  - the call raises the expected type (a PagedAttentionError subclass; SystemExit for the CLI),
  - the message names the argument (the row's words),
  - no kernel ran (the attention and write launchers, and the reference, are replaced by traps),
  - every tensor of the Env and each cache's allocator state are bit-identical afterwards.
A bad input that is not refused properly stays in the table as a strict xfail naming the fix.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import pytest
import torch

import pagedattn.kernels.unified as unified_kernels
import pagedattn.kernels.write as write_kernels
from pagedattn import (
    AttentionConfig,
    BatchMetadata,
    BatchMetadataError,
    CacheFullError,
    DeviceError,
    DTypeError,
    LayoutError,
    PagedAttentionError,
    ScaleError,
    SequenceError,
    ShapeError,
    SlotConflictError,
    UnsupportedConfigError,
    UnwrittenKVError,
    attention,
    dispatch,
    paged_attention,
    prefix_prefill,
    reference,
)
from pagedattn.cache import PagedKVCache
from pagedattn.cli import main as cli_main
from pagedattn.compat import vllm
from pagedattn.kernels.write import write_kv

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 32, 16, 8
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------
# the environment every row starts from: valid inputs, which a row changes in one place
# ---------------------------------------------------------------------------------------------
@dataclass
class Env:
    cache: PagedKVCache  # fp32; sequences a (5 tokens), b (20 tokens), b's fork; c was freed
    a: int
    b: int
    freed: int
    forked: int  # shares b's blocks, the partial last one included
    batch: BatchMetadata  # full contract, query_lens (2, 1): seq_lens (5, 20)
    q: torch.Tensor  # [3, NUM_Q_HEADS, HEAD_SIZE] fp32
    k_new: torch.Tensor  # [3, NUM_KV_HEADS, HEAD_SIZE]
    v_new: torch.Tensor
    fp8: PagedKVCache  # fp8_e4m3, fp16 queries, one sequence of 5 tokens
    fp8_batch: BatchMetadata
    q16: torch.Tensor  # [1, NUM_Q_HEADS, HEAD_SIZE] fp16, for the fp8 cache
    k_v0: torch.Tensor  # cache.k in vLLM's older layout [nb, kvh, d // x, bs, x] (a copy)
    v_v0: torch.Tensor  # [nb, kvh, d, bs]
    ctx_seq_lens: torch.Tensor  # context contract: ctx_len + query_len = (7, 21)
    slots: torch.Tensor  # [3] int64, free slots of the fp32 cache (valid for write_kv)
    extra: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(
            cache_k=self.cache.k,
            cache_v=self.cache.v,
            cache_written=self.cache.written,
            fp8_k=self.fp8.k,
            fp8_v=self.fp8.v,
            fp8_written=self.fp8.written,
            q=self.q,
            k_new=self.k_new,
            v_new=self.v_new,
            q16=self.q16,
            k_v0=self.k_v0,
            v_v0=self.v_v0,
            ctx_seq_lens=self.ctx_seq_lens,
            slots=self.slots,
            cu_seqlens_q=self.batch.cu_seqlens_q,
            seq_lens=self.batch.seq_lens,
            block_table=self.batch.block_table,
        )
        return out


def build_env() -> Env:
    cache = PagedKVCache(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, torch.float32)
    a, b, c = cache.new_sequence(), cache.new_sequence(), cache.new_sequence()
    cache.append([a, c], *_kv(8), [5, 3])
    cache.append([b], *_kv(20), [20])
    cache.free(c)
    forked = cache.fork(b)
    batch = cache.batch([a, b], [2, 1])
    fp8 = PagedKVCache(
        4, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, torch.float16, kv_dtype="fp8_e4m3", k_scale=0.5, v_scale=0.25
    )
    s = fp8.new_sequence()
    fp8.append([s], *_kv(5, torch.float16), [5])
    x = 16 // cache.k.element_size()
    k_v0 = cache.k.reshape(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE // x, x).permute(0, 2, 3, 1, 4).contiguous()
    v_v0 = cache.v.permute(0, 2, 3, 1).contiguous()
    free = cache.free_blocks[0]
    return Env(
        cache,
        a,
        b,
        c,
        forked,
        batch,
        torch.randn(3, NUM_Q_HEADS, HEAD_SIZE),
        *_kv(3),
        fp8,
        fp8.batch([s], [1]),
        torch.randn(1, NUM_Q_HEADS, HEAD_SIZE, dtype=torch.float16),
        k_v0,
        v_v0,
        torch.tensor([7, 21], dtype=torch.int32),
        torch.arange(3, dtype=torch.int64) + free * BLOCK_SIZE,
    )


def _kv(n: int, dtype=torch.float32, heads=NUM_KV_HEADS, d=HEAD_SIZE):
    return torch.randn(n, heads, d).to(dtype), torch.randn(n, heads, d).to(dtype)


# ---------------------------------------------------------------------------------------------
# calls with one thing changed
# ---------------------------------------------------------------------------------------------
def paged(q: torch.Tensor, cache: PagedKVCache, batch: BatchMetadata) -> dict:
    """The tensors of a call over `cache` and `batch`, by name."""
    return dict(
        q=q,
        k_cache=cache.k,
        v_cache=cache.v,
        cu_seqlens_q=batch.cu_seqlens_q,
        seq_lens=batch.seq_lens,
        block_table=batch.block_table,
    )


def pa(e: Env, **changes):
    """paged_attention over the fp32 cache, with `changes` applied."""
    return paged_attention(**(paged(e.q, e.cache, e.batch) | changes))


def pa8(e: Env, **changes):
    """paged_attention over the fp8 cache (scales given unless changed)."""
    scales = dict(k_scale=e.fp8.k_scale, v_scale=e.fp8.v_scale)
    return pa(e, **(paged(e.q16, e.fp8, e.fp8_batch) | scales | changes))


def pp(e: Env, **changes):
    """prefix_prefill (context contract) over the fp32 cache."""
    context = dict(k_new=e.k_new, v_new=e.v_new, seq_lens=e.ctx_seq_lens)
    return prefix_prefill(**(paged(e.q, e.cache, e.batch) | context | changes))


def wk(e: Env, **changes):
    """write_kv of 3 tokens into free slots of the fp32 cache."""
    args = dict(k=e.k_new, v=e.v_new, k_cache=e.cache.k, v_cache=e.cache.v, slot_mapping=e.slots)
    args.update(changes)
    pos = [args.pop(n) for n in ("k", "v", "k_cache", "v_cache", "slot_mapping")]
    return write_kv(*pos, **args)


def wk8(e: Env, **changes):
    args = dict(
        k=e.k_new[:1].half(),
        v=e.v_new[:1].half(),
        k_cache=e.fp8.k,
        v_cache=e.fp8.v,
        slot_mapping=torch.tensor([3 * BLOCK_SIZE], dtype=torch.int64),
        k_scale=0.5,
        v_scale=0.25,
    )
    args.update(changes)
    return wk(e, **args)


def bm(e: Env, **changes) -> BatchMetadata:
    """BatchMetadata.validate against the fp32 cache's geometry."""
    args = dict(
        cu_seqlens_q=e.batch.cu_seqlens_q,
        seq_lens=e.batch.seq_lens,
        block_table=e.batch.block_table,
        max_query_len=2,
        max_seq_len=20,
    )
    args.update(changes)
    num_tokens = args.pop("num_tokens", 3)
    return BatchMetadata(**args).validate(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, num_tokens=num_tokens)


def i32(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def meta(t: torch.Tensor) -> torch.Tensor:
    """The same tensor on the "meta" device: a stand-in for a wrong device on CPU."""
    return torch.empty_like(t, device="meta")


def strided(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, not contiguous in the last dimension."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def overlapping_out_and_k_new(e: Env):
    """out and k_new carved from one buffer: the kernel would read k_new while writing out."""
    buf = torch.randn(e.q.numel())
    k_new = buf[: e.k_new.numel()].view(e.k_new.shape)
    return pp(e, k_new=k_new, out=buf.view(e.q.shape))


def vllm_prefill(op, e: Env, seq_lens: torch.Tensor, max_seq_len: int, /, **changes):
    """A compat.vllm prefill op over the older-layout copies of the fp32 cache: context_attention_fwd
    and chunked_prefill_paged_decode take the same positional arguments; `changes` go by the op's names."""
    args = inspect.signature(op).bind_partial(
        e.q,
        e.k_new,
        e.v_new,
        torch.empty_like(e.q),  # out
        "auto",
        e.k_v0,
        e.v_v0,
        e.batch.block_table,
        e.batch.cu_seqlens_q,
        seq_lens,
        max_seq_len,
        2,  # max_query_len
        1.0,  # k_scale
        1.0,  # v_scale
    )
    return op(**(args.arguments | changes))


def ctx_fwd(e: Env, **changes):
    """compat.vllm.context_attention_fwd (seq_lens: ctx_len + query_len)."""
    return vllm_prefill(vllm.context_attention_fwd, e, e.ctx_seq_lens, 21, **changes)


def chunked(e: Env, **changes):
    return vllm_prefill(vllm.chunked_prefill_paged_decode, e, i32(7, 20), 20, **changes)


def chunked_fp8_uint8(e: Env, **changes):
    """chunked_prefill_paged_decode over fp8 (uint8 storage) older-layout caches."""
    k8 = torch.zeros(4, NUM_KV_HEADS, HEAD_SIZE // 16, BLOCK_SIZE, 16, dtype=torch.uint8)
    v8 = torch.zeros(4, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE, dtype=torch.uint8)
    e.extra.update(k8=k8, v8=v8)
    args = dict(
        query=e.q16,
        key=e.k_new[:1].half(),
        value=e.v_new[:1].half(),
        output=torch.empty_like(e.q16),
        kv_cache_dtype="fp8",
        key_cache=k8,
        value_cache=v8,
        block_table=i32(0).reshape(1, 1),
        query_start_loc=i32(0, 1),
        seq_lens=i32(5),
        max_seq_len=5,
        max_query_len=1,
    )
    args.update(changes)
    return chunked(e, **args)


def ua(e: Env, **changes):
    """compat.vllm.unified_attention (full contract, flash layout) over the fp32 cache."""
    args = dict(
        q=e.q,
        k=e.cache.k,
        v=e.cache.v,
        out=torch.empty_like(e.q),
        cu_seqlens_q=e.batch.cu_seqlens_q,
        max_seqlen_q=2,
        seqused_k=e.batch.seq_lens,
        max_seqlen_k=20,
        softmax_scale=HEAD_SIZE**-0.5,
        causal=True,
        window_size=(-1, -1),
        block_table=e.batch.block_table,
        softcap=0,
        q_descale=None,
        k_descale=None,
        v_descale=None,
    )
    args.update(changes)
    return vllm.unified_attention(**args)


def rcf(e: Env, **changes):
    """compat.vllm.reshape_and_cache_flash into free slots of the fp32 cache."""
    args = dict(
        key=e.k_new,
        value=e.v_new,
        key_cache=e.cache.k,
        value_cache=e.cache.v,
        slot_mapping=e.slots,
        kv_cache_dtype="auto",
        k_scale=1.0,
        v_scale=1.0,
    )
    args.update(changes)
    return vllm.reshape_and_cache_flash(**args)


def rcf8(e: Env, **changes):
    """reshape_and_cache_flash of one fp16 token into the fp8 cache."""
    args = dict(
        key_cache=e.fp8.k,
        value_cache=e.fp8.v,
        kv_cache_dtype="fp8",
        key=e.k_new[:1].half(),
        value=e.v_new[:1].half(),
        slot_mapping=torch.tensor([48]),
    )
    args.update(changes)
    return rcf(e, **args)


def cli(*argv: str):
    """The `pagedattn` command; a non-zero exit status returned (not raised) counts as SystemExit."""
    rc = cli_main(list(argv))
    if rc:
        raise SystemExit(rc)
    return rc


def append_noncontiguous(e: Env):
    k, v = _kv(3)
    return e.cache.append([e.a], strided(k), v, [3])


def xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


# ---------------------------------------------------------------------------------------------
# the catalogue
# ---------------------------------------------------------------------------------------------
P = pytest.param
ROWS = [
    # ---- AttentionConfig
    P(lambda e: AttentionConfig(num_q_heads=0), UnsupportedConfigError, "num_q_heads", id="config-num_q_heads-0"),
    P(
        lambda e: AttentionConfig(num_q_heads=6, num_kv_heads=4),
        UnsupportedConfigError,
        "num_kv_heads",
        id="config-heads-not-multiple",
    ),
    P(lambda e: AttentionConfig(head_size=0), UnsupportedConfigError, "head_size", id="config-head_size-0"),
    P(lambda e: AttentionConfig(head_size=512), UnsupportedConfigError, "head_size", id="config-head_size-512"),
    P(lambda e: AttentionConfig(block_size=12), UnsupportedConfigError, "block_size", id="config-block_size-12"),
    P(lambda e: AttentionConfig(dtype=torch.float64), DTypeError, "dtype", id="config-dtype-float64"),
    P(lambda e: AttentionConfig(kv_dtype="int8"), UnsupportedConfigError, "kv_dtype", id="config-kv_dtype-int8"),
    P(
        lambda e: AttentionConfig(sliding_window=-1),
        UnsupportedConfigError,
        "sliding_window",
        id="config-window-negative",
    ),
    P(lambda e: AttentionConfig(softcap=-1.0), UnsupportedConfigError, "softcap", id="config-softcap-negative"),
    P(lambda e: AttentionConfig(softcap=INF), UnsupportedConfigError, "softcap", id="config-softcap-inf"),
    P(lambda e: AttentionConfig(softcap=NAN), UnsupportedConfigError, "softcap", id="config-softcap-nan"),
    P(
        lambda e: AttentionConfig(num_q_heads=4, num_kv_heads=True),
        UnsupportedConfigError,
        "num_kv_heads",
        id="config-num_kv_heads-bool",
    ),
    # ---- PagedKVCache constructor
    P(lambda e: PagedKVCache(0, 16, 2, 32), UnsupportedConfigError, "num_blocks", id="cache-num_blocks-0"),
    P(lambda e: PagedKVCache(-4, 16, 2, 32), UnsupportedConfigError, "num_blocks", id="cache-num_blocks-negative"),
    P(lambda e: PagedKVCache(4, 12, 2, 32), UnsupportedConfigError, "block_size", id="cache-block_size-12"),
    P(lambda e: PagedKVCache(4, 16, 0, 32), UnsupportedConfigError, "num_kv_heads", id="cache-num_kv_heads-0"),
    P(lambda e: PagedKVCache(4, 16, 2, 300), UnsupportedConfigError, "head_size", id="cache-head_size-300"),
    P(lambda e: PagedKVCache(4, 16, 2, 32, torch.int32), DTypeError, "dtype", id="cache-dtype-int32"),
    P(
        lambda e: PagedKVCache(4, 16, 2, 32, kv_dtype="fp4"),
        UnsupportedConfigError,
        "kv_dtype",
        id="cache-kv_dtype-fp4",
    ),
    P(lambda e: PagedKVCache(4, 16, 2, 32, kv_dtype="fp8", k_scale=NAN), ScaleError, "k_scale", id="cache-k_scale-nan"),
    P(
        lambda e: PagedKVCache(4, 16, 2, 32, kv_dtype="fp8", v_scale=-1.0),
        ScaleError,
        "v_scale",
        id="cache-v_scale-negative",
    ),
    P(lambda e: PagedKVCache(4, 16, 2, 32, kv_dtype="fp8", k_scale=INF), ScaleError, "k_scale", id="cache-k_scale-inf"),
    # ---- PagedKVCache operations (the cache must be unchanged afterwards)
    P(lambda e: e.cache.append([99], *_kv(1), [1]), SequenceError, "sequence 99", id="append-unknown-seq"),
    P(lambda e: e.cache.append([e.freed], *_kv(1), [1]), SequenceError, "was freed", id="append-freed-seq"),
    P(lambda e: e.cache.append([e.a], *_kv(2), [3]), ShapeError, "k must be", id="append-k-wrong-rows"),
    P(lambda e: e.cache.append([e.a], *_kv(3, heads=1), [3]), ShapeError, "k must be", id="append-k-wrong-heads"),
    P(lambda e: e.cache.append([e.a], *_kv(3, torch.float16), [3]), DTypeError, "k must be", id="append-k-fp16"),
    P(
        lambda e: e.cache.append([e.a], _kv(3)[0], meta(_kv(3)[1]), [3]),
        DeviceError,
        "v is on meta",
        id="append-v-meta-device",
    ),
    P(lambda e: e.cache.append([e.a], *_kv(0), [-1]), BatchMetadataError, "query_lens[0]", id="append-negative-len"),
    P(
        lambda e: e.cache.append([e.a, e.b], *_kv(3), [3]),
        BatchMetadataError,
        "seq_ids has 2",
        id="append-lens-count-mismatch",
    ),
    P(
        lambda e: e.cache.append([e.a, e.a], *_kv(2), [1, 1]),
        BatchMetadataError,
        "more than once",
        id="append-duplicate-seq",
    ),
    P(lambda e: e.cache.append([e.a], *_kv(100), [100]), CacheFullError, "free blocks", id="append-cache-full"),
    P(append_noncontiguous, LayoutError, "k must be contiguous", id="append-k-noncontiguous"),
    P(
        lambda e: e.cache.append([e.a], e.k_new.tolist(), e.v_new, [3]),
        DTypeError,
        "k must be a torch.Tensor",
        id="append-k-list",
    ),
    P(lambda e: e.cache.write([e.b], *_kv(1), [1]), SlotConflictError, "shared", id="write-block-shared-by-fork"),
    P(lambda e: e.cache.write([e.a], *_kv(6), [6]), BatchMetadataError, "query_len 6", id="write-beyond-reserved"),
    P(lambda e: e.cache.reserve([e.a], [-2]), BatchMetadataError, "num_tokens[0]", id="reserve-negative"),
    P(lambda e: e.cache.batch([], []), BatchMetadataError, "seq_ids is empty", id="batch-empty"),
    P(
        lambda e: e.cache.batch([e.a], [1], contract="paged"),
        UnsupportedConfigError,
        "contract",
        id="batch-bad-contract",
    ),
    P(lambda e: e.cache.batch([e.a], [6]), BatchMetadataError, "query_len 6", id="batch-query-longer-than-seq"),
    P(lambda e: e.cache.batch([e.a], [-1]), BatchMetadataError, "query_lens[0]", id="batch-negative-query"),
    P(lambda e: e.cache.batch([e.freed], [1]), SequenceError, "was freed", id="batch-freed-seq"),
    P(lambda e: e.cache.fork(42), SequenceError, "sequence 42", id="fork-unknown-seq"),
    P(lambda e: e.cache.free(e.freed), SequenceError, "was freed", id="free-twice"),
    P(lambda e: e.cache.free("a"), SequenceError, "'a'", id="free-non-int-id"),
    P(lambda e: e.cache.slot_mapping([e.a], [9]), BatchMetadataError, "query_len 9", id="slot_mapping-too-long"),
    # ---- BatchMetadata
    P(
        lambda e: BatchMetadata.from_lens([1, 2], [3], [[0], [1]]),
        BatchMetadataError,
        "query_lens has 2",
        id="from_lens-count-mismatch",
    ),
    P(
        lambda e: BatchMetadata.from_lens([0], [-3], [[0]]),
        BatchMetadataError,
        "seq_len -3",
        id="from_lens-negative-seq_len",
    ),
    P(
        lambda e: BatchMetadata.from_lens([-1], [3], [[0]]),
        BatchMetadataError,
        "query_len -1",
        id="from_lens-negative-query_len",
    ),
    P(
        lambda e: BatchMetadata.from_lens([4], [3], [[0]]),
        BatchMetadataError,
        "exceeds seq_len",
        id="from_lens-query-longer-than-seq",
    ),
    P(lambda e: bm(e, cu_seqlens_q=i32(1, 2, 3)), BatchMetadataError, "cu_seqlens_q[0]", id="validate-cu-not-0"),
    P(lambda e: bm(e, cu_seqlens_q=i32(0, 3, 2)), BatchMetadataError, "non-decreasing", id="validate-cu-decreasing"),
    P(
        lambda e: bm(e, seq_lens=i32(1, 20)),
        BatchMetadataError,
        "exceeds seq_lens[0]",
        id="validate-query-longer-than-seq",
    ),
    P(lambda e: bm(e, seq_lens=i32(-5, 20)), BatchMetadataError, "seq_lens[0]", id="validate-negative-seq_len"),
    P(
        lambda e: bm(e, seq_lens=i32(5, 40), max_seq_len=40),
        BatchMetadataError,
        "block_table has only",
        id="validate-seq-beyond-table",
    ),
    P(
        lambda e: bm(e, block_table=i32(0, 0, 9, 1).reshape(2, 2)),
        BatchMetadataError,
        "block_table[1, 0] = 9",
        id="validate-block-id-too-large",
    ),
    P(
        lambda e: bm(e, block_table=i32(-1, 0, 1, 2).reshape(2, 2)),
        BatchMetadataError,
        "block_table[0, 0] = -1",
        id="validate-block-id-negative",
    ),
    P(
        lambda e: bm(e, cu_seqlens_q=e.batch.cu_seqlens_q.long()),
        DTypeError,
        "cu_seqlens_q must be int32",
        id="validate-cu-int64",
    ),
    P(
        lambda e: bm(e, seq_lens=i32(), cu_seqlens_q=i32(0)),
        BatchMetadataError,
        "batch is empty",
        id="validate-empty-batch",
    ),
    P(lambda e: bm(e, num_tokens=4), BatchMetadataError, "cu_seqlens_q[-1] = 3", id="validate-num_tokens"),
    P(lambda e: bm(e, max_seq_len=19), BatchMetadataError, "max_seq_len = 19", id="validate-max_seq_len-low"),
    P(lambda e: bm(e, max_query_len=1), BatchMetadataError, "max_query_len = 1", id="validate-max_query_len-low"),
    # ---- paged_attention: shapes, dtypes, devices, layout
    P(lambda e: pa(e, q=e.q[0]), ShapeError, "q must have 3", id="pa-q-rank-2"),
    P(lambda e: pa(e, q=e.q.double()), DTypeError, "q must be one of", id="pa-q-float64"),
    P(lambda e: pa(e, q=e.q.tolist()), DTypeError, "q must be a torch.Tensor", id="pa-q-list"),
    P(lambda e: pa(e, k_cache=meta(e.cache.k)), DeviceError, "k_cache is on meta", id="pa-k_cache-meta"),
    P(lambda e: pa(e, v_cache=meta(e.cache.v)), DeviceError, "v_cache is on meta", id="pa-v_cache-meta"),
    P(
        lambda e: pa(e, block_table=meta(e.batch.block_table)),
        DeviceError,
        "block_table is on meta",
        id="pa-block_table-meta",
    ),
    P(lambda e: pa(e, seq_lens=meta(e.batch.seq_lens)), DeviceError, "seq_lens is on meta", id="pa-seq_lens-meta"),
    P(lambda e: pa(e, k_cache=e.cache.k[:, :, :, :16]), ShapeError, "v_cache", id="pa-k-v-cache-shapes-differ"),
    P(lambda e: pa(e, v_cache=e.cache.v.half()), DTypeError, "v_cache", id="pa-k-v-cache-dtypes-differ"),
    P(
        lambda e: pa(e, k_cache=e.cache.k.to(torch.int16), v_cache=e.cache.v.to(torch.int16)),
        DTypeError,
        "k_cache must be",
        id="pa-cache-int16",
    ),
    P(lambda e: pa(e, out=e.q), LayoutError, "out overlaps q", id="pa-out-is-q"),
    P(
        lambda e: pa(e, out=e.cache.k.view(-1)[: e.q.numel()].view(e.q.shape)),
        LayoutError,
        "out overlaps k_cache",
        id="pa-out-overlaps-k_cache",
    ),
    P(
        lambda e: pa(e, out=torch.empty(3, NUM_Q_HEADS, 16)),
        ShapeError,
        "out must have q's shape",
        id="pa-out-wrong-shape",
    ),
    P(
        lambda e: pa(e, out=torch.empty_like(e.q).half()),
        DTypeError,
        "out must have q's dtype",
        id="pa-out-wrong-dtype",
    ),
    P(lambda e: pa(e, q=torch.randn(3, NUM_Q_HEADS, 16)), ShapeError, "head_size", id="pa-head_size-mismatch"),
    P(lambda e: pa(e, q=torch.randn(3, NUM_Q_HEADS, 0)), UnsupportedConfigError, "head_size", id="pa-head_size-0"),
    P(
        lambda e: pa(
            e,
            q=torch.randn(3, NUM_Q_HEADS, 512),
            k_cache=torch.randn(2, 16, 2, 512),
            v_cache=torch.randn(2, 16, 2, 512),
        ),
        UnsupportedConfigError,
        "head_size",
        id="pa-head_size-512",
    ),
    P(lambda e: pa(e, q=torch.randn(3, 3, HEAD_SIZE)), ShapeError, "num_q_heads", id="pa-heads-not-multiple"),
    P(
        lambda e: pa(e, k_cache=torch.randn(4, 12, 2, HEAD_SIZE), v_cache=torch.randn(4, 12, 2, HEAD_SIZE)),
        UnsupportedConfigError,
        "block_size",
        id="pa-block_size-12",
    ),
    P(lambda e: pa(e, cu_seqlens_q=i32(0, 3)), ShapeError, "cu_seqlens_q must have", id="pa-cu-wrong-length"),
    P(
        lambda e: pa(e, cu_seqlens_q=e.batch.cu_seqlens_q.long()),
        DTypeError,
        "cu_seqlens_q must be int32",
        id="pa-cu-int64",
    ),
    P(
        lambda e: pa(e, block_table=e.batch.block_table[0]),
        ShapeError,
        "block_table must have 2",
        id="pa-block_table-rank-1",
    ),
    P(
        lambda e: pa(e, block_table=e.batch.block_table[:1]),
        ShapeError,
        "block_table must have at least",
        id="pa-block_table-too-few-rows",
    ),
    P(
        lambda e: pa(e, cu_seqlens_q=i32(0), seq_lens=i32(), block_table=i32().reshape(0, 2)),
        BatchMetadataError,
        "batch is empty",
        id="pa-empty-batch",
    ),
    # ---- paged_attention: options
    P(lambda e: pa(e, sliding_window=-1), UnsupportedConfigError, "sliding_window", id="pa-window-negative"),
    P(lambda e: pa(e, sliding_window=2.5), UnsupportedConfigError, "sliding_window", id="pa-window-float"),
    P(lambda e: pa(e, sliding_window=True), UnsupportedConfigError, "sliding_window", id="pa-window-bool"),
    P(lambda e: pa(e, softcap=-3.0), UnsupportedConfigError, "softcap", id="pa-softcap-negative"),
    P(lambda e: pa(e, softcap=INF), UnsupportedConfigError, "softcap", id="pa-softcap-inf"),
    P(lambda e: pa(e, softcap=NAN), UnsupportedConfigError, "softcap", id="pa-softcap-nan"),
    P(lambda e: pa(e, scale=0.0), UnsupportedConfigError, "scale", id="pa-scale-0"),
    P(lambda e: pa(e, scale=NAN), UnsupportedConfigError, "scale", id="pa-scale-nan"),
    P(lambda e: pa(e, alibi_slopes=torch.rand(3)), ShapeError, "alibi_slopes", id="pa-alibi-wrong-length"),
    P(lambda e: pa(e, alibi_slopes=torch.rand(NUM_Q_HEADS).half()), DTypeError, "alibi_slopes", id="pa-alibi-fp16"),
    P(lambda e: pa(e, alibi_slopes=torch.rand(1, NUM_Q_HEADS)), ShapeError, "alibi_slopes", id="pa-alibi-2d"),
    P(lambda e: pa(e, sinks=torch.rand(NUM_Q_HEADS + 1)), ShapeError, "sinks", id="pa-sinks-wrong-length"),
    P(lambda e: pa(e, sinks=torch.zeros(NUM_Q_HEADS, dtype=torch.int32)), DTypeError, "sinks", id="pa-sinks-int"),
    P(lambda e: pa(e, sinks=meta(torch.rand(NUM_Q_HEADS))), DeviceError, "sinks", id="pa-sinks-meta"),
    P(lambda e: pa(e, kv_layout="xyz"), UnsupportedConfigError, "kv_layout", id="pa-kv_layout-unknown"),
    P(lambda e: pa(e, kv_layout="vllm_v0"), ShapeError, "k_cache must have 5", id="pa-kv_layout-v0-on-nhd"),
    P(
        lambda e: pa(e, k_cache=e.k_v0, v_cache=e.k_v0[:, :, :, :, 0], kv_layout="vllm_v0"),
        ShapeError,
        "v_cache must be",
        id="pa-v0-v_cache-shape",
    ),
    P(lambda e: pa(e, backend="cuda"), UnsupportedConfigError, "backend", id="pa-backend-unknown"),
    # ---- fp8 scales
    P(lambda e: pa8(e, k_scale=None), ScaleError, "k_scale is required", id="pa-fp8-no-k_scale"),
    P(lambda e: pa8(e, v_scale=None), ScaleError, "v_scale is required", id="pa-fp8-no-v_scale"),
    P(lambda e: pa8(e, k_scale=NAN), ScaleError, "k_scale must be finite", id="pa-fp8-k_scale-nan"),
    P(lambda e: pa8(e, v_scale=INF), ScaleError, "v_scale must be finite", id="pa-fp8-v_scale-inf"),
    P(lambda e: pa8(e, k_scale=-0.5), ScaleError, "k_scale", id="pa-fp8-k_scale-negative"),
    P(lambda e: pa8(e, v_scale=0.0), ScaleError, "v_scale", id="pa-fp8-v_scale-zero"),
    P(
        lambda e: pa8(e, k_scale=torch.tensor([0.5, 0.5, 0.5])),  # 2 KV heads: [2] is one scale per head
        ScaleError,
        "k_scale must be one value",
        id="pa-fp8-k_scale-three-values",
    ),
    P(lambda e: pa8(e, v_scale=torch.tensor(NAN)), ScaleError, "v_scale", id="pa-fp8-v_scale-nan-tensor"),
    # ---- paged_attention, checked mode: metadata values
    P(
        lambda e: pa(e, cu_seqlens_q=i32(1, 2, 3), checked=True),
        BatchMetadataError,
        "cu_seqlens_q[0]",
        id="checked-cu-not-0",
    ),
    P(
        lambda e: pa(e, cu_seqlens_q=i32(0, 4, 3), checked=True),
        BatchMetadataError,
        "non-decreasing",
        id="checked-cu-decreasing",
    ),
    P(
        lambda e: pa(e, seq_lens=i32(1, 20), checked=True),
        BatchMetadataError,
        "exceeds seq_lens[0]",
        id="checked-query-longer-than-seq",
    ),
    P(
        lambda e: pa(e, seq_lens=i32(5, -20), checked=True),
        BatchMetadataError,
        "seq_lens[1]",
        id="checked-negative-seq_len",
    ),
    P(
        lambda e: pa(e, seq_lens=i32(5, 33), checked=True),
        BatchMetadataError,
        "block_table has only",
        id="checked-seq-beyond-table",
    ),
    P(
        lambda e: pa(e, block_table=i32(0, 0, 99, 1).reshape(2, 2), checked=True),
        BatchMetadataError,
        "block_table[1, 0] = 99",
        id="checked-block-id-too-large",
    ),
    P(
        lambda e: pa(e, block_table=i32(0, 0, 1, -7).reshape(2, 2), checked=True),
        BatchMetadataError,
        "block_table[1, 1] = -7",
        id="checked-block-id-negative",
    ),
    P(
        lambda e: pa(e, q=e.q[:2], checked=True),
        BatchMetadataError,
        "cu_seqlens_q[-1] = 3",
        id="checked-cu-end-vs-num_tokens",
    ),
    P(
        lambda e: pa(e, max_seq_len=19, checked=True),
        BatchMetadataError,
        "max_seq_len = 19",
        id="checked-max_seq_len-understated",
    ),
    P(
        lambda e: pa(e, max_query_len=1, checked=True),
        BatchMetadataError,
        "max_query_len = 1",
        id="checked-max_query_len-understated",
    ),
    P(
        lambda e: pa(e, seq_lens=i32(5, 21), checked=True),
        UnwrittenKVError,
        "never written",
        id="checked-reads-unwritten-slot",
    ),
    P(
        lambda e: attention(
            e.q,
            e.cache,
            e.cache.batch([e.a, e.b], [2, 1], contract="context"),
            k_new=e.k_new,
            v_new=e.v_new,
            decode_from_cache=True,
            checked=True,
        ),
        UnwrittenKVError,
        "never written",
        id="checked-cache-decode-token-unwritten",
    ),
    # ---- prefix_prefill
    P(lambda e: pp(e, k_new=e.k_new[:2]), ShapeError, "k_new must be", id="pp-k_new-wrong-rows"),
    P(
        lambda e: pp(e, v_new=torch.randn(3, NUM_Q_HEADS, HEAD_SIZE)),
        ShapeError,
        "v_new must be",
        id="pp-v_new-q-heads",
    ),
    P(lambda e: pp(e, k_new=e.k_new.to(torch.int32)), DTypeError, "k_new must be", id="pp-k_new-int"),
    P(lambda e: pp(e, v_new=meta(e.v_new)), DeviceError, "v_new is on meta", id="pp-v_new-meta"),
    P(overlapping_out_and_k_new, LayoutError, "out overlaps k_new", id="pp-out-overlaps-k_new"),
    P(
        lambda e: pp(e, cu_seqlens_q=i32(0, 3, 2), checked=True),
        BatchMetadataError,
        "non-decreasing",
        id="pp-checked-cu-decreasing",
    ),
    # ---- write_kv
    P(lambda e: wk(e, slot_mapping=e.slots.int()), DTypeError, "slot_mapping must be int64", id="write-slots-int32"),
    P(lambda e: wk(e, slot_mapping=e.slots[:2]), ShapeError, "slot_mapping must have", id="write-slots-short"),
    P(
        lambda e: wk(e, k=e.k_new.half(), v=e.v_new.half()),
        DTypeError,
        "k is torch.float16",
        id="write-k-dtype-vs-cache",
    ),
    P(lambda e: wk(e, k=meta(e.k_new)), DeviceError, "k is on meta", id="write-k-meta"),
    P(lambda e: wk(e, v=strided(e.v_new)), LayoutError, "v must be contiguous", id="write-v-noncontiguous"),
    P(
        lambda e: wk(e, k_cache=strided(e.cache.k), v_cache=strided(e.cache.v)),
        LayoutError,
        "k_cache must be contiguous",
        id="write-cache-noncontiguous",
    ),
    P(lambda e: wk(e, k=torch.randn(3, NUM_KV_HEADS, 16)), ShapeError, "k must be", id="write-k-head_size"),
    P(lambda e: wk(e, v_cache=e.cache.k), LayoutError, "same memory", id="write-k-and-v-cache-alias"),
    P(
        lambda e: wk(e, slot_mapping=torch.tensor([0, 1, NUM_BLOCKS * BLOCK_SIZE]), checked=True),
        BatchMetadataError,
        "slot_mapping[2]",
        id="write-checked-slot-too-large",
    ),
    P(
        lambda e: wk(e, slot_mapping=torch.tensor([-5, 1, 2]), checked=True),
        BatchMetadataError,
        "slot_mapping[0] = -5",
        id="write-checked-slot-below-minus-1",
    ),
    P(
        lambda e: wk(e, slot_mapping=torch.tensor([7, 9, 7]) + e.slots[0], checked=True),
        SlotConflictError,
        "slot_mapping[0] and slot_mapping[2]",
        id="write-checked-duplicate-slot",
    ),
    P(lambda e: wk8(e, k_scale=None), ScaleError, "k_scale is required", id="write-fp8-no-k_scale"),
    P(lambda e: wk8(e, v_scale=NAN), ScaleError, "v_scale must be finite", id="write-fp8-v_scale-nan"),
    P(lambda e: wk8(e, k_scale=-1.0), ScaleError, "k_scale", id="write-fp8-k_scale-negative"),
    P(
        lambda e: wk8(e, k_cache=e.fp8.k.view(torch.uint8), v_cache=e.fp8.v.view(torch.uint8)),
        DTypeError,
        "fp8_dtype",
        id="write-uint8-cache-without-fp8_dtype",
    ),
    P(lambda e: wk8(e, fp8_dtype=torch.float8_e5m2), DTypeError, "fp8_dtype", id="write-fp8_dtype-mismatch"),
    # ---- compat.vllm
    P(lambda e: ctx_fwd(e, k_cache=e.cache.k, v_cache=e.cache.v), LayoutError, "k_cache", id="vllm-ctx-flash-layout"),
    P(
        lambda e: ctx_fwd(e, kv_cache_dtype="int4"),
        UnsupportedConfigError,
        "kv_cache_dtype",
        id="vllm-ctx-kv_cache_dtype",
    ),
    P(lambda e: ctx_fwd(e, fp8_out_scale=1.0), UnsupportedConfigError, "fp8_out_scale", id="vllm-ctx-fp8_out_scale"),
    P(lambda e: ctx_fwd(e, b_start_loc=i32(0, 2)), ShapeError, "b_start_loc", id="vllm-ctx-b_start_loc-length"),
    P(lambda e: ctx_fwd(e, b_loc=e.batch.block_table.float()), DTypeError, "b_loc", id="vllm-ctx-b_loc-float"),
    P(lambda e: ctx_fwd(e, k=e.k_new[:2]), ShapeError, "k_new = k", id="vllm-ctx-k-wrong-rows"),
    P(lambda e: ctx_fwd(e, o=e.q), LayoutError, "out = o", id="vllm-ctx-o-is-q"),
    P(
        lambda e: ctx_fwd(e, alibi_slopes=torch.rand(NUM_Q_HEADS), sinks=torch.rand(NUM_Q_HEADS)),
        UnsupportedConfigError,
        "sinks",
        id="vllm-ctx-alibi-and-sinks",
    ),
    P(lambda e: chunked(e, output_scale=1.0), UnsupportedConfigError, "output_scale", id="vllm-chunked-output_scale"),
    P(
        lambda e: chunked_fp8_uint8(e, k_scale=None, v_scale=1.0),
        ScaleError,
        "k_scale",
        id="vllm-chunked-fp8-no-k_scale",
    ),
    P(
        lambda e: chunked(e, key_cache=e.k_v0.view(torch.uint8)),
        DTypeError,
        "key_cache",
        id="vllm-chunked-uint8-cache-auto",
    ),
    P(lambda e: chunked(e, seq_lens=e.ctx_seq_lens.float()), DTypeError, "seq_lens", id="vllm-chunked-seq_lens-float"),
    P(lambda e: ua(e, causal=False), UnsupportedConfigError, "causal", id="vllm-ua-not-causal"),
    P(lambda e: ua(e, window_size=(-1, 4)), UnsupportedConfigError, "window_size", id="vllm-ua-window-right"),
    P(lambda e: ua(e, window_size=(-3, -1)), UnsupportedConfigError, "window_size[0]", id="vllm-ua-window-left"),
    P(lambda e: ua(e, q_descale=1.0), UnsupportedConfigError, "q_descale", id="vllm-ua-q_descale"),
    P(lambda e: ua(e, mm_prefix_range=(0, 4)), UnsupportedConfigError, "mm_prefix_range", id="vllm-ua-unknown-kw"),
    P(
        lambda e: ua(e, k=e.cache.k.view(torch.uint8), v=e.cache.v.view(torch.uint8)),
        DTypeError,
        "k is torch.uint8",
        id="vllm-ua-uint8-cache",
    ),
    P(lambda e: ua(e, softcap=-1.0), UnsupportedConfigError, "softcap", id="vllm-ua-softcap-negative"),
    P(
        lambda e: ua(
            e,
            q=e.q16,
            k=e.fp8.k,
            v=e.fp8.v,
            out=torch.empty_like(e.q16),
            cu_seqlens_q=e.fp8_batch.cu_seqlens_q,
            seqused_k=e.fp8_batch.seq_lens,
            block_table=e.fp8_batch.block_table,
            max_seqlen_q=1,
            max_seqlen_k=5,
            v_descale=0.25,
        ),
        ScaleError,
        "k_descale",
        id="vllm-ua-fp8-no-k_descale",
    ),
    P(lambda e: ua(e, seqused_k=e.batch.seq_lens.float()), DTypeError, "seqused_k", id="vllm-ua-seqused_k-float"),
    P(lambda e: ua(e, k=e.k_v0, v=e.v_v0), LayoutError, "k must be a flash-layout", id="vllm-ua-older-layout"),
    P(lambda e: rcf(e, slot_mapping=e.slots.float()), DTypeError, "slot_mapping", id="vllm-rcf-slots-float"),
    P(lambda e: rcf(e, key_cache=e.k_v0, value_cache=e.v_v0), LayoutError, "key_cache", id="vllm-rcf-older-layout"),
    P(lambda e: rcf8(e, k_scale=None), ScaleError, "k_scale", id="vllm-rcf-fp8-no-k_scale"),
    P(lambda e: rcf8(e, v_scale=NAN), ScaleError, "v_scale", id="vllm-rcf-fp8-v_scale-nan"),
    P(lambda e: rcf(e, value=e.v_new[:2]), ShapeError, "key and value", id="vllm-rcf-key-value-shapes"),
    P(lambda e: rcf(e, slot_mapping=torch.arange(4)), ShapeError, "slot_mapping", id="vllm-rcf-slots-too-many"),
    P(
        lambda e: rcf(e, key=e.k_new.half(), value=e.v_new.half()),
        DTypeError,
        "key_cache",
        id="vllm-rcf-key-dtype-vs-cache",
    ),
    P(
        lambda e: rcf(e, kv_cache_dtype=None),
        UnsupportedConfigError,
        "kv_cache_dtype",
        id="vllm-rcf-kv_cache_dtype-none",
    ),
    # ---- the CLI
    P(lambda e: cli("frobnicate"), SystemExit, "invalid choice: 'frobnicate'", id="cli-unknown-command"),
    P(
        lambda e: cli("scenario", "no-such-fault"),
        SystemExit,
        "invalid choice: 'no-such-fault'",
        id="cli-unknown-scenario",
    ),
    P(lambda e: cli("verify", "--contract", "sideways"), SystemExit, "--contract", id="cli-verify-bad-contract"),
    P(lambda e: cli("verify", "--seed", "x"), SystemExit, "--seed", id="cli-verify-seed-not-int"),
    P(lambda e: cli("explain", "--dtype", "fp64"), SystemExit, "--dtype", id="cli-explain-dtype"),
    P(lambda e: cli("explain", "--sms", "0"), SystemExit, "--sms", id="cli-explain-sms-0"),
    P(
        lambda e: cli("explain", "--sms", "132", "--head-size", "0"),
        SystemExit,
        "head_size",
        id="cli-explain-head-size-0",
    ),
    P(
        lambda e: cli("explain", "--sms", "132", "--head-size", "320"),
        SystemExit,
        "head_size",
        id="cli-explain-head-size-320",
    ),
    P(
        lambda e: cli("explain", "--sms", "132", "--num-kv-heads", "3"),
        SystemExit,
        "num_kv_heads",
        id="cli-explain-heads-not-multiple",
    ),
    P(
        lambda e: cli("explain", "--sms", "132", "--block-size", "24"),
        SystemExit,
        "block_size",
        id="cli-explain-block-size",
    ),
    P(lambda e: cli("explain", "--sms", "132", "--kv-dtype", "fp6"), SystemExit, "kv_dtype", id="cli-explain-kv-dtype"),
    P(
        lambda e: cli("explain", "--sms", "132", "--sliding-window", "-2"),
        SystemExit,
        "sliding_window",
        id="cli-explain-window-negative",
    ),
    P(
        lambda e: cli("explain", "--sms", "132", "--query-lens", "1,1", "--ctx-lens", "5"),
        SystemExit,
        "ctx_lens",
        id="cli-explain-lens-count-mismatch",
    ),
    P(
        lambda e: cli("explain", "--sms", "132", "--query-lens", "one"),
        SystemExit,
        "--query-lens",
        id="cli-explain-query-lens-not-int",
    ),
    P(
        lambda e: cli("explain", "--sms", "132", "--query-lens", "-3", "--ctx-lens", "1"),
        SystemExit,
        "--query-lens",
        id="cli-explain-query-lens-negative",
    ),
    P(
        lambda e: cli("scenario", "incomplete-cache", "--device", "abacus"),
        SystemExit,
        "--device",
        id="cli-scenario-bad-device",
    ),
    P(
        lambda e: cli("bench", "--workloads", "no-such-workload"),
        SystemExit,
        "no-such-workload",
        id="cli-bench-unknown-workload",
    ),
]


# ---------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------
def _trap(name: str):
    def trap(*args, **kwargs):
        raise AssertionError(f"{name} ran: validation must refuse bad inputs before any kernel launch")

    return trap


@pytest.fixture
def env() -> Env:
    return build_env()


@pytest.fixture
def no_kernels(env, monkeypatch):
    """Every way a call could reach device work raises instead (set up after `env` is built)."""
    monkeypatch.setattr(unified_kernels, "bind_attention", _trap("kernels.unified.bind_attention"))
    monkeypatch.setattr(write_kernels, "_launch", _trap("kernels.write._launch"))
    monkeypatch.setattr(write_kernels, "_write_torch", _trap("kernels.write._write_torch"))
    monkeypatch.setattr(reference, "attention", _trap("reference.attention"))
    # `explain --sms` swaps dispatch.sm_count for the process: put it back after the test
    monkeypatch.setattr(dispatch, "sm_count", dispatch.sm_count)


def _allocator_state(cache: PagedKVCache) -> dict:
    return dict(
        free=cache.free_blocks,
        num_free=cache.num_free_blocks,
        tables={s: cache.block_table(s) for s in cache.sequences},
        lens={s: cache.seq_len(s) for s in cache.sequences},
        refcounts=[cache.refcount(b) for b in range(cache.num_blocks)],
        next_id=cache._next_seq_id,
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaN-safe: compares bit patterns, not values)."""
    return t.detach().contiguous().view(torch.uint8).clone() if t.numel() else t.detach().clone()


def _snapshot(env: Env) -> tuple[dict, dict]:
    tensors = {name: _bits(t) for name, t in {**env.tensors(), **env.extra}.items()}
    return tensors, dict(cache=_allocator_state(env.cache), fp8=_allocator_state(env.fp8))


def test_catalogue_is_large_and_distinct():
    ids = [p.id for p in ROWS]
    assert len(ids) == len(set(ids))
    assert len(ROWS) >= 55


@pytest.mark.parametrize("call, error, words", ROWS)
def test_bad_input_is_refused(call, error, words, env, no_kernels, capsys):
    tensors_before, state_before = _snapshot(env)
    with pytest.raises(BaseException) as info:
        call(env)
    exc = info.value
    captured = capsys.readouterr()
    if error is SystemExit:
        assert isinstance(exc, SystemExit), f"expected SystemExit, got {type(exc).__name__}: {exc}"
        assert exc.code not in (0, None), f"exit status {exc.code!r}"
        message = f"{exc.code if not isinstance(exc.code, int) else ''}\n{captured.err}\n{captured.out}"
    else:
        assert isinstance(exc, error), f"expected {error.__name__}, got {type(exc).__name__}: {exc}"
        assert isinstance(exc, PagedAttentionError)
        message = str(exc)
    assert words in message, f"message does not name the argument ({words!r}): {message!r}"
    tensors_after, state_after = _snapshot(env)
    assert state_after == state_before, "allocator state changed by a refused call"
    for name, before in tensors_before.items():
        assert torch.equal(tensors_after[name], before), f"{name} changed by a refused call"


def test_baseline_calls_are_valid():
    """The Env's unchanged calls succeed, so each row fails for the one thing it changes."""
    env = build_env()
    for call in (pa, pa8, pp, ctx_fwd, chunked, ua):
        out = call(env)
        assert out is None or isinstance(out, torch.Tensor)
    wk(env)
    env = build_env()
    rcf(env)
    wk8(env)
    rcf8(env)
    bm(env)
    attention(env.q, env.cache, env.batch, checked=True)
    assert math.isfinite(float(attention(env.q, env.cache, env.batch).abs().sum()))
