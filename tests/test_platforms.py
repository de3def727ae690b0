"""pagedattn.platforms: vLLM 0.33's own kernel choice (use_rocm_custom_paged_attention), condition by condition."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pagedattn.cli import main
from pagedattn.config import seed_grid
from pagedattn.platforms import (
    CUSTOM_KERNEL_RULES,
    OPS,
    PLATFORMS,
    ROCM_CUSTOM,
    TRITON_DECODE,
    TRITON_PREFIX,
    VLLM_VERSION,
    VllmCase,
    failed_conditions,
    vllm_kernel,
)

# a configuration each ROCm platform sends to the custom kernel
TAKES_CUSTOM = {
    "rocm-cdna": VllmCase(torch.float16, head_size=128, block_size=16, gqa_ratio=1, max_seq_len=1024),
    "rocm-gfx1x": VllmCase(torch.bfloat16, head_size=128, block_size=16, gqa_ratio=4, max_seq_len=1024),
}

# (platform, change, the condition vLLM's rule fails on); the same change on the other platform below
CASES = [
    ("rocm-cdna", dict(sliding_window=16), "sliding_window == 0"),
    ("rocm-cdna", dict(dtype=torch.float32), "qtype == torch.half or qtype == torch.bfloat16"),
    ("rocm-cdna", dict(head_size=96), "head_size == 64 or head_size == 128"),
    ("rocm-cdna", dict(head_size=24), "head_size == 64 or head_size == 128"),
    ("rocm-cdna", dict(block_size=8), "block_size == 16 or block_size == 32"),
    ("rocm-cdna", dict(block_size=64), "block_size == 16 or block_size == 32"),
    ("rocm-cdna", dict(gqa_ratio=17), "gqa_ratio >= 1 and gqa_ratio <= 16"),
    ("rocm-cdna", dict(gqa_ratio=64), "gqa_ratio >= 1 and gqa_ratio <= 16"),
    ("rocm-cdna", dict(max_seq_len=128 * 1024 + 1), "max_seq_len <= 128 * 1024"),
    ("rocm-cdna", dict(sinks=True), "sinks is None"),
    ("rocm-gfx1x", dict(sliding_window=16), "sliding_window == 0"),
    ("rocm-gfx1x", dict(dtype=torch.float32), "qtype == torch.half or qtype == torch.bfloat16"),
    ("rocm-gfx1x", dict(head_size=64), "head_size == 128"),
    ("rocm-gfx1x", dict(block_size=32), "block_size == 16"),
    ("rocm-gfx1x", dict(gqa_ratio=2), "gqa_ratio >= 3 and gqa_ratio <= 16"),
    ("rocm-gfx1x", dict(gqa_ratio=1), "gqa_ratio >= 3 and gqa_ratio <= 16"),
    ("rocm-gfx1x", dict(gqa_ratio=17), "gqa_ratio >= 3 and gqa_ratio <= 16"),
    ("rocm-gfx1x", dict(max_seq_len=128 * 1024 + 1), "max_seq_len <= 128 * 1024"),
    ("rocm-gfx1x", dict(alibi=True), "alibi_slopes is None"),
    ("rocm-gfx1x", dict(kv_cache_dtype="fp8"), 'kv_cache_dtype == "auto"'),
    ("rocm-gfx1x", dict(sinks=True), "sinks is None"),
]


@pytest.mark.parametrize("platform", ["rocm-cdna", "rocm-gfx1x"])
def test_the_base_case_takes_the_custom_kernel(platform):
    choice = vllm_kernel(platform, TAKES_CUSTOM[platform])
    assert choice.custom and choice.decode_kernel == ROCM_CUSTOM and choice.prefill_kernel == TRITON_PREFIX
    assert failed_conditions(platform, TAKES_CUSTOM[platform]) == []


@pytest.mark.parametrize("platform,change,condition", CASES)
def test_each_condition_sends_decode_to_triton(platform, change, condition):
    case = dataclasses.replace(TAKES_CUSTOM[platform], **change)
    choice = vllm_kernel(platform, case)
    assert choice.decode_kernel == TRITON_DECODE and not choice.custom
    assert failed_conditions(platform, case) == [condition]
    assert condition in choice.why
    assert condition in [c.text for c in CUSTOM_KERNEL_RULES[platform]]


@pytest.mark.parametrize(
    "platform,change",
    [
        ("rocm-cdna", dict(gqa_ratio=16)),
        ("rocm-cdna", dict(block_size=32)),
        ("rocm-cdna", dict(head_size=64)),
        ("rocm-cdna", dict(max_seq_len=128 * 1024)),
        ("rocm-cdna", dict(dtype=torch.bfloat16)),
        ("rocm-cdna", dict(kv_cache_dtype="fp8")),
        ("rocm-cdna", dict(alibi=True)),  # CDNA checks neither
        ("rocm-gfx1x", dict(gqa_ratio=3)),
        ("rocm-gfx1x", dict(gqa_ratio=16)),
        ("rocm-gfx1x", dict(dtype=torch.float16)),
    ],
)
def test_the_edges_that_still_take_the_custom_kernel(platform, change):
    assert vllm_kernel(platform, dataclasses.replace(TAKES_CUSTOM[platform], **change)).custom


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_other_ops_are_triton_everywhere_and_cuda_never_takes_the_rocm_kernel(platform):
    for case in TAKES_CUSTOM.values():
        assert vllm_kernel(platform, case, "unified_attention").decode_kernel == "triton unified_attention"
        assert vllm_kernel(platform, case, "context_attention_fwd").decode_kernel == TRITON_PREFIX
    assert not vllm_kernel("cuda", TAKES_CUSTOM["rocm-cdna"]).custom
    with pytest.raises(ValueError, match="op must be one of"):
        vllm_kernel(platform, TAKES_CUSTOM["rocm-cdna"], "flash_attn")
    assert len(OPS) == 3


def test_the_seed_grid_platform_by_platform():
    """vLLM's test grid: on CDNA exactly the head-128, no-window configurations with GQA ratio <= 16
    (1 and 8) take the custom kernel, the seed's failing one (gqa 1, head 128, no window) included;
    on gfx1x only GQA 8 without fp8; on CUDA none."""
    custom = {p: set() for p in PLATFORMS}
    for c in seed_grid():
        case = VllmCase.from_config(c.config, max(c.shape.seq_lens))
        for p in PLATFORMS:
            if vllm_kernel(p, case).custom:
                custom[p].add((case.gqa_ratio, case.head_size, case.sliding_window, case.kv_cache_dtype))
    assert custom["cuda"] == set()
    assert custom["rocm-cdna"] == {(g, 128, 0, kv) for g in (1, 8) for kv in ("auto", "fp8")}
    assert (1, 128, 0, "auto") in custom["rocm-cdna"]  # the seed's
    assert custom["rocm-gfx1x"] == {(8, 128, 0, "auto")}


def test_explain_shows_vllms_choice_beside_the_plan(capsys):
    args = [
        "explain",
        "--num-q-heads",
        "64",
        "--num-kv-heads",
        "64",
        "--head-size",
        "128",
        "--dtype",
        "fp16",
        "--query-lens",
        "37,1",
        "--ctx-lens",
        "40,500",
        "--platform",
        "all",
        "--json",
    ]
    assert main(args) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["kernel"] and row["rule"]  # pagedattn's own plan
    assert row["vllm rocm-cdna"].startswith(f"decode: {ROCM_CUSTOM}")
    assert row["vllm cuda"].startswith(f"decode: {TRITON_DECODE}") and "not ROCm" in row["vllm cuda"]
    assert "gqa_ratio >= 3" in row["vllm rocm-gfx1x"]
    assert main(["explain", "--vllm-grid", "--platform", "rocm-cdna"]) == 0
    text = capsys.readouterr().out
    assert f"vLLM {VLLM_VERSION}" in text
    with pytest.raises(SystemExit):
        main(["explain", "--platform", "tpu"])
