"""The one-shot entry points: each is a plan plus one run of `pagedattn.PagedAttention`.

    paged_attention  full-cache contract: every sequence's seq_len tokens are already in the cache
    prefix_prefill   context-cache contract: the cache holds ctx_len tokens; the query tokens'
                     K/V come as k_new / v_new
    attention        the same over a `PagedKVCache` and its `BatchMetadata`

Shapes (names used everywhere):
    q, out:            [num_tokens, num_q_heads, head_size]
    k_new, v_new:      [num_tokens, num_kv_heads, head_size]
    k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, head_size]   (kv_layout "nhd"; "hnd"
                       and "vllm_v0" too, see `pagedattn.options`); any strides
    cu_seqlens_q:      [num_seqs + 1] int32;  seq_lens: [num_seqs] int32
    block_table:       [num_seqs, max_blocks_per_seq] int32

The rule for checks: host-side checks (ranks, shapes, dtypes, devices, q rows against the batch)
always run and cost no device sync; metadata values are validated whenever host copies exist
(always on CPU), and in checked mode; otherwise a sequence with inconsistent metadata gets NaN
rows and the kernels never touch memory outside their tensors.

q may be fp16/bf16/fp32 over a cache of any supported dtype (fp16/bf16/fp32/fp8): K and V are
converted to q's dtype for the dot products (fp32 q over a bf16 cache computes in fp32). q may
also be fp8 (float8_e4m3fn, with `q_scale`: real q = q * q_scale) over an fp16/bf16/fp8 cache;
the output is then bf16 unless `out` says otherwise. An fp8 (e4m3) `out` with `out_scale` holds
out / out_scale (vLLM's output_scale).
An engine that calls attention once per layer should use `PagedAttention` (plan once per step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import reference
from .batch import BatchMetadata
from .config import MAX_HEAD_SIZE
from .errors import ShapeError, UnsupportedConfigError
from .options import AttentionOptions
from .planner import PagedAttention
from .validate import cache_geometry, check_query_tensor, nhd_views

if TYPE_CHECKING:
    from .cache import PagedKVCache

to_nhd = nhd_views  # the older name


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    q_scale: float | torch.Tensor | None = None,
    out_scale: float | torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    kv_layout: str = "nhd",
    query_lens_host: Sequence[int] | None = None,
    seq_lens_host: Sequence[int] | None = None,
    backend: str = "auto",
    checked: bool | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Full-cache contract: the K/V of all seq_len tokens of every sequence, the query tokens'
    own included, were written to the cache before this call. One launch handles any mix of
    prefill (query_len > 1, with or without cached prefix) and decode (query_len == 1).

    `query_lens_host`: optional host copy of the query lengths (never read from the device); it
    lets a mixed batch skip a launch that has no sequence to work on. Leave it out when capturing
    a CUDA graph: without it the launches depend on shapes only (num_tokens, num_seqs and the
    max_query_len / max_seq_len bounds), so a replay with other lengths runs the same kernels.
    `seq_lens_host`: host copy of seq_lens; with both host copies the metadata values are validated
    with no device sync. `backend`: "auto" (dispatch decides), "triton" or "reference". With
    `checked=True` (default: the environment's PAGEDATTN_CHECKED), metadata values are validated
    (one device sync without host copies) and every cache position the kernel will read is proved
    to hold no poison. `validate=False` skips value validation (see the module docstring)."""
    options = AttentionOptions(
        scale=scale,
        sliding_window=sliding_window,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
        sinks=sinks,
        k_scale=k_scale,
        v_scale=v_scale,
        kv_layout=kv_layout,
        q_scale=q_scale,
        out_scale=out_scale,
    )
    return _plan_and_run(
        "full",
        q,
        k_cache,
        v_cache,
        cu_seqlens_q,
        seq_lens,
        block_table,
        None,
        None,
        False,
        options,
        max_query_len,
        max_seq_len,
        out,
        query_lens_host,
        seq_lens_host,
        backend,
        checked,
        validate,
    )


