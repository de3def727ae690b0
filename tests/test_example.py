"""examples/toy_decoder.py runs and passes its own check (served logits against a dense float32
reference): on CPU at its tiny defaults (through the Triton interpreter under TRITON_INTERPRET=1),
compiled with aot_eager, and on a GPU with a captured decode graph."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "toy_decoder.py"


def load_example():
    spec = importlib.util.spec_from_file_location("toy_decoder", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "extra", [[], ["--compile", "--compile-backend", "aot_eager", "--dtype", "bf16"]], ids=["eager", "aot_eager-bf16"]
)
def test_toy_decoder_cpu(extra, capsys):
    torch._dynamo.reset()
    assert load_example().main(["--device", "cpu", *extra]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("OK"), out
    assert "decode steps:" in out and "prefill steps:" in out, out  # both kinds of step ran
    if extra:
        assert "max |compiled vs eager|" in out, out


@pytest.mark.gpu
def test_toy_decoder_cuda_graphs(capsys):
    small = [
        "--layers",
        "2",
        "--hidden",
        "256",
        "--requests",
        "4",
        "--prompt-len",
        "600",
        "--new-tokens",
        "16",
        "--step-tokens",
        "256",
        "--bench-iters",
        "10",
    ]
    assert load_example().main(["--device", "cuda", "--cuda-graphs", *small]) == 0
    out = capsys.readouterr().out
    assert "max |graph replay vs direct call|: 0.000e+00" in out, out
