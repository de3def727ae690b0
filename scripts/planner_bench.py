"""Host and kernel time of the planner on the standard workloads (GPU only).

    PYTHONPATH=src python3 scripts/planner_bench.py [--out DIR] [--workloads a,b]

Per workload, in one process:
    plan_us       host time of PagedAttention.plan with host copies of the lengths and block table
    run_us        host time of PagedAttention.run (calls queued behind a GPU sleep, so the host
                  is measured, not the GPU)
    oneshot_us    the same for the one-shot paged_attention (plan + run every call)
    sdpa_us       torch SDPA's host time on the same data made dense (the peer)
    eager_ms      kernel time of run() called eagerly (do_bench median, after warm-up)
    graph_ms      the same step replayed from a CUDA graph, re-planned into the same buffers
    graph_ok      the graph replay after a new plan equals an eager run (bitwise)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from pagedattn import AttentionOptions, PagedAttention, paged_attention
from pagedattn.bench.workloads import load_workloads

CALLS = 200


def host_us(fn, calls: int = CALLS, rounds: int = 5) -> float:
    """Median over rounds of host time per call, with the calls queued behind a GPU sleep."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        torch.cuda._sleep(2_000_000_000 // 1000 * 50)  # ~50 ms of GPU time at ~2 GHz: the queue never drains
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def build(w, device):
    """Random bf16 paged caches, permuted blocks, metadata on device and host."""
    bs, kvh, hq, d = w["block_size"], w["num_kv_heads"], w["num_q_heads"], w["head_size"]
    qlens, ctx = w["query_lens"], w["ctx_lens"]
    seqs = [q + c for q, c in zip(qlens, ctx)]
    blocks = [-(-s // bs) for s in seqs]
    num_blocks = sum(blocks)
    perm = torch.randperm(num_blocks).to(torch.int32)
    width = max(blocks)
    table = torch.zeros(len(seqs), width, dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks):
        table[i, :n] = perm[at : at + n]
        at += n
    k = torch.randn(num_blocks, bs, kvh, d, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    q = torch.randn(sum(qlens), hq, d, dtype=torch.bfloat16, device=device)
    cu = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0).tolist()), dtype=torch.int32)
    meta = dict(
        cu=cu.to(device),
        seq_lens=torch.tensor(seqs, dtype=torch.int32, device=device),
        table=table.to(device),
        table_host=table,
        qlens=qlens,
        seqs=seqs,
    )
    return q, k, v, meta


def dense_sdpa_call(w, device):
    """SDPA on the same shapes made dense (one sequence length per batch: the workload's max)."""
    qlens, ctx = w["query_lens"], w["ctx_lens"]
    b, hq, hkv, d = len(qlens), w["num_q_heads"], w["num_kv_heads"], w["head_size"]
    sq, sk = max(qlens), max(q + c for q, c in zip(qlens, ctx))
    q = torch.randn(b, hq, sq, d, dtype=torch.bfloat16, device=device)
    k = torch.randn(b, hkv, sk, d, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    causal = sq > 1
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)


