"""Every planted fault is diagnosed as what was planted; the seed's fault is refused by checked mode.

The seed's scenario runs through whatever `attention` dispatches to here (the Triton interpreter
under `make test`). The others run with the interpreter off (the reference backs `attention` and
the torch write path fills the cache): what they test is the planting and the diagnosis, and the
interpreted write/fp8 kernels would cost minutes; the kernels have their own tests."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import pagedattn.kernels.unified  # noqa: F401  (Triton decides at decoration time whether a kernel is
import pagedattn.kernels.write  # noqa: F401   interpreted: decorate under the session's TRITON_INTERPRET,
from pagedattn import scenarios  #              before `no_interpreter` turns it off for a test)
from pagedattn.cli import scenario as scenario_cli
from pagedattn.errors import UnwrittenKVError
from pagedattn.scenarios import SCENARIOS, run_scenario
from pagedattn.testing import make_step

FAST = [name for name in SCENARIOS if name != "incomplete-cache"]


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("name", FAST)
def test_scenario_top_diagnosis_is_the_planted_cause(name, no_interpreter):
    result = run_scenario(name, "cpu")
    assert result.top == result.expected, result.report.summary()
    assert result.ok
    if name == "wrong-block-table":  # a contract fault checked mode refuses
        assert result.checked_raised and result.checked.startswith("SlotConflictError")
    else:
        assert "not a contract violation" in result.checked


def test_incomplete_cache_scenario():
    """The seed: checked mode names the unwritten slot; unchecked, exactly the decode token is wrong
    and forensics says why; writing the token first makes the comparison clean."""
    result = run_scenario("incomplete-cache", "cpu")
    assert result.checked_raised and result.checked.startswith("UnwrittenKVError")
    assert "decode_from_cache=True" in result.checked
    report = result.report
    assert report.num_bad_tokens == 1 and report.sequences[0].kind == "decode"
    assert report.mismatched == report.shape[1] * report.shape[2]  # 1 token x all heads x all dims
    assert report.nan == report.mismatched  # poison reaches the output: the kernel keeps NaN
    assert result.top == "missing-decode-kv" and result.ok
    assert "clean" in result.fixed


def test_incomplete_cache_checked_mode_raises(no_interpreter):
    """The seed's inputs through the public entry point, checked: UnwrittenKVError before any kernel."""
    from pagedattn.attention import attention

    config, shape = scenarios.sizes(False, 0)
    step = make_step(config, shape, seed=1, contract="context", write_decode_kv=False)
    with pytest.raises(UnwrittenKVError, match=f"sequence {step.seq_ids[-1]} \\(decode"):
        attention(
            step.q, step.cache, step.batch, k_new=step.k_new, v_new=step.v_new, decode_from_cache=True, checked=True
        )
    out = attention(
        step.q, step.cache, step.batch, k_new=step.k_new, v_new=step.v_new, decode_from_cache=True, checked=False
    )
    assert torch.isnan(out[-1]).all() and not torch.isnan(out[:-1]).any()


def test_cli(no_interpreter, capsys):
    args = argparse.Namespace(name="gqa-head-mapping", device="cpu", rng_seed=0, full=False, json=True)
    assert scenario_cli.run(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] and d["top"] == d["expected"] == "gqa-head-mapping"
    assert d["forensics"]["causes"][0]["id"] == "gqa-head-mapping"
    args = argparse.Namespace(name="list", device="cpu", rng_seed=0, full=False, json=False)
    assert scenario_cli.run(args) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in SCENARIOS)
