"""write_kv: the Triton kernel (interpreter on CPU) and the PyTorch path, against a direct gather."""

from __future__ import annotations

import pytest
import torch

from pagedattn.errors import (
    BatchMetadataError,
    DeviceError,
    DTypeError,
    LayoutError,
    ScaleError,
    ShapeError,
    SlotConflictError,
    UnsupportedConfigError,
)
from pagedattn.kernels import write
from pagedattn.kernels.write import quantize_fp8, write_kv

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def kernel_is_interpreted() -> bool:
    """Whether @triton.jit built the kernel for the interpreter (decided at import time)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(write._write_kv_kernel, InterpretedFunction)


@pytest.fixture(params=["triton", "torch", "cuda"])
def path(request, monkeypatch):
    """Run write_kv through the Triton kernel (interpreter), the plain PyTorch path, or the native
    kernel on the GPU ("cuda": the same test with every tensor the test makes on the GPU)."""
    if request.param == "triton":
        if not kernel_is_interpreted():
            pytest.skip("the Triton path on CPU needs TRITON_INTERPRET=1 at import time")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    elif request.param == "cuda":
        if not torch.cuda.is_available() or kernel_is_interpreted():
            pytest.skip("the native kernel needs CUDA (and no TRITON_INTERPRET at import time)")
        torch.set_default_device("cuda")
        request.addfinalizer(lambda: torch.set_default_device(None))
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    return request.param


def nan_cache(num_blocks, block_size, num_kv_heads, head_size, dtype):
    return torch.full((num_blocks, block_size, num_kv_heads, head_size), float("nan")).to(dtype)


def random_slots(num_tokens, num_slots, num_padding=0):
    slots = torch.randperm(num_slots)[:num_tokens]
    slots[torch.randperm(num_tokens)[:num_padding]] = -1
    return slots


def expected_cache(cache, x, slots):
    """`cache` with x[i] at slot slots[i] (the test's own scatter, one token at a time)."""
    out = cache.clone()
    block_size = cache.shape[1]
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            out[s // block_size, s % block_size] = x[i]
    return out


# ---------------------------------------------------------------------------------------------
# plain caches
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_size,block_size", [(1, 1), (24, 4), (64, 16), (256, 2)])
def test_write_scatters_tokens_and_skips_padding(path, dtype, head_size, block_size):
    num_blocks, num_kv_heads, num_tokens = 9, 2, 7
    k = torch.randn(num_tokens, num_kv_heads, head_size).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_size).to(dtype)
    slots = random_slots(num_tokens, num_blocks * block_size, num_padding=2)
    k_cache = nan_cache(num_blocks, block_size, num_kv_heads, head_size, dtype)
    v_cache = nan_cache(num_blocks, block_size, num_kv_heads, head_size, dtype)
    want_k, want_v = expected_cache(k_cache, k, slots), expected_cache(v_cache, v, slots)
    write_kv(k, v, k_cache, v_cache, slots)
    # equal_nan: untouched slots (padding tokens included) must still hold the poison
    torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0, equal_nan=True)
    assert int(torch.isfinite(k_cache).all(-1).all(-1).sum()) == int((slots >= 0).sum())


def test_write_into_strided_cache(path):
    """vLLM's kv_cache[:, 0] / kv_cache[:, 1] views: blocks are not contiguous with each other."""
    kv_cache = torch.full((4, 2, 8, 2, 16), float("nan"), dtype=torch.float16)
    k_cache, v_cache = kv_cache[:, 0], kv_cache[:, 1]
    k = torch.randn(6, 2, 16, dtype=torch.float16)
    v = torch.randn(6, 2, 16, dtype=torch.float16)
    slots = torch.tensor([0, 9, 17, -1, 31, 8])
    want_k, want_v = expected_cache(k_cache, k, slots), expected_cache(v_cache, v, slots)
    write_kv(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0, equal_nan=True)