def measure(w, device) -> dict:
    q, k, v, m = build(w, device)
    attn = PagedAttention(
        AttentionOptions(),
        num_q_heads=w["num_q_heads"],
        num_kv_heads=w["num_kv_heads"],
        head_size=w["head_size"],
        block_size=w["block_size"],
        dtype=torch.bfloat16,
        num_blocks=k.shape[0],
        device=device,
    )

    def plan():
        attn.plan(
            m["cu"],
            m["seq_lens"],
            m["table"],
            query_lens_host=m["qlens"],
            seq_lens_host=m["seqs"],
            block_table_host=m["table_host"],
        )

    plan()
    out = torch.empty_like(q)
    t0 = time.perf_counter()
    for _ in range(50):
        plan()
    plan_us = (time.perf_counter() - t0) / 50 * 1e6
    run = lambda: attn.run(q, k, v, out=out)  # noqa: E731
    run_us = host_us(run)
    run_alloc_us = host_us(lambda: attn.run(q, k, v))
    oneshot = lambda: paged_attention(
        q,
        k,
        v,
        m["cu"],
        m["seq_lens"],
        m["table"],
        out=out,  # noqa: E731
        max_query_len=max(m["qlens"]),
        max_seq_len=max(m["seqs"]),
        query_lens_host=m["qlens"],
    )
    oneshot_us = host_us(oneshot, calls=50)
    sdpa = dense_sdpa_call(w, device)
    sdpa_us = host_us(sdpa, calls=50)
    eager_ms = triton.testing.do_bench(run, warmup=25, rep=200)
    # CUDA graph: a PagedAttention with fixed buffers, captured once, replayed after a re-plan
    gattn = PagedAttention(
        AttentionOptions(),
        num_q_heads=w["num_q_heads"],
        num_kv_heads=w["num_kv_heads"],
        head_size=w["head_size"],
        block_size=w["block_size"],
        dtype=torch.bfloat16,
        num_blocks=k.shape[0],
        device=device,
        cuda_graph=True,
    )
    bounds = dict(max_query_len=max(m["qlens"]), max_seq_len=max(m["seqs"]))
    gattn.plan(m["cu"], m["seq_lens"], m["table"], **bounds)
    gout = torch.empty_like(q)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            gattn.run(q, k, v, out=gout)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gattn.run(q, k, v, out=gout)
    # re-plan with other lengths (shorter sequences, same shapes) into the same buffers
    shorter = torch.clamp(m["seq_lens"] - 7, min=torch.tensor(m["qlens"], device=device, dtype=torch.int32))
    gattn.plan(m["cu"], shorter, m["table"], **bounds)
    graph.replay()
    expect = paged_attention(
        q,
        k,
        v,
        m["cu"],
        shorter,
        m["table"],
        max_query_len=bounds["max_query_len"],
        max_seq_len=bounds["max_seq_len"],
        validate=False,
    )
    torch.cuda.synchronize()
    graph_ok = bool(torch.equal(gout, expect))
    graph_ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200)
    return dict(
        workload=w["name"],
        plan_us=plan_us,
        run_us=run_us,
        run_alloc_us=run_alloc_us,
        oneshot_us=oneshot_us,
        sdpa_us=sdpa_us,
        eager_ms=eager_ms,
        graph_ms=graph_ms,
        eager_over_graph=eager_ms / graph_ms,
        graph_ok=graph_ok,
        launches=len(attn._bindings and next(iter(attn._bindings.values())).launches),
        plan=attn.explain(),
    )


def _as_dict(w) -> dict:
    c = w.config
    return dict(
        name=w.name,
        query_lens=list(w.shape.query_lens),
        ctx_lens=list(w.shape.ctx_lens),
        num_q_heads=c.num_q_heads,
        num_kv_heads=c.num_kv_heads,
        head_size=c.head_size,
        block_size=c.block_size,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--workloads",
        default="decode-b64-ctx4k,decode-b256-ctx1k,decode-b4-ctx32k,"
        "decode-mha-b32-ctx2k,mixed-chunk2k-plus-63dec,prefill-b4-4k",
    )
    args = parser.parse_args()
    device = torch.device("cuda")
    names = args.workloads.split(",")
    rows = [measure(_as_dict(w), device) for w in load_workloads() if w.name in names]
    header = (
        f"{'workload':28} {'plan us':>8} {'run us':>7} {'run+alloc':>9} {'one-shot':>8} {'sdpa us':>7} "
        f"{'eager ms':>8} {'graph ms':>8} {'eager/graph':>11} graph-replan-ok launches"
    )
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}", header]
    for r in rows:
        lines.append(
            f"{r['workload']:28} {r['plan_us']:8.1f} {r['run_us']:7.1f} {r['run_alloc_us']:9.1f} "
            f"{r['oneshot_us']:8.1f} {r['sdpa_us']:7.1f} {r['eager_ms']:8.4f} {r['graph_ms']:8.4f} "
            f"{r['eager_over_graph']:11.3f} {str(r['graph_ok']):>14} {r['launches']:>8}"
        )
    print("\n".join(lines))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "planner-bench.json").write_text(json.dumps(rows, indent=1))
        Path(args.out, "planner-bench.txt").write_text("\n".join(lines) + "\n")
    return 0 if all(r["graph_ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
