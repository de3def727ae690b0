"""vLLM's own choice of attention kernel per platform, as data: which kernel vLLM's ops run for a
configuration, so a configuration grid can be read platform by platform (the seed's failure showed
only where a ROCm dispatcher sent one configuration to another kernel).

Read from vLLM 0.33 (vllm-project/vllm, `vllm/platforms/rocm.py`, `use_rocm_custom_paged_attention`,
and `vllm/v1/attention/ops/chunked_prefill_paged_decode.py`, which calls it for its decode rows):

    rocm-cdna  (gfx90a, gfx942, gfx950: the `_ON_GFX9` branch) the custom paged-attention kernel when
               sliding_window == 0, qtype fp16/bf16, head_size 64 or 128, block_size 16 or 32,
               1 <= gqa_ratio <= 16, max_seq_len <= 128 * 1024, no sinks
    rocm-gfx1x (gfx11, gfx12) when sliding_window == 0, qtype fp16/bf16, head_size 128, block_size 16,
               3 <= gqa_ratio <= 16, max_seq_len <= 128 * 1024, no ALiBi, kv_cache_dtype "auto", no sinks
    cuda       never (the rule answers False off ROCm): vLLM's Triton kernels
and chunked_prefill_paged_decode also forces Triton for a block size that is not a power of two.
Otherwise decode rows run the Triton `kernel_paged_attention_2d`; prefill rows (query_len > 1) run
the Triton `context_attention_fwd` on every platform; `unified_attention` is one Triton kernel on
every platform. Every condition is a row of `CUSTOM_KERNEL_RULES`, so `explain` can say which one
failed, and the tests check each against vLLM's text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import AttentionConfig

VLLM_VERSION = "0.33"
SOURCE = "vllm/platforms/rocm.py: use_rocm_custom_paged_attention (vLLM 0.33)"
PLATFORMS = ("cuda", "rocm-cdna", "rocm-gfx1x")
OPS = ("chunked_prefill_paged_decode", "context_attention_fwd", "unified_attention")
MAX_SEQ_LEN = 128 * 1024

ROCM_CUSTOM = "rocm custom paged attention (ops.paged_attention_rocm)"
TRITON_DECODE = "triton kernel_paged_attention_2d"
TRITON_PREFIX = "triton context_attention_fwd"
TRITON_UNIFIED = "triton unified_attention"


@dataclass(frozen=True)
class VllmCase:
    """What vLLM's rule reads: the query dtype, head and block size, query heads per KV head, the
    batch's longest sequence, the window (0 = none), the kv_cache_dtype string, ALiBi and sinks."""

    dtype: torch.dtype
    head_size: int
    block_size: int
    gqa_ratio: int
    max_seq_len: int
    sliding_window: int = 0
    kv_cache_dtype: str = "auto"
    alibi: bool = False
    sinks: bool = False

    @classmethod
    def from_config(cls, config: AttentionConfig, max_seq_len: int) -> VllmCase:
        kv = (
            "auto"
            if config.kv_dtype == "auto"
            else ("fp8" if config.kv_dtype in ("fp8", "fp8_e4m3", "e4m3") else "fp8_e5m2")
        )
        return cls(
            config.dtype,
            config.head_size,
            config.block_size,
            config.num_queries_per_kv,
            max_seq_len,
            config.sliding_window,
            kv,
            config.use_alibi,
            config.use_sinks,
        )


@dataclass(frozen=True)
class Condition:
    text: str  # as vLLM writes it
    holds: Callable[[VllmCase], bool]


_HALF_OR_BF16 = Condition(
    "qtype == torch.half or qtype == torch.bfloat16", lambda c: c.dtype in (torch.float16, torch.bfloat16)
)
_NO_WINDOW = Condition("sliding_window == 0", lambda c: not c.sliding_window)
_SEQ_LEN = Condition("max_seq_len <= 128 * 1024", lambda c: c.max_seq_len <= MAX_SEQ_LEN)
_NO_SINKS = Condition("sinks is None", lambda c: not c.sinks)

# platform -> the conditions, all of which must hold for the ROCm custom kernel (empty: never)
CUSTOM_KERNEL_RULES: dict[str, tuple[Condition, ...]] = {
    "cuda": (),
    "rocm-cdna": (
        _NO_WINDOW,
        _HALF_OR_BF16,
        Condition("head_size == 64 or head_size == 128", lambda c: c.head_size in (64, 128)),
        Condition("block_size == 16 or block_size == 32", lambda c: c.block_size in (16, 32)),
        Condition("gqa_ratio >= 1 and gqa_ratio <= 16", lambda c: 1 <= c.gqa_ratio <= 16),
        _SEQ_LEN,
        _NO_SINKS,
    ),
    "rocm-gfx1x": (
        _NO_WINDOW,
        _HALF_OR_BF16,
        Condition("head_size == 128", lambda c: c.head_size == 128),
        Condition("block_size == 16", lambda c: c.block_size == 16),
        Condition("gqa_ratio >= 3 and gqa_ratio <= 16", lambda c: 3 <= c.gqa_ratio <= 16),
        _SEQ_LEN,
        Condition("alibi_slopes is None", lambda c: not c.alibi),
        Condition('kv_cache_dtype == "auto"', lambda c: c.kv_cache_dtype == "auto"),
        _NO_SINKS,
    ),
}
# chunked_prefill_paged_decode, after the rule: Triton for a block size that is not a power of two
_POW2_BLOCK = Condition(
    "block_size is a power of two (chunked_prefill_paged_decode)",
    lambda c: c.block_size > 0 and c.block_size & (c.block_size - 1) == 0,
)


@dataclass(frozen=True)
class VllmChoice:
    platform: str
    op: str
    decode_kernel: str  # what decode rows (query_len == 1) run
    prefill_kernel: str  # what rows with query_len > 1 run
    why: str

    @property
    def custom(self) -> bool:
        return self.decode_kernel == ROCM_CUSTOM


def failed_conditions(platform: str, case: VllmCase) -> list[str]:
    """The conditions of vLLM's custom-kernel rule that `case` fails on `platform` (empty: it takes it)."""
    if platform not in CUSTOM_KERNEL_RULES:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    if platform == "cuda":
        return ["not ROCm (use_rocm_custom_paged_attention is False off gfx9/gfx11/gfx12)"]
    return [c.text for c in (*CUSTOM_KERNEL_RULES[platform], _POW2_BLOCK) if not c.holds(case)]


def vllm_kernel(platform: str, case: VllmCase, op: str = "chunked_prefill_paged_decode") -> VllmChoice:
    """Which kernel vLLM 0.33 runs for `case` through `op` on `platform`, and why."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if op == "unified_attention":
        return VllmChoice(platform, op, TRITON_UNIFIED, TRITON_UNIFIED, "one Triton kernel on every platform")
    if op == "context_attention_fwd":
        return VllmChoice(platform, op, TRITON_PREFIX, TRITON_PREFIX, "one Triton kernel on every platform")
    failed = failed_conditions(platform, case)
    if failed:
        why = "Triton: " + "; ".join(failed) if platform != "cuda" else "Triton: " + failed[0]
        return VllmChoice(platform, op, TRITON_DECODE, TRITON_PREFIX, why)
    return VllmChoice(
        platform, op, ROCM_CUSTOM, TRITON_PREFIX, "every condition of use_rocm_custom_paged_attention holds"
    )
