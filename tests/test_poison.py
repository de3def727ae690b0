"""pagedattn.poison: the pattern for every cache dtype, in place over any layout, told apart from user NaN."""

from __future__ import annotations

import pytest
import torch

import pagedattn
from pagedattn.errors import DTypeError, LayoutError, UnsupportedConfigError
from pagedattn.poison import KV_LAYOUTS, POISON_BITS, empty_kv_cache, is_nonfinite, is_poison, poison_, poison_bits

DTYPES = list(POISON_BITS)


def bits(t: torch.Tensor) -> set[int]:
    """The distinct unsigned bit patterns in t."""
    width = t.element_size()
    raw = t if t.dtype == torch.uint8 else t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[width])
    return {int(x) & ((1 << 8 * width) - 1) for x in raw.flatten().unique().tolist()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_poison_is_a_nan_with_its_own_bits(dtype):
    t = poison_(torch.zeros(3, 5).to(dtype))
    assert bits(t) == {POISON_BITS[dtype]} == {poison_bits(dtype)}
    assert torch.isnan(t.float()).all()
    assert is_poison(t).all() and is_nonfinite(t).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_user_nan_is_not_poison(dtype):
    """float('nan'), torch.nan, x86's 0/0 and CUDA's canonical NaN, converted to the cache dtype."""
    zero = torch.zeros(1)
    user = [float("nan"), torch.nan, float(zero / zero)]
    values = torch.tensor(user).to(dtype)
    if dtype.itemsize == 4:
        values = torch.cat([values, torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)])
    assert is_nonfinite(values).all()
    if dtype == torch.float8_e4m3fn:  # two NaN codes only: a negative NaN lands on the poison
        positive = values[torch.tensor(user).isnan() & ~torch.tensor(user).signbit()]
        assert not is_poison(positive).any() and is_poison(torch.tensor([-torch.nan]).to(dtype)).all()
    else:
        assert not is_poison(values).any(), sorted(hex(b) for b in bits(values))
    finite = torch.tensor([0.0, -1.5, 448.0, 1e-3]).to(dtype)
    assert not is_poison(finite).any() and not is_nonfinite(finite).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["k_half", "v_half", "stacked", "hnd_as_nhd", "vllm_v0_k"])
def test_poison_fills_views_in_place_and_nothing_else(dtype, view):
    nb, bs, kvh, hd = 3, 4, 2, 16
    if view in ("k_half", "v_half"):
        buf = torch.zeros(nb, bs, kvh, 2 * hd).to(dtype)
        t = buf[..., :hd] if view == "k_half" else buf[..., hd:]
    elif view == "stacked":
        buf = torch.zeros(2, nb, bs, kvh, hd).to(dtype)
        t = buf[1]
    elif view == "hnd_as_nhd":
        buf = torch.zeros(nb, kvh, bs, hd).to(dtype)
        t = buf.transpose(1, 2)
    else:
        buf = torch.zeros(nb, kvh, hd // 8, bs, 8).to(dtype)
        t = buf[:, :, :, 1:3]  # two slots of every block
    assert not t.is_contiguous() or view == "stacked"
    out = poison_(t)
    assert out is t and is_poison(t).all()
    assert int(is_poison(buf).sum()) == t.numel()
    assert not is_nonfinite(buf).logical_and(~is_poison(buf)).any()


def test_uint8_storage_needs_its_format():
    storage = torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(DTypeError, match="dtype=torch.float8_e4m3fn or torch.float8_e5m2"):
        poison_(storage)
    poison_(storage, dtype=torch.float8_e5m2)
    assert bits(storage) == {0xFD} and is_poison(storage, dtype=torch.float8_e5m2).all()
    with pytest.raises(DTypeError, match="must be one of"):
        poison_(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(DTypeError, match="only for uint8 storage"):
        poison_(torch.zeros(3), dtype=torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(KV_LAYOUTS))
def test_empty_kv_cache_layouts(dtype, layout):
    k, v = pagedattn.empty_kv_cache(5, 16, 2, 64, dtype=dtype, layout=layout)
    x = 16 // dtype.itemsize
    expected = {
        "nhd": ((5, 16, 2, 64), (5, 16, 2, 64)),
        "hnd": ((5, 2, 16, 64), (5, 2, 16, 64)),
        "vllm_v0": ((5, 2, 64 // x, 16, x), (5, 2, 64, 16)),
    }[layout]
    assert (tuple(k.shape), tuple(v.shape)) == expected
    assert k.dtype == v.dtype == dtype and k.data_ptr() != v.data_ptr()
    assert is_poison(k).all() and is_poison(v).all()


def test_empty_kv_cache_errors():
    with pytest.raises(UnsupportedConfigError, match="layout must be one of"):
        empty_kv_cache(2, 16, 2, 64, layout="NHD")
    with pytest.raises(LayoutError, match="head_size 20 is not a multiple of 8"):
        empty_kv_cache(2, 16, 2, 20, dtype=torch.float16, layout="vllm_v0")
    with pytest.raises(DTypeError, match="cache dtype"):
        empty_kv_cache(2, 16, 2, 64, dtype=torch.int8)
    with pytest.raises(UnsupportedConfigError, match="num_blocks must be a positive int"):
        empty_kv_cache(0, 16, 2, 64)
