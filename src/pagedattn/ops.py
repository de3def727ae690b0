"""The entry points as PyTorch custom ops, for torch.compile and CUDA graphs.

    import pagedattn.ops      # registers torch.ops.pagedattn.{write_kv, paged_attention, prefix_prefill}

Importing this module registers three ops in the `pagedattn` namespace (`import pagedattn` alone
does not: the registration is global state and an engine asks for it):

    pagedattn::write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache,
        Tensor slot_mapping, Tensor? k_scale=None, Tensor? v_scale=None, *,
        ScalarType? fp8_dtype=None, bool checked=False) -> ()
    pagedattn::paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens_q,
        Tensor seq_lens, Tensor block_table, Tensor(a!) out, Tensor? alibi_slopes=None,
        Tensor? sinks=None, Tensor? k_scale=None, Tensor? v_scale=None, Tensor? q_scale=None,
        Tensor? out_scale=None, *,
        SymInt? max_query_len=None, SymInt? max_seq_len=None, float? scale=None,
        SymInt? sliding_window=None, float? softcap=None, str kv_layout="nhd",
        str backend="auto", bool checked=False, bool? validate=None) -> ()
    pagedattn::prefix_prefill(Tensor q, Tensor k_new, Tensor v_new, Tensor k_cache, Tensor v_cache,
        Tensor cu_seqlens_q, Tensor seq_lens, Tensor block_table, Tensor(a!) out, <the same
        optional tensors>, *, bool decode_from_cache=False, <the same options>) -> ()

Each op mutates what its schema marks `!` and returns nothing (an op may not return an alias of
its input); the Python functions below (`write_kv`, `paged_attention`, `prefix_prefill`) keep the
library's signatures, allocate `out` when it is not given, and return it. Their real
implementations call the public functions of `pagedattn.attention` and `pagedattn.kernels.write`,
so every host-side check runs as in eager code; their fake implementations only describe shapes,
so torch.compile traces a model step through them without running a kernel or reading a value.

Differences from the plain functions, all forced by the op schema language:
- fp8 scales are one-element float32 tensors on the cache's device (as vLLM's ops take them), or
  [num_kv_heads] ones (one scale per KV head) for k_scale / v_scale. The wrappers turn a float into
  such a tensor; under CUDA-graph capture pass tensors made once. As in the plain functions, q may
  be float8_e4m3fn with q_scale (real q = q * q_scale; `out` then any float dtype, bf16 when the
  wrapper allocates it) and `out` may be float8_e4m3fn with out_scale (it holds out / out_scale).
- `query_lens_host` is not an op argument: a host tuple that changes every step would be a
  recompilation guard under torch.compile, and a captured graph cannot skip launches anyway.
- Optional tensors come before the keyword-only options (custom ops take no keyword-only tensors).

See docs/torch-integration.md for which arguments must stay fixed when a graph is replayed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import paged_attention as _paged_attention
from .attention import prefix_prefill as _prefix_prefill
from .config import FP8_DTYPES
from .errors import DTypeError, ScaleError, ShapeError
from .kernels.write import WRITE_RANKS, resolve_fp8_dtype
from .kernels.write import write_kv as _write_kv
from .validate import check_tensor, default_out_dtype

NAMESPACE = "pagedattn"
FP8_E4M3 = torch.float8_e4m3fn  # fp8 queries and outputs


# ---------------------------------------------------------------------------------------------
# the ops: real implementations call the public functions, so all input validation stays
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::write_kv", mutates_args=("k_cache", "v_cache"))
def write_kv_op(
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    *,
    fp8_dtype: torch.dtype | None = None,
    checked: bool = False,
) -> None:
    _write_kv(
        k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale, fp8_dtype=fp8_dtype, checked=checked
    )


@torch.library.custom_op(f"{NAMESPACE}::paged_attention", mutates_args=("out",))
def paged_attention_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    block_table: Tensor,
    out: Tensor,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    q_scale: Tensor | None = None,
    out_scale: Tensor | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    kv_layout: str = "nhd",
    backend: str = "auto",
    checked: bool = False,
    validate: bool | None = None,
) -> None:
    _paged_attention(
        q,
        k_cache,
        v_cache,
        cu_seqlens_q,
        seq_lens,
        block_table,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        scale=scale,
        sliding_window=sliding_window,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
        sinks=sinks,
        k_scale=k_scale,
        v_scale=v_scale,
        q_scale=q_scale,
        out_scale=out_scale,
        out=out,
        kv_layout=kv_layout,
        backend=backend,
        checked=checked or None,  # None: PAGEDATTN_CHECKED
        validate=validate,
    )


@torch.library.custom_op(f"{NAMESPACE}::prefix_prefill", mutates_args=("out",))
def prefix_prefill_op(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    block_table: Tensor,
    out: Tensor,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    q_scale: Tensor | None = None,
    out_scale: Tensor | None = None,
    *,
    decode_from_cache: bool = False,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    kv_layout: str = "nhd",
    backend: str = "auto",
    checked: bool = False,
    validate: bool | None = None,
) -> None:
    _prefix_prefill(
        q,
        k_new,
        v_new,
        k_cache,
        v_cache,
        cu_seqlens_q,
        seq_lens,
        block_table,
        decode_from_cache=decode_from_cache,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        scale=scale,
        sliding_window=sliding_window,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
        sinks=sinks,
        k_scale=k_scale,
        v_scale=v_scale,
        q_scale=q_scale,
        out_scale=out_scale,
        out=out,
        kv_layout=kv_layout,
        backend=backend,
        checked=checked or None,
        validate=validate,
    )


# ---------------------------------------------------------------------------------------------
# fake implementations: shapes only (no data, no kernel). The ops return nothing, so these only
# catch at trace time the shape errors the real checks would raise at run time.
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake(f"{NAMESPACE}::write_kv")
def _write_kv_fake(
    k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None, *, fp8_dtype=None, checked=False
) -> None:
    for (name, rank), t in zip(WRITE_RANKS, (k, v, k_cache, v_cache, slot_mapping)):
        check_tensor(name, t, rank)
    if slot_mapping.shape[0] != k.shape[0]:
        raise ShapeError(f"slot_mapping must have num_tokens = {k.shape[0]} entries, got {slot_mapping.shape[0]}")


def _fake_attention(q, out, q_scale, out_scale) -> None:
    """out like q; in q's dtype unless q or out is fp8 (e4m3), whose scale must then be given."""
    check_tensor("q", q, 3)
    if out.shape != q.shape:
        raise ShapeError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if FP8_E4M3 not in (q.dtype, out.dtype) and out.dtype != q.dtype:
        raise DTypeError(f"out must have q's dtype {q.dtype} (or be float8_e4m3fn with out_scale), got {out.dtype}")
    for name, t, scale in (("q", q, q_scale), ("out", out, out_scale)):
        if t.dtype == FP8_E4M3 and scale is None:
            raise ScaleError(f"{name} is {t.dtype}: {name}_scale is required")