def test_write_all_padding_and_empty(path):
    k_cache = nan_cache(2, 4, 1, 8, torch.float32)
    v_cache = nan_cache(2, 4, 1, 8, torch.float32)
    k = torch.randn(3, 1, 8)
    write_kv(k, k, k_cache, v_cache, torch.full((3,), -1, dtype=torch.long))
    write_kv(k[:0], k[:0], k_cache, v_cache, torch.zeros(0, dtype=torch.long))
    assert torch.isnan(k_cache).all() and torch.isnan(v_cache).all()


# ---------------------------------------------------------------------------------------------
# fp8
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("storage", ["fp8", "uint8"])
def test_fp8_write_quantizes_like_torch(path, fp8_dtype, storage):
    num_tokens, num_kv_heads, head_size, block_size = 9, 2, 40, 4
    k = torch.randn(num_tokens, num_kv_heads, head_size, dtype=torch.bfloat16) * 3
    v = torch.randn(num_tokens, num_kv_heads, head_size, dtype=torch.bfloat16)
    slots = random_slots(num_tokens, 6 * block_size, num_padding=1)
    k_cache, v_cache = (
        nan_cache(6, block_size, num_kv_heads, head_size, fp8_dtype),
        nan_cache(6, block_size, num_kv_heads, head_size, fp8_dtype),
    )
    want_k = expected_cache(k_cache.view(torch.uint8), quantize_fp8(k, 0.05, fp8_dtype).view(torch.uint8), slots)
    want_v = expected_cache(v_cache.view(torch.uint8), quantize_fp8(v, 2.0, fp8_dtype).view(torch.uint8), slots)
    extra = {}
    if storage == "uint8":
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        extra = {"fp8_dtype": fp8_dtype}
    write_kv(k, v, k_cache, v_cache, slots, k_scale=0.05, v_scale=torch.tensor(2.0), **extra)
    assert torch.equal(k_cache.view(torch.uint8), want_k)
    assert torch.equal(v_cache.view(torch.uint8), want_v)


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_fp8_saturates_and_keeps_nan(path, fp8_dtype):
    fp8_max = torch.finfo(fp8_dtype).max
    values = torch.tensor(
        [
            fp8_max * 1.01,
            -fp8_max * 1.5,
            1e6,
            -1e30,
            float("inf"),
            -float("inf"),
            float("nan"),
            1.0,
            -2.5,
            0.0,
            1e-6,
            fp8_max,
        ]
    )
    k = values.reshape(1, 1, -1)
    k_cache = torch.zeros(1, 1, 1, values.numel()).to(fp8_dtype)
    v_cache = torch.zeros_like(k_cache)
    write_kv(k, k, k_cache, v_cache, torch.tensor([0]), k_scale=1.0, v_scale=1.0)
    got = k_cache.float().flatten()
    assert got[:6].tolist() == [fp8_max, -fp8_max, fp8_max, -fp8_max, fp8_max, -fp8_max]
    assert torch.isnan(got[6])
    assert not torch.isinf(got).any()
    assert got[7:9].tolist() == [1.0, -2.5] and got[11] == fp8_max
    assert torch.equal(v_cache.view(torch.uint8), k_cache.view(torch.uint8))


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_fp8_kernel_rounding_is_exact(fp8_dtype, monkeypatch):
    """Every fp8 value, every rounding midpoint and its neighbours, subnormals, signed zeros:
    the kernel's hand-written conversion gives torch's bits (ties to even)."""
    if not kernel_is_interpreted():
        pytest.skip("needs TRITON_INTERPRET=1 at import time")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    grid = torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()
    grid = grid[torch.isfinite(grid)].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    x = torch.cat(
        [
            grid,
            mid,
            torch.nextafter(mid, grid[1:]),
            torch.nextafter(mid, grid[:-1]),
            torch.tensor([-0.0, 1e-30, -1e-30]),
        ]
    )
    head_size = 128
    x = torch.cat([x, torch.zeros(-x.numel() % head_size)]).reshape(-1, 1, head_size)
    cache = torch.zeros(x.shape[0], 1, 1, head_size, dtype=fp8_dtype)
    write_kv(x, x, cache, torch.zeros_like(cache), torch.arange(x.shape[0]), k_scale=1.0, v_scale=1.0)
    want = quantize_fp8(x, 1.0, fp8_dtype).view(torch.uint8)
    assert torch.equal(cache.view(torch.uint8).reshape(want.shape), want)


