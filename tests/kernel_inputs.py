"""Random paged-attention inputs built without the cache object (the functional layer's view),
shared by the kernel tests and the fuzz tests. Fresh random data, never zeros; unwritten slots NaN."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pagedattn.config import AttentionConfig, BatchShape

from pagedattn.verify import TOLERANCES  # noqa: E402  (one table, shared with `pagedattn verify`)


@dataclass
class Inputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    options: dict
    max_query_len: int
    max_seq_len: int


def make_inputs(config: AttentionConfig, shape: BatchShape, *, device="cpu", seed=0,
                contract: str = "full", extra_blocks: int = 3) -> Inputs:
    """Caches in nhd layout with randomly permuted physical blocks; every slot not written is NaN.
    contract "full": all seq_len tokens written; "context": only ctx_len tokens, k_new/v_new carry
    the query tokens' K/V (their cache slots stay NaN)."""
    g = torch.Generator().manual_seed(seed)
    bs, kvh, d = config.block_size, config.num_kv_heads, config.head_size
    seq_lens = shape.seq_lens
    blocks_per_seq = [max(1, math.ceil(s / bs)) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    width = max(blocks_per_seq)
    block_table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_table[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
    fp8 = config.fp8_dtype
    k_scale = v_scale = None
    # K/V of every position of every sequence, in float32
    full_k = [torch.randn(s, kvh, d, generator=g) for s in seq_lens]
    full_v = [torch.randn(s, kvh, d, generator=g) for s in seq_lens]
    k_cache = torch.full((num_blocks, bs, kvh, d), float("nan"))
    v_cache = torch.full((num_blocks, bs, kvh, d), float("nan"))
    for i, (s, q_len) in enumerate(zip(seq_lens, shape.query_lens)):
        written = s if contract == "full" else s - q_len
        pos = torch.arange(written)
        blocks = block_table[i].long()[pos // bs]
        k_cache[blocks, pos % bs] = full_k[i][:written]
        v_cache[blocks, pos % bs] = full_v[i][:written]
    if fp8 is not None:
        k_scale, v_scale = 0.37, 0.61  # non-trivial scales: a missed scale shows
        k_cache = (k_cache / k_scale).to(fp8)
        v_cache = (v_cache / v_scale).to(fp8)
    else:
        k_cache, v_cache = k_cache.to(config.dtype), v_cache.to(config.dtype)
    num_tokens = shape.num_tokens
    q = torch.randn(num_tokens, config.num_q_heads, d, generator=g).to(config.dtype)
    k_new = torch.cat([full_k[i][s - ql:] for i, (s, ql) in enumerate(zip(seq_lens, shape.query_lens))]).to(config.dtype)
    v_new = torch.cat([full_v[i][s - ql:] for i, (s, ql) in enumerate(zip(seq_lens, shape.query_lens))]).to(config.dtype)
    cu = [0]
    for ql in shape.query_lens:
        cu.append(cu[-1] + ql)
    options = dict(sliding_window=config.sliding_window or None, softcap=config.softcap or None,
                   k_scale=k_scale, v_scale=v_scale)
    if config.use_alibi:
        options["alibi_slopes"] = (torch.rand(config.num_q_heads, generator=g) * 0.5 + 0.01)
    if config.use_sinks:
        options["sinks"] = torch.randn(config.num_q_heads, generator=g) * 2
    dev = torch.device(device)
    for key in ("alibi_slopes", "sinks"):
        if key in options:
            options[key] = options[key].to(dev)
    return Inputs(
        q=q.to(dev), k_cache=k_cache.to(dev), v_cache=v_cache.to(dev),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_table=block_table.to(dev), k_new=k_new.to(dev), v_new=v_new.to(dev), options=options,
        max_query_len=max(shape.query_lens), max_seq_len=max(seq_lens),
    )


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, label: str = "") -> None:
    """Every element written (no NaN left from the poison) and within the dtype's tolerance."""
    atol, rtol = TOLERANCES[dtype]
    out32 = out.float().cpu()
    ref32 = ref.float().cpu()
    unwritten = torch.isnan(out32) & ~torch.isnan(ref32)
    assert not unwritten.any(), f"{label}: {int(unwritten.sum())} output elements never written (still NaN)"
    err = (out32 - ref32).abs()
    bad = err > atol + rtol * ref32.abs()
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{label}: {int(bad.sum())} of {bad.numel()} elements beyond atol {atol} rtol {rtol}; "
            f"max abs err {float(err.max()):.3g}; first at (token, head, dim) {idx}: "
            f"out {float(out32[idx]):.5g} ref {float(ref32[idx]):.5g}"
        )
