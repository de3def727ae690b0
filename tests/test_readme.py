"""The README's usage examples run as written."""

import re
from pathlib import Path

import torch

from pagedattn import reference

README = Path(__file__).parent.parent / "README.md"


def _blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost its python examples"
    return blocks


def test_readme_planner_example_runs_and_is_right():
    namespace: dict = {}
    exec(compile(_blocks()[0], "README.md", "exec"), namespace)
    n = namespace
    layer = n["num_layers"] - 1
    expect = reference.attention(
        n["q"],
        n["k_caches"][layer],
        n["v_caches"][layer],
        n["cu_seqlens_q"],
        torch.tensor(n["seq_lens"], dtype=torch.int32),
        n["block_table"],
        sliding_window=16,
    )
    torch.testing.assert_close(n["out"], expect, atol=1e-4, rtol=1e-4)


def test_readme_cache_example_runs():
    namespace: dict = {}
    exec(compile(_blocks()[1], "README.md", "exec"), namespace)
    report = namespace["report"]
    assert report.ok, report.summary()
    assert namespace["out"].shape == (38, 8, 64)
