"""Configuration objects shared by the tests, the CLI (`verify`, `explain`, `bench`) and dispatch.

`AttentionConfig` is the static part (head geometry, dtypes, options); `BatchShape` is the dynamic
part (per-sequence query and context lengths). One matrix of these drives `pytest` and
`pagedattn verify`, so both exercise the same configurations.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import DTypeError, UnsupportedConfigError

# Supported ranges. head_size is padded to the next power of two inside the kernels.
MAX_HEAD_SIZE = 256
SUPPORTED_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# kv_dtype names accepted everywhere (vLLM spellings included) -> torch fp8 dtype or None (= query dtype).
_KV_DTYPE_ALIASES = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "e5m2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Cache layouts, by the order of a cache tensor's dimensions (`poison.KV_LAYOUTS` describes each):
#   "nhd":     [num_blocks, block_size, num_kv_heads, head_size]  (vLLM flash layout, FlashInfer NHD)
#   "hnd":     [num_blocks, num_kv_heads, block_size, head_size]  (FlashInfer HND)
#   "vllm_v0": k [num_blocks, num_kv_heads, head_size // x, block_size, x],
#              v [num_blocks, num_kv_heads, head_size, block_size]  (vLLM's older layout)
KV_LAYOUTS = ("nhd", "hnd", "vllm_v0")


# ---------------------------------------------------------------------------------------------
# the value rules of a configuration: one home, used by AttentionConfig, AttentionOptions and
# PagedAttention (`validate` re-exports them with the other argument checks)
# ---------------------------------------------------------------------------------------------
def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise UnsupportedConfigError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_geometry(*, num_q_heads: int, num_kv_heads: int, head_size: int, block_size: int) -> None:
    """Head counts, head size and block size: positive ints, head_size <= MAX_HEAD_SIZE, a
    supported block size, num_q_heads a multiple of num_kv_heads."""
    for name, value in (
        ("num_q_heads", num_q_heads),
        ("num_kv_heads", num_kv_heads),
        ("head_size", head_size),
        ("block_size", block_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UnsupportedConfigError(f"{name} must be a positive int, got {value!r}")
    if head_size > MAX_HEAD_SIZE:
        raise UnsupportedConfigError(f"head_size must be in 1..{MAX_HEAD_SIZE}, got {head_size}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise UnsupportedConfigError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    if num_q_heads % num_kv_heads:
        raise UnsupportedConfigError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")


def check_option_scalars(*, scale=None, sliding_window=None, softcap=None, kv_layout: str | None = None) -> None:
    """scale finite and > 0; sliding_window None, 0 (none) or a positive int; softcap None, 0
    (off) or finite and > 0; kv_layout one of KV_LAYOUTS (None: not checked). None: the default."""
    if sliding_window is not None and (
        not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 0
    ):
        raise UnsupportedConfigError(f"sliding_window must be None, 0 (none) or a positive int, got {sliding_window!r}")
    if softcap is not None and (not math.isfinite(float(softcap)) or float(softcap) < 0):
        raise UnsupportedConfigError(f"softcap must be None, 0 (off) or finite and > 0, got {softcap!r}")
    if scale is not None and (not math.isfinite(float(scale)) or float(scale) <= 0):
        raise UnsupportedConfigError(f"scale must be finite and > 0, got {scale!r}")
    if kv_layout is not None:
        check_choice("kv_layout", kv_layout, KV_LAYOUTS)


def fp8_dtype_of(kv_dtype: str) -> torch.dtype | None:
    """Map a kv_dtype name ("auto", "fp8", "fp8_e4m3", "fp8_e5m2") to a torch fp8 dtype, or None for "auto"."""
    try:
        return _KV_DTYPE_ALIASES[kv_dtype]
    except (KeyError, TypeError):
        raise UnsupportedConfigError(f"kv_dtype must be one of {sorted(_KV_DTYPE_ALIASES)}, got {kv_dtype!r}") from None


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPE_NAMES.items():
        if d == dtype:
            return name
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class AttentionConfig:
    """Static attention configuration: head geometry, dtypes and options."""

    num_q_heads: int = 8
    num_kv_heads: int = 2
    head_size: int = 64
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16
    kv_dtype: str = "auto"  # "auto" (= dtype) | "fp8_e4m3" | "fp8_e5m2"
    sliding_window: int = 0  # 0 = no window; W > 0: a query attends its last W positions (itself included)
    use_alibi: bool = False
    softcap: float = 0.0  # 0 = off; else logits -> softcap * tanh(logits / softcap)
    use_sinks: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def fp8_dtype(self) -> torch.dtype | None:
        return fp8_dtype_of(self.kv_dtype)

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.fp8_dtype or self.dtype

    def validate(self) -> None:
        check_geometry(
            num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            block_size=self.block_size,
        )
        if self.dtype not in QUERY_DTYPES:
            raise DTypeError(f"dtype must be one of {QUERY_DTYPES}, got {self.dtype}")
        fp8_dtype_of(self.kv_dtype)
        if self.sliding_window is None or self.softcap is None:
            raise UnsupportedConfigError(
                f"sliding_window and softcap of an AttentionConfig are numbers (0 = off), got "
                f"{self.sliding_window!r}, {self.softcap!r}"
            )
        check_option_scalars(sliding_window=self.sliding_window, softcap=self.softcap)

    def replace(self, **changes) -> AttentionConfig:
        return dataclasses.replace(self, **changes)

    def label(self) -> str:
        parts = [
            f"h{self.num_q_heads}/kv{self.num_kv_heads}",
            f"d{self.head_size}",
            f"bs{self.block_size}",
            dtype_name(self.dtype),
        ]
        if self.kv_dtype != "auto":
            parts.append(self.kv_dtype)
        if self.sliding_window:
            parts.append(f"sw{self.sliding_window}")
        if self.use_alibi:
            parts.append("alibi")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.use_sinks:
            parts.append("sinks")
        return " ".join(parts)


@dataclass(frozen=True)
class BatchShape:
    """Per-sequence lengths of one step: seq_len = ctx_len + query_len (all of it in the cache
    under the full-cache contract; ctx_len of it under the context-cache contract)."""

    query_lens: tuple[int, ...]
    ctx_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        for name, lens in (("query_lens", self.query_lens), ("ctx_lens", self.ctx_lens)):
            for i, n in enumerate(lens):
                if not isinstance(n, int) or n < 0:
                    raise UnsupportedConfigError(f"{name}[{i}] must be an int >= 0, got {n!r}")
        if len(self.query_lens) != len(self.ctx_lens):
            raise UnsupportedConfigError(
                f"query_lens has {len(self.query_lens)} entries but ctx_lens has {len(self.ctx_lens)}"
            )

    @property
    def seq_lens(self) -> tuple[int, ...]:
        return tuple(q + c for q, c in zip(self.query_lens, self.ctx_lens))

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @classmethod
    def seed_like(
        cls, num_seqs: int = 10, max_query_len: int = 1024, max_ctx_len: int = 1024, min_len: int = 16, seed: int = 0
    ) -> BatchShape:
        """vLLM's test_prefix_prefill batch: random query/context lengths, the last sequence a decode."""
        rng = random.Random(seed)
        query_lens = [rng.randint(min_len, max_query_len) for _ in range(num_seqs)]
        query_lens[-1] = 1
        ctx_lens = [rng.randint(min_len, max_ctx_len) for _ in range(num_seqs)]
        return cls(tuple(query_lens), tuple(ctx_lens))

    def label(self) -> str:
        if self.num_seqs <= 4:
            return " ".join(f"{q}+{c}" for q, c in zip(self.query_lens, self.ctx_lens))
        decodes = sum(q == 1 for q in self.query_lens)
        return f"{self.num_seqs} seqs ({decodes} decode), {self.num_tokens} tokens, max seq {max(self.seq_lens)}"


