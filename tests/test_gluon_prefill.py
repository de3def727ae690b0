"""The Gluon Hopper prefill kernel (issue 17): on CPU, its sm_90 compile (registers, stack, shared
memory, the wgmma/cp.async pipeline in the PTX) and its host-side checks; on a GPU, correctness
against the float64 reference. Triton's interpreter does not run Gluon, so the numerics are
GPU-only (scripts/gluon_bench.py runs the same grid and the issue-17 timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from pagedattn.config import AttentionConfig, BatchShape
from pagedattn.errors import DTypeError, LayoutError, ShapeError, UnsupportedConfigError
from pagedattn.kernels import gluon_prefill as gp

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
SHARED_PER_BLOCK = 232448  # 227 KB: sm_90's opt-in maximum per block
REGISTERS_PER_SM = 65536


def _inputs(num_tokens=64, hq=8, hkv=2, d=128, bs=16, dtype=torch.bfloat16, blocks=16):
    q = torch.randn(num_tokens, hq, d, dtype=dtype)
    k = torch.randn(blocks, bs, hkv, d, dtype=dtype)
    v = torch.randn_like(k)
    cu = torch.tensor([0, num_tokens], dtype=torch.int32)
    seq_lens = torch.tensor([num_tokens + 7], dtype=torch.int32)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    return q, k, v, cu, seq_lens, table


# ---------------------------------------------------------------------------------------------
# sm_90 compile, on CPU
# ---------------------------------------------------------------------------------------------
COMPILE = r"""
import json, sys
import torch
from pagedattn.tools import sm90
from pagedattn.tools.compile_check import _resource_usage

