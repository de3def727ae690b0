"""Quick GPU timing of the standard workloads (the lead's kernel-iteration loop; the full suite
with peers, sweeps and plots is `pagedattn bench`). Usage: python3 scripts/perf_quick.py [names]
(with pagedattn installed: `pip install -e .`)."""

from __future__ import annotations

import functools
import json
import sys

import torch
import triton

from pagedattn import dispatch, paged_attention
from pagedattn.bench.host import queued_host_us
from pagedattn.bench.runner import make_timer, measure_ceilings
from pagedattn.bench.workloads import WORKLOADS_JSON
from pagedattn.config import AttentionConfig, BatchShape
from pagedattn.kernels import unified
from pagedattn.testing import build_paged

WORKLOADS = json.loads(WORKLOADS_JSON.read_text())


def ceilings() -> tuple[float, float]:
    """(read TB/s, bf16 matmul TFLOP/s): the bench's own ceiling measurement."""
    c = measure_ceilings(make_timer(quick=False, cuda_graph=False), "cuda")
    return c["read_tbs"], c["mm_tflops"]


def build(w, dtype=torch.bfloat16, kv_dtype=None, block_size=None, seed=0):
    """One batch of workload `w` (a workloads.json entry) on the GPU, through pagedattn.testing.build_paged."""
    kv = {None: "auto", torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}[kv_dtype]
    config = AttentionConfig(
        w["num_q_heads"], w["num_kv_heads"], w["head_size"], block_size or w["block_size"], dtype, kv_dtype=kv
    )
    shape = BatchShape(tuple(w["query_lens"]), tuple(w["ctx_lens"]))
    x = build_paged(config, shape, "cuda", num_sets=1, seed=seed)
    s = x.sets[0]
    opts = dict(k_scale=x.k_scale, v_scale=x.v_scale) if kv_dtype is not None else {}
    return (
        s.q,
        x.k_cache,
        x.v_cache,
        s.cu_seqlens_q,
        s.seq_lens,
        s.block_table,
        max(shape.query_lens),
        max(shape.seq_lens),
        opts,
    )


def accounting(w):
    kv_bytes = flops = 0
    for q, c in zip(w["query_lens"], w["ctx_lens"]):
        s = q + c
        kv_bytes += 2 * s * w["num_kv_heads"] * w["head_size"] * 2
        pairs = sum(c + i + 1 for i in range(q))
        flops += 4 * w["num_q_heads"] * w["head_size"] * pairs
    return kv_bytes, flops


_CHOOSE_SPLITS = dispatch.choose_splits


def _forced_splits(n: int):
    def choose(*, num_seqs, num_kv_heads, max_seq_len, block_n, sm_count, programs_per_sm=None):
        splits, _, _ = _CHOOSE_SPLITS(
            num_seqs=num_seqs,
            num_kv_heads=num_kv_heads,
            max_seq_len=max_seq_len,
            block_n=block_n,
            sm_count=sm_count,
            programs_per_sm=programs_per_sm,
        )
        if splits == 1:
            return splits, 0, "not split"
        return (*dispatch.partition_for(max_seq_len, n, block_n), f"forced {n} splits")

    return choose


def apply_variant(spec: str) -> None:
    """spec like 'prefill128=128,128,8,3;decode128=64,4,3;fp8decode128=256,4,2;ppsm=2,3;splits=12;
    kv=bf16|fp8|both;q=fp16;cvt=asm' (dispatch tables and constants, and which runs, for sweeps)."""
    global KV_RUNS, Q_DTYPE, GRAPH
    for part in filter(None, spec.split(";")):
        key, value = part.split("=")
        choices = {"kv": ("bf16", "fp8", "both"), "graph": ("0", "1"), "q": ("fp16", "bf16"), "cvt": ("asm", "triton")}
        if key in choices and value not in choices[key]:
            raise SystemExit(f"perf_quick: {key}= must be one of {choices[key]}, got {value!r}")
        if key == "kv":  # which caches to time on decode workloads
            KV_RUNS = {"bf16": ("bf16",), "fp8": ("fp8",), "both": ("bf16", "fp8")}[value]
            continue
        if key == "graph":  # time CUDA-graph replays (no host launch cost in the timed interval)
            GRAPH = value == "1"
            continue
        if key == "cvt":  # e4m3 tiles converted by inline PTX (unified.FP8_CVT_ASM, experimental) or by Triton
            unified.FP8_CVT_ASM = value == "asm"
            continue
        if key == "q":  # query (and 16-bit cache) dtype
            Q_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}[value]
            continue
        nums = tuple(int(x) for x in value.split(","))
        if key.startswith("fp8decode"):
            dispatch.DECODE_TILES_FP8[int(key[9:])] = nums
        elif key.startswith("prefill"):
            dispatch.PREFILL_TILES[int(key[7:])] = nums
        elif key.startswith("decode"):
            dispatch.DECODE_TILES[int(key[6:])] = nums
        elif key == "ppsm":  # split search range: programs per SM, at least and at most
            dispatch.SPLIT_PROGRAMS_PER_SM = (nums[0], nums[-1])
        elif key == "splits":  # force this many KV splits on decode batches that split at all
            dispatch.choose_splits = _forced_splits(nums[0])
        else:
            raise SystemExit(f"perf_quick: unknown variant key {key!r}")


