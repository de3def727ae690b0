"""Kernels against the reference: every option and their combinations, both contracts, the
split-KV path, and the seed's grid. On CPU the kernels run through Triton's interpreter at small
shapes (`make test` sets TRITON_INTERPRET=1); on a GPU the same tests run at full size."""

from __future__ import annotations

import random

import pytest
import torch

from pagedattn import dispatch
from pagedattn.attention import to_nhd
from pagedattn.config import AttentionConfig, BatchShape, seed_grid
from pagedattn.testing import DEVICE, assert_close_to_reference, make_inputs, poisoned_like, run_both

pytestmark = pytest.mark.kernels

# Small shapes for the interpreter: a mix of prefill with/without prefix and decodes (mixed), and
# decode-only batches with longer contexts (split-KV).
MIXED = BatchShape((5, 1, 17, 1, 9), (11, 40, 0, 3, 16))
DECODE = BatchShape((1, 1, 1), (300, 700, 5))
SPEC = BatchShape((3, 2, 4), (60, 33, 200))  # short multi-token queries: decode-like tiles


# --------------------------------------------------------------------------- one option at a time
BASE = AttentionConfig(num_q_heads=8, num_kv_heads=2, head_size=32, block_size=16, dtype=torch.float32)
SINGLE_OPTIONS = {
    "plain": {},
    "fp16": dict(dtype=torch.float16),
    "bf16": dict(dtype=torch.bfloat16),
    "mha": dict(num_q_heads=8, num_kv_heads=8),
    "mqa": dict(num_kv_heads=1),
    "gqa3": dict(num_q_heads=6, num_kv_heads=2),
    "head24": dict(head_size=24),
    "head80": dict(head_size=80),
    "head96": dict(head_size=96),
    "head112": dict(head_size=112),
    "head192": dict(head_size=192, num_q_heads=4, num_kv_heads=2),
    "head256": dict(head_size=256, num_q_heads=4, num_kv_heads=2),
    "block8": dict(block_size=8),
    "block32": dict(block_size=32),
    "block64": dict(block_size=64),
    "block128": dict(block_size=128),
    "block256": dict(block_size=256),
    "window1": dict(sliding_window=1),
    "window7": dict(sliding_window=7),
    "alibi": dict(use_alibi=True),
    "softcap": dict(softcap=3.0),
    "sinks": dict(use_sinks=True),
    "fp8_e4m3": dict(kv_dtype="fp8_e4m3", dtype=torch.float16),
    "fp8_e5m2": dict(kv_dtype="fp8_e5m2", dtype=torch.bfloat16),
}


@pytest.mark.parametrize("contract", ["full", "context", "context-decode"])
@pytest.mark.parametrize("shape", [MIXED, DECODE, SPEC], ids=["mixed", "decode", "spec"])
@pytest.mark.parametrize("option", list(SINGLE_OPTIONS))
def test_single_option(option, shape, contract):
    config = BASE.replace(**SINGLE_OPTIONS[option])
    out, ref = run_both(config, shape, contract, seed=hash((option, contract)) % 1000)
    assert_close_to_reference(out, ref, config.dtype, f"{option} {contract}")


# --------------------------------------------------------------------------- combinations
def _random_combinations(n: int, seed: int):
    rng = random.Random(seed)
    keys = [k for k in SINGLE_OPTIONS if k != "plain"]
    out = []
    for _ in range(n):
        changes = {}
        for key in rng.sample(keys, 4):
            for name, value in SINGLE_OPTIONS[key].items():
                changes.setdefault(name, value)
        try:
            out.append(BASE.replace(**changes))
        except Exception:  # e.g. num_q_heads 6 with num_kv_heads 8: not a valid combination
            continue
    return out


@pytest.mark.parametrize("contract", ["full", "context"])
@pytest.mark.parametrize("config", _random_combinations(24, seed=7), ids=lambda c: c.label())
def test_option_combinations(config, contract):
    for shape in (MIXED, DECODE):
        out, ref = run_both(config, shape, contract, seed=11)
        assert_close_to_reference(out, ref, config.dtype, f"{config.label()} {contract}")


# fp32 queries over an fp8 cache: plans of their own (8 warps; at 4 warps the d192/d256 kernels
# spilled kilobytes per thread on sm_90), and the fp8 conversion feeding IEEE fp32 dots
@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("head_size", [64, 192, 256])
@pytest.mark.parametrize("contract", ["full", "context-decode"])
def test_fp32_queries_over_fp8_cache(kv_dtype, head_size, contract):
    config = BASE.replace(
        dtype=torch.float32,
        kv_dtype=kv_dtype,
        head_size=head_size,
        num_q_heads=4,
        num_kv_heads=2,
        use_alibi=head_size == 192,
    )
    for shape in (MIXED, DECODE):
        out, ref = run_both(config, shape, contract, seed=head_size)
        assert_close_to_reference(out, ref, config.dtype, f"{config.label()} {contract}")