@dataclass(frozen=True)
class Case:
    """One verification case: a configuration and a batch shape (what `verify` and the tests iterate)."""

    config: AttentionConfig
    shape: BatchShape
    name: str = field(default="")

    def label(self) -> str:
        return self.name or f"{self.config.label()} | {self.shape.label()}"


def seed_grid(*, quick: bool = False, seed: int = 0) -> list[Case]:
    """The seed's test grid: 64 query heads, num_queries_per_kv in {1, 8, 64}, head size {24, 128},
    sliding window {0, 16}, kv dtype {auto, fp8}, a batch of 10 sequences, the last one a decode.
    `quick` keeps the grid but shrinks heads and lengths to what the CPU interpreter runs in seconds."""
    cases = []
    for qpk in (1, 8, 64):
        for head_size in (24, 128):
            for window in (0, 16):
                for kv_dtype in ("auto", "fp8_e4m3"):
                    if quick:
                        num_q_heads = max(qpk, 4)  # keeps the ratio; 4, 8 or 64 query heads
                        num_kv_heads = num_q_heads // qpk
                        shape = BatchShape.seed_like(num_seqs=4, max_query_len=24, max_ctx_len=40, min_len=1, seed=seed)
                        head = 24 if head_size == 24 else 32
                    else:
                        num_q_heads, num_kv_heads = 64, 64 // qpk
                        shape = BatchShape.seed_like(seed=seed)
                        head = head_size
                    config = AttentionConfig(
                        num_q_heads=num_q_heads,
                        num_kv_heads=num_kv_heads,
                        head_size=head,
                        block_size=16,
                        dtype=torch.float16,
                        kv_dtype=kv_dtype,
                        sliding_window=window,
                    )
                    cases.append(Case(config, shape))
    return cases
