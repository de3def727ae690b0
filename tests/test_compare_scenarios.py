"""`pagedattn compare` on tensors saved from the six planted scenarios: the cause each planted is
named again from the saved files alone (out, ref and a JSON of batch metadata), as a user would
do with the tensors of a failing test."""

from __future__ import annotations

import json

import pytest
import torch

from pagedattn import scenarios
from pagedattn.cli import main
from pagedattn.forensics import compare_saved


def saved_run(name, monkeypatch, tmp_path):
    """Run the scenario; save the first comparison it makes (the output under test) to files."""
    seen = []
    original = scenarios.Step.compare

    def capture(step, out, ref, batch=None):
        if not seen:
            seen.append((out.detach().clone(), ref.detach().clone(), batch or step.batch, step.config))
        return original(step, out, ref, batch)

    monkeypatch.setattr(scenarios.Step, "compare", capture)
    result = scenarios.run_scenario(name, "cpu")
    out, ref, batch, config = seen[0]
    torch.save(out, tmp_path / "out.pt")
    torch.save(ref, tmp_path / "ref.pt")
    meta = dict(
        cu_seqlens_q=batch.cu_seqlens_q.tolist(),
        seq_lens=batch.seq_lens.tolist(),
        block_table=batch.block_table.tolist(),
        num_kv_heads=config.num_kv_heads,
        block_size=config.block_size,
        sliding_window=config.sliding_window or None,
    )
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return result, [str(tmp_path / f) for f in ("out.pt", "ref.pt", "meta.json")]


@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_saved_scenario_is_diagnosed_from_files(name, monkeypatch, tmp_path, capsys):
    result, paths = saved_run(name, monkeypatch, tmp_path)
    report = compare_saved(*paths)
    assert report.top.id == result.expected, [(c.id, round(c.score, 2)) for c in report.diagnose()]
    assert report.mismatched == result.report.mismatched
    assert main(["compare", *paths[:2], "--batch", paths[2], "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["causes"][0]["id"] == result.expected
