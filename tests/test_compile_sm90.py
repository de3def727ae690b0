"""Every kernel configuration dispatch can choose must be launchable on an H100. Triton ships
ptxas, so the kernels compile for sm_90 here without a GPU, specialized on the real launch
arguments as a native launch would be (pagedattn.tools.sm90): check each representative
call's stack frame (spilled registers: kilobytes of it made fp32 launches fail on the H100), shared memory
(227 KB per block) and registers x threads (64K per SM)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from pagedattn import dispatch
from pagedattn.config import AttentionConfig, BatchShape
from pagedattn.tools import compile_check

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")

MIXED = BatchShape((700, 1, 1), (100, 3000, 9000))
CASES = [
    AttentionConfig(32, 8, 128, 16, torch.bfloat16),  # the standard workloads
    AttentionConfig(64, 64, 128, 16, torch.float16, kv_dtype="fp8_e4m3"),  # the seed's failing config
    AttentionConfig(8, 8, 80, 8, torch.float32, sliding_window=7),  # run 6's failing fp32 launches
    AttentionConfig(8, 1, 256, 16, torch.float32),
    AttentionConfig(4, 4, 192, 16, torch.float32, kv_dtype="fp8_e4m3"),  # spilled 3 KB at 4 warps (offline sweep)
    AttentionConfig(8, 2, 256, 16, torch.bfloat16, use_alibi=True, softcap=5.0, use_sinks=True),
]


def _in_fresh_interpreter(expression: str, cases: list | None = None, timeout: int = 900):
    """The JSON value of `expression`, evaluated in a fresh interpreter without TRITON_INTERPRET (under
    the interpreter the kernels are not compilable objects) with pagedattn.tools' sm90 and fingerprint
    imported and `cases` (pickled over) bound; sm90 compiles each launch exactly as an H100 launch
    would specialize it."""
    code = (
        "import json, pickle, sys, torch\n"
        "from pagedattn.tools import fingerprint, sm90\n"
        "cases = pickle.loads(sys.stdin.buffer.read())\n"
        f"print(json.dumps({expression}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(cases), env=env, capture_output=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def _compile_calls(cases: list) -> list[list[dict]]:
    """The launches of each (config, shape, contract, ...) case (`sm90.compile_case`'s arguments)."""
    return _in_fresh_interpreter("[sm90.compile_case(*case) for case in cases]", cases)


def _assert_fits_sm90(r: dict, where: str) -> None:
    """One launch fits an H100/H200: shared memory per block, registers per SM, no spilled stack."""
    assert r["shared"] <= compile_check.SHARED_PER_BLOCK, f"{where}: shared {r['shared']}"
    assert r["regs"] * 32 * r["warps"] <= compile_check.REGISTERS_PER_SM, f"{where}: {r['regs']} regs"
    assert r["stack"] <= 1024, f"{where}: {r['stack']} B of stack per thread (spilled registers)"


def test_every_chosen_kernel_is_launchable_on_sm90():
    calls = _compile_calls([(c, MIXED, "full") for c in CASES])
    assert len(calls) == len(CASES)
    for config, rows in zip(CASES, calls):
        attention = [r for r in rows if r["kernel"] == "_paged_attention_kernel"]
        assert len(attention) == 2, f"{config.label()}: expected a prefill and a decode launch, got {rows}"
        for r in rows:
            _assert_fits_sm90(r, f"{config.label()} {r['kernel']} [{r['params']}]")


# Every cache layout compiles: vLLM v0's V is keys-contiguous, so its slot stride is specialized to
# 1 (a constexpr); inside a nested tuple argument Triton 3.6 handed that constexpr to the callee as
# None and the compile failed (H200, 2026-11-29: 53 GPU tests, every vLLM context-op case), while
# the CPU interpreter ran it fine. Compiled here, that failure shows on CPU.
FP8_CACHE = AttentionConfig(8, 2, 128, 16, torch.bfloat16, kv_dtype="fp8_e4m3")
LAYOUT_CASES = [  # compile_case's arguments: config, shape, contract, q_dtype, out_dtype, fp8_dot, fp8_pv, kv_layout
    (AttentionConfig(8, 2, 64, 16, torch.float16), MIXED, "context-decode", None, None, True, False, "vllm_v0"),
    (FP8_CACHE, MIXED, "full", None, None, True, False, "vllm_v0"),
    (AttentionConfig(8, 2, 128, 16, torch.bfloat16), MIXED, "full", None, None, True, False, "hnd"),
]


def test_every_cache_layout_compiles_on_sm90():
    for case, rows in zip(LAYOUT_CASES, _compile_calls(LAYOUT_CASES)):
        config, _, contract, *_, layout = case
        attention = [r for r in rows if r["kernel"] == "_paged_attention_kernel"]
        assert attention, f"{config.label()} {contract} {layout}: nothing was launched"
        for r in rows:
            assert r["stack"] <= 1024, f"{config.label()} {contract} {layout} [{r['params']}]: {r['stack']} B stack"


# Calls whose exact kernels once crashed ptxas (SIGSEGV) on the H100; compiled with the launch's
# own argument specializations (scripts/sm90_call_compile.py), so a change that brings the crash
# back fails here, on CPU, before any GPU run.
PTXAS_CRASHES = [
    (AttentionConfig(8, 1, 64, 8, torch.float16, use_alibi=True), BatchShape((1, 1, 1, 3), (0, 0, 0, 0)), "context"),
    (AttentionConfig(16, 2, 48, 16, torch.bfloat16, use_alibi=True), BatchShape((1, 5), (7, 30)), "context-decode"),
]


def test_calls_that_crashed_ptxas_compile():
    for (config, _shape, contract), rows in zip(PTXAS_CRASHES, _compile_calls(PTXAS_CRASHES)):
        assert rows, f"{config.label()} {contract}: nothing was launched"
        for r in rows:
            assert r["stack"] <= 1024, f"{config.label()} {contract} [{r['params']}]: {r['stack']} B stack"


def test_alibi_context_prefill_avoids_the_ptxas_crash():
    config, shape, _ = PTXAS_CRASHES[0]
    plan = dispatch.plan_for(config, shape, device="cuda", context_contract=True)
    assert plan.phase == "prefill" and plan.num_stages == 2 and "ptxas" in plan.rule
    # without ALiBi, or under the full-cache contract, the measured 3-stage tiles stay
    assert (
        dispatch.plan_for(config.replace(use_alibi=False), shape, device="cuda", context_contract=True).num_stages == 3
    )
    assert dispatch.plan_for(config, shape, device="cuda").num_stages == 3


# fp8 queries (issue 19): the prefill launch must use fp8 tensor-core instructions for q.k (and for
# P.V with fp8_pv), every launch must fit an H100/H200, the fp8 output included
FP8_Q_CASES = [
    (AttentionConfig(32, 8, 128, 16, torch.bfloat16, kv_dtype="fp8_e4m3"), torch.float8_e4m3fn, False),
    (AttentionConfig(32, 8, 128, 16, torch.bfloat16, kv_dtype="fp8_e4m3"), torch.bfloat16, True),
]


def test_fp8_query_kernels_use_fp8_tensor_cores_and_fit_sm90():
    cases = [(c, MIXED, "full", torch.float8_e4m3fn, o, True, pv) for c, o, pv in FP8_Q_CASES]
    for (config, *_, out_dtype, _, pv), rows in zip(cases, _compile_calls(cases)):
        attention = [r for r in rows if r["kernel"] == "_paged_attention_kernel"]
        assert len(attention) == 2, rows
        prefill = attention[0]
        # e4m3 MMA instructions in the PTX: 8 for q.k at these tiles (Triton 3.6), twice that with P.V
        assert prefill["fp8_mma"] >= (16 if pv else 8), prefill
        for r in rows:
            _assert_fits_sm90(r, f"{config.label()} fp8 q -> {out_dtype} fp8_pv={pv} {r['kernel']} [{r['params']}]")


# Shared-prefix (cascade) launches: the prefix kernel, the suffix's partial-writing unified launch(es)
# and the merge, for the benchmark's batch (256 x 32k shared + 512) and for option-heavy variants.
CASCADE_CASES = [
    (AttentionConfig(32, 8, 128, 16, torch.bfloat16), 256, 32768, 512, 1),
    (AttentionConfig(8, 2, 256, 16, torch.bfloat16, use_alibi=True, softcap=5.0, use_sinks=True), 16, 4096, 700, 1),
    (AttentionConfig(16, 4, 128, 16, torch.float16, kv_dtype="fp8_e4m3"), 32, 2048, 300, 40),
    (AttentionConfig(8, 8, 80, 16, torch.float32), 8, 1024, 100, 1),
]


def test_cascade_launches_fit_sm90():
    calls = _in_fresh_interpreter("[sm90.compile_cascade_case(*c) for c in cases]", CASCADE_CASES)
    for (config, *_), rows in zip(CASCADE_CASES, calls):
        names = [r["kernel"] for r in rows]
        assert names[0] == "_prefix_kernel" and "_cascade_merge_kernel" in names, f"{config.label()}: {names}"
        for r in rows:
            _assert_fits_sm90(r, f"{config.label()} {r['kernel']}")


def test_sass_fingerprint_is_stable_and_tells_kernels_apart():
    """pagedattn.tools.fingerprint (SASS hashes, for refactors checked without a GPU) on the write
    kernel: two compiles of one case agree, and the three cases (bf16, fp8 per head, e5m2) differ."""
    first, second = _in_fresh_interpreter("[fingerprint.fingerprints('write') for _ in range(2)]", timeout=600)
    assert first == second and len(first) == 3
    hashes = {rows[0]["sass"] for rows in first.values()}
    assert len(hashes) == 3 and all(rows[0]["instructions"] > 50 for rows in first.values()), first


def test_fp8_cvt_asm_reads_e4m3_tiles_without_byte_loads(monkeypatch):
    """unified.FP8_CVT_ASM (experimental; PAGEDATTN_FP8_CVT_ASM=1): the bf16-q decode launch over an
    e4m3 (or e5m2) cache reads its tiles from shared memory byte by byte by default (ld.shared.b8: Triton
    converts them after the read, in the dot-operand layout) and not at all with the inline-PTX
    conversion; every launch still fits an H100."""
    e5m2 = FP8_CACHE.replace(kv_dtype="fp8_e5m2")
    cases = [(FP8_CACHE, MIXED, "full"), (FP8_CACHE, MIXED, "context"), (e5m2, MIXED, "full")]
    plain = _compile_calls(cases)
    monkeypatch.setenv("PAGEDATTN_FP8_CVT_ASM", "1")
    asm = _compile_calls(cases)
    for (config, _, contract), p_rows, a_rows in zip(cases, plain, asm):
        where = f"{config.label()} {contract}"
        decode_plain, decode_asm = p_rows[1], a_rows[1]  # the decode launch of the mixed batch
        assert decode_plain["smem_b8"] > 0, f"{where}: the default decode launch no longer reads bytes"
        assert decode_asm["smem_b8"] == 0, f"{where}: {decode_asm}"
        for r in a_rows:
            _assert_fits_sm90(r, f"{where} {r['kernel']} [{r['params']}]")
