"""A streaming-read kernel: the read-bandwidth ceiling `pagedattn bench` measures.

Each program sums UNROLL consecutive tiles of BLOCK elements; the tiles' loads are independent
(an unrolled loop), so each thread has UNROLL vector loads in flight and each SM holds several
programs: many bytes in flight, which is what a streaming read needs to reach the memory's rate
(`torch.sum` reaches about 4.23 TB/s on an H200, a kernel like this one about 4.40).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
UNROLL = 4
NUM_WARPS = 8


@triton.jit
def _stream_sum_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * (BLOCK * UNROLL)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(UNROLL):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_first")
        acc += x.to(tl.float32)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


def stream_programs(n: int, block: int = BLOCK, unroll: int = UNROLL) -> int:
    return triton.cdiv(n, block * unroll)


def stream_sum(
    x: torch.Tensor,
    partials: torch.Tensor | None = None,
    *,
    block: int = BLOCK,
    unroll: int = UNROLL,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """Per-program fp32 sums of a contiguous tensor `x` (their sum is x's sum): reads every byte
    of x once. `partials`: a float32 buffer of `stream_programs(x.numel())` entries (allocated
    when not given: pass one to time the read alone)."""
    if not x.is_contiguous():
        raise ValueError("stream_sum reads a contiguous tensor")
    n = x.numel()
    programs = stream_programs(n, block, unroll)
    if partials is None:
        partials = torch.empty(programs, dtype=torch.float32, device=x.device)
    _stream_sum_kernel[(programs,)](x, partials, n, BLOCK=block, UNROLL=unroll, num_warps=num_warps)
    return partials
