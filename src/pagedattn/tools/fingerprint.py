"""Fingerprint the machine code of every kernel pagedattn launches, compiled for sm_90 on this CPU.

A refactor of kernel source (a helper extracted, a loop body shared through a constexpr flag,
arguments regrouped) that leaves the SASS of every launch identical cannot change what a GPU
computes or how fast: this checks that without a GPU. Each case is compiled exactly as an H100
launch would specialize it (pagedattn.tools.sm90): the unified kernel over the contracts, cache
layouts, options and fp8 variants; the cascade launches; the write kernel; the Gluon prefill.
Each launch's SASS instructions (cuobjdump, addresses and encodings dropped) are hashed.

    python -m pagedattn.tools.fingerprint --save before.json
    ... edit the kernels ...
    python -m pagedattn.tools.fingerprint --compare before.json   # exit 1 on any difference

Identical SASS means the change is behaviour- and speed-neutral on sm_90 for these cases. "The
same instruction mix" (the same count of every opcode, in another order or other registers: the
usual result of a helper function changing the compiler's value numbering) is near-certainly
neutral; "differs" needs a GPU run (a deliberate change differs, so it is not necessarily a bug).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from . import sm90  # noqa: E402


def digest(cubin: bytes) -> dict:
    """sass: a hash of the instructions in order; mix: a hash of how many of each opcode (with its
    modifiers) there are, which register allocation and scheduling order leave unchanged."""
    lines = sm90.sass_lines(cubin)
    opcodes = Counter(_opcode(line) for line in lines)
    return dict(
        sass=hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16],
        mix=hashlib.sha256(repr(sorted(opcodes.items())).encode()).hexdigest()[:16],
        instructions=len(lines),
    )


def _opcode(line: str) -> str:
    words = line.split()
    return words[1] if words[0].startswith("@") else words[0]  # past a predicate guard (@P0, @!PT)


def _unified_cases():
    from ..config import AttentionConfig, BatchShape

    mixed = BatchShape((700, 1, 1), (100, 3000, 9000))
    decode = BatchShape((1,) * 8, (4000,) * 8)
    bf16 = AttentionConfig(32, 8, 128, 16, torch.bfloat16)
    fp8 = AttentionConfig(8, 2, 128, 16, torch.bfloat16, kv_dtype="fp8_e4m3")
    e4 = torch.float8_e4m3fn
    fp16_v0 = (None, None, True, False, "vllm_v0")
    # (label, compile_case arguments[, unified.FP8_CVT_ASM for the compile])
    return [
        ("bf16 mixed full", (bf16, mixed, "full")),
        ("bf16 decode full", (bf16, decode, "full")),
        ("bf16 mixed context", (bf16, mixed, "context")),
        ("fp16 mixed context-decode", (AttentionConfig(8, 2, 64, 16, torch.float16), mixed, "context-decode")),
        ("seed fp8 cache", (AttentionConfig(64, 64, 128, 16, torch.float16, kv_dtype="fp8_e4m3"), mixed, "full")),
        ("fp32 window", (AttentionConfig(8, 8, 80, 8, torch.float32, sliding_window=7), mixed, "full")),
        (
            "options",
            (AttentionConfig(8, 2, 256, 16, torch.bfloat16, use_alibi=True, softcap=5.0, use_sinks=True), mixed),
        ),
        ("v0 layout", (AttentionConfig(8, 2, 64, 16, torch.float16), mixed, "context-decode", *fp16_v0)),
        ("v0 fp8", (fp8, mixed, "full", None, None, True, False, "vllm_v0")),
        ("hnd", (bf16, mixed, "full", None, None, True, False, "hnd")),
        ("fp8 q fp8 out", (fp8, mixed, "full", e4, e4)),
        ("fp8 q fp8 pv", (fp8, mixed, "full", e4, torch.bfloat16, True, True)),
        ("fp8 cache cvt asm", (fp8, mixed, "full"), True),
    ]


def _cascade_cases():
    from ..config import AttentionConfig

    return [
        ("cascade bf16", (AttentionConfig(32, 8, 128, 16, torch.bfloat16), 64, 4096, 512, 1)),
        (
            "cascade options",
            (AttentionConfig(8, 2, 256, 16, torch.bfloat16, use_alibi=True, softcap=5.0, use_sinks=True), 16, 4096, 9),
        ),
        ("cascade fp8", (AttentionConfig(16, 4, 128, 16, torch.float16, kv_dtype="fp8_e4m3"), 32, 2048, 300, 40)),
    ]


def _write_cases():
    from ..kernels import write

    def case(dtype, cache_dtype, per_head):
        def call():
            k = torch.randn(37, 4, 128, dtype=dtype)
            cache = torch.zeros(16, 16, 4, 128, dtype=cache_dtype)
            slots = torch.arange(37, dtype=torch.int64)
            fp8 = cache_dtype if cache_dtype.is_floating_point and cache_dtype.itemsize == 1 else None
            scale = torch.full((4,) if per_head else (1,), 0.5) if fp8 else None
            write._launch(k, k.clone(), cache, cache.clone(), slots, scale, scale, fp8)

        return call

    return [
        ("write bf16", case(torch.bfloat16, torch.bfloat16, False)),
        ("write fp8 per-head", case(torch.bfloat16, torch.float8_e4m3fn, True)),
        ("write fp8 e5m2", case(torch.float16, torch.float8_e5m2, False)),
    ]


GLUON_CASES = [  # (num_q_heads, num_kv_heads, head_size, block_size, dtype, tiles, warp_specialized)
    (32, 8, 128, 16, torch.bfloat16, None, False),
    (8, 1, 128, 32, torch.bfloat16, None, False),
    (16, 2, 64, 32, torch.float16, None, False),
    (32, 8, 128, 16, torch.bfloat16, None, True),
]


def fingerprints(only: str | None = None) -> dict[str, list[dict]]:
    """{case label: [{kernel, sass (hash), instructions}, ...]} over every case (or those whose
    label contains `only`)."""
    jobs = []
    for label, args, *flag in _unified_cases():
        asm = bool(flag) and flag[0]
        jobs.append((label, lambda args=args, asm=asm: [(n, k) for n, _, k in _compile_unified(args, asm)]))
    for label, args in _cascade_cases():
        jobs.append((label, lambda args=args: [(n, k) for n, _, k in _compile_cascade(args)]))
    for label, call in _write_cases():
        jobs.append((label, lambda call=call: [(n, k) for n, _, k in sm90.compile_call(call)]))
    for case in GLUON_CASES:
        label = "gluon " + " ".join(str(x).replace("torch.", "") for x in case)
        jobs.append((label, lambda case=case: [sm90.compile_gluon_case(*case)[::2]]))
    out = {}
    for label, job in jobs:
        if only and only not in label:
            continue
        rows = []
        for name, kernel in job():
            rows.append(dict(kernel=name, **digest(kernel.asm["cubin"])))
        out[label] = rows
        print(f"{label:<40} " + "  ".join(f"{r['kernel']}:{r['sass']}" for r in rows), file=sys.stderr, flush=True)
    return out


def _compile_unified(args, cvt_asm: bool = False):
    from ..kernels import unified

    original = unified.FP8_CVT_ASM
    unified.FP8_CVT_ASM = cvt_asm
    try:
        sm90.compile_case(*args)  # fills sm90.compiled through compile_call
    finally:
        unified.FP8_CVT_ASM = original
    return list(sm90.compiled)


def _compile_cascade(args):
    sm90.compile_cascade_case(*args)
    return list(sm90.compiled)


def _mixes(rows: list[dict]) -> list:
    return [(r["kernel"], r.get("mix"), r["instructions"]) for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--save", type=Path, help="write the fingerprints to this JSON file")
    p.add_argument("--compare", type=Path, help="compare with a saved JSON file; exit 1 on any difference")
    p.add_argument("--only", help="only the cases whose label contains this text")
    a = p.parse_args(argv)
    now = fingerprints(a.only)
    if a.save:
        a.save.write_text(json.dumps(now, indent=1) + "\n")
    if a.compare:
        before = json.loads(a.compare.read_text())
        same = [k for k in now if before.get(k) == now[k]]
        mix = [k for k in now if k in before and k not in same and _mixes(before[k]) == _mixes(now[k])]
        differ = [k for k in now if k in before and k not in same and k not in mix]
        for k in mix:
            print(f"SAME MIX {k}: the same instructions, in another order or registers")
        for k in differ:
            print(f"DIFFERS {k}: {before[k]} -> {now[k]}")
        missing = [k for k in now if k not in before]
        print(
            f"{len(same)} identical, {len(mix)} the same instruction mix, {len(differ)} differ, "
            f"{len(missing)} not in {a.compare}"
        )
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
