"""The launch path that skips Triton's binder (kernels/launch.py) must pick exactly the kernel
Triton would: its key classes must determine Triton's own specialization of every argument."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from pagedattn.kernels import launch
from pagedattn.kernels.launch import FastKernel, arg_class

INTS = [
    0,
    1,
    2,
    15,
    16,
    17,
    32,
    -1,
    -16,
    -17,
    2**31 - 1,
    2**31,
    2**31 + 16,
    -(2**31),
    -(2**31) - 1,
    -(2**31) - 16,
    2**32,
    2**63 - 1,
    2**63 - 16,
    -(2**63),
    2**63,
    2**63 + 16,
    2**64 - 1,
]


def _triton_spec(a):
    return native_specialize_impl(BaseBackend, a, False, True, True)


def _values():
    base = torch.empty(64, dtype=torch.uint8)
    tensors = [base[i:].view(torch.uint8) for i in range(0, 33)]  # every offset: aligned and not
    tensors += [
        torch.empty(8, dtype=d)[1:]
        for d in (torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64, torch.float8_e4m3fn)
    ]
    tensors += [torch.empty(8, dtype=d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.int32)]
    return tensors + INTS + [0.5, 1.0, -2.0, True, False, None] + _tuples()


def _tuples():
    """Tuple arguments (the kernels' per-tensor strides): every scalar beside ints that differ in
    what Triton specializes on, in both orders, three long and nested."""
    scalars = INTS + [0.5, True, None]
    out = []
    for a in scalars:
        for b in (0, 1, 16, 17, 2**31, -1):
            out += [(a, b), (b, a), (b, a, 1), ((a,), b), (a, (b, 1))]
    return out + [(), (1,), (16,), (1, 1, 1, 1, 1)]


def test_key_classes_determine_tritons_specialization():
    """Equal classes imply equal Triton specializations (the key is at least as fine as Triton's)."""
    seen: dict = {}
    for a in _values():
        cls = arg_class(a)
        assert cls is not None, a
        spec = _triton_spec(a)
        assert seen.setdefault(cls, spec) == spec, (a, cls, spec, seen[cls])


def test_key_tells_apart_what_triton_tells_apart():
    """And the key is no finer than needed where it matters: an int is 1 or not, a multiple of 16 or
    not; a tensor is 16-byte aligned or not (so a decode loop keeps hitting one entry)."""
    assert arg_class(1) != arg_class(3) and arg_class(3) == arg_class(5)
    assert arg_class(32) == arg_class(48) != arg_class(40)
    t = torch.empty(64, dtype=torch.float16)
    assert arg_class(t) == arg_class(t[8:]) != arg_class(t[1:])
    assert arg_class(object()) is None  # anything else goes through Triton's own path
    # tuples: element by element (a stride of 1 is a constexpr inside a tuple too), not by value
    assert arg_class((3, 5)) == arg_class((7, 9)) != arg_class((1, 9)) != arg_class((9, 1))
    assert arg_class((3, 5)) != arg_class(((3,), 5)) and arg_class((16, 1)) != arg_class(16)
    assert arg_class((t, 16)) is None  # a tensor inside a tuple: Triton's own path (addresses go top-level)
    assert arg_class((2, object())) is None


def test_interpreter_forced_and_cpu_calls_use_tritons_path(monkeypatch):
    """The fast path is only for CUDA arguments it can key, with no interpreter, no forcing flag and
    no hooks; every other call goes to the JIT function unchanged (a fake one here: runs on CPU)."""
    calls = []

    class Fake:
        pre_run_hooks, debug = [], False

        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k))

    class CudaLike:  # what the fast path looks at first: the first argument's is_cuda
        is_cuda = True

    cuda_arg, cpu_arg = CudaLike(), torch.empty(4)
    monkeypatch.setattr(launch, "ALWAYS_TRITON", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    FastKernel(Fake())[(1, 1, 1)](cuda_arg, 2, X=3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    FastKernel(Fake())[(2,)](cpu_arg, X=4)
    monkeypatch.setattr(launch, "ALWAYS_TRITON", True)
    FastKernel(Fake())[(3, 1)](cuda_arg, X=5)
    assert calls == [
        ((1, 1, 1), (cuda_arg, 2), {"X": 3}),
        ((2,), (cpu_arg,), {"X": 4}),
        ((3, 1), (cuda_arg,), {"X": 5}),
    ]
    monkeypatch.setattr(launch, "ALWAYS_TRITON", False)
    FastKernel(Fake())[(4,)](cuda_arg, 7)  # past the guards: an argument type the key does not know
    assert calls[-1] == ((4,), (cuda_arg, 7), {})


@triton.jit
def _probe_kernel(out_ptr, x_ptr, n, stride, f, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i * stride, mask=i < n, other=0.0)
    tl.store(out_ptr + i, x * f + SHIFT, mask=i < n)


@pytest.mark.gpu
def test_fast_launch_matches_triton_on_cuda(monkeypatch):
    """Each call's result is right, repeated classes skip Triton's run(), and the kernel launched is
    the one Triton's own binder selects (warmup returns it) for aligned and unaligned pointers,
    n == 1, multiples of 16 and not."""
    fast = FastKernel(_probe_kernel)
    slow_calls = []
    original = type(_probe_kernel).run

    def counting_run(self, *args, **kwargs):
        slow_calls.append(kwargs.get("warmup"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(_probe_kernel), "run", counting_run)
    x = torch.randn(4096, device="cuda")
    cases = [(x, 1, 1), (x[1:], 1, 1), (x, 16, 1), (x, 17, 3), (x[4:], 100, 16), (x[3:], 100, 2), (x, 1, 7)]

    def call(x_view, n, stride):
        out = torch.full((128,), float("nan"), device="cuda")
        fast[(1,)](out, x_view, n, stride, 2.5, BLOCK=128, SHIFT=1)  # a 1-d grid, as Triton allows
        torch.testing.assert_close(out[:n], x_view[: n * stride : stride][:n] * 2.5 + 1)
        assert out[n:].isnan().all()
        return out

    for case in cases:
        call(*case)
    first = len(slow_calls)
    assert 1 <= first <= len(cases)  # one Triton launch per new key class at most
    for case in cases:
        call(*case)
    assert len(slow_calls) == first  # the second pass went around Triton's run() entirely
    for x_view, n, stride in cases:
        out = torch.empty(128, device="cuda")
        key = (
            torch.cuda.current_device(),
            tuple(arg_class(a) for a in (out, x_view, n, stride, 2.5)),
            (("BLOCK", 128), ("SHIFT", 1)),
        )
        assert fast._kernels[key].kernel is _probe_kernel.warmup(
            out, x_view, n, stride, 2.5, BLOCK=128, SHIFT=1, grid=(1,)
        )


@triton.jit
def _tuple_probe_kernel(out_ptr, x_ptr, n, strides, f, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i * strides[0] + strides[1], mask=i < n, other=0.0)
    tl.store(out_ptr + i, x * f, mask=i < n)


@pytest.mark.gpu
def test_fast_launch_of_tuple_arguments_matches_triton_on_cuda(monkeypatch):
    """A tuple argument goes to Triton's C launcher as it is (nested parse, no flattening): results
    right, repeated classes skip Triton's run(), and the kernel launched is the one Triton selects,
    for tuples holding 1 (a constexpr there), multiples of 16 and neither."""
    fast = FastKernel(_tuple_probe_kernel)
    slow_calls = []
    original = type(_tuple_probe_kernel).run

    def counting_run(self, *args, **kwargs):
        slow_calls.append(kwargs.get("warmup"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(_tuple_probe_kernel), "run", counting_run)
    x = torch.randn(8192, device="cuda")
    cases = [(1, (1, 0)), (50, (1, 16)), (50, (16, 1)), (50, (3, 17)), (50, (32, 0)), (100, (2, 5)), (7, (1, 1))]

    def call(n, strides):
        out = torch.full((128,), float("nan"), device="cuda")
        fast[(1,)](out, x, n, strides, 2.5, BLOCK=128)
        torch.testing.assert_close(out[:n], x[strides[1] :: strides[0]][:n] * 2.5)
        assert out[n:].isnan().all()

    for case in cases:
        call(*case)
    first = len(slow_calls)
    assert 1 <= first <= len(cases)
    for case in cases:
        call(*case)
    assert len(slow_calls) == first  # tuples keyed: the second pass went around Triton's run()
    for n, strides in cases:
        out = torch.empty(128, device="cuda")
        key = (
            torch.cuda.current_device(),
            tuple(arg_class(a) for a in (out, x, n, strides, 2.5)),
            (("BLOCK", 128),),
        )
        assert fast._kernels[key].kernel is _tuple_probe_kernel.warmup(out, x, n, strides, 2.5, BLOCK=128, grid=(1,))


def test_c_launcher_parses_tuple_arguments_itself():
    """The kernels' stride tuples are bound once and handed to Triton's C launcher whole: its
    generated argument format must parse each tuple itself (Triton 3.6: a nested "(...)", a
    constexpr element taken as any object), or they would need flattening on every call."""
    import re

    from triton.backends.nvidia.driver import make_launcher

    src = make_launcher({}, {"x": "*fp32", "s": ("i32", "constexpr", "i64"), "n": "i32"}, None)
    assert re.findall(r'PyArg_ParseTuple\(args, "([^"]*)"', src) == ["iiiKKppOOOOOOO(iOL)i"]


def test_compiled_calls_the_c_launcher_as_tritons_own_wrapper_does(monkeypatch):
    """`Compiled` skips Triton 3.6's `CudaLauncher.__call__` and calls its C `launch` directly with
    the arguments that wrapper passes (no scratch buffers): the wrapper must still be that one, or
    `Compiled` must fall back to `kernel.run`."""
    import inspect
    import re

    from triton.backends.nvidia.driver import CudaLauncher

    source = re.sub(r"\s+", "", inspect.getsource(CudaLauncher.__call__))
    assert (
        "self.launch(gridX,gridY,gridZ,stream,function,self.launch_cooperative_grid,self.launch_pdl,"
        "global_scratch,profile_scratch,*args)" in source
    )

    class CudaLauncher:  # a stand-in with the same shape: taken directly only without scratch
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid = launch_pdl = False

        def __call__(self, gridX, gridY, gridZ, stream, function, *args):
            raise AssertionError("the wrapper was called")

        def launch(self, *args):
            calls.append(args)

    calls = []

    class Kernel:
        function, packed_metadata, run = "fn", "meta", CudaLauncher()

    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    launch.Compiled(Kernel, ("C",), 0)(1, 2, 3, [10, 11])
    assert calls == [(1, 2, 3, 7, "fn", False, False, None, None, "meta", None, None, None, 10, 11, "C")]
    fn, template, first = launch.Compiled(Kernel, ("C",), 0).template((1, 2, 3), [10, 11])
    fn(*[7 if i == 3 else a for i, a in enumerate(template)])  # what BoundLaunch calls: the same list
    assert calls[-1] == calls[0] and template[first] == 10 and template[3] is None
    Kernel.run.global_scratch_size = 64  # scratch to allocate: through the wrapper (which raises here)
    with pytest.raises(AssertionError, match="wrapper"):
        launch.Compiled(Kernel, (), 0)._fn(0, 0, 0, 0, None)