# ---------------------------------------------------------------------------------------------
# validation and checked mode
# ---------------------------------------------------------------------------------------------
def _args(**changes):
    args = dict(
        k=torch.randn(3, 2, 8),
        v=torch.randn(3, 2, 8),
        k_cache=torch.zeros(4, 4, 2, 8),
        v_cache=torch.zeros(4, 4, 2, 8),
        slot_mapping=torch.tensor([0, 5, -1]),
    )
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,error,words",
    [
        (dict(k=torch.randn(3, 2, 7)), ShapeError, "k must be [num_tokens, num_kv_heads, head_size]"),
        (dict(v=torch.randn(3, 2, 8, 1)), ShapeError, "v must have 3 dimensions"),
        (dict(v_cache=torch.zeros(4, 4, 2, 4)), ShapeError, "v_cache"),
        (
            dict(slot_mapping=torch.tensor([0, 5, -1], dtype=torch.int32)),
            DTypeError,
            "slot_mapping must be int64, got torch.int32",
        ),
        (dict(slot_mapping=torch.tensor([0, 5])), ShapeError, "slot_mapping must have num_tokens = 3 entries"),
        (dict(k=torch.randn(3, 2, 8).half(), v=torch.randn(3, 2, 8).half()), DTypeError, "non-fp8 cache"),
        (dict(v=torch.randn(3, 2, 8).half()), DTypeError, "must share a dtype"),
        (
            dict(
                k_cache=torch.zeros(4, 4, 2, 8, dtype=torch.uint8), v_cache=torch.zeros(4, 4, 2, 8, dtype=torch.uint8)
            ),
            DTypeError,
            "fp8_dtype",
        ),
        (
            dict(
                k_cache=torch.zeros(4, 4, 2, 8).to(torch.float8_e4m3fn),
                v_cache=torch.zeros(4, 4, 2, 8).to(torch.float8_e4m3fn),
            ),
            ScaleError,
            "k_scale is required",
        ),
        (
            dict(k_cache=torch.zeros(4, 4, 8, 2).transpose(2, 3), v_cache=torch.zeros(4, 4, 2, 8)),
            LayoutError,
            "contiguous",
        ),
        (
            dict(
                k=torch.randn(3, 2, 300),
                v=torch.randn(3, 2, 300),
                k_cache=torch.zeros(1, 4, 2, 300),
                v_cache=torch.zeros(1, 4, 2, 300),
            ),
            UnsupportedConfigError,
            "head_size",
        ),
        (dict(slot_mapping=[0, 5, -1]), DTypeError, "slot_mapping must be a torch.Tensor"),
        (
            dict(slot_mapping=torch.tensor([0, 5, -1], device="meta")),
            DeviceError,
            "slot_mapping is on meta, expected cpu (the device of k_cache)",
        ),
    ],
)
def test_write_validates_arguments(changes, error, words):
    with pytest.raises(error) as info:
        write_kv(**_args(**changes))
    assert words in str(info.value)


def test_write_rejects_aliased_caches():
    cache = torch.zeros(4, 4, 2, 8)
    with pytest.raises(LayoutError, match="same memory"):
        write_kv(**_args(k_cache=cache, v_cache=cache))


