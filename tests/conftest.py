"""Shared test fixtures, kept small and generic."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Tests run in parallel workers (pytest -n 2 on 2 cores): one intra-op thread each, or the many
# small CPU ops of the interpreter and the reference contend and run 10-25x slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The one place for device markers: `@pytest.mark.gpu` skips without CUDA; `@pytest.mark.kernels`
    (the Triton kernels themselves) skips without CUDA or TRITON_INTERPRET=1."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_kernels = pytest.mark.skip(reason="needs CUDA or TRITON_INTERPRET=1")
    for item in items:
        if not CUDA and item.get_closest_marker("gpu"):
            item.add_marker(no_gpu)
        elif not (CUDA or INTERPRETER) and item.get_closest_marker("kernels"):
            item.add_marker(no_kernels)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _release_gpu_cache():
    """On a GPU, a test's cached blocks go back to the device afterwards: many xdist workers share
    one GPU, and each worker's caching allocator would otherwise keep its largest test's memory
    (H100 run 11: 16 workers holding 5-7 GiB each ran the full-size tests out of memory)."""
    yield
    if CUDA:
        torch.cuda.empty_cache()


@pytest.fixture
def device() -> torch.device:
    """The device CPU tests run on (kernel tests go through the Triton interpreter there)."""
    return torch.device("cpu")
