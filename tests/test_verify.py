"""`verify` and the tests share one matrix: run_case on a few cases of config.seed_grid(quick=True),
both contracts, through whatever `attention` dispatches to (the Triton interpreter under make test)."""

from __future__ import annotations

import json

import pytest
import torch

from pagedattn.config import seed_grid
from pagedattn.testing import TOLERANCES, make_step
from pagedattn.verify import run_case

GRID = seed_grid(quick=True)
# fp16 cache at one query head per KV head (the seed's failing geometry), and an fp8 cache at 8 query
# heads per KV head: the cheapest two through the interpreter
PICKED = [
    c
    for c in GRID
    if c.config.sliding_window == 0
    and (
        (c.config.num_queries_per_kv == 1 and c.config.kv_dtype == "auto" and c.config.head_size == 24)
        or (c.config.num_queries_per_kv == 8 and c.config.kv_dtype == "fp8_e4m3" and c.config.head_size == 32)
    )
]


def test_picked_cases():
    assert len(PICKED) == 2


@pytest.mark.parametrize("contract", ["full", "context"])
@pytest.mark.parametrize("case", PICKED, ids=lambda c: c.label())
def test_run_case_passes(case, contract):
    result = run_case(case, "cpu", contract, seed=0)
    assert result.passed, result.summary
    assert result.summary == "ok" and result.max_abs_err < TOLERANCES[case.config.dtype][0]
    assert json.dumps(result.to_dict())


def test_run_case_reports_a_failure_with_forensics(monkeypatch):
    """A library error inside a case becomes a failed row naming it, not a crash of the whole run."""
    import pagedattn.verify as verify

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(verify, "attention", broken)
    result = run_case(PICKED[0], "cpu", "full")
    assert not result.passed and "kernel exploded" in result.summary


def test_make_step_contracts():
    case = PICKED[0]
    full = make_step(case.config, case.shape, contract="full")
    assert full.batch.host_seq_lens() == case.shape.seq_lens
    assert all(full.cache.written_mask(s).all() for s in full.seq_ids)
    context = make_step(case.config, case.shape, contract="context")
    assert context.batch.host_seq_lens() == case.shape.seq_lens and context.decode_from_cache
    for s, q, c in zip(context.seq_ids, case.shape.query_lens, case.shape.ctx_lens):
        assert context.cache.seq_len(s) == c + (q == 1)  # decodes hold their own token
    broken = make_step(case.config, case.shape, contract="context", write_decode_kv=False)
    assert not broken.cache.written_mask(broken.seq_ids[-1])[-1]
    assert torch.isnan(broken.cache.k.float()).any()