@torch.library.register_fake(f"{NAMESPACE}::paged_attention")
def _paged_attention_fake(
    q,
    k_cache,
    v_cache,
    cu_seqlens_q,
    seq_lens,
    block_table,
    out,
    alibi_slopes=None,
    sinks=None,
    k_scale=None,
    v_scale=None,
    q_scale=None,
    out_scale=None,
    **kwargs,
) -> None:
    _fake_attention(q, out, q_scale, out_scale)


@torch.library.register_fake(f"{NAMESPACE}::prefix_prefill")
def _prefix_prefill_fake(
    q,
    k_new,
    v_new,
    k_cache,
    v_cache,
    cu_seqlens_q,
    seq_lens,
    block_table,
    out,
    alibi_slopes=None,
    sinks=None,
    k_scale=None,
    v_scale=None,
    q_scale=None,
    out_scale=None,
    **kwargs,
) -> None:
    _fake_attention(q, out, q_scale, out_scale)


# ---------------------------------------------------------------------------------------------
# Python wrappers with the library's signatures (traced through by torch.compile)
# ---------------------------------------------------------------------------------------------
def _scale_arg(scale, tensor: Tensor, device: torch.device) -> Tensor | None:
    """A scale as the ops take it: a float32 tensor when `tensor` (the cache for k/v scales, q or
    out for theirs) is fp8, None otherwise (ignored)."""
    if scale is None or isinstance(scale, Tensor):
        return scale
    if tensor.dtype not in FP8_DTYPES and tensor.dtype != torch.uint8:
        return None
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


