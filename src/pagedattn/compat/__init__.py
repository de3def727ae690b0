"""Entry points with other libraries' signatures over pagedattn's kernels (`compat.vllm`)."""
