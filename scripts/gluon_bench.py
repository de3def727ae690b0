"""Correctness and speed of the Gluon Hopper prefill kernel (issue 17) on one H200/H100.

    PYTHONPATH=src python scripts/gluon_bench.py [--out DIR] [--quick] [--skip-check]

1. Correctness: fresh random inputs (`pagedattn.testing.make_inputs`: permuted blocks, NaN in every
   unwritten cache slot), output poisoned with NaN, compared with the float64 reference
   (`pagedattn.reference`) at `pagedattn.tolerances`; a grid of shapes (prefill, prefix-prefill,
   ragged lengths, one-token sequences, GQA 1/4/8, block 16/32/64, head 64/128, bf16/fp16).
2. The two issue-17 workloads (32 q heads, 8 kv heads, head 128, block 16, bf16): prefill b4 x 4k
   causal and prefix-prefill b4 q1k ctx4k, each checked against the float32 reference (NaN
   poison, every element written), then timed with triton.testing.do_bench_cudagraph against
   pagedattn's Triton path (`PagedAttention`, planned once) and, for prefill, torch SDPA with the
   cuDNN and flash backends on the same data made dense.
A table is printed last; full results go to DIR/gluon_bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
import triton

from pagedattn import reference
from pagedattn.config import AttentionConfig, BatchShape
from pagedattn.kernels.gluon_prefill import gluon_prefill
from pagedattn.testing import assert_close_to_reference, block_table_from, cu_seqlens, make_inputs, poisoned_like

WORKLOADS = {
    # name: (query_lens, ctx_lens, flops from src/pagedattn/bench/workloads.json)
    "prefill-b4-4k": ((4096,) * 4, (0,) * 4, 549890031616),
    "prefix-prefill-b4-q1k-ctx4k": ((1024,) * 4, (4096,) * 4, 309271199744),
}

CHECKS = [
    # (num_q_heads, num_kv_heads, head_size, block_size, dtype, query_lens, ctx_lens)
    (32, 8, 128, 16, torch.bfloat16, (300,), (0,)),
    (32, 8, 128, 16, torch.bfloat16, (1, 77, 513, 128), (0, 200, 37, 1000)),
    (8, 8, 128, 16, torch.bfloat16, (129, 1, 256), (5, 300, 0)),
    (16, 2, 128, 32, torch.float16, (200, 33), (100, 0)),
    (32, 8, 128, 64, torch.bfloat16, (1000,), (300,)),
    (8, 1, 128, 16, torch.bfloat16, (64, 17), (0, 129)),
    (32, 8, 64, 16, torch.bfloat16, (300, 45), (0, 500)),
    (16, 16, 64, 16, torch.float16, (257,), (31,)),
    (32, 8, 128, 16, torch.bfloat16, (0, 50, 0), (10, 10, 0)),
]


def check_grid(results: list, **kw) -> None:
    for i, (hq, hkv, d, bs, dt, ql, cl) in enumerate(CHECKS):
        label = f"check{i} hq{hq} hkv{hkv} d{d} bs{bs} {str(dt)[6:]} q{ql} ctx{cl}" + "".join(f" {k}" for k in kw)
        try:
            config = AttentionConfig(hq, hkv, d, bs, dt)
            x = make_inputs(config, BatchShape(ql, cl), device="cuda", seed=1000 + i)
            out = poisoned_like(x.q)
            gluon_prefill(
                x.q, x.k_cache, x.v_cache, x.cu_seqlens_q, x.seq_lens, x.block_table, scale=d**-0.5, out=out, **kw
            )
            torch.cuda.synchronize()
            ref = x.reference(scale=d**-0.5, compute_dtype=torch.float64)
            err = float((out.double() - ref).abs().max()) if out.numel() else 0.0
            assert_close_to_reference(out, ref, dt, label)
            results.append(dict(case=label, ok=True, max_abs_err=err))
            print(f"PASS {label} max_abs_err={err:.3g}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every case, fail at the end
            results.append(dict(case=label, ok=False, error=f"{type(e).__name__}: {e}"[:2000]))
            print(f"FAIL {label}: {type(e).__name__}: {e}"[:3000], flush=True)
            traceback.print_exc()


def paged_inputs(query_lens, ctx_lens, dtype=torch.bfloat16, hq=32, hkv=8, d=128, bs=16, seed=0):
    """Random bf16 cache with randomly permuted blocks (no NaN slots: the dense copies for SDPA
    must be finite), q, metadata, and the dense per-sequence K/V."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, ctx_lens)]
    per_seq = [-(-s // bs) for s in seq_lens]
    nb = sum(per_seq) + 7
    k_cache = torch.randn(nb, bs, hkv, d, device="cuda", dtype=dtype, generator=g)
    v_cache = torch.randn(nb, bs, hkv, d, device="cuda", dtype=dtype, generator=g)
    table = block_table_from(torch.randperm(nb, device="cuda", generator=g), per_seq)
    cu = cu_seqlens(query_lens)
    q = torch.randn(cu[-1], hq, d, device="cuda", dtype=dtype, generator=g)
    return (
        q,
        k_cache,
        v_cache,
        torch.tensor(cu, dtype=torch.int32, device="cuda"),
        torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        table,
    )


def bench(fn) -> float:
    return float(triton.testing.do_bench_cudagraph(fn, rep=200))


def workload(name: str, results: dict, check: bool, variants: list) -> None:
    from pagedattn.options import AttentionOptions
    from pagedattn.planner import PagedAttention

    query_lens, ctx_lens, flops = WORKLOADS[name]
    data = paged_inputs(query_lens, ctx_lens)
    q, k_cache, v_cache, cu, seq_lens, table = data
    d, hq, hkv, bs = q.shape[2], q.shape[1], k_cache.shape[2], k_cache.shape[1]
    scale = d**-0.5
    row = dict(workload=name, flops=flops)
    out = torch.full_like(q, float("nan"))
    gluon_prefill(q, k_cache, v_cache, cu, seq_lens, table, scale=scale, out=out)
    torch.cuda.synchronize()
    if check:
        t0 = time.time()
        ref = reference.attention(q, k_cache, v_cache, cu, seq_lens, table, scale=scale, compute_dtype=torch.float32)
        unwritten = int(torch.isnan(out).sum())
        err = float((out.float() - ref).abs().max())
        try:
            assert_close_to_reference(out, ref, q.dtype, name)
            row["check"] = f"ok (max abs err {err:.3g})"
        except AssertionError as e:
            row["check"] = f"FAIL: {e}"[:500]
        row["unwritten"] = unwritten
        print(f"{name}: {row['check']} unwritten={unwritten} ({time.time() - t0:.1f} s)", flush=True)
        del ref

    row["gluon_ms"] = bench(lambda: gluon_prefill(q, k_cache, v_cache, cu, seq_lens, table, scale=scale, out=out))
    for tiles in variants:
        key = f"gluon_n{tiles[0]}r{tiles[1]}"
        try:
            out_v = torch.full_like(q, float("nan"))
            gluon_prefill(q, k_cache, v_cache, cu, seq_lens, table, scale=scale, out=out_v, tiles=tiles)
            torch.cuda.synchronize()
            row[key + "_unwritten"] = int(torch.isnan(out_v).sum())
            row[key + "_vs_default_max_abs"] = float((out_v.float() - out.float()).abs().max())
            row[key + "_ms"] = bench(lambda t=tiles, o=out_v: gluon_prefill(*data, scale=scale, out=o, tiles=t))
        except Exception as e:  # noqa: BLE001
            row[key + "_error"] = f"{type(e).__name__}: {e}"[:300]
    attn = PagedAttention(
        AttentionOptions(scale=scale),
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_size=d,
        block_size=bs,
        dtype=q.dtype,
        device=q.device,
    )
    attn.plan(cu, seq_lens, table, max_query_len=max(query_lens), max_seq_len=int(seq_lens.max()))
    out_t = torch.empty_like(q)
    attn.run(q, k_cache, v_cache, out=out_t)
    torch.cuda.synchronize()
    row["gluon_vs_triton_max_abs"] = float((out_t.float() - out.float()).abs().max())
    row["triton_ms"] = bench(lambda: attn.run(q, k_cache, v_cache, out=out_t))
    if all(c == 0 for c in ctx_lens) and len(set(query_lens)) == 1:
        # the same data made dense: [b, heads, seq, d], K/V gathered through the table
        b, n = len(query_lens), query_lens[0]
        pos = torch.arange(n, device="cuda")
        blocks = table[:, pos // bs].long()  # [b, n]
        kd = k_cache[blocks, pos % bs].permute(0, 2, 1, 3).contiguous()  # [b, hkv, n, d]
        vd = v_cache[blocks, pos % bs].permute(0, 2, 1, 3).contiguous()
        kd = kd.repeat_interleave(hq // hkv, dim=1)
        vd = vd.repeat_interleave(hq // hkv, dim=1)
        qd = q.view(b, n, hq, d).transpose(1, 2).contiguous()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                        qd, kd, vd, is_causal=True, scale=scale
                    )
                    dense = fn()
                    row[f"sdpa_{label}_vs_gluon_max_abs"] = float(
                        (dense.transpose(1, 2).reshape(-1, hq, d).float() - out.float()).abs().max()
                    )
                    row[f"sdpa_{label}_ms"] = bench(fn)
            except Exception as e:  # noqa: BLE001
                row[f"sdpa_{label}_error"] = f"{type(e).__name__}: {e}"[:300]
    for key in [k for k in row if k.endswith("_ms")]:
        row[key[:-3] + "_tflops"] = flops / (row[key] * 1e-3) / 1e12
    results[name] = row
    print(json.dumps(row), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--variants", default="128,3 64,4", help="extra (BLOCK_N,RING) tiles to time")
    ap.add_argument("--no-ws", action="store_true", help="skip the warp-specialized variant")
    ap.add_argument("--quick", action="store_true", help="the two workloads only (no check grid)")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    variants = [tuple(int(x) for x in v.split(",")) for v in args.variants.split()]
    results: dict = {"checks": []}
    if not args.quick:
        check_grid(results["checks"])
    for name in WORKLOADS:
        try:
            workload(name, results, not args.skip_check, variants)
        except Exception as e:  # noqa: BLE001
            results[name] = dict(error=f"{type(e).__name__}: {e}"[:2000])
            traceback.print_exc()
    with open(f"{args.out}/gluon_bench.json", "w") as f:
        json.dump(results, f, indent=1)
    failed = [c["case"] for c in results["checks"] if not c["ok"]]
    print(f"\nchecks: {len(results['checks']) - len(failed)} passed, {len(failed)} failed {failed}")
    print("| workload | check | gluon ms (TFLOP/s) | triton ms (TFLOP/s) | cuDNN SDPA | flash SDPA |")
    print("|---|---|---|---|---|---|")
    for name in WORKLOADS:
        r = results.get(name, {})

        def cell(k, r=r):
            return f"{r[k + '_ms']:.4f} ({r[k + '_tflops']:.0f})" if k + "_ms" in r else "n/a"

        print(
            f"| {name} | {r.get('check', r.get('error', '-'))[:40]} | {cell('gluon')} | {cell('triton')} | "
            f"{cell('sdpa_cudnn')} | {cell('sdpa_flash')} |"
        )
        for k in r:
            if k.startswith("gluon_n") and k.endswith("_ms"):
                print(f"|   variant {k[6:-3]} | | {cell(k[:-3])} | | | |")
    if not args.no_ws:
        # the warp-specialized variant last: it has not run on a GPU before, so a hang here leaves
        # everything above printed and saved
        print("\nwarp-specialized variant (producer warps + mbarriers):", flush=True)
        ws_checks: list = []
        check_grid(ws_checks, warp_specialized=True)
        results["ws_checks"] = ws_checks
        for name in WORKLOADS:
            try:
                workload_ws(name, results)
            except Exception as e:  # noqa: BLE001
                results[name]["ws_error"] = f"{type(e).__name__}: {e}"[:2000]
                traceback.print_exc()
        with open(f"{args.out}/gluon_bench.json", "w") as f:
            json.dump(results, f, indent=1)
        ws_failed = [c["case"] for c in ws_checks if not c["ok"]]
        failed += ws_failed
        print(f"ws checks: {len(ws_checks) - len(ws_failed)} passed, {len(ws_failed)} failed {ws_failed}")
        for name in WORKLOADS:
            r = results[name]
            for key, label in (("gluon_ws_ms", "ws"), ("gluon_ws_r3_ms", "ws 128x3")):
                ms = r.get(key)
                print(
                    f"| {name} {label} | {r.get('ws_check', r.get('ws_error', '-'))[:40]} | "
                    + (f"{ms:.4f} ({r['flops'] / (ms * 1e-3) / 1e12:.0f})" if ms else "n/a")
                    + " | | | |"
                )
    return 1 if failed else 0


def workload_ws(name: str, results: dict) -> None:
    """The warp-specialized kernel on a workload: checked against the plain Gluon kernel's output
    (itself checked against the reference above) at the dtype's tolerance, then timed."""
    query_lens, ctx_lens, flops = WORKLOADS[name]
    data = paged_inputs(query_lens, ctx_lens)
    q = data[0]
    scale = q.shape[2] ** -0.5
    ref = gluon_prefill(*data, scale=scale)
    out = torch.full_like(q, float("nan"))
    gluon_prefill(*data, scale=scale, out=out, warp_specialized=True)
    torch.cuda.synchronize()
    row = results[name]
    row["ws_unwritten"] = int(torch.isnan(out).sum())
    try:
        assert_close_to_reference(out, ref.float(), q.dtype, name + " ws")
        row["ws_check"] = f"ok vs plain (max abs {float((out.float() - ref.float()).abs().max()):.3g})"
    except AssertionError as e:
        row["ws_check"] = f"FAIL: {e}"[:500]
    row["gluon_ws_ms"] = bench(lambda: gluon_prefill(*data, scale=scale, out=out, warp_specialized=True))
    # 3-slot rings: the V slots are released one iteration after their P.V, so more lead helps here
    out3 = torch.full_like(q, float("nan"))
    gluon_prefill(*data, scale=scale, out=out3, warp_specialized=True, tiles=(128, 3))
    torch.cuda.synchronize()
    row["ws_r3_vs_ws_max_abs"] = float((out3.float() - out.float()).abs().max())
    row["gluon_ws_r3_ms"] = bench(
        lambda: gluon_prefill(*data, scale=scale, out=out3, warp_specialized=True, tiles=(128, 3))
    )
    print(name, row["ws_check"], row["gluon_ws_ms"], row["gluon_ws_r3_ms"], flush=True)


if __name__ == "__main__":
    sys.exit(main())