def main():
    global KV_RUNS, Q_DTYPE, GRAPH
    args = sys.argv[1:]
    variants = [a[2:] for a in args if a.startswith("v:")]
    names = [a for a in args if not a.startswith("v:")] or [w["name"] for w in WORKLOADS["workloads"]]
    if variants:
        base_p, base_d, base_s = (
            dict(dispatch.PREFILL_TILES),
            dict(dispatch.DECODE_TILES),
            dispatch.SPLIT_PROGRAMS_PER_SM,
        )
        base_f = dict(dispatch.DECODE_TILES_FP8)
        base_cvt = unified.FP8_CVT_ASM
        for spec in variants:
            dispatch.PREFILL_TILES.clear()
            dispatch.PREFILL_TILES.update(base_p)
            dispatch.DECODE_TILES.clear()
            dispatch.DECODE_TILES.update(base_d)
            dispatch.SPLIT_PROGRAMS_PER_SM = base_s
            dispatch.DECODE_TILES_FP8.clear()
            dispatch.DECODE_TILES_FP8.update(base_f)
            KV_RUNS, Q_DTYPE, GRAPH = ("bf16", "fp8"), torch.bfloat16, False
            dispatch.choose_splits = _CHOOSE_SPLITS
            unified.FP8_CVT_ASM = base_cvt
            apply_variant(spec)
            print(f"=== variant {spec}")
            run(names)
        return
    run(names)


_CEIL = None
KV_RUNS = ("bf16", "fp8")  # decode workloads: time the 16-bit cache, fp8 e4m3, or both
Q_DTYPE = torch.bfloat16
GRAPH = False


def time_ms(fn) -> float:
    if GRAPH:
        return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def host_us(fn) -> float:
    """Host time per call (median of rounds of calls queued behind a GPU sleep: bench/host.py)."""
    return queued_host_us(fn, "cuda")


def run(names):
    global _CEIL
    if _CEIL is None:
        _CEIL = ceilings()
    read_tbs, mm_tf = _CEIL
    print(f"ceilings: read {read_tbs:.3f} TB/s, bf16 matmul {mm_tf:.1f} TFLOP/s")
    rows = []
    for w in WORKLOADS["workloads"]:
        if w["name"] not in names:
            continue
        for variant, kv in (("bf16", None), ("fp8", torch.float8_e4m3fn)):
            if variant == "fp8" and not w["name"].startswith("decode"):
                continue
            if w["name"].startswith("decode") and variant not in KV_RUNS:
                continue
            q, k, v, cu, sl, bt, mq, ms, opts = build(w, dtype=Q_DTYPE, kv_dtype=kv)
            out = torch.empty_like(q)
            fn = functools.partial(
                paged_attention, q, k, v, cu, sl, bt, max_query_len=mq, max_seq_len=ms, out=out, **opts
            )
            fn()
            t = time_ms(fn)
            host = host_us(fn)
            kv_bytes, flops = accounting(w)
            if kv is not None:
                kv_bytes //= 2
            plan = dispatch.plan(
                num_seqs=len(w["query_lens"]),
                num_tokens=q.shape[0],
                max_query_len=mq,
                max_seq_len=ms,
                num_q_heads=q.shape[1],
                num_kv_heads=k.shape[2],
                head_size=q.shape[2],
                block_size=k.shape[1],
                dtype=q.dtype,
                cache_dtype=k.dtype,
                device="cuda",
            )
            anchor = w["anchors_h100"]["vllm-unified"]["ms"]
            rows.append(
                (
                    w["name"] + ("" if kv is None else "-fp8"),
                    t,
                    kv_bytes / t / 1e9,
                    kv_bytes / t / 1e9 / read_tbs * 100,
                    flops / t / 1e9,
                    anchor / t,
                    f"host {host:5.1f} us  " + plan.kernel + " " + plan.params(),
                )
            )
            del q, k, v, out
            torch.cuda.empty_cache()
            if kv is None and 1 in w["query_lens"] and max(w["query_lens"]) > 1:
                # the bound for mixed batches: prefill and decode parts as two separate launches
                parts = []
                for pick in (lambda n: n > 1, lambda n: n == 1):
                    idx = [i for i, n in enumerate(w["query_lens"]) if pick(n)]
                    sub = dict(
                        w, query_lens=[w["query_lens"][i] for i in idx], ctx_lens=[w["ctx_lens"][i] for i in idx]
                    )
                    q, k, v, cu, sl, bt, mq, ms, opts = build(sub)
                    out = torch.empty_like(q)
                    f = functools.partial(
                        paged_attention, q, k, v, cu, sl, bt, max_query_len=mq, max_seq_len=ms, out=out
                    )
                    f()
                    parts.append(time_ms(f))
                    del q, k, v, out
                rows.append(
                    (
                        w["name"] + "-as-2-launches",
                        sum(parts),
                        0,
                        0,
                        0,
                        anchor / sum(parts),
                        f"prefill part {parts[0]:.4f} ms + decode part {parts[1]:.4f} ms",
                    )
                )
    print(f"{'workload':32s} {'ms':>8s} {'TB/s':>6s} {'%rd':>5s} {'TF/s':>7s} {'xvllm':>6s}  plan")
    for r in rows:
        print(f"{r[0]:32s} {r[1]:8.4f} {r[2]:6.3f} {r[3]:5.1f} {r[4]:7.1f} {r[5]:6.2f}  {r[6]}")


if __name__ == "__main__":
    main()
