"""GPU check of the kernels' tuple arguments (per-tensor strides as one tuple each) through the fast
launcher (kernels/launch.py): every launch kind runs through the fast path and through Triton's own
path (PAGEDATTN_TRITON_LAUNCH=1), in two child processes, and the outputs must agree bit for bit.

In the fast child each case runs three times: the first call compiles through Triton's path, the
next two go through `BoundLaunch`'s bound C-launcher calls (checked: every launch has a bound
entry, and tuple arguments were keyed). Every kernel the fast path keyed is also checked to be the
one Triton's own binder selects for the same arguments (`warmup`), as tests/test_launch.py does
for a flat kernel.

    python scripts/check_tuple_launch.py          # exit status 0: all equal
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import torch

CASES = (
    "mixed-bf16",  # prefill + split-KV decode (+ merge)
    "context-fp8-alibi",  # context contract (k_new / v_new strides), fp8 e4m3 cache, per-head scales
    "context-decode-fp32-window",
    "strided-softcap-sinks",  # q, k_new, v_new views of fused buffers, HND caches, softcap + ALiBi + sinks
    "fp8-q-fp8-out",  # fp8 queries over an e4m3 cache, fp8 output
    "cascade",  # shared-prefix kernel, suffix partials, cascade merge
)


def _case(name: str):
    """(PagedAttention planned, run kwargs) on the GPU for one named case."""
    from pagedattn import AttentionOptions, PagedAttention
    from pagedattn.config import AttentionConfig, BatchShape
    from pagedattn.testing import geometry, make_inputs

    dev = torch.device("cuda")
    contract, q_dtype, out_dtype, layout, strided = "full", None, None, "nhd", False
    if name == "mixed-bf16":
        config = AttentionConfig(32, 8, 128, 16, torch.bfloat16)
        shape = BatchShape((700, 1, 1), (100, 3000, 9000))
    elif name == "context-fp8-alibi":
        config = AttentionConfig(16, 4, 128, 16, torch.float16, kv_dtype="fp8_e4m3", use_alibi=True)
        shape = BatchShape((37, 1, 64), (90, 500, 300))
        contract = "context"
    elif name == "context-decode-fp32-window":
        config = AttentionConfig(8, 8, 80, 8, torch.float32, sliding_window=13)
        shape = BatchShape((29, 1, 3), (40, 90, 7))
        contract = "context-decode"
    elif name == "strided-softcap-sinks":
        config = AttentionConfig(8, 2, 96, 16, torch.bfloat16, use_alibi=True, softcap=5.0, use_sinks=True)
        shape = BatchShape((33, 1, 5), (70, 2000, 40))
        contract, layout, strided = "context", "hnd", True
    elif name == "fp8-q-fp8-out":
        config = AttentionConfig(32, 8, 128, 16, torch.bfloat16, kv_dtype="fp8_e4m3")
        shape = BatchShape((300, 1, 1), (400, 3000, 9000))
        q_dtype = out_dtype = torch.float8_e4m3fn
    elif name == "cascade":
        return _cascade_case(dev)
    else:
        raise ValueError(name)
    x = make_inputs(config, shape, device=dev, contract="full" if contract == "full" else "context")
    options = {k: v for k, v in x.options.items() if v is not None}
    if config.kv_dtype != "auto":  # one scale per KV head: the scale-stride tuple (1, 1)
        options["k_scale"] = torch.full((config.num_kv_heads,), options["k_scale"], device=dev)
        options["v_scale"] = torch.full((config.num_kv_heads,), options["v_scale"], device=dev)
    q, k_cache, v_cache, k_new, v_new = x.q, x.k_cache, x.v_cache, x.k_new, x.v_new
    if q_dtype is not None:
        q = (q.float() / 0.02).to(q_dtype)
        options["q_scale"] = 0.02
    if out_dtype is not None:
        options["out_scale"] = 0.05
    if strided:  # q out of a fused QKV buffer, k_new / v_new halves of one buffer
        n, hq, hkv, d = q.shape[0], config.num_q_heads, config.num_kv_heads, config.head_size
        qkv = torch.zeros(n, hq + 2 * hkv, d, dtype=q.dtype, device=dev)
        qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :] = q, k_new, v_new
        q, k_new, v_new = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
    if layout == "hnd":
        k_cache = k_cache.transpose(1, 2).contiguous()
        v_cache = v_cache.transpose(1, 2).contiguous()
    attn = PagedAttention(
        AttentionOptions(scale=config.head_size**-0.5, kv_layout=layout, **options),
        **geometry(config),
        dtype=q.dtype,
        kv_cache_dtype=k_cache.dtype,
        out_dtype=out_dtype,
        device=dev,
        contract="full" if contract == "full" else "context",
        decode_from_cache=contract == "context-decode",
        backend="triton",
    )
    attn.plan(x.cu_seqlens_q, x.seq_lens, x.block_table)
    run = dict(q=q, k_cache=k_cache, v_cache=v_cache)
    if contract != "full":
        run.update(k_new=k_new, v_new=v_new)
    return attn, run, torch.empty(q.shape, dtype=attn.out_dtype, device=dev)


def _cascade_case(dev):
    from pagedattn import AttentionOptions, PagedAttention

    g = torch.Generator().manual_seed(0)
    hq, hkv, d, bs, prefix, own, n = 16, 4, 128, 16, 1024, 200, 24
    seq_len = prefix + own
    width = -(-seq_len // bs)
    num_blocks = prefix // bs + n * (width - prefix // bs) + 3
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.empty(n, width, dtype=torch.int32)
    table[:, : prefix // bs] = perm[: prefix // bs]
    table[:, prefix // bs :] = perm[prefix // bs : prefix // bs + n * (width - prefix // bs)].view(n, -1)
    q = torch.randn(n, hq, d, generator=g).to(dev, torch.bfloat16)
    k = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dev, torch.bfloat16)
    v = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dev, torch.bfloat16)
    attn = PagedAttention(
        AttentionOptions(),
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_size=d,
        block_size=bs,
        dtype=torch.bfloat16,
        device=dev,
        backend="triton",
    )
    attn.cascade_min_prefix, attn.cascade_min_saved_keys, attn.cascade_prefix_splits = 1, 1, 4
    cu = torch.arange(n + 1, dtype=torch.int32)
    lens = torch.full((n,), seq_len, dtype=torch.int32)
    attn.plan(
        cu.to(dev),
        lens.to(dev),
        table.to(dev),
        query_lens_host=[1] * n,
        seq_lens_host=lens.tolist(),
        block_table_host=table,
        shared_prefix=[(list(range(n)), prefix)],
    )
    assert "cascade:" in attn.explain(), attn.explain()
    return attn, dict(q=q, k_cache=k, v_cache=v), torch.empty_like(q)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).cpu()


def child(path: str) -> None:
    """Run every case three times; save the outputs' bytes (and, on the fast path, check it)."""
    from pagedattn.kernels import launch

    fast = not launch.ALWAYS_TRITON
    records = []
    original = launch.FastKernel.launch

    def recording(self, grid, args, kwargs):
        entry = original(self, grid, args, kwargs)
        if entry is not None:
            records.append((self, grid, list(args), dict(kwargs), entry))
        return entry

    launch.FastKernel.launch = recording
    results = {}
    for name in CASES:
        attn, run, out = _case(name)
        outs = []
        for _ in range(3):
            if out.dtype == torch.float8_e4m3fn:
                out.view(torch.uint8).fill_(0x7F)  # e4m3 NaN
            else:
                out.fill_(float("nan"))
            attn.run(out=out, **run)
            torch.cuda.synchronize()
            outs.append(_bits(out))
        launches = [b for binding in attn._bindings.values() for b in binding.launches]
        if fast:
            for b in launches:
                assert b._compiled, f"{name}: a launch of {b.kernel.fn.__name__} was never bound to the fast path"
        assert all(torch.equal(outs[0], o) for o in outs[1:]), f"{name}: repeated runs differ"
        start = time.perf_counter()
        for _ in range(100):
            attn.run(out=out, **run)
        host_us = (time.perf_counter() - start) * 1e4
        torch.cuda.synchronize()
        results[name] = outs
        mode = "fast" if fast else "triton"
        print(f"{mode} {name}: {len(launches)} launches, {host_us:.1f} us/run (host)", flush=True)
    if fast:
        assert records, "the fast path compiled nothing"
        assert any(isinstance(a, tuple) for _, _, args, _, _ in records for a in args), "no tuple argument seen"
        for fk, grid, args, kwargs, entry in records:
            chosen = fk.fn.warmup(*args, grid=grid, **kwargs)
            assert entry.kernel is chosen, f"{fk.fn.__name__}: the fast path keyed another kernel than Triton's"
        print(f"fast: {len(records)} keyed launches, each the kernel Triton's binder selects", flush=True)
    torch.save(results, path)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return 0
    if not torch.cuda.is_available():
        print("no GPU: nothing checked")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        saved = {}
        for mode, flag in (("fast", "0"), ("triton", "1")):
            path = os.path.join(tmp, f"{mode}.pt")
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["PAGEDATTN_TRITON_LAUNCH"] = flag
            subprocess.run([sys.executable, __file__, "--child", path], env=env, check=True)
            saved[mode] = torch.load(path)
    bad = 0
    for name in CASES:
        fast, triton_ = saved["fast"][name], saved["triton"][name]
        same = all(torch.equal(f, t) for f, t in zip(fast, triton_))
        bad += not same
        print(f"{'ok  ' if same else 'DIFF'} {name}: fast path == Triton's path, bitwise ({len(fast)} runs each)")
    print("all equal" if not bad else f"{bad} case(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
