"""Random paged inputs, tolerances and poison helpers for tests, `verify`, `bench` and the scripts.

Builders (fresh normal data, never zeros; block ids from one random permutation, so sequences lie
scattered over the cache as in a serving engine):

    make_inputs(config, shape)   functional view: nhd caches + metadata tensors, unwritten slots NaN
                                 (the kernel tests, fuzz, sanitizer, sm_90 compile checks)
    make_step(config, shape)     through `PagedKVCache.append` into a poisoned cache (verify, scenarios)
    build_paged(config, shape)   `num_sets` batches over disjoint blocks of one cache, sized for a GPU
                                 (bench, scripts/perf_quick.py)

`make_inputs`' Inputs call the kernels and the reference themselves (`x.kernel(contract, out)`,
`x.reference(contract)`). Tolerances live in one table by query dtype (`TOLERANCES`, from
`pagedattn.tolerances`); `assert_close_to_reference` applies it. Poison helpers (`poison_`,
`is_poison`, `empty_kv_cache`) come from `pagedattn.poison`. Planning: `geometry(config)` (the
keywords PagedAttention takes a config's geometry by), `dispatch_plan` and `split_plan` (dispatch's
plan for a config and a batch, as is or forced to split), `capture_graph` (warm-up and CUDA-graph
capture of a call).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import dispatch, reference
from .batch import BatchMetadata
from .config import AttentionConfig, BatchShape
from .forensics import Report, compare
from .poison import empty_kv_cache, is_poison, poison_
from .tolerances import TOLERANCES  # by query dtype; fp8 KV shares its query dtype's row

__all__ = [
    "TOLERANCES",
    "FP8_SCALES",
    "FP8_SCALE",
    "CONTRACTS",
    "DEVICE",
    "tolerance",
    "geometry",
    "dispatch_plan",
    "split_plan",
    "capture_graph",
    "block_table_from",
    "cu_seqlens",
    "poisoned_like",
    "assert_close_to_reference",
    "Inputs",
    "make_inputs",
    "run_both",
    "Step",
    "make_step",
    "context_batch",
    "PagedSet",
    "PagedInputs",
    "random_tensor",
    "build_paged",
    "poison_",
    "is_poison",
    "empty_kv_cache",
]

FP8_SCALES = (0.03, 0.02)  # (k_scale, v_scale) for fp8 caches in make_step: randn / 0.03 stays inside e4m3's 448
CONTRACTS = ("full", "context")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where tests run the kernels (the interpreter on CPU)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for outputs of this query dtype."""
    return TOLERANCES[dtype]


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------
def block_table_from(perm: torch.Tensor, blocks_per_seq: list[int], width: int | None = None) -> torch.Tensor:
    """[num_seqs, width] int32: sequence i gets the next blocks_per_seq[i] ids of `perm`, in order."""
    table = torch.zeros(len(blocks_per_seq), width or max(blocks_per_seq), dtype=torch.int32, device=perm.device)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
    return table


