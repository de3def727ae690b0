"""The functional entry points: validate once at the boundary, plan with `dispatch`, launch.

    paged_attention  full-cache contract: every sequence's seq_len tokens are already in the cache
    prefix_prefill   context-cache contract: the cache holds ctx_len tokens; the query tokens'
                     K/V come as k_new / v_new
    attention        the same over a `PagedKVCache` and its `BatchMetadata`

Shapes (names used everywhere):
    q, out:            [num_tokens, num_q_heads, head_size]
    k_new, v_new:      [num_tokens, num_kv_heads, head_size]
    k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, head_size]   (kv_layout "nhd")
    cu_seqlens_q:      [num_seqs + 1] int32;  seq_lens: [num_seqs] int32
    block_table:       [num_seqs, max_blocks_per_seq] int32

Host-side checks (ranks, sizes, dtypes, devices, scales) always run and cost no device sync.
Value checks (offsets, lengths, block ids, written positions) run only with `checked=True`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

from . import dispatch, reference
from .batch import BatchMetadata, check_block_table_values, check_metadata_tensors
from .config import FP8_DTYPES, MAX_HEAD_SIZE, QUERY_DTYPES, SUPPORTED_BLOCK_SIZES
from .errors import DeviceError, DTypeError, LayoutError, ShapeError, UnsupportedConfigError
from .kernels.write import check_scale

if TYPE_CHECKING:
    from .cache import PagedKVCache


# ---------------------------------------------------------------------------------------------
# validation (host only, no device sync)
# ---------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, rank: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ShapeError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    if t.device != device:
        raise DeviceError(f"{name} is on {t.device}, expected {device} (the device of q)")


KV_LAYOUTS = ("nhd", "vllm_v0")


def cache_geometry(k_cache, v_cache, kv_layout: str, device: torch.device) -> tuple[int, int, int, int]:
    """(num_blocks, block_size, num_kv_heads, head_size) of a K/V cache pair in `kv_layout`:
    "nhd":     k, v [num_blocks, block_size, num_kv_heads, head_size] (vLLM flash layout, FlashInfer NHD)
    "vllm_v0": k [num_blocks, num_kv_heads, head_size // x, block_size, x], v [num_blocks, num_kv_heads, head_size, block_size]
    """
    if kv_layout not in KV_LAYOUTS:
        raise UnsupportedConfigError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    if kv_layout == "nhd":
        _check_tensor("k_cache", k_cache, 4, device)
        _check_tensor("v_cache", v_cache, 4, device)
        if k_cache.shape != v_cache.shape:
            raise ShapeError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
        return tuple(k_cache.shape)
    _check_tensor("k_cache", k_cache, 5, device)
    _check_tensor("v_cache", v_cache, 4, device)
    num_blocks, num_kv_heads, chunks, block_size, x = k_cache.shape
    expected_v = (num_blocks, num_kv_heads, chunks * x, block_size)
    if tuple(v_cache.shape) != expected_v:
        raise ShapeError(
            f"v_cache must be [num_blocks, num_kv_heads, head_size, block_size] = {list(expected_v)} "
            f"to match k_cache {list(k_cache.shape)}, got {list(v_cache.shape)}"
        )
    return num_blocks, block_size, num_kv_heads, chunks * x


def to_nhd(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches in "nhd" layout (for the reference and checks; the kernels read in place)."""
    if kv_layout == "nhd":
        return k_cache, v_cache
    nb, kvh, chunks, bs, x = k_cache.shape
    k = k_cache.permute(0, 3, 1, 2, 4).reshape(nb, bs, kvh, chunks * x)
    v = v_cache.permute(0, 3, 1, 2)
    return k, v


def check_inputs(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, *, out=None,
                 k_new=None, v_new=None, sliding_window=None, alibi_slopes=None, softcap=None,
                 sinks=None, k_scale=None, v_scale=None, scale=None, kv_layout="nhd",
                 checked=False) -> tuple[int, int, int, int]:
    """Cheap host-side validation of every argument; raises a specific PagedAttentionError.
    Returns the cache geometry (num_blocks, block_size, num_kv_heads, head_size)."""
    if not isinstance(q, torch.Tensor):
        raise DTypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    device = q.device
    _check_tensor("q", q, 3, device)
    if q.dtype not in QUERY_DTYPES:
        raise DTypeError(f"q must be one of {QUERY_DTYPES}, got {q.dtype}")
    num_tokens, num_q_heads, head_size = q.shape
    if head_size == 0 or head_size > MAX_HEAD_SIZE:
        raise UnsupportedConfigError(f"head_size (q.shape[2]) must be in 1..{MAX_HEAD_SIZE}, got {head_size}")
    if q.stride(-1) != 1:
        raise LayoutError(f"q must be contiguous in its last dimension, got strides {q.stride()}")
    num_blocks, block_size, num_kv_heads, cache_head_size = cache_geometry(k_cache, v_cache, kv_layout, device)
    if cache_head_size != head_size:
        raise ShapeError(f"k_cache has head_size {cache_head_size}, q has head_size {head_size}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise UnsupportedConfigError(f"block_size of k_cache must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ShapeError(
            f"num_q_heads ({num_q_heads}, q.shape[1]) must be a multiple of num_kv_heads "
            f"({num_kv_heads}, from k_cache)"
        )
    if k_cache.dtype != v_cache.dtype:
        raise DTypeError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must share a dtype")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise LayoutError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    fp8 = k_cache.dtype in FP8_DTYPES
    if fp8:
        check_scale("k_scale", k_scale, device, checked=checked)
        check_scale("v_scale", v_scale, device, checked=checked)
    elif k_cache.dtype not in QUERY_DTYPES:
        raise DTypeError(f"k_cache must be fp16/bf16/fp32 or an fp8 dtype, got {k_cache.dtype}")
    check_metadata_tensors(cu_seqlens_q, seq_lens, block_table, device)
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t is None:
            continue
        _check_tensor(name, t, 3, device)
        if tuple(t.shape) != (num_tokens, num_kv_heads, head_size):
            raise ShapeError(
                f"{name} must be [num_tokens, num_kv_heads, head_size] = "
                f"{[num_tokens, num_kv_heads, head_size]}, got {list(t.shape)}"
            )
        if t.dtype not in QUERY_DTYPES:
            raise DTypeError(f"{name} must be fp16/bf16/fp32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise LayoutError(f"{name} must be contiguous in head_size, got strides {t.stride()}")
    if out is not None:
        _check_tensor("out", out, 3, device)
        if out.shape != q.shape:
            raise ShapeError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
        if out.dtype != q.dtype:
            raise DTypeError(f"out must have q's dtype {q.dtype}, got {out.dtype}")
        if out.stride(-1) != 1:
            raise LayoutError(f"out must be contiguous in its last dimension, got strides {out.stride()}")
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
            if t is not None and _overlaps(out, t):
                raise LayoutError(f"out overlaps {name}: the kernel reads {name} while writing out")
    if sliding_window is not None and (not isinstance(sliding_window, int) or isinstance(sliding_window, bool)
                                       or sliding_window < 0):
        raise UnsupportedConfigError(f"sliding_window must be None, 0 (none) or a positive int, got {sliding_window!r}")
    if softcap is not None and (not math.isfinite(float(softcap)) or float(softcap) < 0):
        raise UnsupportedConfigError(f"softcap must be None, 0 (off) or finite and > 0, got {softcap!r}")
    if scale is not None and (not math.isfinite(float(scale)) or float(scale) <= 0):
        raise UnsupportedConfigError(f"scale must be finite and > 0, got {scale!r}")
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if t is None:
            continue
        _check_tensor(name, t, 1, device)
        if t.shape[0] != num_q_heads:
            raise ShapeError(f"{name} must have num_q_heads = {num_q_heads} entries, got {t.shape[0]}")
        if t.dtype != torch.float32:
            raise DTypeError(f"{name} must be float32, got {t.dtype}")
    return num_blocks, block_size, num_kv_heads, head_size


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + (a.numel() and sum((s - 1) * st for s, st in zip(a.shape, a.stride())) + 1) * a.element_size()
    b1 = b0 + (b.numel() and sum((s - 1) * st for s, st in zip(b.shape, b.stride())) + 1) * b.element_size()
    return a0 < b1 and b0 < a1


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
    out: torch.Tensor | None = None,
    kv_layout: str = "nhd",
    query_lens_host: Sequence[int] | None = None,
    backend: str = "auto",
    checked: bool = False,
) -> torch.Tensor:
    """Full-cache contract: the K/V of all seq_len tokens of every sequence, the query tokens'
    own included, were written to the cache before this call. One launch handles any mix of
    prefill (query_len > 1, with or without cached prefix) and decode (query_len == 1).

    `query_lens_host`: optional host copy of the query lengths (never read from the device); it
    lets a mixed batch skip a launch that has no sequence to work on. Leave it out when capturing
    a CUDA graph: without it the launches depend on shapes only (num_tokens, num_seqs and the
    max_query_len / max_seq_len bounds), so a replay with other lengths runs the same kernels.
    `backend`: "auto" (dispatch decides), "triton" or "reference". With `checked=True`, metadata
    values are validated (one device sync) and, where the cache was poisoned with NaN, every
    position the kernel will read is verified to have been written."""
    return _run(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, None, None, False,
                max_query_len, max_seq_len, scale, sliding_window, alibi_slopes, softcap, sinks,
                k_scale, v_scale, out, kv_layout, query_lens_host, backend, checked)


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
    out: torch.Tensor | None = None,
    kv_layout: str = "nhd",
    query_lens_host: Sequence[int] | None = None,
    backend: str = "auto",
    checked: bool = False,
) -> torch.Tensor:
    """Context-cache contract (vLLM's context_attention_fwd): the cache holds the first
    ctx_len = seq_len - query_len tokens of each sequence; the query tokens' K/V are `k_new` /
    `v_new` (rows aligned with `q`). With `decode_from_cache=True`, sequences with query_len == 1
    instead read all seq_len tokens from the cache (vLLM's chunked_prefill_paged_decode), so their
    own K/V must already be in the cache: exactly the contract the seed's test broke."""
    return _run(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, k_new, v_new,
                decode_from_cache, max_query_len, max_seq_len, scale, sliding_window, alibi_slopes,
                softcap, sinks, k_scale, v_scale, out, kv_layout, query_lens_host, backend, checked)


def attention(q: torch.Tensor, cache: "PagedKVCache", batch: BatchMetadata, *,
              k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
              decode_from_cache: bool = False, checked: bool | None = None, **options) -> torch.Tensor:
    """Attention over a `PagedKVCache`: full-cache contract, or context-cache contract when
    `k_new`/`v_new` are given. `checked` defaults to the cache's own flag; in checked mode the
    cache's bookkeeping proves every position to be read was written (see `checks`)."""
    checked = cache.checked if checked is None else checked
    if checked:
        from . import checks
        checks.check_batch_against_cache(cache, batch, contract="context" if k_new is not None else "full",
                                         decode_from_cache=decode_from_cache)
    common = dict(max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len,
                  query_lens_host=batch.query_lens_host,
                  k_scale=cache.k_scale if cache.is_fp8 else None,
                  v_scale=cache.v_scale if cache.is_fp8 else None, **options)
    if k_new is None:
        return paged_attention(q, cache.k, cache.v, batch.cu_seqlens_q, batch.seq_lens, batch.block_table, **common)
    return prefix_prefill(q, k_new, v_new, cache.k, cache.v, batch.cu_seqlens_q, batch.seq_lens,
                          batch.block_table, decode_from_cache=decode_from_cache, **common)


def reference_attention(q: torch.Tensor, cache: "PagedKVCache", batch: BatchMetadata, *,
                        k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                        decode_from_cache: bool = False, compute_dtype: torch.dtype = torch.float32,
                        **options) -> torch.Tensor:
    """`attention` computed by the PyTorch reference in `compute_dtype` (float32 or float64):
    the same arguments, for checking a kernel's output (see `pagedattn.compare`)."""
    return reference.attention(
        q, cache.k, cache.v, batch.cu_seqlens_q, batch.seq_lens, batch.block_table,
        k_scale=cache.k_scale if cache.is_fp8 else None, v_scale=cache.v_scale if cache.is_fp8 else None,
        k_new=k_new, v_new=v_new, decode_from_cache=decode_from_cache, compute_dtype=compute_dtype,
        **options,
    )


def _run(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, k_new, v_new, decode_from_cache,
         max_query_len, max_seq_len, scale, sliding_window, alibi_slopes, softcap, sinks,
         k_scale, v_scale, out, kv_layout, query_lens_host, backend, checked):
    num_blocks, block_size, num_kv_heads, _ = check_inputs(
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, out=out, k_new=k_new,
        v_new=v_new, sliding_window=sliding_window, alibi_slopes=alibi_slopes, softcap=softcap,
        sinks=sinks, k_scale=k_scale, v_scale=v_scale, scale=scale, kv_layout=kv_layout,
        checked=checked)
    if backend not in ("auto", "triton", "reference"):
        raise UnsupportedConfigError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if checked:
        metadata = BatchMetadata(cu_seqlens_q, seq_lens, block_table,
                                 max_query_len if max_query_len is not None else 1 << 62,
                                 max_seq_len if max_seq_len is not None else 1 << 62)
        metadata.validate(num_tokens=q.shape[0])
        check_block_table_values(block_table, seq_lens.tolist(), block_size, num_blocks)
        from . import checks
        checks.check_cache_finite(*to_nhd(k_cache, v_cache, kv_layout), cu_seqlens_q, seq_lens, block_table,
                                  contract="context" if k_new is not None else "full",
                                  decode_from_cache=decode_from_cache)
    if out is None:
        out = torch.empty_like(q)
    if max_query_len is None or max_seq_len is None:
        # unknown maxima: take safe upper bounds from shapes (no sync)
        max_query_len = q.shape[0] if max_query_len is None else max_query_len
        max_seq_len = block_table.shape[1] * block_size if max_seq_len is None else max_seq_len
    plan = dispatch.plan(
        num_seqs=seq_lens.shape[0], num_tokens=q.shape[0], max_query_len=max_query_len,
        max_seq_len=max_seq_len, num_q_heads=q.shape[1], num_kv_heads=num_kv_heads,
        head_size=q.shape[2], block_size=block_size, dtype=q.dtype, cache_dtype=k_cache.dtype,
        sliding_window=sliding_window or 0, context_contract=k_new is not None,
        alibi=alibi_slopes is not None, device=q.device,
        backend=backend,
    )
    if plan.kernel == "reference":
        ref = reference.attention(
            q, *to_nhd(k_cache, v_cache, kv_layout), cu_seqlens_q, seq_lens, block_table, scale=scale,
            sliding_window=sliding_window, alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks,
            k_scale=k_scale, v_scale=v_scale, k_new=k_new, v_new=v_new,
            decode_from_cache=decode_from_cache,
        )
        out.copy_(ref)
        return out
    from .kernels import unified
    unified.launch(plan, q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_table,
                   k_new=k_new, v_new=v_new, decode_from_cache=decode_from_cache,
                   scale=1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale),
                   sliding_window=sliding_window or 0, alibi_slopes=alibi_slopes,
                   softcap=float(softcap or 0.0), sinks=sinks, k_scale=k_scale, v_scale=v_scale,
                   kv_layout=kv_layout, query_lens_host=query_lens_host)
    return out