def prefix_prefill(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    decode_from_cache: bool = False,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    q_scale: float | torch.Tensor | None = None,
    out_scale: float | torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    kv_layout: str = "nhd",
    query_lens_host: Sequence[int] | None = None,
    seq_lens_host: Sequence[int] | None = None,
    backend: str = "auto",
    checked: bool | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Context-cache contract (vLLM's context_attention_fwd): the cache holds the first
    ctx_len = seq_len - query_len tokens of each sequence; the query tokens' K/V are `k_new` /
    `v_new` (rows aligned with `q`). With `decode_from_cache=True`, sequences with query_len == 1
    instead read all seq_len tokens from the cache (vLLM's chunked_prefill_paged_decode), so their
    own K/V must already be in the cache: exactly the contract the seed's test broke."""
    options = AttentionOptions(
        scale=scale,
        sliding_window=sliding_window,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
        sinks=sinks,
        k_scale=k_scale,
        v_scale=v_scale,
        kv_layout=kv_layout,
        q_scale=q_scale,
        out_scale=out_scale,
    )
    return _plan_and_run(
        "context",
        q,
        k_cache,
        v_cache,
        cu_seqlens_q,
        seq_lens,
        block_table,
        k_new,
        v_new,
        decode_from_cache,
        options,
        max_query_len,
        max_seq_len,
        out,
        query_lens_host,
        seq_lens_host,
        backend,
        checked,
        validate,
    )


def attention(
    q: torch.Tensor,
    cache: PagedKVCache,
    batch: BatchMetadata,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    decode_from_cache: bool = False,
    checked: bool | None = None,
    **options,
) -> torch.Tensor:
    """Attention over a `PagedKVCache`: full-cache contract, or context-cache contract when
    `k_new`/`v_new` are given. `checked` defaults to the cache's own flag; in checked mode the
    cache's bookkeeping proves every position to be read was written (see `checks`). q's rows
    must be the batch's query tokens (checked on the host, always)."""
    checked = cache.checked if checked is None else checked
    if (
        isinstance(q, torch.Tensor)
        and batch.query_lens_host is not None
        and q.dim() >= 1
        and q.shape[0] != sum(batch.query_lens_host)
    ):
        raise ShapeError(
            f"q has {q.shape[0]} rows (tokens) but the batch has {sum(batch.query_lens_host)} "
            f"query tokens: the kernel would read and write rows that are not there"
        )
    contract = "context" if k_new is not None else "full"
    if checked:  # the one proof of the reads: the bookkeeping (or one scan of a poisoned cache)
        from . import checks

        checks.check_batch_against_cache(cache, batch, contract=contract, decode_from_cache=decode_from_cache)
    out, backend, validate = (options.pop(name, default) for name, default in _RUN_ARGUMENTS)
    tensors, scales = _cache_arguments(cache, batch)
    return _plan_and_run(
        contract,
        q,
        *tensors,
        k_new,
        v_new,
        decode_from_cache,
        AttentionOptions(**scales, **options),
        batch.max_query_len,
        batch.max_seq_len,
        out,
        batch.query_lens_host,
        batch.seq_lens_host,
        backend,
        checked,
        validate,
        reads_proven=checked,
    )


# what `attention` passes on to the run rather than to AttentionOptions, with defaults
_RUN_ARGUMENTS = (("out", None), ("backend", "auto"), ("validate", None))


def _cache_arguments(cache: PagedKVCache, batch: BatchMetadata) -> tuple[tuple, dict]:
    """A cache and its batch as the plain functions take them: (k_cache, v_cache, cu_seqlens_q,
    seq_lens, block_table), and k_scale / v_scale (the cache's own when it is fp8, else None)."""
    fp8 = cache.is_fp8
    scales = dict(k_scale=cache.k_scale if fp8 else None, v_scale=cache.v_scale if fp8 else None)
    return (cache.k, cache.v, batch.cu_seqlens_q, batch.seq_lens, batch.block_table), scales


def reference_attention(
    q: torch.Tensor,
    cache: PagedKVCache,
    batch: BatchMetadata,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    decode_from_cache: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    **options,
) -> torch.Tensor:
    """`attention` computed by the PyTorch reference in `compute_dtype` (float32 or float64):
    the same arguments, for checking a kernel's output (see `pagedattn.compare`)."""
    tensors, scales = _cache_arguments(cache, batch)
    return reference.attention(
        q,
        *tensors,
        **scales,
        k_new=k_new,
        v_new=v_new,
        decode_from_cache=decode_from_cache,
        compute_dtype=compute_dtype,
        **options,
    )


def _plan_and_run(
    contract,
    q,
    k_cache,
    v_cache,
    cu_seqlens_q,
    seq_lens,
    block_table,
    k_new,
    v_new,
    decode_from_cache,
    options,
    max_query_len,
    max_seq_len,
    out,
    query_lens_host,
    seq_lens_host,
    backend,
    checked,
    validate,
    *,
    reads_proven: bool = False,
):
    """`reads_proven`: the caller proved every cache position to be read was written (checked
    mode's bookkeeping, `attention`): checked mode then validates the metadata values but does
    not scan the cache again."""
    check_query_tensor(q)
    out_dtype = None  # out in q's dtype, except with fp8 q or an fp8 out
    if isinstance(out, torch.Tensor) and torch.float8_e4m3fn in (q.dtype, out.dtype):
        out_dtype = out.dtype
    if not 0 < q.shape[2] <= MAX_HEAD_SIZE:
        raise UnsupportedConfigError(f"head_size (q.shape[2]) must be in 1..{MAX_HEAD_SIZE}, got {q.shape[2]}")
    num_blocks, block_size, num_kv_heads, head_size = cache_geometry(k_cache, v_cache, options.kv_layout, q.device)
    if head_size != q.shape[2]:
        raise ShapeError(f"k_cache has head_size {head_size}, q has head_size {q.shape[2]}")
    if num_kv_heads == 0 or q.shape[1] % num_kv_heads:
        raise ShapeError(
            f"num_q_heads ({q.shape[1]}, q.shape[1]) must be a multiple of num_kv_heads ({num_kv_heads}, from k_cache)"
        )
    attn = PagedAttention(
        options,
        num_q_heads=q.shape[1],
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        block_size=block_size,
        dtype=q.dtype,
        kv_cache_dtype=k_cache.dtype,
        out_dtype=out_dtype,
        num_blocks=num_blocks,
        device=q.device,
        contract=contract,
        decode_from_cache=decode_from_cache,
        checked=checked,
        backend=backend,
    )
    attn._share_bindings = True  # a binding equal to an earlier call's is taken from the cache
    attn._scan_reads = not reads_proven
    attn.plan(
        cu_seqlens_q,
        seq_lens,
        block_table,
        query_lens_host=query_lens_host,
        seq_lens_host=seq_lens_host,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        num_tokens=q.shape[0],
        validate=validate,
    )
    return attn.run(q, k_cache, v_cache, out=out, k_new=k_new, v_new=v_new)
