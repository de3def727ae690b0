"""Triton kernels, one file per kernel family: the `@triton.jit` kernel(s), then a thin launcher."""
