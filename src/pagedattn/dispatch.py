"""Choosing a kernel and its launch parameters, and saying why (`explain`).

Planning is a pure function of shapes and configuration: the same shapes always give the same
plan (safe for CUDA-graph capture), and it never reads device memory. The rules are the tables
and the three small functions below; `explain` prints the plan and the rule that decided it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch

from .config import FP8_DTYPES, AttentionConfig, BatchShape
from .kernels.launch import interpreter_enabled  # noqa: F401  (re-exported)
from .text import plural

# ---------------------------------------------------------------------------------------------
# the rules, as data
# ---------------------------------------------------------------------------------------------
# Query tiles. A tile holds BLOCK_M rows = BLOCK_Q query tokens x num_queries_per_kv query heads
# of one KV head, so each K/V tile is loaded once for all query heads that share it.
# Prefill tiles by padded head size: (BLOCK_M, BLOCK_N, num_warps, num_stages)
PREFILL_TILES = {
    32: (128, 64, 4, 3),
    64: (128, 64, 4, 3),
    128: (128, 128, 8, 3),
    256: (64, 32, 4, 2),
}
# Decode tiles (few query rows per KV head): (BLOCK_N, num_warps, num_stages) by padded head size
DECODE_TILES = {
    32: (64, 4, 2),
    64: (64, 4, 2),
    128: (64, 4, 2),
    256: (32, 4, 2),
}
# fp8 caches: half the bytes per key, so twice the keys per tile keeps as many bytes in flight per
# program (measured, see BENCHMARKS.md). At head 128 two stages beat three on the H200 (2026-11-29
# probe, decode b64 ctx4k: 216 vs 226 us; 64-key tiles 274-354 us, 256-key 231-339 us): the fp8
# kernel is bound by converting tiles (255 registers, 12% occupancy, 49% of DRAM bandwidth under
# ncu), and a third stage only adds registers
DECODE_TILES_FP8 = {
    32: (128, 4, 3),
    64: (128, 4, 3),
    128: (128, 4, 2),
    256: (64, 4, 3),
}
DECODE_MIN_ROWS = 16  # tl.dot needs M >= 16: decode tiles are padded up to this many rows
PARTITION_MIN_TOKENS = 256  # a split-KV partition never covers fewer keys than this
# split-KV: how many programs per SM the split search aims for, (at least, at most). At least 2 so
# each SM has enough bytes in flight; at most 3 so every program is resident at once (4 decode
# programs fit an SM at bf16, 3 with fp8's deeper tiles): one wave, no tail of late programs.
# Within that range the count that spreads programs most evenly over the SMs wins (H100 run 11,
# decode-b4-ctx32k: 12 splits 88.5%, 9 splits 86.3%, 13 splits 85.6%; fp8 71.5% vs 64.7%).
SPLIT_PROGRAMS_PER_SM = (2, 3)
MAX_SPLITS = 64
# Known compiler failures and their workaround, checked offline by tests/test_compile_sm90.py.
# Triton 3.6's bundled ptxas dies with SIGSEGV compiling the context-contract prefill kernel with
# ALiBi at head sizes padded to 64 (BLOCK_M 128, 4 warps) with 3 stages (H100 fuzz run 9: h8/kv1
# d64 alibi); the same kernel with 2 stages compiles. (head_pad, num_stages to use instead)
PTXAS_ALIBI_CONTEXT_STAGES = {64: 2}


@dataclass(frozen=True)
class Plan:
    """What runs and with which parameters; `rule` says why, in words."""

    kernel: str  # "unified" | "split_kv" | "reference"
    phase: str = ""  # "decode" (few query rows per KV head) | "prefill"
    block_m: int = 0
    block_q: int = 0
    block_n: int = 0
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int = 1
    partition_size: int = 0  # keys per split (a multiple of block_n)
    min_query_len: int = 0  # this launch handles sequences with min_query_len <= query_len <= max_query_len
    max_query_len: int = 1 << 30
    decode_part: Plan | None = None  # the second launch of a mixed batch (decode tiles)
    rule: str = ""

    @property
    def seq_grid(self) -> bool:
        """Decode launches run one program per sequence (every sequence fits one tile)."""
        return self.phase == "decode"

    @property
    def launches(self) -> tuple[Plan, ...]:
        """The kernel launches of this plan, in order (a mixed batch: prefill tiles, then decode)."""
        return (self,) if self.decode_part is None else (self, self.decode_part)

    def params(self) -> str:
        if self.kernel == "reference":
            return "-"
        s = f"BLOCK_M={self.block_m} (BLOCK_Q={self.block_q}) BLOCK_N={self.block_n} warps={self.num_warps} stages={self.num_stages}"  # noqa: E501
        if self.num_splits > 1:
            s += f" splits={self.num_splits}x{self.partition_size}"
        if self.decode_part is not None:
            s += f" + decode launch [{self.decode_part.params()}]"
        return s


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@functools.cache
def sm_count(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # no GPU: plan as for an H100 so explain() reads the same everywhere


def choose_backend(device: torch.device, backend: str) -> tuple[str, str]:
    if backend == "reference":
        return "reference", "backend='reference' was asked for"
    if device.type == "cuda":
        return "triton", ""
    if interpreter_enabled():
        _check_interpreter_versions()
        return "triton", ""
    if backend == "triton":
        from .errors import UnsupportedConfigError

        raise UnsupportedConfigError(
            f"backend='triton' needs a CUDA device or TRITON_INTERPRET=1, got tensors on {device}"
        )
    _warn_reference_once(device)
    return "reference", f"tensors on {device.type} and TRITON_INTERPRET is not set: the PyTorch reference runs"


_warned_reference = False


@functools.cache
def _check_interpreter_versions() -> None:
    """numpy 2.4 turned int() of a 1-element array into an error, and Triton 3.6's interpreter does
    that on every scalar load: refuse the pair by name instead of failing inside a kernel."""
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, int]:
        return tuple(int(x) for x in version.split(".")[:2])

    if major_minor(numpy.__version__) >= (2, 4) and major_minor(triton.__version__) < (3, 7):
        from .errors import UnsupportedConfigError

        raise UnsupportedConfigError(
            f"TRITON_INTERPRET=1 with numpy {numpy.__version__} and triton {triton.__version__}: Triton's "
            "interpreter before 3.7 fails on numpy >= 2.4 (InterpreterError: only 0-dimensional arrays can be "
            "converted to Python scalars). Install numpy<2.4 (pip install 'numpy<2.4'), as pagedattn's "
            "requirements say, or a newer triton"
        )


def _warn_reference_once(device: torch.device) -> None:
    """Once per process: without CUDA or the interpreter no kernel runs, and a comparison with the
    reference then checks the reference against itself."""
    global _warned_reference
    if not _warned_reference:
        _warned_reference = True
        import sys
        import warnings

        # point at the caller's line: the first frame outside this package
        package, frame, level = os.path.dirname(__file__), sys._getframe(0), 1
        while frame is not None and frame.f_code.co_filename.startswith(package):
            frame, level = frame.f_back, level + 1
        warnings.warn(
            f"pagedattn: tensors on {device.type} and TRITON_INTERPRET is not set, so the PyTorch "
            "reference runs, not a Triton kernel; set TRITON_INTERPRET=1 to run the kernels through "
            "Triton's interpreter on the CPU",
            UserWarning,
            stacklevel=level,
        )


def choose_tiles(
    *, decode: bool, num_queries_per_kv: int, head_size: int, block_size: int, fp32: bool, fp8: bool = False
) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_Q, BLOCK_N, num_warps, num_stages) for a decode-like or prefill batch."""
    head_pad = max(32, next_pow2(head_size))
    if decode:
        block_n, warps, stages = (DECODE_TILES_FP8 if fp8 else DECODE_TILES)[head_pad]
        block_m = max(DECODE_MIN_ROWS, next_pow2(num_queries_per_kv))
    else:
        block_m, block_n, warps, stages = PREFILL_TILES[head_pad]
        block_m = max(block_m, next_pow2(num_queries_per_kv))
    if fp32:
        # fp32 is the accuracy path: IEEE dots on FMA units keep operand tiles in registers, and
        # larger tiles spill kilobytes per thread on sm_90 (an 11 KB stack frame at 128x64x8 warps,
        # where the H100 runs failed to launch). 16x16 tiles at 4 warps compile with no stack frame
        # for head sizes up to 256 (scripts/compile_check.py).
        # With an fp8 cache, converting the tiles at 4 warps spilled 1.6-3 KB per thread at head
        # sizes 192/256; 8 warps spread them (at most 160 B of stack, tests/test_compile_sm90.py).
        block_m, block_n, warps, stages = max(16, next_pow2(num_queries_per_kv)), 16, 8 if fp8 else 4, 2
    block_q = max(1, block_m // num_queries_per_kv)
    return block_m, block_q, block_n, warps, stages


def spread(programs: int, sm_count: int) -> float:
    """How evenly `programs` equal programs load `sm_count` SMs: 1.0 when every SM runs as many as
    the busiest one (programs / (waves of one program per SM x SMs))."""
    return programs / (math.ceil(programs / sm_count) * sm_count)


def partition_for(max_seq_len: int, splits: int, block_n: int) -> tuple[int, int]:
    """(num_splits, partition_size): keys per split rounded up to whole key tiles, and the split
    count that partition size really gives."""
    partition = math.ceil(math.ceil(max_seq_len / splits) / block_n) * block_n
    return math.ceil(max_seq_len / partition), partition


def choose_splits(
    *,
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    block_n: int,
    sm_count: int,
    programs_per_sm: tuple[int, int] | None = None,
) -> tuple[int, int, str]:
    """(num_splits, partition_size, why) for a decode-like batch: one program per (sequence, KV
    head, split). Splits only when the batch alone gives fewer than programs_per_sm[0] programs
    per SM; then the split count in that range that spreads programs most evenly (fewest on a tie)."""
    low, high = programs_per_sm or SPLIT_PROGRAMS_PER_SM
    programs = num_seqs * num_kv_heads
    if programs >= low * sm_count:
        return 1, 0, f"{num_seqs} seqs x {num_kv_heads} KV heads = {programs} programs fill {sm_count} SMs"
    by_length = max(1, max_seq_len // PARTITION_MIN_TOKENS)
    limit = min(by_length, MAX_SPLITS)
    if limit <= 1:
        return 1, 0, f"seq_len {max_seq_len} is too short to split (< 2 x {PARTITION_MIN_TOKENS} tokens)"
    first = math.ceil(low * sm_count / programs)
    last = max(first, high * sm_count // programs)
    candidates = range(min(first, limit), min(last, limit) + 1)
    splits = max(candidates, key=lambda s: (spread(s * programs, sm_count), -s))
    splits, partition = partition_for(max_seq_len, splits, block_n)
    total = splits * programs
    how = (
        f"the most even spread of {low}-{high} per SM"
        if limit >= first
        else f"fewer than {low} per SM: seq_len {max_seq_len} allows no more partitions of >= {PARTITION_MIN_TOKENS} keys"  # noqa: E501
    )
    return (
        splits,
        partition,
        (
            f"{num_seqs} seqs x {num_kv_heads} KV heads = {programs} programs would leave most of "
            f"{sm_count} SMs idle: split each sequence's keys into {splits} partitions of {partition} tokens "
            f"({total} programs, {total / sm_count:.2f} per SM: {how})"
        ),
    )


def plan(
    *,
    num_seqs: int,
    num_tokens: int,
    max_query_len: int,
    max_seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
    sliding_window: int = 0,
    context_contract: bool = False,
    alibi: bool = False,
    device: torch.device | str = "cuda",
    backend: str = "auto",
    sms: int | None = None,
) -> Plan:
    """The plan for one call. `sms` overrides the device's SM count (for explain)."""
    device = torch.device(device)
    which, why = choose_backend(device, backend)
    if which == "reference":
        return Plan(kernel="reference", rule=why)
    qpk = num_q_heads // num_kv_heads
    fp32 = dtype == torch.float32 or cache_dtype == torch.float32
    fp8 = cache_dtype in FP8_DTYPES
    # decode tiles: the query heads of one KV head, padded to 16 rows, for up to block_q tokens
    d_m, d_q, d_n, d_warps, d_stages = choose_tiles(
        decode=True, num_queries_per_kv=qpk, head_size=head_size, block_size=block_size, fp32=fp32, fp8=fp8
    )
    splits, partition, why = (
        (1, 0, "context-cache contract: keys are not split")
        if context_contract
        else choose_splits(
            num_seqs=num_seqs,
            num_kv_heads=num_kv_heads,
            max_seq_len=max_seq_len,
            block_n=d_n,
            sm_count=sms or sm_count(device),
        )
    )
    decode_plan = Plan(
        "split_kv" if splits > 1 else "unified",
        "decode",
        d_m,
        d_q,
        d_n,
        d_warps,
        d_stages,
        splits,
        partition,
        max_query_len=d_q,
    )
    if max_query_len <= d_q:
        # one decode tile per sequence: max_query_len must hold (checked mode verifies it)
        # the decode launch takes every sequence: one whose query_len exceeds the tile (a
        # max_query_len below the real one) gets NaN rows rather than being skipped
        return dataclasses.replace(
            decode_plan,
            max_query_len=1 << 30,
            rule=(
                f"decode batch (max_query_len {max_query_len} <= {d_q}: {plural(qpk, 'query head')} per KV head "
                f"fit one {d_m}-row tile): {why}"
            ),
        )
    block_m, block_q, block_n, warps, stages = choose_tiles(
        decode=False, num_queries_per_kv=qpk, head_size=head_size, block_size=block_size, fp32=fp32, fp8=fp8
    )
    workaround = ""
    head_pad = max(32, next_pow2(head_size))
    if context_contract and alibi and not fp32 and head_pad in PTXAS_ALIBI_CONTEXT_STAGES:
        stages = PTXAS_ALIBI_CONTEXT_STAGES[head_pad]
        workaround = f"; {stages} stages, not 3: ptxas (Triton 3.6) crashes on this kernel with ALiBi at 3"
    # A mixed batch runs as two launches of the same kernel, each skipping the other's sequences:
    # prefill tiles for query_len > d_q, decode tiles (split if long) for the rest. A decode in a
    # 128-row prefill tile would waste most of the tile's math. Shapes alone decide: graph-safe.
    return Plan(
        "unified",
        "prefill",
        block_m,
        block_q,
        block_n,
        warps,
        stages,
        min_query_len=d_q + 1,
        decode_part=dataclasses.replace(decode_plan, rule=why),
        rule=(
            f"max_query_len {max_query_len} > {d_q}: prefill tiles of {block_q} query tokens x "
            f"{plural(qpk, 'head')} per KV head for sequences with query_len > {d_q}; sequences with "
            f"query_len <= {d_q} (decodes) in a second launch with {d_m}-row decode tiles"
            + (f" and {splits} KV splits" if splits > 1 else "")
            + workaround
        ),
    )


def plan_for(
    config: AttentionConfig,
    shape: BatchShape,
    *,
    device="cuda",
    backend="auto",
    context_contract: bool = False,
    sms: int | None = None,
) -> Plan:
    return plan(
        num_seqs=shape.num_seqs,
        num_tokens=shape.num_tokens,
        max_query_len=max(shape.query_lens),
        max_seq_len=max(shape.seq_lens),
        num_q_heads=config.num_q_heads,
        num_kv_heads=config.num_kv_heads,
        head_size=config.head_size,
        block_size=config.block_size,
        dtype=config.dtype,
        cache_dtype=config.cache_dtype,
        sliding_window=config.sliding_window,
        context_contract=context_contract,
        alibi=config.use_alibi,
        device=device,
        backend=backend,
        sms=sms,
    )


def explain(config: AttentionConfig, shape: BatchShape, *, device="cuda", context_contract=False) -> str:
    """One paragraph: the configuration, the batch, the kernel chosen, its parameters and the rule."""
    p = plan_for(config, shape, device=device, context_contract=context_contract)
    return (
        f"num_queries_per_kv={config.num_queries_per_kv}, head_size={config.head_size}, "
        f"sliding_window={config.sliding_window}, {shape.label()} -> {p.kernel} "
        f"[{p.params()}]: {p.rule}"
    )
