"""vLLM's attention-op signatures (as of vLLM 0.33) over pagedattn's kernels: switch by changing an import.

    context_attention_fwd         context-cache contract, vLLM's older cache layout
    chunked_prefill_paged_decode  the same, but decode sequences (query_len 1) read all seq_len
                                  tokens from the cache
    unified_attention             full-cache contract, flash layout
    reshape_and_cache_flash       write K/V into a flash-layout cache (pagedattn's write kernel)
    reshape_and_cache             write K/V into an older-layout cache (plain PyTorch)

Cache layouts (x = 16 bytes / element size in vLLM's allocator; any x dividing head_size is read):
    older ("vllm_v0"): k_cache [num_blocks, num_kv_heads, head_size // x, block_size, x]
                       v_cache [num_blocks, num_kv_heads, head_size, block_size]
    flash ("nhd"):     k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_size]
Both are read in place by the kernels; nothing here copies a cache.

Conventions mapped onto pagedattn's:
- sliding_window W (context_attention_fwd, chunked_prefill_paged_decode): a query at position p
  sees keys j with p - j < W, itself included -- the same as ours; None, 0 or negative = none.
- window_size (left, right) (unified_attention): left L = itself and L tokens before, so our
  window is L + 1; -1 = none. right must be -1 or 0 (causal).
- fp8 caches may come as torch.uint8 storage, with kv_cache_dtype "fp8"/"fp8_e4m3"/"fp8_e5m2";
  they are viewed as the torch fp8 dtype. Scales (floats, 1-element tensors, or vLLM's expanded
  per-(seq, kv head) tensors holding one value) are only read for fp8 caches, as in vLLM.
- fp8 outputs (all three attention ops): fp8_out_scale / output_scale given means the output is
  torch.float8_e4m3fn and holds attention / scale, saturated to +-448 (vLLM's kernels store
  acc * (1 / scale) clamped to the fp8 range). A scale without an fp8 output is refused.
- Where vLLM asserts, a `pagedattn.errors` exception names the argument, the expectation and
  the value. Differences from vLLM, on purpose: ALiBi and a sliding window given together both
  apply on every row (vLLM's prefill path drops the window); the context ops ignore max_seq_len
  (vLLM's own tests pass one below the true maximum) and plan with a bound from the block table.
  unified_attention trusts max_seqlen_q / max_seqlen_k (vLLM's metadata computes them exactly).
"""

from __future__ import annotations

import contextlib
import re

import torch

from ..attention import paged_attention, prefix_prefill
from ..config import FP8_DTYPES, fp8_dtype_of
from ..errors import DTypeError, LayoutError, PagedAttentionError, ScaleError, ShapeError, UnsupportedConfigError
from ..kernels.write import check_scale, quantize_fp8, write_kv
from ..validate import check_tensor

__all__ = [
    "context_attention_fwd",
    "chunked_prefill_paged_decode",
    "unified_attention",
    "reshape_and_cache_flash",
    "reshape_and_cache",
]

# non-fp8 kv_cache_dtype names vLLM uses ("auto" = the model dtype)
_FLOAT_CACHE_DTYPES = {
    "auto": None,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "float32": torch.float32,
}
# unified_attention keywords that only size vLLM's own scratch buffers: accepted and ignored
# (use_td: a tensor-descriptor load switch of vLLM's kernel; pagedattn chooses its own loads)
_SCRATCH_KWARGS = frozenset(
    {
        "use_td",
        "seq_threshold_3D",
        "num_par_softmax_segments",
        "softmax_segm_output",
        "softmax_segm_max",
        "softmax_segm_expsum",
    }
)


# ---------------------------------------------------------------------------------------------
# argument mapping (host only, no device sync except where noted)
# ---------------------------------------------------------------------------------------------
def _refuse(name: str, value, why: str) -> None:
    if value is not None:
        raise UnsupportedConfigError(f"{name} is not supported ({why}); pass None, got {_short(value)}")


