"""Decode b64 x ctx4k once over a bf16 cache and once over an e4m3 cache (dispatch's plans), for a
profiler: `ncu --clock-control none -k regex:_paged_attention_kernel --section SpeedOfLight ...
python3 scripts/fp8_decode_ncu.py` profiles the two kernels (two calls each: the second is warm).
Issue 19's fp8-KV decode target (<= 0.55x the bf16 time) is not met: this shows whether the fp8
kernel is bound by memory, by issue (the conversions) or by latency (bytes in flight)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fp8_bench  # noqa: E402


def main() -> None:
    query_lens, seq_lens = [1] * 64, [4096] * 64
    q, k, v, meta = fp8_bench._batch(query_lens, seq_lens, "cuda", 7)
    for kv_fp8 in (False, True):
        attn, runs = fp8_bench._variant("ncu", [(q, k, v)], meta, query_lens, seq_lens, q_fp8=False, kv_fp8=kv_fp8)
        for _ in range(2):
            fp8_bench._call(attn, runs[0])
        torch.cuda.synchronize()
        print("kv_fp8" if kv_fp8 else "bf16", attn.explain().splitlines()[0])


if __name__ == "__main__":
    main()