@pytest.mark.parametrize(
    "bad", [0.0, -1.0, float("nan"), float("inf"), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -2.0])]
)  # 2 KV heads: [2] is per head
def test_write_rejects_bad_fp8_scales(bad):
    cache = torch.zeros(4, 4, 2, 8).to(torch.float8_e5m2)
    with pytest.raises(ScaleError, match="k_scale"):
        write_kv(**_args(k_cache=cache, v_cache=cache.clone()), k_scale=bad, v_scale=1.0)


def test_write_rejects_mismatched_fp8_dtype():
    cache = torch.zeros(4, 4, 2, 8).to(torch.float8_e5m2)
    with pytest.raises(DTypeError, match="fp8_dtype"):
        write_kv(**_args(k_cache=cache, v_cache=cache.clone()), k_scale=1.0, v_scale=1.0, fp8_dtype=torch.float8_e4m3fn)


def test_checked_write_finds_slot_conflicts(path):
    args = _args(slot_mapping=torch.tensor([7, -1, 7]))
    write_kv(**args)  # unchecked: no value checks
    with pytest.raises(SlotConflictError) as info:
        write_kv(**args, checked=True)
    message = str(info.value)
    assert "slot_mapping[0] and slot_mapping[2]" in message and "slot 7" in message


@pytest.mark.parametrize("slot", [16, -2])
def test_checked_write_finds_out_of_range_slots(slot):
    with pytest.raises(BatchMetadataError, match=f"slot_mapping\\[1\\] = {slot} is out of range"):
        write_kv(**_args(slot_mapping=torch.tensor([0, slot, -1])), checked=True)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_gpu_kernel_matches_torch_path(dtype):
    num_tokens, num_kv_heads, head_size, block_size, num_blocks = 300, 8, 80, 16, 64
    k = torch.randn(num_tokens, num_kv_heads, head_size, device="cuda", dtype=torch.bfloat16) * 50
    v = torch.randn(num_tokens, num_kv_heads, head_size, device="cuda", dtype=torch.bfloat16)
    slots = random_slots(num_tokens, num_blocks * block_size, num_padding=10).cuda()
    caches = [nan_cache(num_blocks, block_size, num_kv_heads, head_size, dtype).cuda() for _ in range(4)]
    scales = dict(k_scale=0.3, v_scale=torch.tensor([0.7], device="cuda")) if dtype in FP8 else {}
    write_kv(k, v, caches[0], caches[1], slots, **scales)
    write._write_torch(
        k, v, caches[2], caches[3], slots, scales.get("k_scale"), scales.get("v_scale"), dtype if dtype in FP8 else None
    )
    for kernel_cache, torch_cache in ((caches[0], caches[2]), (caches[1], caches[3])):
        if dtype in FP8:
            assert torch.equal(kernel_cache.view(torch.uint8), torch_cache.view(torch.uint8))
        else:
            torch.testing.assert_close(kernel_cache, torch_cache, rtol=0, atol=0, equal_nan=True)


@pytest.mark.bigmem
@pytest.mark.gpu
def test_gpu_offsets_past_2_31_elements():
    """A cache of more than 2^31 elements: the last block's address overflows int32 arithmetic."""
    block_size, num_kv_heads, head_size = 16, 8, 128
    num_blocks = (1 << 31) // (block_size * num_kv_heads * head_size) + 8
    try:
        k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_size, dtype=torch.uint8, device="cuda")
        v_cache = torch.zeros_like(k_cache)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for two 2 GiB caches")
    k = torch.randn(2, num_kv_heads, head_size, device="cuda", dtype=torch.float16)
    last = num_blocks * block_size - 1
    slots = torch.tensor([last, 3], device="cuda")
    write_kv(k, k, k_cache, v_cache, slots, k_scale=1.0, v_scale=1.0, fp8_dtype=torch.float8_e4m3fn)
    want = quantize_fp8(k, 1.0, torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(k_cache[-1, -1], want[0]) and torch.equal(v_cache[0, 3], want[1])
