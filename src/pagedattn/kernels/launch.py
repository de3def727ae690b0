"""Launching Triton kernels without Triton's per-call argument binder.

`JITFunction.run` binds every argument through generated code and `native_specialize_impl` on each
call (19 us for the attention kernel's 38 runtime arguments on our development CPU, about twice
that on the H100 host), then builds a cache key string. `FastKernel` computes an equivalent key
itself, cheaper, and launches the kernel Triton compiled for it directly. The first call with a
new key, and every call while a launch hook, debug mode or a pre-run hook is set, goes through
Triton unchanged (so does the CPU interpreter).

The key holds exactly what Triton specializes on (Triton 3.6; `tests/test_launch.py` checks
the classes against `native_specialize_impl`): for each tensor its dtype and whether its address
is a multiple of 16; for each int whether it is 1, whether it is a multiple of 16 and whether it
fits 32 or 64 bits; the type of anything else; for a tuple (the kernels' per-tensor strides)
the class of each element, which Triton specializes as it would the element alone; and every
keyword (constexprs, num_warps, num_stages) with its value. Two calls with equal keys get the same
compiled kernel from Triton.

Tuple arguments go to Triton's C launcher as they are: it parses each one with a nested "(...)"
format (Triton 3.6's `make_launcher`), so nothing is flattened per call. Tensors are passed as
addresses only at the top level, so a tuple holding a tensor is not keyed (Triton's own path).
"""

from __future__ import annotations

import os

import torch
from triton import knobs


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# PAGEDATTN_TRITON_LAUNCH=1: every launch through Triton's own path (to compare, or to rule this out)
ALWAYS_TRITON = os.environ.get("PAGEDATTN_TRITON_LAUNCH", "0") not in ("", "0")

_I32 = (-(2**31), 2**31)
_I64 = (-(2**63), 2**63)


