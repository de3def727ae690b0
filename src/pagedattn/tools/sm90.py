"""Compile, for sm_90 and without a GPU, exactly the kernels one pagedattn call would launch on an
H100: the same arguments go through Triton's own binder, so integer and pointer specializations
(value 1, divisibility by 16) match a native launch. Nothing runs; each launch is compiled with the
bundled ptxas and its registers / stack / shared memory are printed. Used to reproduce a ptxas
failure seen on the GPU from the failing case alone.

    python -m pagedattn.tools.sm90
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;")
compiled = []  # (kernel name, grid, compiled kernel) of the last compile_call / compile_case


def sass_lines(cubin: bytes) -> list[str]:
    """The SASS instructions of a cubin (Triton's bundled cuobjdump), one per line, without
    addresses or encodings."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [m.group(1) for m in map(_INSTRUCTION.match, text.splitlines()) if m]


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = make_backend(TARGET)
    binder = create_function_from_signature(self.signature, self.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
    kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    compiled.append((self.__name__, grid, kernel))
    return None


def compile_call(fn, *args, **kwargs):
    """Run fn(*args, **kwargs) with every Triton launch replaced by an sm_90 compile; return the kernels."""
    compiled.clear()
    original = JITFunction.run
    JITFunction.run = _compile_instead_of_launch
    try:
        fn(*args, **kwargs)
    finally:
        JITFunction.run = original
    return list(compiled)


def compile_case(
    config,
    shape,
    contract: str = "full",
    q_dtype=None,
    out_dtype=None,
    fp8_dot: bool = True,
    fp8_pv: bool = False,
    kv_layout: str = "nhd",
) -> list[dict]:
    """Compile what `PagedAttention.run` would launch on an H100 for this case (inputs built as the
    kernel tests build them); one row per launch: registers, stack frame and shared memory.
    `q_dtype` / `out_dtype` torch.float8_e4m3fn: fp8 queries / output (q.k on fp8 tensor cores
    over an e4m3 cache, as on an sm_89+ GPU, unless `fp8_dot=False`). `kv_layout`: the caches in
    that layout ("hnd", "vllm_v0": its V is keys-contiguous, a stride the launch specializes to 1)."""
    import torch

    from .. import dispatch
    from ..kernels import unified
    from ..options import AttentionOptions
    from ..planner import PagedAttention
    from ..testing import geometry, make_inputs

    x = make_inputs(config, shape, contract=contract)
    context = contract != "full"
    plan = dispatch.plan_for(config, shape, device="cuda", context_contract=context)
    options = {k: v for k, v in x.options.items() if v is not None}
    q = x.q
    if q_dtype is not None and q_dtype != q.dtype:
        q = (q.float() / 0.02).to(q_dtype)
        options["q_scale"] = 0.02
    if out_dtype == torch.float8_e4m3fn:
        options["out_scale"] = 0.05
    k_cache, v_cache = x.k_cache, x.v_cache
    if kv_layout == "hnd":
        k_cache, v_cache = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    elif kv_layout == "vllm_v0":
        nb, bs, kvh, d = k_cache.shape
        chunk = 16 // k_cache.element_size()
        k_cache = k_cache.reshape(nb, bs, kvh, d // chunk, chunk).permute(0, 2, 3, 1, 4).contiguous()
        v_cache = v_cache.permute(0, 2, 3, 1).contiguous()
    attn = PagedAttention(
        AttentionOptions(scale=config.head_size**-0.5, kv_layout=kv_layout, **options),
        **geometry(config),
        dtype=q.dtype,
        kv_cache_dtype=x.k_cache.dtype,
        out_dtype=out_dtype,
        device=x.q.device,
        contract="context" if context else "full",
        decode_from_cache=contract == "context-decode",
        fp8_pv=fp8_pv,
    )
    # the H100 plan, forced: on this CPU the planner's own dispatch would pick the reference
    attn.plan(x.cu_seqlens_q, x.seq_lens, x.block_table, validate=False, dispatch_plan=plan)
    extra = dict(k_new=x.k_new, v_new=x.v_new) if context else {}
    out = torch.empty(q.shape, dtype=attn.out_dtype)
    original = unified.fp8_dot_available
    unified.fp8_dot_available = lambda device: fp8_dot  # this CPU has no GPU to ask
    try:
        calls = compile_call(attn.run, q, k_cache, v_cache, out=out, **extra)
    finally:
        unified.fp8_dot_available = original
    return [
        dict(
            _resources(name, grid, kernel, plan.params()),
            fp8_mma=kernel.asm["ptx"].count("e4m3.e4m3"),  # fp8 tensor-core instructions (wgmma / mma)
            smem_b8=kernel.asm["ptx"].count("ld.shared.b8"),  # byte-wide shared-memory reads
        )
        for name, grid, kernel in calls
    ]


def _resources(name: str, grid, kernel, params: str) -> dict:
    """One compiled launch's row: kernel, grid, registers, stack frame, shared memory, warps, params."""
    from .compile_check import _resource_usage

    regs, stack = _resource_usage(kernel.asm["cubin"])
    return dict(
        kernel=name,
        grid=list(grid),
        regs=regs,
        stack=stack,
        shared=kernel.metadata.shared,
        warps=kernel.metadata.num_warps,
        params=params,
    )


def compile_cascade_case(config, num_seqs: int, prefix: int, own: int, query_len: int = 1) -> list[dict]:
    """Compile what `PagedAttention.run` launches on an H100 for `num_seqs` sequences sharing a
    `prefix`-token prefix plus `own` tokens each (`query_len` of them queries): the prefix kernel,
    the suffix launch(es) writing partials and the cascade merge. The cache is a few blocks (only
    the launch's shapes and specializations matter to the compiler)."""
    import torch

    from .. import dispatch
    from ..options import AttentionOptions
    from ..planner import PagedAttention
    from ..testing import geometry

    bs = config.block_size
    seq_len = prefix + own
    width = -(-seq_len // bs)
    num_blocks = 64
    table = (torch.arange(num_seqs * width, dtype=torch.int32).reshape(num_seqs, width) % num_blocks).contiguous()
    table[:, : prefix // bs] = table[0, : prefix // bs]
    cu = torch.arange(num_seqs + 1, dtype=torch.int32) * query_len
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32)
    kv_dtype = {"auto": config.dtype, "fp8_e4m3": torch.float8_e4m3fn}[config.kv_dtype]
    cache = torch.zeros(num_blocks, bs, config.num_kv_heads, config.head_size, dtype=kv_dtype)
    q = torch.zeros(num_seqs * query_len, config.num_q_heads, config.head_size, dtype=config.dtype)
    h = config.num_q_heads
    options = AttentionOptions(
        alibi_slopes=torch.ones(h) if config.use_alibi else None,
        softcap=config.softcap or None,
        sinks=torch.zeros(h) if config.use_sinks else None,
        k_scale=1.0 if kv_dtype != config.dtype else None,
        v_scale=1.0 if kv_dtype != config.dtype else None,
    )
    suffix = dispatch.plan(
        num_seqs=num_seqs,
        num_tokens=num_seqs * query_len,
        max_query_len=query_len,
        max_seq_len=seq_len - prefix // bs * bs,
        **geometry(config),
        dtype=config.dtype,
        cache_dtype=kv_dtype,
        device="cuda",
    )
    attn = PagedAttention(
        options,
        **geometry(config),
        dtype=config.dtype,
        kv_cache_dtype=kv_dtype,
        device="cpu",
    )
    attn.plan(
        cu,
        seq_lens,
        table,
        validate=False,
        dispatch_plan=suffix,
        shared_prefix=[(list(range(num_seqs)), prefix)],
    )
    calls = compile_call(attn.run, q, cache, cache, out=torch.empty_like(q))
    return [_resources(name, grid, kernel, attn.explain()) for name, grid, kernel in calls]


def compile_gluon_case(num_q_heads, num_kv_heads, head_size, block_size, dtype, tiles=None, warp_specialized=False):
    """Compile the Gluon prefill kernel (kernels/gluon_prefill.py) for one 256-token causal
    sequence, bound exactly as a launch would be; returns (kernel name, grid, compiled kernel)."""
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource

    from ..kernels import gluon_prefill as gp

    backend = make_backend(TARGET)
    q = torch.randn(256, num_q_heads, head_size, dtype=dtype)
    k = torch.randn(64, block_size, num_kv_heads, head_size, dtype=dtype)
    cu = torch.tensor([0, 256], dtype=torch.int32)
    seq_lens = torch.tensor([256], dtype=torch.int32)
    table = torch.arange(64, dtype=torch.int32)[None]
    fn, grid, args, meta = gp.launch_args(
        q, k, k.clone(), cu, seq_lens, table, torch.empty_like(q), head_size**-0.5,
        tuple(tiles) if tiles else None, warp_specialized,
    )  # fmt: skip
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, spec, options)
    kernel = triton.compile(GluonASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    return fn.__name__, grid, kernel


def main() -> None:
    import torch

    from ..config import AttentionConfig, BatchShape

    # the GPU fuzz failure of run 9: ptxas died with SIGSEGV (before dispatch's workaround)
    config = AttentionConfig(
        num_q_heads=8, num_kv_heads=1, head_size=64, block_size=8, dtype=torch.float16, use_alibi=True
    )
    for row in compile_case(config, BatchShape((1, 1, 1, 3), (0, 0, 0, 0)), "context"):
        print(row)


if __name__ == "__main__":
    main()