def cu_seqlens(query_lens) -> list[int]:
    """[0, q0, q0 + q1, ...]."""
    cu = [0]
    for q in query_lens:
        cu.append(cu[-1] + q)
    return cu


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: an element the kernel never writes stays NaN."""
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


def geometry(config: AttentionConfig) -> dict:
    """num_q_heads, num_kv_heads, head_size and block_size of `config`: the keywords `PagedAttention`
    and `dispatch.plan` take the geometry by."""
    return dict(
        num_q_heads=config.num_q_heads,
        num_kv_heads=config.num_kv_heads,
        head_size=config.head_size,
        block_size=config.block_size,
    )


def dispatch_plan(
    config: AttentionConfig,
    shape: BatchShape,
    *,
    max_seq_len: int | None = None,
    cache_dtype: torch.dtype | None = None,
    device=DEVICE,
) -> dispatch.Plan:
    """`dispatch.plan_for(config, shape)`, with `max_seq_len` (a bound, or a hint, in place of the
    batch's longest sequence) and the cache's dtype `cache_dtype` where given."""
    return dispatch.plan(
        num_seqs=shape.num_seqs,
        num_tokens=shape.num_tokens,
        max_query_len=max(shape.query_lens),
        max_seq_len=max(shape.seq_lens) if max_seq_len is None else max_seq_len,
        **geometry(config),
        dtype=config.dtype,
        cache_dtype=cache_dtype or config.cache_dtype,
        sliding_window=config.sliding_window,
        alibi=config.use_alibi,
        device=device,
    )


def split_plan(config: AttentionConfig, shape: BatchShape, num_splits: int, **kwargs) -> dispatch.Plan:
    """`dispatch_plan(config, shape, **kwargs)` forced to split the keys into `num_splits` partitions
    of one key tile each."""
    base = dispatch_plan(config, shape, **kwargs)
    return dataclasses.replace(base, kernel="split_kv", num_splits=num_splits, partition_size=base.block_n)


def capture_graph(fn, warmup: int = 1):
    """(CUDA graph, what the captured call returned): `fn()` run `warmup` times on a side stream
    first (compilation, Triton JIT, split-KV workspace), then captured once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


# ---------------------------------------------------------------------------------------------
# make_inputs: tensors only, no cache object
# ---------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    q: torch.Tensor  # [num_tokens, num_q_heads, head_size]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_size]
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    k_new: torch.Tensor  # [num_tokens, num_kv_heads, head_size]: the query tokens' K/V
    v_new: torch.Tensor
    options: dict
    max_query_len: int
    max_seq_len: int

    def call_args(self, contract: str = "full", **changes) -> dict:
        """Keyword arguments of a call on these inputs under `contract` (full | context |
        context-decode): the tensors, the options and, under a context contract, k_new / v_new /
        decode_from_cache; `changes` override any of them."""
        args = dict(
            q=self.q,
            k_cache=self.k_cache,
            v_cache=self.v_cache,
            cu_seqlens_q=self.cu_seqlens_q,
            seq_lens=self.seq_lens,
            block_table=self.block_table,
            **self.options,
        )
        if contract != "full":
            args.update(k_new=self.k_new, v_new=self.v_new, decode_from_cache=contract == "context-decode")
        args.update(changes)
        return args

    def reference(self, contract: str = "full", **changes) -> torch.Tensor:
        """The reference output under `contract`; `changes` override the call's arguments."""
        return reference.attention(**self.call_args(contract, **changes))

    def kernel(self, contract: str, out: torch.Tensor, **changes):
        """The Triton kernels under `contract` (paged_attention for full, prefix_prefill otherwise),
        writing `out`; `changes` override the call's arguments (the bounds and backend included)."""
        from .attention import paged_attention, prefix_prefill

        bounds = dict(out=out, max_query_len=self.max_query_len, max_seq_len=self.max_seq_len, backend="triton")
        call = paged_attention if contract == "full" else prefix_prefill
        return call(**self.call_args(contract, **{**bounds, **changes}))

    def write_decode_tokens(self, k_rows: torch.Tensor | None = None, v_rows: torch.Tensor | None = None) -> None:
        """Write each decode sequence's own K/V (k_new / v_new, or the rows given) to its cache slot,
        as an engine would before a decode_from_cache call."""
        cu, seq_lens = self.cu_seqlens_q.tolist(), self.seq_lens.tolist()
        bs = self.k_cache.shape[1]
        ks, vs = self.options["k_scale"] or 1.0, self.options["v_scale"] or 1.0
        for i, sl in enumerate(seq_lens):
            if cu[i + 1] - cu[i] != 1:
                continue
            blk = int(self.block_table[i, (sl - 1) // bs])
            k = (self.k_new if k_rows is None else k_rows)[cu[i]].float()
            v = (self.v_new if v_rows is None else v_rows)[cu[i]].float()
            self.k_cache[blk, (sl - 1) % bs] = (k / ks).to(self.k_cache.dtype)
            self.v_cache[blk, (sl - 1) % bs] = (v / vs).to(self.v_cache.dtype)


def make_inputs(
    config: AttentionConfig, shape: BatchShape, *, device="cpu", seed=0, contract: str = "full", extra_blocks: int = 3
) -> Inputs:
    """Caches in nhd layout with randomly permuted physical blocks; every slot not written is NaN.
    contract "full": all seq_len tokens written; "context": only ctx_len tokens, k_new/v_new carry
    the query tokens' K/V (their cache slots stay NaN); "context-decode": as "context", and each
    decode sequence's own token written to the cache too (`Inputs.write_decode_tokens`)."""
    g = torch.Generator().manual_seed(seed)
    bs, kvh, d = config.block_size, config.num_kv_heads, config.head_size
    seq_lens = shape.seq_lens
    blocks_per_seq = [max(1, math.ceil(s / bs)) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    block_table = block_table_from(torch.randperm(num_blocks, generator=g), blocks_per_seq)
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
    k_new = torch.cat([full_k[i][s - ql :] for i, (s, ql) in enumerate(zip(seq_lens, shape.query_lens))]).to(
        config.dtype
    )
    v_new = torch.cat([full_v[i][s - ql :] for i, (s, ql) in enumerate(zip(seq_lens, shape.query_lens))]).to(
        config.dtype
    )
    options = dict(
        sliding_window=config.sliding_window or None, softcap=config.softcap or None, k_scale=k_scale, v_scale=v_scale
    )
    if config.use_alibi:
        options["alibi_slopes"] = torch.rand(config.num_q_heads, generator=g) * 0.5 + 0.01
    if config.use_sinks:
        options["sinks"] = torch.randn(config.num_q_heads, generator=g) * 2
    dev = torch.device(device)
    for key in ("alibi_slopes", "sinks"):
        if key in options:
            options[key] = options[key].to(dev)
    x = Inputs(
        q=q.to(dev),
        k_cache=k_cache.to(dev),
        v_cache=v_cache.to(dev),
        cu_seqlens_q=torch.tensor(cu_seqlens(shape.query_lens), dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_table=block_table.to(dev),
        k_new=k_new.to(dev),
        v_new=v_new.to(dev),
        options=options,
        max_query_len=max(shape.query_lens),
        max_seq_len=max(seq_lens),
    )
    if contract == "context-decode":
        x.write_decode_tokens()
    return x


def run_both(config: AttentionConfig, shape: BatchShape, contract: str, seed: int = 0, device=DEVICE):
    """(kernel output, reference output) on fresh `make_inputs`; contract: full | context | context-decode
    (decode sequences read their own token from the cache, written there first as an engine would)."""
    x = make_inputs(config, shape, device=device, seed=seed, contract=contract)
    ref = x.reference(contract)
    out = poisoned_like(x.q)
    x.kernel(contract, out)
    return out, ref


# ---------------------------------------------------------------------------------------------
# make_step: through the cache (verify, scenarios)
# ---------------------------------------------------------------------------------------------
@dataclass
class Step:
    """A cache holding the step's K/V, its batch and the query-side tensors."""

    config: AttentionConfig
    shape: BatchShape
    cache: object  # PagedKVCache
    seq_ids: list[int]
    batch: BatchMetadata
    q: torch.Tensor  # [num_tokens, num_q_heads, head_size]
    k_new: torch.Tensor  # [num_tokens, num_kv_heads, head_size]: the query tokens' K/V
    v_new: torch.Tensor
    contract: str
    decode_from_cache: bool

    def call_options(self) -> dict:
        """k_new/v_new/decode_from_cache for `attention`, per the contract."""
        if self.contract == "full":
            return {}
        return dict(k_new=self.k_new, v_new=self.v_new, decode_from_cache=self.decode_from_cache)

    def reference(self, **changes) -> torch.Tensor:
        """The reference output on this step's cache (float32); `changes` override its arguments."""
        c = self.cache
        args = dict(
            q=self.q,
            k_cache=c.k,
            v_cache=c.v,
            cu_seqlens_q=self.batch.cu_seqlens_q,
            seq_lens=self.batch.seq_lens,
            block_table=self.batch.block_table,
            sliding_window=self.config.sliding_window or None,
            k_scale=c.k_scale if c.is_fp8 else None,
            v_scale=c.v_scale if c.is_fp8 else None,
            **self.call_options(),
        )
        args.update(changes)
        return reference.attention(**args)

    def compare(self, out: torch.Tensor, ref: torch.Tensor, batch: BatchMetadata | None = None) -> Report:
        atol, rtol = tolerance(self.config.dtype)
        return compare(
            out,
            ref,
            batch or self.batch,
            atol=atol,
            rtol=rtol,
            num_kv_heads=self.config.num_kv_heads,
            block_size=self.config.block_size,
            sliding_window=self.config.sliding_window or None,
        )


def make_step(
    config: AttentionConfig,
    shape: BatchShape,
    *,
    device="cpu",
    seed: int = 0,
    contract: str = "full",
    write_decode_kv: bool = True,
    checked: bool = False,
) -> Step:
    """Random q/K/V (normal, on a seeded CPU generator, so every device sees the same numbers) written
    through `PagedKVCache.append` into a poisoned cache. Under the context contract decode sequences
    read from the cache (decode_from_cache=True); `write_decode_kv=False` reserves their token's slot
    without writing it: the origin bug (docs/origin-analysis.md)."""
    from .cache import PagedKVCache

    if contract not in CONTRACTS:
        raise ValueError(f"contract must be one of {CONTRACTS}, got {contract!r}")
    gen = torch.Generator().manual_seed(seed)
    h, kv, d, bs = config.num_q_heads, config.num_kv_heads, config.head_size, config.block_size

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=config.dtype)

    k_scale, v_scale = FP8_SCALES if config.fp8_dtype else (1.0, 1.0)
    num_blocks = sum(-(-s // bs) for s in shape.seq_lens) + 2
    cache = PagedKVCache(
        num_blocks,
        bs,
        kv,
        d,
        dtype=config.dtype,
        kv_dtype=config.kv_dtype,
        device=device,
        k_scale=k_scale,
        v_scale=v_scale,
        checked=checked,
        poison=True,
    )
    seq_ids = [cache.new_sequence() for _ in range(shape.num_seqs)]
    q = randn(shape.num_tokens, h, d)
    k_ctx, v_ctx = randn(sum(shape.ctx_lens), kv, d), randn(sum(shape.ctx_lens), kv, d)
    k_new, v_new = randn(shape.num_tokens, kv, d), randn(shape.num_tokens, kv, d)
    cache.append(seq_ids, k_ctx, v_ctx, shape.ctx_lens)
    if contract == "full":
        cache.append(seq_ids, k_new, v_new, shape.query_lens)
        batch = cache.batch(seq_ids, shape.query_lens, contract="full")
        return Step(config, shape, cache, seq_ids, batch, q, k_new, v_new, "full", False)
    # context contract, decode_from_cache: decode sequences hold their own token in the cache
    rows = [i for i, ql in enumerate(shape.query_lens) if ql == 1]
    starts = [sum(shape.query_lens[:i]) for i in rows]
    decode_ids = [seq_ids[i] for i in rows]
    if decode_ids:
        if write_decode_kv:
            cache.append(decode_ids, k_new[starts], v_new[starts], [1] * len(rows))
        else:
            cache.reserve(decode_ids, [1] * len(rows))
    batch = context_batch(cache, seq_ids, shape)
    return Step(config, shape, cache, seq_ids, batch, q, k_new, v_new, "context", True)


def context_batch(cache, seq_ids: list[int], shape: BatchShape) -> BatchMetadata:
    """Context-contract metadata (seq_len = ctx_len + query_len); decode sequences already hold
    their token in the cache and read it from there (decode_from_cache)."""
    return cache.batch(seq_ids, shape.query_lens, contract="context", decode_from_cache=True)


# ---------------------------------------------------------------------------------------------
# build_paged: GPU-sized batches over disjoint blocks of one cache (bench, perf scripts)
# ---------------------------------------------------------------------------------------------
FP8_SCALE = 0.5  # k_scale = v_scale for fp8 caches in build_paged: dequantized value = fp8 * 0.5


@dataclass
class PagedSet:
    """One batch over its own blocks: q/out [num_tokens, num_q_heads, head_size], metadata int32."""

    q: torch.Tensor
    out: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor  # [num_seqs, max_blocks_per_seq]


@dataclass
class PagedInputs:
    config: AttentionConfig
    shape: BatchShape
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_size]
    v_cache: torch.Tensor
    sets: list[PagedSet]
    k_scale: float | None
    v_scale: float | None

    def call(self, i: int, backend: str = "auto") -> torch.Tensor:
        """paged_attention on set i (full-cache contract), writing its `out`."""
        from .attention import paged_attention

        s, shape = self.sets[i], self.shape
        return paged_attention(
            s.q,
            self.k_cache,
            self.v_cache,
            s.cu_seqlens_q,
            s.seq_lens,
            s.block_table,
            max_query_len=max(shape.query_lens),
            max_seq_len=max(shape.seq_lens),
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            out=s.out,
            backend=backend,
        )


def random_tensor(shape, dtype: torch.dtype, device, chunk: int = 1 << 26) -> torch.Tensor:
    """torch.randn in any dtype (fp8 included), filled in chunks so big caches need no fp32 copy."""
    t = torch.empty(shape, dtype=dtype, device=device)
    flat = t.view(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        part.copy_(torch.randn(part.numel(), dtype=torch.float32, device=device))
    return t


def build_paged(
    config: AttentionConfig, shape: BatchShape, device, *, num_sets: int = 2, seed: int = 0, fill: bool = True
) -> PagedInputs:
    """`num_sets` batches over disjoint, randomly permuted blocks of one cache. `fill=False` leaves
    the cache and queries uninitialized (for code that only reads the metadata)."""
    c = config
    make = random_tensor if fill else (lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    torch.manual_seed(seed)
    per_seq = [-(-s // c.block_size) for s in shape.seq_lens]
    needed = sum(per_seq)
    num_blocks = needed * num_sets
    cache_shape = (num_blocks, c.block_size, c.num_kv_heads, c.head_size)
    k_cache = make(cache_shape, c.cache_dtype, device)
    v_cache = make(cache_shape, c.cache_dtype, device)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    cu = cu_seqlens(shape.query_lens)
    sets = []
    for i in range(num_sets):
        table = block_table_from(perm[i * needed : (i + 1) * needed], per_seq)
        q = make((shape.num_tokens, c.num_q_heads, c.head_size), c.dtype, device)
        sets.append(
            PagedSet(
                q=q,
                out=torch.full_like(q, float("nan")),
                cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
                seq_lens=torch.tensor(shape.seq_lens, dtype=torch.int32, device=device),
                block_table=table.to(device),
            )
        )
    scale = FP8_SCALE if c.fp8_dtype is not None else None
    return PagedInputs(c, shape, k_cache, v_cache, sets, scale, scale)