# --------------------------------------------------------------------------- the seed's grid
@pytest.mark.parametrize("case", seed_grid(quick=True), ids=lambda c: c.config.label())
@pytest.mark.parametrize("contract", ["full", "context-decode"])
def test_seed_grid_quick(case, contract):
    out, ref = run_both(case.config, case.shape, contract)
    assert_close_to_reference(out, ref, case.config.dtype, case.label())


@pytest.mark.gpu
@pytest.mark.parametrize("case", seed_grid(quick=False), ids=lambda c: c.config.label())
@pytest.mark.parametrize("contract", ["full", "context-decode"])
def test_seed_grid_full(case, contract):
    out, ref = run_both(case.config, case.shape, contract, device="cuda")
    assert_close_to_reference(out, ref, case.config.dtype, case.label())


@pytest.mark.gpu
@pytest.mark.parametrize("contract", ["full", "context", "context-decode"])
@pytest.mark.parametrize("option", list(SINGLE_OPTIONS))
def test_single_option_full_size(option, contract):
    config = BASE.replace(num_q_heads=32, num_kv_heads=8, head_size=128).replace(**SINGLE_OPTIONS[option])
    for shape in (
        BatchShape((700, 1, 1, 333, 1), (0, 3000, 17, 900, 9000)),
        BatchShape((1,) * 4, (20000, 33000, 5, 16384)),
    ):
        out, ref = run_both(config, shape, contract, device="cuda")
        assert_close_to_reference(out, ref, config.dtype, f"{option} {contract} {shape.label()}")


# --------------------------------------------------------------------------- paths and edges
def test_split_kv_path_is_exercised_and_matches_single_pass():
    config = BASE.replace(dtype=torch.float32)
    plan = dispatch.plan_for(config, DECODE, device=DEVICE)
    assert plan.kernel == "split_kv" and plan.num_splits > 1, plan
    out, ref = run_both(config, DECODE, "full", seed=3)
    assert_close_to_reference(out, ref, config.dtype, "split-kv")


def test_fully_masked_rows_give_zero_not_nan():
    # sliding window 1 and a sink: a row still sees itself; with seq_len 0 sequences mixed in,
    # an empty sequence contributes no rows. A query_len 0 sequence must not break the batch.
    config = BASE.replace(sliding_window=1, use_sinks=True)
    shape = BatchShape((0, 3, 1, 0), (5, 0, 7, 0))
    out, ref = run_both(config, shape, "full")
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, ref, config.dtype, "empty sequences")


def test_vllm_v0_layout_reads_in_place():
    config = BASE.replace(dtype=torch.float16, head_size=64)
    x = make_inputs(config, MIXED, device=DEVICE)
    x_elems = 16 // x.k_cache.element_size()
    nb, bs, kvh, d = x.k_cache.shape
    k_v0 = x.k_cache.reshape(nb, bs, kvh, d // x_elems, x_elems).permute(0, 2, 3, 1, 4).contiguous()
    v_v0 = x.v_cache.permute(0, 2, 3, 1).contiguous()
    k_back, v_back = to_nhd(k_v0, v_v0, "vllm_v0")
    assert torch.equal(k_back.nan_to_num(), x.k_cache.nan_to_num())
    assert torch.equal(v_back.nan_to_num(), x.v_cache.nan_to_num())
    ref = x.reference()
    out = poisoned_like(x.q)
    x.kernel("full", out, k_cache=k_v0, v_cache=v_v0, kv_layout="vllm_v0")
    assert_close_to_reference(out, ref, config.dtype, "vllm_v0 layout")


def test_same_shapes_same_plan():
    """CUDA-graph safety: the plan is a pure function of shapes."""
    a = dispatch.plan_for(BASE, DECODE, device=DEVICE)
    b = dispatch.plan_for(BASE, BatchShape(DECODE.query_lens, DECODE.ctx_lens), device=DEVICE)
    assert a == b


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize(
    "shape", [BatchShape((5, 3, 1), (11, 40, 20)), BatchShape((1, 1), (600, 20))], ids=["mixed", "split-kv"]
)
def test_unwritten_slot_read_gives_nan_for_exactly_that_token(kv_dtype, shape):
    """The seed's bug with poison on: the decode token's K/V is never written (context contract,
    decode_from_cache=True) so the kernel reads a NaN slot: exactly that token's rows are NaN, in
    every head and dim, and nothing else is. A kernel that turned NaN into 0 would hide the bug."""
    config = BASE.replace(dtype=torch.float16, kv_dtype=kv_dtype, num_q_heads=4, num_kv_heads=2)
    x = make_inputs(config, shape, device=DEVICE, contract="context")
    out = poisoned_like(x.q)
    x.kernel("context-decode", out)
    cu = x.cu_seqlens_q.tolist()
    decode_rows = [cu[i] for i, ql in enumerate(shape.query_lens) if ql == 1]
    nan_tokens = torch.isnan(out).all(-1).all(-1).nonzero().flatten().tolist()
    assert nan_tokens == decode_rows
    others = torch.ones(out.shape[0], dtype=torch.bool)
    others[decode_rows] = False
    assert torch.isfinite(out[others]).all()
