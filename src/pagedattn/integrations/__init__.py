"""Bridges from model libraries to pagedattn's kernels: `transformers` (Hugging Face continuous batching)."""
