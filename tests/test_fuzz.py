"""Property tests: random batches, head geometries, dtypes and options through the Triton kernels
(the interpreter on CPU, native on CUDA), each compared with the reference on NaN-poisoned outputs.

Two hypothesis profiles, chosen with PAGEDATTN_FUZZ_PROFILE (default: "gpu" with CUDA, else "ci"):
    ci   derandomized (the same examples every run), 40 examples at interpreter-sized shapes
    gpu  2000 random examples, longer sequences (to 2k+ tokens), larger batches and head sizes
PAGEDATTN_FUZZ_EXAMPLES=N overrides the number of examples; PAGEDATTN_FUZZ_SHARDS=N the number of
shards the GPU profile splits them into (default 8).
The profiles apply to this file's tests only (hypothesis' global default is left alone).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from pagedattn import dispatch
from pagedattn.config import AttentionConfig, BatchShape
from pagedattn.testing import DEVICE, assert_close_to_reference, run_both

CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.kernels

_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("ci", derandomize=True, max_examples=40, **_COMMON)
settings.register_profile("gpu", max_examples=2000, **_COMMON)
# PAGEDATTN_FUZZ_EXAMPLES=N overrides the profile's number of examples (a quick look, or a long soak)
_EXAMPLES = os.environ.get("PAGEDATTN_FUZZ_EXAMPLES")
PROFILE = os.environ.get("PAGEDATTN_FUZZ_PROFILE", "gpu" if CUDA else "ci")
if PROFILE not in ("ci", "gpu"):
    raise ValueError(f"PAGEDATTN_FUZZ_PROFILE must be 'ci' or 'gpu', got {PROFILE!r}")
BIG = PROFILE == "gpu"

# sizes by profile: (max num_seqs, max query_len, max ctx_len)
MAX_SEQS, MAX_QUERY, MAX_CTX = (8, 256, 2048) if BIG else (5, 20, 70)
BLOCK_SIZES = (8, 16, 32, 64)
HEAD_SIZES = (16, 24, 32, 40, 64, 80) + ((96, 128, 256) if BIG else ())
QUERIES_PER_KV = (1, 2, 3, 4, 8)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")
CONTRACTS = ("full", "context", "context-decode")


@st.composite
def configs(draw) -> AttentionConfig:
    num_kv_heads = draw(st.integers(1, 4))
    return AttentionConfig(
        num_q_heads=num_kv_heads * draw(st.sampled_from(QUERIES_PER_KV)),
        num_kv_heads=num_kv_heads,
        head_size=draw(st.sampled_from(HEAD_SIZES)),
        block_size=draw(st.sampled_from(BLOCK_SIZES)),
        dtype=draw(st.sampled_from(DTYPES)),
        kv_dtype=draw(st.sampled_from(KV_DTYPES)),
        sliding_window=draw(st.one_of(st.just(0), st.integers(1, 40 if not BIG else 600))),
        use_alibi=draw(st.booleans()),
        softcap=draw(st.sampled_from((0.0, 0.0, 1.0, 5.0, 30.0))),
        use_sinks=draw(st.booleans()),
    )


def query_lens():
    # decodes (1) and empty queries (0) often, 1-token prefills come from ctx_len 0 + query_len 1
    return st.one_of(st.just(1), st.just(0), st.integers(0, MAX_QUERY))


def ctx_lens(block_size: int):
    boundary = st.builds(
        lambda k, d: max(0, min(MAX_CTX, k * block_size + d)),
        st.integers(0, MAX_CTX // block_size + 1),
        st.sampled_from((-1, 0, 1)),
    )
    return st.one_of(st.just(0), boundary, st.integers(0, MAX_CTX))


@st.composite
def cases(draw):
    config = draw(configs())
    num_seqs = draw(st.integers(1, MAX_SEQS))
    qs = draw(st.lists(query_lens(), min_size=num_seqs, max_size=num_seqs))
    cs = draw(st.lists(ctx_lens(config.block_size), min_size=num_seqs, max_size=num_seqs))
    contract = draw(st.sampled_from(CONTRACTS))
    return config, BatchShape(tuple(qs), tuple(cs)), contract


# The GPU profile runs as SHARDS independent tests (random, not derandomized: each shard draws its
# own examples) so pytest-xdist can spread the 2,000 examples over its workers.
# PAGEDATTN_FUZZ_SHARDS=N splits them finer, so a run cut off by a time limit still reports whole shards.
SHARDS = int(os.environ.get("PAGEDATTN_FUZZ_SHARDS", 8)) if BIG else 1
_TOTAL = int(_EXAMPLES) if _EXAMPLES else settings.get_profile(PROFILE).max_examples


@pytest.mark.parametrize("shard", range(SHARDS))
@settings(settings.get_profile(PROFILE), max_examples=max(1, _TOTAL // SHARDS))
@given(case=cases(), seed=st.integers(0, 2**16))
def test_kernel_matches_reference(shard, case, seed):
    config, shape, contract = case
    # the interpreter's cost grows with query rows x keys; keep CI examples small
    if not BIG:
        assume(sum(q * (q + c) for q, c in zip(shape.query_lens, shape.ctx_lens)) * config.num_q_heads < 60_000)
    note(
        f"{config.label()} | {shape.label()} | {contract} | "
        f"plan: {dispatch.plan_for(config, shape, device=DEVICE, context_contract=contract != 'full')}"
    )
    out, ref = run_both(config, shape, contract, seed=seed, device=DEVICE)
    assert_close_to_reference(out, ref, config.dtype, f"{config.label()} {shape.label()} {contract}")


def test_profiles_are_registered():
    assert settings.get_profile("ci").derandomize
    assert settings.get_profile("ci").deadline is None
    assert settings.get_profile("gpu").max_examples == 2000