def arg_class(a):
    """What Triton specializes on for one runtime argument (None: a type this module does not key)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, (a.data_ptr() & 15) == 0
    cls = a.__class__
    if cls is int:
        width = 0 if _I32[0] <= a < _I32[1] else 1 if _I64[0] <= a < _I64[1] else 2
        return a == 1, (a & 15) == 0, width
    if cls is float or cls is bool or a is None:
        return cls
    if cls is tuple:  # not a namedtuple: Triton types those apart
        classes = tuple(arg_class(x) for x in a)
        if None in classes or any(isinstance(x, torch.Tensor) for x in a):
            return None
        return tuple, classes
    return None


class FastKernel:
    """`FastKernel(jit_fn)[grid](*args, **kwargs)` launches like `jit_fn[grid](*args, **kwargs)`:
    runtime arguments positional (the first one a tensor: its device decides), constexprs and
    launch options as keywords."""

    def __init__(self, fn):
        self.fn = fn
        self._kernels: dict[tuple, Compiled] = {}

    def __getitem__(self, grid: tuple[int, ...]):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple[int, ...], args, kwargs: dict):
        """Launch; returns the `Compiled` entry when the launch went through the fast path or
        compiled for it (what `BoundLaunch` keeps), else None."""
        if (
            ALWAYS_TRITON
            or not (args and getattr(args[0], "is_cuda", False))
            or interpreter_enabled()
            or _hooks_set(self.fn)
        ):
            self.fn[grid](*args, **kwargs)
            return
        classes = tuple(arg_class(a) for a in args)
        if None in classes:
            self.fn[grid](*args, **kwargs)
            return
        device = torch.cuda.current_device()
        key = (device, classes, tuple(kwargs.items()))
        entry = self._kernels.get(key)
        if entry is None:
            kernel = self.fn[grid](*args, **kwargs)
            if kernel is None:  # Triton's run was replaced (scripts/sm90_call_compile.py compiles only)
                return
            if hasattr(kernel, "result"):  # an asynchronous compile
                kernel = kernel.result()
            names = self.fn.arg_names[len(args) :]  # the constexprs, in signature order
            if set(names) <= kwargs.keys():
                entry = self._kernels[key] = Compiled(kernel, tuple(kwargs[n] for n in names), device)
            return entry
        size = len(grid)
        entry(
            grid[0],
            grid[1] if size > 1 else 1,
            grid[2] if size > 2 else 1,
            [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args],
        )
        return entry


class Compiled:
    """A kernel Triton compiled, launched with its runtime arguments (pointers as ints) and no
    binder: `entry(g0, g1, g2, args)`.

    Pointers go to Triton's C launcher as ints: for a tensor it would call `data_ptr()` and then
    `cuPointerGetAttribute` (a driver call) per pointer argument, each launch. Where the launcher
    is Triton 3.6's `CudaLauncher` with no scratch memory, its C entry is called directly (its
    Python `__call__` only adds the scratch buffers, None here); otherwise `kernel.run`."""

    __slots__ = ("kernel", "constexprs", "device", "_fn", "_head")

    def __init__(self, kernel, constexprs: tuple, device: int):
        self.kernel, self.constexprs, self.device = kernel, constexprs, device
        launcher = kernel.run
        if _is_plain_cuda_launcher(launcher):
            self._fn = launcher.launch
            self._head = (
                kernel.function,
                launcher.launch_cooperative_grid,
                launcher.launch_pdl,
                None,  # global scratch
                None,  # profile scratch
                kernel.packed_metadata,
                None,  # launch metadata
                None,  # enter hook
                None,  # exit hook
            )
        else:
            self._fn = launcher
            self._head = (kernel.function, kernel.packed_metadata, None, None, None)

    def __call__(self, g0: int, g1: int, g2: int, args) -> None:
        self._fn(g0, g1, g2, torch._C._cuda_getCurrentRawStream(self.device), *self._head, *args, *self.constexprs)

    def template(self, grid: tuple[int, int, int], args: list) -> tuple:
        """(launcher, its whole argument list with the stream at index 3 still None, index of
        args[0] in it): what `BoundLaunch` fills per call (the stream, its slots) and calls."""
        return self._fn, [*grid, None, *self._head, *args, *self.constexprs], 4 + len(self._head)


def _is_plain_cuda_launcher(launcher) -> bool:
    """Triton 3.6's CudaLauncher, whose `__call__(gridX, gridY, gridZ, stream, function, *args)`
    calls `launch(gridX, gridY, gridZ, stream, function, cooperative, pdl, global_scratch,
    profile_scratch, *args)`, with no scratch to allocate."""
    cls = type(launcher)
    code = getattr(cls.__dict__.get("__call__"), "__code__", None)
    return (
        cls.__name__ == "CudaLauncher"
        and code is not None
        and code.co_varnames[:6] == ("self", "gridX", "gridY", "gridZ", "stream", "function")
        and callable(getattr(launcher, "launch", None))
        and getattr(launcher, "global_scratch_size", 1) == 0
        and getattr(launcher, "profile_scratch_size", 1) == 0
        and hasattr(launcher, "launch_cooperative_grid")
        and hasattr(launcher, "launch_pdl")
    )


class BoundLaunch:
    """One launch with every argument bound except a few tensors, given per call: what a plan
    holds for each of its kernels so that `PagedAttention.run` does nothing but launch.

    `slots` are the argument positions the per-call tensors fill; `uses` picks, from the tensors a
    call passes, those that go into the slots (default: the first len(slots)). A call passes the
    tensors' addresses (`ptrs`, ints) and the tensors themselves (for Triton's own path, taken by
    the first call of each alignment pattern, by the interpreter and off CUDA). The compiled kernel
    is looked up once per alignment pattern of those addresses (what Triton specializes pointers
    on; their dtypes and strides are part of the binding, fixed by the caller). The bound tensors
    are passed to the launcher as addresses too (`Compiled`); the binding keeps them alive."""

    __slots__ = ("kernel", "grid", "args", "slots", "uses", "kwargs", "_compiled", "_ints", "_pairs")

    def __init__(
        self,
        kernel: FastKernel,
        grid: tuple[int, ...],
        args: list,
        slots: tuple[int, ...],
        kwargs: dict,
        uses: tuple[int, ...] | None = None,
    ):
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.args = list(args)
        self.slots = slots
        self.uses = tuple(range(len(slots))) if uses is None else uses
        self.kwargs = kwargs
        # alignment pattern -> (launcher, argument list template, (position, ptrs index) pairs, device)
        self._compiled: dict[int, tuple] = {}
        self._ints = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in self.args]
        self._pairs = tuple(zip(self.slots, self.uses))

    def __call__(self, ptrs, tensors) -> None:
        """`ptrs[i]` is `tensors[i].data_ptr()`."""
        aligned = 0
        for _, i in self._pairs:
            aligned = (aligned << 1) | ((ptrs[i] & 15) == 0)
        entry = self._compiled.get(aligned)
        if entry is None:
            args = self.args.copy()
            for slot, i in self._pairs:
                args[slot] = tensors[i]
            compiled = self.kernel.launch(self.grid, args, self.kwargs)
            if compiled is not None:
                fn, template, first = compiled.template(self.grid, self._ints)
                self._compiled[aligned] = (fn, template, tuple((first + s, i) for s, i in self._pairs), compiled.device)
            return
        fn, template, positions, device = entry
        call = template.copy()
        call[3] = torch._C._cuda_getCurrentRawStream(device)
        for at, i in positions:
            call[at] = ptrs[i]
        fn(*call)


def _hooks_set(fn) -> bool:
    runtime = knobs.runtime
    return bool(
        runtime.launch_enter_hook.calls
        or runtime.launch_exit_hook.calls
        or runtime.debug
        or knobs.compilation.instrumentation_mode
        or fn.pre_run_hooks
        or fn.debug
    )