def _optional_tensors(q, k_cache, out, alibi_slopes, sinks, k_scale, v_scale, q_scale, out_scale) -> tuple:
    """The attention ops' optional tensors, in their order (alibi_slopes, sinks, then the scales of
    k, v, q and out as `_scale_arg` makes them: k/v's by the cache's dtype, q's and out's by their own)."""
    return (
        alibi_slopes,
        sinks,
        _scale_arg(k_scale, k_cache, q.device),
        _scale_arg(v_scale, k_cache, q.device),
        _scale_arg(q_scale, q, q.device),
        _scale_arg(out_scale, out, q.device),
    )


def _out_arg(q: Tensor, out: Tensor | None) -> Tensor:
    """`out` as given, or allocated NaN like q (bf16 for fp8 q, the planner's default), so rows no
    sequence covers (unvalidated offsets) stay NaN, never leftovers."""
    if out is not None:
        return out
    return torch.full(q.shape, float("nan"), dtype=default_out_dtype(q.dtype), device=q.device)


def write_kv(
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    *,
    k_scale: float | Tensor | None = None,
    v_scale: float | Tensor | None = None,
    fp8_dtype: torch.dtype | None = None,
    checked: bool = False,
) -> None:
    """`pagedattn.kernels.write.write_kv` through `torch.ops.pagedattn.write_kv`: k[i], v[i] to
    slot slot_mapping[i] of the caches (in place); slot -1 is skipped."""
    if isinstance(fp8_dtype, str):
        fp8_dtype = resolve_fp8_dtype(k_cache.dtype, fp8_dtype)
    write_kv_op(
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        _scale_arg(k_scale, k_cache, k_cache.device),
        _scale_arg(v_scale, k_cache, k_cache.device),
        fp8_dtype=fp8_dtype,
        checked=checked,
    )


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    block_table: Tensor,
    *,
    out: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    k_scale: float | Tensor | None = None,
    v_scale: float | Tensor | None = None,
    q_scale: float | Tensor | None = None,
    out_scale: float | Tensor | None = None,
    **options,
) -> Tensor:
    """`pagedattn.paged_attention` through `torch.ops.pagedattn.paged_attention`; returns `out`
    (allocated like q when not given, bf16 for fp8 q). `options`: the op's keyword-only arguments."""
    out = _out_arg(q, out)
    paged_attention_op(
        q,
        k_cache,
        v_cache,
        cu_seqlens_q,
        seq_lens,
        block_table,
        out,
        *_optional_tensors(q, k_cache, out, alibi_slopes, sinks, k_scale, v_scale, q_scale, out_scale),
        **options,
    )
    return out


def prefix_prefill(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    block_table: Tensor,
    *,
    out: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    k_scale: float | Tensor | None = None,
    v_scale: float | Tensor | None = None,
    q_scale: float | Tensor | None = None,
    out_scale: float | Tensor | None = None,
    **options,
) -> Tensor:
    """`pagedattn.prefix_prefill` through `torch.ops.pagedattn.prefix_prefill`; returns `out`."""
    out = _out_arg(q, out)
    prefix_prefill_op(
        q,
        k_new,
        v_new,
        k_cache,
        v_cache,
        cu_seqlens_q,
        seq_lens,
        block_table,
        out,
        *_optional_tensors(q, k_cache, out, alibi_slopes, sinks, k_scale, v_scale, q_scale, out_scale),
        **options,
    )
    return out


OPS = {"write_kv": write_kv_op, "paged_attention": paged_attention_op, "prefix_prefill": prefix_prefill_op}
