"""A representative grid for compute-sanitizer (memcheck / racecheck): every kernel (write, unified
prefill/decode/mixed, context contract, split-KV + merge), odd head sizes, fp8, windows, ALiBi,
softcap, sinks, block sizes 8..256, sequences ending mid-block. Each case also checks the result
against the reference, so a run that "passes" the sanitizer computed the right thing.

    compute-sanitizer --tool memcheck python3 scripts/sanitize.py
"""

from __future__ import annotations

import sys

import torch

from pagedattn.config import AttentionConfig, BatchShape
from pagedattn.kernels.write import write_kv
from pagedattn.testing import assert_close_to_reference, run_both

CASES = [
    (AttentionConfig(8, 2, 128, 16, torch.bfloat16), BatchShape((37, 1, 64, 1), (0, 500, 33, 7)), "full"),
    (AttentionConfig(8, 2, 128, 16, torch.bfloat16), BatchShape((1, 1), (3000, 4097)), "full"),  # split-KV
    (AttentionConfig(4, 4, 80, 8, torch.float16, sliding_window=13), BatchShape((29, 1, 3), (17, 90, 0)), "context"),
    (
        AttentionConfig(16, 2, 96, 32, torch.float16, kv_dtype="fp8_e4m3"),
        BatchShape((20, 1, 1), (40, 700, 1)),
        "context-decode",
    ),
    (
        AttentionConfig(6, 2, 24, 256, torch.float32, use_alibi=True, softcap=4.0, use_sinks=True),
        BatchShape((9, 1), (250, 300)),
        "full",
    ),
    (AttentionConfig(64, 1, 256, 64, torch.bfloat16, kv_dtype="fp8_e5m2"), BatchShape((1, 17), (2000, 3)), "full"),
    (AttentionConfig(4, 1, 192, 128, torch.bfloat16, sliding_window=100), BatchShape((1,) * 3, (5000, 129, 1)), "full"),
]


def main() -> int:
    only_split = "split" in sys.argv[1:]  # racecheck: just the split-KV + merge cases
    for config, shape, contract in CASES:
        if only_split and max(shape.query_lens) > 1:
            continue
        out, ref = run_both(config, shape, contract, device="cuda")
        torch.cuda.synchronize()
        assert_close_to_reference(out, ref, config.dtype, config.label())
        print("ok", config.label(), shape.label(), contract, flush=True)
    if only_split:
        return 0
    # the write kernel: padding slots, fp8 quantization, a head size that is not a power of two
    for dtype, cache_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float8_e4m3fn)):
        k = torch.randn(50, 2, 80, device="cuda", dtype=dtype)
        kc = torch.full((10, 16, 2, 80), float("nan"), device="cuda").to(cache_dtype)
        vc = kc.clone()
        slots = torch.randperm(160, device="cuda")[:50]
        slots[::7] = -1
        scales = dict(k_scale=0.5, v_scale=0.5) if cache_dtype != dtype else {}
        write_kv(k, k, kc, vc, slots, **scales)
        torch.cuda.synchronize()
        print("ok write", dtype, cache_dtype, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