rows = []
for hq, hkv, d, bs, dtype, tiles, ws in json.loads(sys.argv[1]):
    _, grid, kernel = sm90.compile_gluon_case(hq, hkv, d, bs, getattr(torch, dtype), tiles, ws)
    regs, stack = _resource_usage(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    # SASS: exp2 (MUFU.EX2) issued between "wait until 1 wgmma group is pending" and "until 0",
    # i.e. the softmax really runs while P.V is on the tensor cores (ptxas retires in-flight
    # wgmma at basic-block boundaries, which a branch in the loop body would cause)
    overlapped, inside = 0, False
    for line in sm90.sass_lines(kernel.asm["cubin"]):
        if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in line:
            inside = True
        elif "WARPGROUP.DEPBAR.LE gsb0, 0x0" in line:
            inside = False
        elif inside and "MUFU.EX2" in line:
            overlapped += 1
    rows.append(dict(regs=regs, stack=stack, shared=kernel.metadata.shared, warps=kernel.metadata.num_warps,
                     wgmma=ptx.count("wgmma.mma_async"), wait1=ptx.count("wgmma.wait_group.sync.aligned 1"),
                     cp_async=ptx.count("cp.async.cg.shared.global"), grid=list(grid),
                     ex2_under_pv=overlapped))
print(json.dumps(rows))
"""

COMPILE_CASES = [
    # (num_q_heads, num_kv_heads, head_size, block_size, dtype, tiles, warp_specialized)
    (32, 8, 128, 16, "bfloat16", None, False),  # the issue-17 workloads
    (32, 8, 128, 16, "bfloat16", (128, 3), False),
    (8, 8, 128, 64, "float16", None, False),
    (8, 1, 128, 32, "bfloat16", None, False),
    (16, 2, 64, 32, "bfloat16", None, False),
    (32, 8, 128, 16, "bfloat16", None, True),
]


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")
def test_compiles_for_sm90_within_limits_and_pipelined():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(COMPILE_CASES)], env=env, capture_output=True, timeout=900
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    rows = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert len(rows) == len(COMPILE_CASES)
    for case, r in zip(COMPILE_CASES, rows):
        where = f"{case}: {r}"
        ws = case[6]
        # the warp-specialized consumers run on 240 registers: a few words spill in the diagonal
        # loop (24 B of stack); the plain kernel spills nothing
        assert r["stack"] <= (64 if ws else 0), f"{where}: spills"
        assert r["shared"] <= SHARED_PER_BLOCK, where
        assert r["regs"] * 32 * r["warps"] <= REGISTERS_PER_SM, where  # warps: producers included
        # the overlap is there: q.k and P.V wgmma in flight together, only q.k waited for
        assert r["wait1"] >= 1, f"{where}: no 'wgmma.wait_group 1' (softmax not overlapped with P.V)"
        assert r["wgmma"] > 0 and r["cp_async"] > 0, where
        # head 128: the key loops exponentiate a whole tile under P.V (BLOCK_M x BLOCK_N scores
        # over 256 threads: 64 ex2 per thread at 128 keys; the warp-specialized unmasked loop keeps
        # 43 of them there). At head 64 ptxas sinks the unmasked loop's ex2 below the wait (known
        # gap, docs/gluon.md).
        if case[2] == 128:
            block_n = (case[5] or gp.tiles_for(case[2]))[0]
            want = 128 * block_n // 256 + (40 if ws else 128 * block_n // 256)
            assert r["ex2_under_pv"] >= want, f"{where}: softmax not under P.V in the SASS"
        hq, hkv = case[0], case[1]
        assert r["grid"] == [256 // (128 // (hq // hkv)) + 1, hkv], where


# ---------------------------------------------------------------------------------------------
# host side, on CPU
# ---------------------------------------------------------------------------------------------
BASE = dict(
    head_size=128, num_q_heads=32, num_kv_heads=8, block_size=16, dtype=torch.bfloat16, kv_cache_dtype=torch.bfloat16
)


def test_supported_configuration_has_no_reason():
    assert gp.unsupported_reason(**BASE) is None
    assert (
        gp.unsupported_reason(**{**BASE, "head_size": 64, "dtype": torch.float16, "kv_cache_dtype": torch.float16})
        is None
    )
    assert gp.unsupported_reason(**{**BASE, "head_size": 64}) is None


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(head_size=96), "head sizes"),
        (dict(head_size=256), "head sizes"),
        (dict(dtype=torch.float32, kv_cache_dtype=torch.float32), "fp16/bf16"),
        (dict(kv_cache_dtype=torch.float8_e4m3fn), "query dtype"),
        (dict(num_q_heads=24, num_kv_heads=8), "power-of-two"),
        (dict(num_q_heads=30, num_kv_heads=8), "not a multiple"),
        (dict(block_size=256), "block_size"),
        (dict(block_size=24), "block_size"),
        (dict(causal=False), "causal"),
        (dict(contract="context"), "full-cache"),
        (dict(sliding_window=128), "sliding_window"),
        (dict(alibi=True), "alibi"),
        (dict(softcap=30.0), "softcap"),
        (dict(sinks=True), "sinks"),
        (dict(device="cpu"), "CUDA"),
    ],
)
def test_unsupported_reason_names_the_option(change, words):
    reason = gp.unsupported_reason(**{**BASE, **change})
    assert reason is not None and words in reason, reason


def test_launch_rejects_bad_arguments_before_any_launch():
    q, k, v, cu, sl, bt = _inputs()
    with pytest.raises(UnsupportedConfigError, match="head sizes"):
        x = _inputs(d=96)
        gp.gluon_prefill(*x, scale=0.1)
    with pytest.raises(DTypeError, match="cu_seqlens_q must be int32"):
        gp.gluon_prefill(q, k, v, cu.long(), sl, bt, scale=0.1)
    with pytest.raises(DTypeError, match="v_cache must have the query dtype"):
        gp.gluon_prefill(q, k, v.half(), cu, sl, bt, scale=0.1)
    with pytest.raises(ShapeError, match="k_cache must be"):
        gp.gluon_prefill(q, k[..., :64], v, cu, sl, bt, scale=0.1)
    with pytest.raises(ShapeError, match="one entry more"):
        gp.gluon_prefill(q, k, v, cu[:1], sl, bt, scale=0.1)
    with pytest.raises(LayoutError, match="unit stride along head_size"):
        qt = torch.randn(q.shape[2], q.shape[1], q.shape[0], dtype=q.dtype).permute(2, 1, 0)
        gp.gluon_prefill(qt, k, v, cu, sl, bt, scale=0.1)
    with pytest.raises(ShapeError, match="out must match q"):
        gp.gluon_prefill(q, k, v, cu, sl, bt, scale=0.1, out=torch.empty(3, 8, 128, dtype=q.dtype))
    with pytest.raises(UnsupportedConfigError, match="scale must be > 0"):
        gp.gluon_prefill(q, k, v, cu, sl, bt, scale=-0.1)
    with pytest.raises(UnsupportedConfigError, match="BLOCK_N >= block_size"):
        gp.gluon_prefill(q, k, v, cu, sl, bt, scale=0.1, tiles=(8, 2))


def test_grid_covers_every_query_tile():
    """Grid axis 0 = num_tokens // BLOCK_Q + num_seqs: at least the tiles of every sequence."""
    for hq, hkv, lens in ((32, 8, (1, 31, 32, 33, 100)), (8, 8, (128, 129, 1)), (64, 1, (3, 1, 2))):
        q = torch.randn(sum(lens), hq, 128, dtype=torch.bfloat16)
        k = torch.randn(4, 16, hkv, 128, dtype=torch.bfloat16)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        sl = torch.tensor(lens, dtype=torch.int32)
        bt = torch.zeros(len(lens), 4, dtype=torch.int32)
        _, grid, _, meta = gp.launch_args(q, k, k, cu, sl, bt, torch.empty_like(q), 0.1)
        block_q = gp.BLOCK_M // meta["QPK"]
        assert grid[0] >= sum(-(-n // block_q) for n in lens) and grid[1] == hkv


# ---------------------------------------------------------------------------------------------
# numerics, on a Hopper GPU
# ---------------------------------------------------------------------------------------------
GPU_CASES = [
    (AttentionConfig(32, 8, 128, 16, torch.bfloat16), BatchShape((300,), (0,))),
    (AttentionConfig(32, 8, 128, 16, torch.bfloat16), BatchShape((1, 77, 513, 128), (0, 200, 37, 1000))),
    (AttentionConfig(8, 8, 128, 16, torch.bfloat16), BatchShape((129, 1, 256), (5, 300, 0))),
    (AttentionConfig(16, 2, 128, 32, torch.float16), BatchShape((200, 33), (100, 0))),
    (AttentionConfig(8, 1, 128, 64, torch.bfloat16), BatchShape((64, 17), (0, 129))),
    (AttentionConfig(32, 8, 64, 16, torch.bfloat16), BatchShape((300, 45), (0, 500))),
    (AttentionConfig(16, 16, 64, 16, torch.float16), BatchShape((257,), (31,))),
    (AttentionConfig(32, 8, 128, 16, torch.bfloat16), BatchShape((0, 50, 0), (10, 10, 0))),
]


@pytest.mark.gpu
@pytest.mark.kernels
@pytest.mark.parametrize("tiles, ws", [(None, False), ((128, 3), False), ((64, 4), False), (None, True)])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_matches_reference_on_hopper(case, tiles, ws):
    from pagedattn import reference
    from pagedattn.testing import assert_close_to_reference, make_inputs, poisoned_like

    config, shape = GPU_CASES[case]
    x = make_inputs(config, shape, device="cuda", seed=100 + case)
    scale = config.head_size**-0.5
    out = poisoned_like(x.q)
    gp.gluon_prefill(
        x.q,
        x.k_cache,
        x.v_cache,
        x.cu_seqlens_q,
        x.seq_lens,
        x.block_table,
        scale=scale,
        out=out,
        tiles=tiles,
        warp_specialized=ws,
    )
    ref = reference.attention(
        x.q, x.k_cache, x.v_cache, x.cu_seqlens_q, x.seq_lens, x.block_table, scale=scale, compute_dtype=torch.float64
    )
    assert_close_to_reference(out, ref, config.dtype, f"{config.label()} {shape} tiles={tiles} ws={ws}")


@pytest.mark.gpu
@pytest.mark.kernels
def test_block_id_outside_the_cache_gives_nan_rows_on_hopper():
    from pagedattn.testing import make_inputs, poisoned_like

    config = AttentionConfig(32, 8, 128, 16, torch.bfloat16)
    x = make_inputs(config, BatchShape((40, 300), (0, 100)), device="cuda", seed=7)
    table = x.block_table.clone()
    table[1, 5] = x.k_cache.shape[0] + 3  # sequence 1 reads a block past the cache
    out = poisoned_like(x.q)
    out[:40] = 0
    gp.gluon_prefill(x.q, x.k_cache, x.v_cache, x.cu_seqlens_q, x.seq_lens, table, scale=0.1, out=out)
    assert not torch.isnan(out[:40]).any()  # sequence 0 is served
    # sequence 1's tiles that reach column 5 (keys 80..95) are NaN: those of query rows >= 0 all do
    assert torch.isnan(out[40:]).all()


@pytest.mark.gpu
@pytest.mark.kernels
@pytest.mark.parametrize("ws", [False, True])
def test_min_query_len_leaves_short_sequences_to_the_other_launch(ws):
    """A mixed batch's prefill launch: sequences below min_query_len keep their `out` rows as they
    were; the others match the reference."""
    from pagedattn import reference
    from pagedattn.testing import assert_close_to_reference, make_inputs

    config = AttentionConfig(32, 8, 128, 16, torch.bfloat16)
    shape = BatchShape((1, 200, 3, 129), (500, 0, 40, 77))
    x = make_inputs(config, shape, device="cuda", seed=11)
    out = torch.full_like(x.q, 7.0)
    gp.gluon_prefill(
        x.q,
        x.k_cache,
        x.v_cache,
        x.cu_seqlens_q,
        x.seq_lens,
        x.block_table,
        scale=0.09,
        out=out,
        min_query_len=4,
        warp_specialized=ws,
    )
    ref = reference.attention(
        x.q, x.k_cache, x.v_cache, x.cu_seqlens_q, x.seq_lens, x.block_table, scale=0.09, compute_dtype=torch.float64
    )
    assert (out[0:1] == 7.0).all() and (out[201:204] == 7.0).all()
    assert_close_to_reference(out[1:201], ref[1:201], config.dtype, "sequence 1")
    assert_close_to_reference(out[204:], ref[204:], config.dtype, "sequence 3")
