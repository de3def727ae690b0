"""Compile the attention kernel ahead of time for sm_90 (no GPU needed: Triton ships ptxas) and
report registers, spills and shared memory per configuration, flagging launches an H100 would
refuse: registers x threads over the 64K register file, or shared memory over 227 KB.

    python -m pagedattn.tools.compile_check

Caveat: this compiles from a bare signature, without the argument specializations a launch gets
(pointer alignment, integers divisible by 16 or equal to 1). Without known alignment Triton emits
no cp.async, so loads, shared memory and register use differ from the real kernel. For figures
that match a launch use pagedattn.tools.sm90 (what tests/test_compile_sm90.py uses).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import dispatch
from ..config import AttentionConfig, BatchShape
from ..kernels.unified import _paged_attention_kernel

TARGET = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM = 65536
SHARED_PER_BLOCK = 232448  # 227 KB opt-in on sm_90
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
# the kernel's tuple arguments (one per tensor's strides) and their lengths
_STRIDES = dict(
    q_strides=3,
    out_strides=3,
    k_strides=5,
    v_strides=4,
    k_new_strides=3,
    v_new_strides=3,
    bt_strides=2,
    scale_strides=2,
)


def compile_plan(config: AttentionConfig, part: dispatch.Plan, *, context: bool, seq_grid: bool):
    q_ptr = _PTR[config.dtype]
    fp8 = {"auto": 0, "fp8_e4m3": 1, "fp8_e5m2": 2}[config.kv_dtype if config.kv_dtype != "fp8" else "fp8_e4m3"]
    cache_ptr = "*u8" if fp8 else q_ptr
    head_pad = max(16, triton.next_power_of_2(config.head_size))
    types = {}
    for p in _paged_attention_kernel.params:
        n = p.name
        if p.is_constexpr:
            types[n] = "constexpr"
        elif n in _STRIDES:
            types[n] = ("i32",) * _STRIDES[n]
        elif n in ("q_ptr", "out_ptr", "k_new_ptr", "v_new_ptr", "alibi_ptr", "sinks_ptr"):
            types[n] = q_ptr if n not in ("alibi_ptr", "sinks_ptr") else "*fp32"
        elif n in ("k_cache_ptr", "v_cache_ptr"):
            types[n] = cache_ptr
        elif n in ("cu_seqlens_q_ptr", "seq_lens_ptr", "block_table_ptr"):
            types[n] = "*i32"
        elif n.endswith("_ptr"):
            types[n] = "*fp32"
        elif n in ("qk_scale", "softcap"):
            types[n] = "fp32"
        else:
            types[n] = "i32"
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[config.dtype]
    constexprs = dict(
        QPK=config.num_queries_per_kv,
        HEAD_SIZE=config.head_size,
        HEAD_PAD=head_pad,
        BLOCK_M=part.block_m,
        BLOCK_Q=part.block_q,
        BLOCK_N=part.block_n,
        PAGE=config.block_size,
        K_X=head_pad,
        KV_FP8=fp8,
        Q_FP8=False,
        OUT_FP8=False,
        DOT_DTYPE=dot_dtype,
        PV_DTYPE=tl.float16 if fp8 and dot_dtype != tl.float32 else dot_dtype,  # as unified.bind_attention
        NEW_DTYPE=dot_dtype,
        IEEE=config.dtype == torch.float32,
        CONTEXT=context,
        DECODE_FROM_CACHE=False,
        USE_SOFTCAP=bool(config.softcap),
        USE_ALIBI=config.use_alibi,
        USE_SINKS=config.use_sinks,
        SLIDING=bool(config.sliding_window),
        NUM_SPLITS=part.num_splits,
        IDX64=False,
        INTERPRET=False,
        SEQ_GRID=seq_grid,
        PARTIALS=False,
    )
    src = ASTSource(_paged_attention_kernel, types, constexprs)
    kernel = triton.compile(src, target=TARGET, options=dict(num_warps=part.num_warps, num_stages=part.num_stages))
    regs, local = _resource_usage(kernel.asm["cubin"])
    return kernel.metadata.shared, regs, local, kernel


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack-frame bytes per thread: spilled registers) from the bundled cuobjdump."""
    import os
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1


def main() -> int:
    configs = []
    wanted = sys.argv[1:] or ["bf16", "fp16", "fp32"]
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dtype in (names[n] for n in wanted):
        for head in (24, 64, 80, 128, 192, 256):
            for qpk in (1, 4, 8):
                for kv in ("auto", "fp8_e4m3"):
                    for window in (0, 7):
                        configs.append(
                            AttentionConfig(
                                num_q_heads=8 * qpk if qpk < 8 else 8,
                                num_kv_heads=8 if qpk < 8 else 1,
                                head_size=head,
                                dtype=dtype,
                                kv_dtype=kv,
                                sliding_window=window,
                            )
                        )
    shapes = {"mixed": BatchShape((700, 1, 1), (100, 3000, 9000)), "decode": BatchShape((1, 1), (20000, 30000))}
    bad = 0
    seen = set()
    for config in configs:
        for shape in shapes.values():
            plan = dispatch.plan_for(config, shape, device="cuda")
            for part in (plan, plan.decode_part):
                if part is None:
                    continue
                key = (
                    config.dtype,
                    config.head_size,
                    config.num_queries_per_kv,
                    config.kv_dtype,
                    config.sliding_window,
                    part.params(),
                )
                if key in seen:
                    continue
                seen.add(key)
                shared, regs, spills, kernel = compile_plan(
                    config, part, context=False, seq_grid=part.phase == "decode"
                )
                threads = 32 * part.num_warps
                # ptxas allocates registers per warp in units of 256
                regs_block = ((regs * 32 + 255) // 256) * 256 * part.num_warps if regs is not None else 0
                problem = []
                if regs_block > REGISTERS_PER_SM:
                    problem.append(f"registers {regs}x{threads} > 64K")
                if shared > SHARED_PER_BLOCK:
                    problem.append(f"shared {shared} > 227KB")
                if spills > 1024:  # a stack frame this size means register arrays went to local memory
                    problem.append(f"stack {spills} B/thread")
                flag = "BAD " if problem else "ok  "
                bad += bool(problem)
                print(
                    f"{flag}{config.label():40s} {part.phase:7s} {part.params()[:60]:60s} "
                    f"regs={regs} stack={spills} shared={shared} {' '.join(problem)}",
                    flush=True,
                )
    print(f"{len(seen)} kernels compiled for sm_90, {bad} would not launch")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
