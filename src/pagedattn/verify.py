"""`pagedattn verify`: run a grid of cases against the reference and print one table.

Each case gets fresh random data, a poisoned `PagedKVCache` filled through the write path, a
NaN-poisoned output buffer, and a checked-mode call of `pagedattn.attention`; the output is
compared with `reference.attention` (float32) at the tolerance of its dtype, and any mismatch is
summarised by `forensics`. `run_case` is what the tests call too, so `pytest` and `verify`
exercise one matrix (`config.seed_grid`).

Contracts:
    full     every sequence's seq_len tokens are appended to the cache, then attention reads them
    context  the cache holds ctx_len tokens, the query tokens' K/V come as k_new / v_new; decode
             sequences read their own token from the cache (decode_from_cache=True, the seed's
             path), so it is appended before attending (write-before-attend)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from . import dispatch, reference
from .attention import attention
from .batch import BatchMetadata
from .config import AttentionConfig, BatchShape, Case
from .forensics import Report, compare

# The one tolerance table, by query dtype: (atol, rtol) on outputs of unit scale. fp8 KV is compared
# with the reference on the same dequantized cache, so it shares its query dtype's row.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.5e-2, 1.5e-2),
}
FP8_SCALES = (0.03, 0.02)  # (k_scale, v_scale) for fp8 caches: randn / 0.03 stays well inside e4m3's 448
CONTRACTS = ("full", "context")


def tolerance(config: AttentionConfig) -> tuple[float, float]:
    return TOLERANCES[config.dtype]


# ---------------------------------------------------------------------------------------------
# one step's inputs, built through the cache (shared with `scenarios`)
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
        args = dict(q=self.q, k_cache=c.k, v_cache=c.v, cu_seqlens_q=self.batch.cu_seqlens_q,
                    seq_lens=self.batch.seq_lens, block_table=self.batch.block_table,
                    sliding_window=self.config.sliding_window or None,
                    k_scale=c.k_scale if c.is_fp8 else None, v_scale=c.v_scale if c.is_fp8 else None,
                    **self.call_options())
        args.update(changes)
        return reference.attention(**args)

    def compare(self, out: torch.Tensor, ref: torch.Tensor, batch: BatchMetadata | None = None) -> Report:
        atol, rtol = tolerance(self.config)
        return compare(out, ref, batch or self.batch, atol=atol, rtol=rtol,
                       num_kv_heads=self.config.num_kv_heads, block_size=self.config.block_size,
                       sliding_window=self.config.sliding_window or None)


def make_step(config: AttentionConfig, shape: BatchShape, *, device="cpu", seed: int = 0,
              contract: str = "full", write_decode_kv: bool = True, checked: bool = False) -> Step:
    """Random q/K/V (normal, on a seeded CPU generator, so every device sees the same numbers) written
    through `PagedKVCache.append` into a poisoned cache. Under the context contract decode sequences
    read from the cache (decode_from_cache=True); `write_decode_kv=False` reserves their token's slot
    without writing it: the seed's bug."""
    from .cache import PagedKVCache

    if contract not in CONTRACTS:
        raise ValueError(f"contract must be one of {CONTRACTS}, got {contract!r}")
    gen = torch.Generator().manual_seed(seed)
    h, kv, d, bs = config.num_q_heads, config.num_kv_heads, config.head_size, config.block_size

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=config.dtype)

    k_scale, v_scale = FP8_SCALES if config.fp8_dtype else (1.0, 1.0)
    num_blocks = sum(-(-s // bs) for s in shape.seq_lens) + 2
    cache = PagedKVCache(num_blocks, bs, kv, d, dtype=config.dtype, kv_dtype=config.kv_dtype,
                         device=device, k_scale=k_scale, v_scale=v_scale, checked=checked, poison=True)
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
# one case
# ---------------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    case: str
    contract: str
    kernel: str
    max_abs_err: float
    passed: bool
    summary: str  # forensics one-liner, or the error raised
    seconds: float
    report: Report | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "report"}
        if not math.isfinite(self.max_abs_err):  # strict JSON: NaN (raised) / inf (NaN output) -> null
            d["max_abs_err"] = None
        d["forensics"] = self.report.to_dict() if self.report is not None and not self.passed else None
        return d


def best_device() -> tuple[torch.device, str]:
    """(device, what runs there, in words)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), f"Triton kernels on {torch.cuda.get_device_name()}"
    if dispatch.interpreter_enabled():
        return torch.device("cpu"), "Triton kernels through the interpreter (CPU, TRITON_INTERPRET=1)"
    return torch.device("cpu"), ("the PyTorch reference (CPU, TRITON_INTERPRET unset): this checks the "
                                 "harness, not a kernel; set TRITON_INTERPRET=1 or use a GPU")


def run_case(case: Case, device="cpu", contract: str = "full", seed: int = 0) -> CaseResult:
    """Build the case through the cache, run `attention` (checked) into a NaN-poisoned buffer, compare
    with the reference. Errors raised by the library become a failed result naming them."""
    device = torch.device(device)
    kernel = dispatch.plan_for(case.config, case.shape, device=device,
                               context_contract=contract == "context").kernel
    start = time.perf_counter()
    try:
        step = make_step(case.config, case.shape, device=device, seed=seed, contract=contract)
        out = torch.full_like(step.q, float("nan"))
        attention(step.q, step.cache, step.batch, out=out, checked=True,
                  sliding_window=case.config.sliding_window or None, **step.call_options())
        ref = step.reference()
        report = step.compare(out, ref)
    except Exception as e:  # noqa: BLE001: a case that raises is a failed case, reported as such
        return CaseResult(case.label(), contract, kernel, math.nan, False, f"{type(e).__name__}: {e}",
                          time.perf_counter() - start)
    summary = report.summary() if not report.ok else "ok"
    return CaseResult(case.label(), contract, kernel, report.max_abs_err if not report.nan else math.inf,
                      report.ok, summary, time.perf_counter() - start, report)