def _require_causal(fn: str, causal) -> None:
    if causal is not True:
        raise UnsupportedConfigError(f"{fn}: only causal attention is supported (causal=True), got causal={causal!r}")


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def _check_tensors(fn: str, named) -> None:
    """Each (name, value) of `named` is a tensor (a value in the wrong position is named)."""
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _cache_views(
    kv_cache_dtype, k_cache, v_cache, fn: str, names: tuple[str, str] = ("k_cache", "v_cache")
) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches as pagedattn reads them: uint8 fp8 storage viewed as the torch fp8 dtype."""
    if not isinstance(kv_cache_dtype, str):
        raise UnsupportedConfigError(f"{fn}: kv_cache_dtype must be a string, got {kv_cache_dtype!r}")
    caches = ((names[0], k_cache), (names[1], v_cache))
    _check_tensors(fn, caches)
    if "fp8" in kv_cache_dtype:
        target = fp8_dtype_of(kv_cache_dtype)
        if torch.version.hip is not None and target == torch.float8_e4m3fn:
            raise UnsupportedConfigError(
                f"{fn}: on ROCm vLLM's kv_cache_dtype={kv_cache_dtype!r} is "
                f"float8_e4m3fnuz, which pagedattn does not read (e4m3fn, e5m2 only)"
            )
        views = []
        for name, c in caches:
            if c.dtype not in (torch.uint8, target):
                raise DTypeError(
                    f"{fn}: {name} must be torch.uint8 storage or {target} for "
                    f"kv_cache_dtype={kv_cache_dtype!r}, got {c.dtype}"
                )
            views.append(c.view(target))
        return views[0], views[1]
    if kv_cache_dtype not in _FLOAT_CACHE_DTYPES:
        raise UnsupportedConfigError(
            f"{fn}: kv_cache_dtype must be one of {sorted(_FLOAT_CACHE_DTYPES)} or 'fp8', 'fp8_e4m3', "
            f"'fp8_e5m2', got {kv_cache_dtype!r}"
        )
    expected = _FLOAT_CACHE_DTYPES[kv_cache_dtype]
    for name, c in caches:
        if c.dtype == torch.uint8:
            raise DTypeError(
                f"{fn}: {name} is torch.uint8 (fp8 storage) but kv_cache_dtype="
                f"{kv_cache_dtype!r}; pass 'fp8', 'fp8_e4m3' or 'fp8_e5m2'"
            )
        if expected is not None and c.dtype != expected:
            raise DTypeError(f"{fn}: {name} must be {expected} for kv_cache_dtype={kv_cache_dtype!r}, got {c.dtype}")
    return k_cache, v_cache


def _per_tensor_scale(name: str, scale, num_kv_heads: int | None = None):
    """An fp8 scale as our kernels take it: a float or a 1-element tensor, or (with `num_kv_heads`)
    a [num_kv_heads] tensor, one per KV head. vLLM also passes scales expanded to [num_seqs,
    num_kv_heads] (flash-attn's descale layout): one value (strides 0), or one per KV head (stride
    0 over sequences: vLLM's per-head "attn_head" scales). A materialized multi-element scale is
    accepted if it holds one value, or the same row for every sequence (this check reads it: one
    device sync)."""
    if not isinstance(scale, torch.Tensor) or scale.numel() <= 1:
        return scale
    if num_kv_heads is not None and num_kv_heads > 1:
        if tuple(scale.shape) == (num_kv_heads,):
            return scale
        if scale.dim() == 2 and scale.shape[0] >= 1 and scale.shape[1] == num_kv_heads:
            row = scale[0]
            if scale.stride(0) == 0 or bool((scale == row).all()):  # the same row for every sequence
                return row[0] if row.stride(0) == 0 else row
    first = scale[(0,) * scale.dim()]
    if any(st != 0 for st in scale.stride()) and not bool((scale == first).all()):
        heads = "" if num_kv_heads is None else " or one per KV head, the same for every sequence"
        raise ScaleError(
            f"{name} must hold one per-tensor scale{heads}; got a tensor of shape "
            f"{tuple(scale.shape)} with different values (per-sequence scales are not supported)"
        )
    return first


def _scales(k_cache, k_scale, v_scale, k_name="k_scale", v_name="v_scale", num_kv_heads=None):
    if k_cache.dtype not in FP8_DTYPES:
        return None, None  # vLLM passes scales for every cache dtype; only fp8 reads them
    return _per_tensor_scale(k_name, k_scale, num_kv_heads), _per_tensor_scale(v_name, v_scale, num_kv_heads)


def _fp8_output(fn: str, out, out_name: str, scale, scale_name: str):
    """vLLM's fp8 output: `out` is torch.float8_e4m3fn and holds attention / scale, saturated to
    +-448 (vLLM's kernels store acc * (1 / scale) clamped to the fp8 range). Returns the scale as
    pagedattn's out_scale (None for an output that is not fp8). Refused by name, before any launch:
    a scale without an fp8 output, an fp8 output without a scale, a scale that is not one positive
    float value (a float or a 1-element floating tensor on out's device or the CPU)."""
    out_fp8 = isinstance(out, torch.Tensor) and out.dtype == torch.float8_e4m3fn
    if scale is not None and not out_fp8:
        raise UnsupportedConfigError(
            f"{fn}: {scale_name} needs an fp8 {out_name} (torch.float8_e4m3fn, holding attention / "
            f"{scale_name}); got {out_name} of dtype {getattr(out, 'dtype', type(out).__name__)}"
        )
    if not out_fp8:
        return None
    if scale is None:
        raise ScaleError(
            f"{fn}: {out_name} is {out.dtype}: {scale_name} is required ({out_name} holds attention / {scale_name})"
        )
    scale = _per_tensor_scale(scale_name, scale)
    try:
        check_scale(scale_name, scale, out.device)
    except PagedAttentionError as e:
        raise type(e)(f"{fn}: {e}") from e
    return scale


def _int32(name: str, t) -> torch.Tensor:
    check_tensor(name, t)
    if t.dtype == torch.int32:
        return t
    if t.dtype in (torch.int64, torch.int16, torch.uint8, torch.int8):
        return t.to(torch.int32)  # metadata only: a few KB at most
    raise DTypeError(f"{name} must be an integer tensor (int32), got {t.dtype}")


def _float32(name: str, t):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise DTypeError(f"{name} must be a floating-point tensor, got {_short(t)}")
    return t if t.dtype == torch.float32 else t.float()


def _window(sliding_window) -> int | None:
    """vLLM's sliding_window (None / <= 0 = none; W = itself and W - 1 before) -> ours (same W)."""
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not float(sliding_window).is_integer():
        raise UnsupportedConfigError(f"sliding_window must be None or an int, got {sliding_window!r}")
    w = int(sliding_window)
    return w if w > 0 else None


def _window_from_window_size(window_size) -> int | None:
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise UnsupportedConfigError(f"window_size must be a pair (left, right) of ints, got {window_size!r}") from None
    if right not in (-1, 0):
        raise UnsupportedConfigError(
            f"window_size[1] (right) must be -1 or 0 for causal attention, got {right} (window_size={window_size!r})"
        )
    if left < -1:
        raise UnsupportedConfigError(f"window_size[0] (left) must be -1 (none) or >= 0, got {left}")
    return None if left == -1 else left + 1


def _check_older_layout(fn: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 5 or v_cache.dim() != 4:
        hint = (
            " (that is the flash layout: use unified_attention for it)"
            if k_cache.dim() == 4 and k_cache.shape == v_cache.shape
            else ""
        )
        raise LayoutError(
            f"{fn} takes vLLM's older cache layout: k_cache [num_blocks, num_kv_heads, head_size // x, "
            f"block_size, x] (5 dims) and v_cache [num_blocks, num_kv_heads, head_size, block_size] "
            f"(4 dims); got k_cache {list(k_cache.shape)}, v_cache {list(v_cache.shape)}{hint}"
        )


@contextlib.contextmanager
def _vllm_names(fn: str, names: dict[str, str]):
    """Errors raised by pagedattn's own checks name its arguments: say which vLLM argument that is."""
    try:
        yield
    except PagedAttentionError as e:
        said = ", ".join(
            f"{ours} = {theirs}"
            for ours, theirs in names.items()
            if ours != theirs and re.search(rf"\b{ours}\b", str(e))
        )
        raise type(e)(f"{fn}: {e}" + (f" (pagedattn's names: {said})" if said else "")) from e


def _decode_rows(cu_seqlens_q: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens] bool on the device: True for the token of a query_len == 1 sequence (no sync)."""
    tokens = torch.arange(num_tokens, device=cu_seqlens_q.device, dtype=cu_seqlens_q.dtype)
    seq = torch.searchsorted(cu_seqlens_q[1:].contiguous(), tokens, right=True)
    query_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    return query_lens.index_select(0, seq.clamp_max(query_lens.shape[0] - 1)) == 1


def _context(
    fn,
    names,
    q,
    k,
    v,
    o,
    kv_cache_dtype,
    k_cache,
    v_cache,
    block_table,
    query_start_loc,
    seq_lens,
    max_query_len,
    k_scale,
    v_scale,
    alibi_slopes,
    sliding_window,
    sm_scale,
    sinks,
    decode_from_cache,
    out_scale=None,
    skip_decode=False,
    checked=None,
    validate=None,
):
    """The shared body of context_attention_fwd and chunked_prefill_paged_decode; `names` maps
    pagedattn's argument names to the caller's. `out_scale`: the caller's fp8 output scale (o /
    output), checked here and passed on as pagedattn's out_scale."""
    q_name, out_name = names.get("q", "q"), names["out"]
    if isinstance(q, torch.Tensor) and q.dtype in FP8_DTYPES:
        raise UnsupportedConfigError(
            f"{fn}: {q_name} is {q.dtype}: fp8 queries are not supported here (vLLM's op takes no query "
            f"scale); pass {q_name} in the model dtype, or use unified_attention with q_descale"
        )
    out_scale = _fp8_output(fn, o, out_name, out_scale, names["out_scale"])
    k_cache, v_cache = _cache_views(
        kv_cache_dtype, k_cache, v_cache, fn, (names.get("k_cache", "k_cache"), names.get("v_cache", "v_cache"))
    )
    _check_older_layout(fn, k_cache, v_cache)
    if alibi_slopes is not None and sinks is not None:
        raise UnsupportedConfigError(f"{fn}: sinks cannot be combined with alibi_slopes (as in vLLM)")
    k_scale, v_scale = _scales(k_cache, k_scale, v_scale, num_kv_heads=k_cache.shape[1])
    query_start_loc = _int32(names["cu_seqlens_q"], query_start_loc)
    seq_lens = _int32(names["seq_lens"], seq_lens)
    block_table = _int32(names["block_table"], block_table)
    if query_start_loc.dim() != 1 or seq_lens.dim() != 1 or query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        raise ShapeError(
            f"{fn}: {names['cu_seqlens_q']} must hold the query start offsets of every sequence "
            f"and the total, [num_seqs + 1] = [{seq_lens.shape[0] + 1}] for {names['seq_lens']} "
            f"of shape {list(seq_lens.shape)}; got shape {list(query_start_loc.shape)}"
        )
    max_query_len = int(max_query_len)
    # vLLM never relied on max_seq_len (its tests pass one below the true maximum): it is not
    # passed on, so the planner takes the true maximum from host copies (or the table's capacity).
    # The context contract does not split keys, so the bound costs nothing.
    max_seq_len = None
    saved = None
    if skip_decode and isinstance(o, torch.Tensor) and o.dim() == 3 and o.shape[0] > 0:
        saved = o.clone()  # restore the decode rows afterwards
    with _vllm_names(fn, names):
        prefix_prefill(
            q,
            k,
            v,
            k_cache,
            v_cache,
            query_start_loc,
            seq_lens,
            block_table,
            decode_from_cache=decode_from_cache,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            scale=sm_scale,
            sliding_window=_window(sliding_window),
            alibi_slopes=_float32("alibi_slopes", alibi_slopes),
            sinks=_float32("sinks", sinks),
            k_scale=k_scale,
            v_scale=v_scale,
            out_scale=out_scale,
            out=o,
            kv_layout="vllm_v0",
            checked=checked,
            validate=validate,
        )
    if saved is not None:  # fp8 rows restored bit for bit, as bytes
        decode = _decode_rows(query_start_loc, o.shape[0])
        bits, saved = (o.view(torch.uint8), saved.view(torch.uint8)) if out_scale is not None else (o, saved)
        bits.copy_(torch.where(decode[:, None, None], saved, bits))
    return o


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def context_attention_fwd(
    q,
    k,
    v,
    o,
    kv_cache_dtype,
    k_cache,
    v_cache,
    b_loc,
    b_start_loc,
    b_seq_len,
    max_seq_len,
    max_input_len,
    k_scale,
    v_scale,
    alibi_slopes=None,
    sliding_window=None,
    sm_scale=None,
    skip_decode=False,
    fp8_out_scale=None,
    sinks=None,
    is_block_table_ptr=False,
    *,
    checked=None,
    validate=None,
):
    """vLLM's prefix-prefill op. Context-cache contract: the cache (older layout) holds the first
    ctx_len = b_seq_len - query_len tokens of each sequence; the query tokens' K/V are `k`/`v`
    ([num_tokens, num_kv_heads, head_size], rows aligned with `q`). b_loc is the block table,
    b_start_loc the query start offsets [num_seqs + 1]. With skip_decode=True the rows of
    sequences with query_len == 1 are left as they were in `o` (this costs one copy of `o`: the
    kernels write every row). Writes `o` and returns it.

    fp8 output (vLLM's meaning): with fp8_out_scale (a float or a 1-element tensor), `o` is
    torch.float8_e4m3fn and holds attention / fp8_out_scale saturated to +-448 in every row written
    (vLLM's kernel asserts fp8_out_scale is None with ALiBi; here ALiBi applies with it).

    Refused: fp8_out_scale with an `o` that is not torch.float8_e4m3fn, an fp8 `o` without
    fp8_out_scale, fp8 `q` (vLLM's op takes no query scale), is_block_table_ptr=True, sinks
    together with ALiBi."""
    if is_block_table_ptr:
        raise UnsupportedConfigError("is_block_table_ptr=True (block table of raw pointers) is not supported")
    names = dict(
        k_new="k",
        v_new="v",
        out="o",
        out_scale="fp8_out_scale",
        cu_seqlens_q="b_start_loc",
        seq_lens="b_seq_len",
        block_table="b_loc",
    )
    return _context(
        "context_attention_fwd",
        names,
        q,
        k,
        v,
        o,
        kv_cache_dtype,
        k_cache,
        v_cache,
        b_loc,
        b_start_loc,
        b_seq_len,
        max_input_len,
        k_scale,
        v_scale,
        alibi_slopes,
        sliding_window,
        sm_scale,
        sinks,
        decode_from_cache=False,
        out_scale=fp8_out_scale,
        skip_decode=skip_decode,
        checked=checked,
        validate=validate,
    )


def chunked_prefill_paged_decode(
    query,
    key,
    value,
    output,
    kv_cache_dtype,
    key_cache,
    value_cache,
    block_table,
    query_start_loc,
    seq_lens,
    max_seq_len,
    max_query_len,
    k_scale,
    v_scale,
    alibi_slopes=None,
    sliding_window=None,
    sm_scale=None,
    output_scale=None,
    sinks=None,
    is_block_table_ptr=False,
    causal=True,
    *,
    checked=None,
    validate=None,
):
    """vLLM's chunked-prefill op over the older cache layout, in one launch: sequences with
    query_len > 1 follow the context-cache contract (ctx_len tokens in the cache, their own K/V in
    `key`/`value`); sequences with query_len == 1 read all seq_len tokens from the cache, so the
    decode token's own K/V must have been written to the cache first (the seed's bug: if it was
    not, exactly that token's output rows read an unwritten slot). Writes `output` and returns it.

    vLLM 0.33's keywords `causal` (True only: the op is causal) and `is_block_table_ptr` (False
    only) are accepted. `checked` (default: PAGEDATTN_CHECKED) proves before launch that no cache
    slot to be read holds poison.

    fp8 output (vLLM's meaning): with output_scale (a float or a 1-element tensor), `output` is
    torch.float8_e4m3fn and holds attention / output_scale saturated to +-448, on prefill and
    decode rows alike (vLLM's kernels store acc * (1 / output_scale) clamped to the fp8 range).

    Refused: output_scale with an `output` that is not torch.float8_e4m3fn, an fp8 `output`
    without output_scale, fp8 `query` (vLLM's op takes no query scale), sinks together with ALiBi."""
    _require_causal("chunked_prefill_paged_decode", causal)
    if is_block_table_ptr:
        raise UnsupportedConfigError(
            "chunked_prefill_paged_decode: is_block_table_ptr=True (a block table of raw pointers) is not supported"
        )
    names = dict(
        q="query",
        k_new="key",
        v_new="value",
        out="output",
        out_scale="output_scale",
        cu_seqlens_q="query_start_loc",
        seq_lens="seq_lens",
        block_table="block_table",
        k_cache="key_cache",
        v_cache="value_cache",
    )
    return _context(
        "chunked_prefill_paged_decode",
        names,
        query,
        key,
        value,
        output,
        kv_cache_dtype,
        key_cache,
        value_cache,
        block_table,
        query_start_loc,
        seq_lens,
        max_query_len,
        k_scale,
        v_scale,
        alibi_slopes,
        sliding_window,
        sm_scale,
        sinks,
        decode_from_cache=True,
        out_scale=output_scale,
        checked=checked,
        validate=validate,
    )


def unified_attention(
    q,
    k,
    v,
    out,
    cu_seqlens_q,
    max_seqlen_q,
    seqused_k,
    max_seqlen_k,
    softmax_scale,
    causal,
    window_size,
    block_table,
    softcap,
    q_descale,
    k_descale,
    v_descale,
    alibi_slopes=None,
    output_scale=None,
    qq_bias=None,
    sinks=None,
    *,
    checked=None,
    validate=None,
    **scratch_kwargs,
):
    """vLLM v1's unified attention. Full-cache contract: `k`/`v` ARE the caches, flash layout
    [num_blocks, block_size, num_kv_heads, head_size] (fp8 as torch fp8 dtypes, dequantized with
    k_descale / v_descale), and hold all seqused_k tokens of every sequence. Writes `out`, returns it.

    fp8: `q` may be torch.float8_e4m3fn with `q_descale` (real q = q * q_descale; a float, a
    1-element tensor, or flash-attn's [num_seqs, num_kv_heads] holding one value); `out` may be
    torch.float8_e4m3fn with `output_scale` (out holds attention / output_scale saturated to +-448,
    vLLM's meaning). k_descale / v_descale: one value, or one per KV head ([num_kv_heads], or
    [num_seqs, num_kv_heads] with the same row for every sequence); ignored for caches that are
    not fp8, as in vLLM. q_descale with a q that is not fp8 is refused.

    Accepted and ignored: vLLM's scratch-buffer keywords (seq_threshold_3D, num_par_softmax_segments,
    softmax_segm_output/max/expsum, use_td). Refused with an UnsupportedConfigError: causal=False,
    q_descale with a q that is not fp8, qq_bias, output_scale with an out that is not fp8,
    window_size right > 0, and any other keyword
    whose value is not None/False/"none" (mm_prefix_range, use_alibi_sqrt, ...)."""
    fn = "unified_attention"
    for name, value in scratch_kwargs.items():
        if name in _SCRATCH_KWARGS or value is None or value is False:
            continue
        if name == "kv_quant_mode" and getattr(value, "name", str(value)).upper() in ("NONE", "FP8_PER_TENSOR"):
            continue  # the cache dtype already says which
        raise UnsupportedConfigError(f"{fn}: keyword {name} is not supported, got {_short(value)}")
    _require_causal(fn, causal)
    _refuse("qq_bias", qq_bias, "no query-query bias")
    q_fp8 = isinstance(q, torch.Tensor) and q.dtype == torch.float8_e4m3fn
    if q_fp8 and q_descale is None:
        raise ScaleError(f"{fn}: q is {q.dtype}: q_descale is required (real q = q * q_descale)")
    if not q_fp8 and q_descale is not None:  # vLLM's triton kernel asserts q_descale is None
        raise UnsupportedConfigError(
            f"{fn}: q_descale is for fp8 queries (torch.float8_e4m3fn), but q is "
            f"{getattr(q, 'dtype', type(q).__name__)}; pass None, got {_short(q_descale)}"
        )
    out_scale = _fp8_output(fn, out, "out", output_scale, "output_scale")
    q_scale = _per_tensor_scale("q_descale", q_descale) if q_fp8 else None
    for name, c in (("k", k), ("v", v)):
        if not isinstance(c, torch.Tensor):
            raise DTypeError(f"{fn}: {name} (the {name.upper()} cache) must be a torch.Tensor, got {type(c).__name__}")
        if c.dim() != 4:
            raise LayoutError(
                f"{fn}: {name} must be a flash-layout cache [num_blocks, block_size, num_kv_heads, head_size] "
                f"(4 dims), got shape {list(c.shape)} (older 5-dim layouts go to chunked_prefill_paged_decode)"
            )
        if c.dtype == torch.uint8:
            raise DTypeError(
                f"{fn}: {name} is torch.uint8: view an fp8 cache as torch.float8_e4m3fn or "
                f"torch.float8_e5m2 before the call (unified_attention has no kv_cache_dtype)"
            )
    k_scale, v_scale = _scales(k, k_descale, v_descale, "k_descale", "v_descale", num_kv_heads=k.shape[2])
    if softcap is not None and float(softcap) < 0:
        raise UnsupportedConfigError(f"{fn}: softcap must be 0 (off) or > 0, got {softcap!r}")
    names = dict(
        k_cache="k",
        v_cache="v",
        seq_lens="seqused_k",
        k_scale="k_descale",
        v_scale="v_descale",
        q_scale="q_descale",
        out_scale="output_scale",
        scale="softmax_scale",
    )
    with _vllm_names(fn, names):
        return paged_attention(
            q,
            k,
            v,
            _int32("cu_seqlens_q", cu_seqlens_q),
            _int32("seqused_k", seqused_k),
            _int32("block_table", block_table),
            max_query_len=int(max_seqlen_q),
            max_seq_len=int(max_seqlen_k),
            scale=float(softmax_scale),
            sliding_window=_window_from_window_size(window_size),
            alibi_slopes=_float32("alibi_slopes", alibi_slopes),
            softcap=float(softcap) if softcap else None,
            sinks=_float32("sinks", sinks),
            k_scale=k_scale,
            v_scale=v_scale,
            q_scale=q_scale,
            out_scale=out_scale,
            out=out,
            kv_layout="nhd",
            checked=checked,
            validate=validate,
        )


# ---------------------------------------------------------------------------------------------
# cache writes
# ---------------------------------------------------------------------------------------------
def _check_write_args(fn, key, value, slot_mapping, kv_cache_dtype, key_cache, value_cache, k_scale, v_scale):
    _check_tensors(fn, (("key", key), ("value", value), ("slot_mapping", slot_mapping)))
    if key.dim() != 3 or value.shape != key.shape:
        raise ShapeError(
            f"{fn}: key and value must both be [num_tokens, num_kv_heads, head_size], "
            f"got {list(key.shape)} and {list(value.shape)}"
        )
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] > key.shape[0]:
        raise ShapeError(
            f"{fn}: slot_mapping must be [num_tokens] with num_tokens <= key.shape[0] = "
            f"{key.shape[0]}, got shape {list(slot_mapping.shape)}"
        )
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise DTypeError(f"{fn}: slot_mapping must be int64 (or int32), got {slot_mapping.dtype}")
    key_cache, value_cache = _cache_views(kv_cache_dtype, key_cache, value_cache, fn, ("key_cache", "value_cache"))
    if key_cache.dtype in FP8_DTYPES:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is None:
                raise ScaleError(
                    f"{fn}: {name} is required for kv_cache_dtype={kv_cache_dtype!r} "
                    f"(stored value = {name.split('_')[0]} / {name})"
                )
    elif key_cache.dtype != key.dtype:
        raise DTypeError(
            f"{fn}: key_cache ({key_cache.dtype}) must have key's dtype ({key.dtype}) "
            f"for kv_cache_dtype={kv_cache_dtype!r}"
        )
    # one scale, or one per KV head (vLLM's "attn_head" scales); None for a cache that is not fp8
    k_scale, v_scale = _scales(key_cache, k_scale, v_scale, num_kv_heads=key.shape[1])
    n = slot_mapping.shape[0]  # vLLM: key may hold padding rows beyond the slots
    return key[:n], value[:n], key_cache, value_cache, slot_mapping.long(), k_scale, v_scale


def reshape_and_cache_flash(
    key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, *, validate=None
):
    """vLLM's cache write for the flash layout: token i of key/value goes to slot slot_mapping[i]
    (block slot // block_size, position slot % block_size); slots < 0 are padding and skipped. fp8
    caches (uint8 storage or fp8 dtype) store key / k_scale, k_scale one value or one per KV head
    ([num_kv_heads]: vLLM's per-head "attn_head" scales). Runs pagedattn's write kernel."""
    fn = "reshape_and_cache_flash"
    if isinstance(key_cache, torch.Tensor) and key_cache.dim() != 4:
        raise LayoutError(
            f"{fn}: key_cache must be a flash-layout cache [num_blocks, block_size, num_kv_heads, "
            f"head_size], got shape {list(key_cache.shape)} (older layouts: reshape_and_cache)"
        )
    key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale = _check_write_args(
        fn, key, value, slot_mapping, kv_cache_dtype, key_cache, value_cache, k_scale, v_scale
    )
    write_kv(key, value, key_cache, value_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale, validate=validate)


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    """vLLM's cache write for the older layout (k_cache [num_blocks, num_kv_heads, head_size // x,
    block_size, x], v_cache [num_blocks, num_kv_heads, head_size, block_size]); same slot semantics
    as reshape_and_cache_flash. Plain PyTorch (it exists so tests can fill older-layout caches
    through a write path); fp8 values are saturated to the format's range like vLLM's."""
    fn = "reshape_and_cache"
    if isinstance(key_cache, torch.Tensor) and isinstance(value_cache, torch.Tensor):
        _check_older_layout(fn, key_cache, value_cache)
    key, value, kc, vc, slots, k_scale, v_scale = _check_write_args(
        fn, key, value, slot_mapping, kv_cache_dtype, key_cache, value_cache, k_scale, v_scale
    )
    num_blocks, num_kv_heads, chunks, block_size, x = kc.shape
    head_size = key.shape[2]
    expected_v = (num_blocks, num_kv_heads, head_size, block_size)
    if (key.shape[1], head_size) != (num_kv_heads, chunks * x) or tuple(vc.shape) != expected_v:
        raise ShapeError(
            f"{fn}: key {list(key.shape)} does not fit key_cache {list(kc.shape)} / value_cache "
            f"{list(vc.shape)} (num_kv_heads {num_kv_heads}, head_size {chunks} x {x})"
        )
    keep = slots >= 0
    slots, key, value = slots[keep], key[keep], value[keep]
    blocks, offsets = slots // block_size, slots % block_size
    if kc.dtype in FP8_DTYPES:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            check_scale(name, s, key.device, num_kv_heads=num_kv_heads)
        key = quantize_fp8(key, k_scale, kc.dtype).view(torch.uint8)
        value = quantize_fp8(value, v_scale, kc.dtype).view(torch.uint8)
        kc, vc = kc.view(torch.uint8), vc.view(torch.uint8)  # index_put on uint8: fp8 has no CPU kernel
    # advanced indices split by slices put the token dimension first: [tokens, heads, chunks, x]
    kc[blocks, :, :, offsets, :] = key.reshape(-1, num_kv_heads, chunks, x).to(kc.dtype)
    vc[blocks, :, :, offsets] = value.to(vc.dtype)
