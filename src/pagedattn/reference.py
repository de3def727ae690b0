"""Reference paged attention in plain PyTorch, written for obviousness, not speed.

It takes the same arguments as the kernels, gathers each sequence's keys and values through its
block table, and does dense math in float32 (float64 on request). It shares no code with the
kernels, so a kernel bug cannot hide in both.

Semantics (the kernels implement exactly these):
- Sequence s has `seq_len` tokens; its `query_len` query tokens are the last ones, so query token i
  sits at absolute position p = ctx_len + i with ctx_len = seq_len - query_len.
- Query at position p sees key j iff j <= p, and with `sliding_window` W > 0 also p - j < W
  (itself and the W - 1 tokens before it).
- logits = scale * q.k; then soft-cap (cap * tanh(logits / cap)); then ALiBi (+ slope[h] * (j - p)).
- `sinks[h]` is an extra logit per query head that joins the softmax denominator with no value.
- A row that sees no key gives 0 (never NaN).
- fp8 caches hold k / k_scale; they are read back as float(k_fp8) * k_scale. k_scale / v_scale
  are one value, or one per KV head ([num_kv_heads]).
- fp8 (e4m3) queries are real q = float(q_fp8) * q_scale.
- An fp8 output holds out / out_scale, saturated to +-448 and rounded to nearest even
  (`quantize_output`; vLLM's output_scale).
- Query head h reads KV head h // (num_q_heads // num_kv_heads).

Contracts:
- full-cache (`attention`): all seq_len tokens of each sequence are in the cache.
- context-cache (`attention` with `k_new`/`v_new`): the cache holds the first ctx_len tokens and
  the query tokens' K/V come in `k_new`/`v_new` ([num_tokens, num_kv_heads, head_size], rows
  aligned with `q`). With `decode_from_cache=True`, sequences with query_len == 1 read all
  seq_len tokens from the cache instead (vLLM's chunked_prefill_paged_decode).
"""

from __future__ import annotations

import math

import torch

from .errors import ScaleError


def gather_sequence(
    cache: torch.Tensor,
    block_table_row: torch.Tensor,
    length: int,
    scale: float | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Tokens 0..length-1 of one sequence: [length, num_kv_heads, head_size] in `dtype`.
    `cache` is [num_blocks, block_size, num_kv_heads, head_size]."""
    block_size = cache.shape[1]
    positions = torch.arange(length, device=cache.device)
    blocks = block_table_row.to(cache.device).long()[positions // block_size]
    tokens = cache[blocks, positions % block_size].to(dtype)
    if scale is not None:
        s = torch.as_tensor(scale, dtype=dtype, device=cache.device).reshape(-1)
        tokens = tokens * (s.reshape(1, -1, 1) if s.numel() > 1 else s.reshape(()))  # per KV head
    return tokens


def quantize_output(out: torch.Tensor, out_scale, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """An attention output as an fp8 output stores it: out / out_scale (division in float32, as the
    kernels do), saturated to +-finfo(dtype).max, rounded to nearest even; NaN stays NaN."""
    fp8_max = torch.finfo(dtype).max
    s = torch.as_tensor(out_scale, dtype=torch.float32, device=out.device).reshape(1)
    return (out.float() / s).clamp(-fp8_max, fp8_max).to(dtype)


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    q_scale: float | torch.Tensor | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    decode_from_cache: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention of `q` [num_tokens, num_q_heads, head_size] over a paged cache.

    Returns [num_tokens, num_q_heads, head_size] in `compute_dtype` (float32 or float64).
    See the module docstring for the exact semantics and the two contracts."""
    num_tokens, num_q_heads, head_size = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_size) if scale is None else float(scale)
    fp8 = k_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if not fp8:
        k_scale = v_scale = None
    q_fp8 = q.dtype == torch.float8_e4m3fn
    if q_fp8 and q_scale is None:
        raise ScaleError("q_scale is required for fp8 queries (real q = q_fp8 * q_scale)")
    out = torch.zeros(num_tokens, num_q_heads, head_size, dtype=compute_dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        start, end = cu[s], cu[s + 1]
        query_len = end - start
        if query_len == 0:
            continue
        ctx_len = seq_len - query_len
        from_cache = seq_len
        if k_new is not None and not (decode_from_cache and query_len == 1):
            from_cache = ctx_len
        k = gather_sequence(k_cache, block_table[s], from_cache, k_scale, compute_dtype).to(q.device)
        v = gather_sequence(v_cache, block_table[s], from_cache, v_scale, compute_dtype).to(q.device)
        if from_cache < seq_len:
            k = torch.cat([k, k_new[start:end].to(compute_dtype)])
            v = torch.cat([v, v_new[start:end].to(compute_dtype)])
        # k, v: [seq_len, num_kv_heads, head_size] -> one copy per query head
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [num_q_heads, seq_len, head_size]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qs = q[start:end].to(compute_dtype).transpose(0, 1)  # [num_q_heads, query_len, head_size]
        if q_fp8:
            qs = qs * torch.as_tensor(q_scale, dtype=compute_dtype, device=q.device).reshape(())
        logits = scale * (qs @ k.transpose(1, 2))  # [num_q_heads, query_len, seq_len]
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        pos_q = torch.arange(ctx_len, seq_len, device=q.device)[:, None]
        pos_k = torch.arange(seq_len, device=q.device)[None, :]
        visible = pos_k <= pos_q
        if sliding_window:
            visible &= (pos_q - pos_k) < sliding_window
        if alibi_slopes is not None:
            logits = logits + alibi_slopes.to(compute_dtype)[:, None, None] * (pos_k - pos_q).to(compute_dtype)
        logits = logits.masked_fill(~visible, float("-inf"))
        row_max = logits.amax(dim=-1, keepdim=True)
        if sinks is not None:
            row_max = torch.maximum(row_max, sinks.to(compute_dtype)[:, None, None])
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = torch.exp(logits - row_max)
        denom = weights.sum(dim=-1, keepdim=True)
        if sinks is not None:
            denom = denom + torch.exp(sinks.to(compute_dtype)[:, None, None] - row_max)
        # a row with no visible key (denom 0) gives 0; NaN read from the cache must stay NaN
        probs = torch.where(denom == 0, 0.0, weights / torch.where(denom == 0, 1.0, denom))
        out[start:end] = (probs @ v).transpose(0, 1)
    return out
