"""The exception hierarchy: one base, specific subclasses.

Every message names the argument, what was expected and what came, e.g.
``block_table[3, 7] = 912 is out of range for a cache of 640 blocks``.
Validation happens once, at the public boundary, before any kernel launches.
"""

from __future__ import annotations


class PagedAttentionError(Exception):
    """Base of every error pagedattn raises on purpose."""


class ShapeError(PagedAttentionError, ValueError):
    """A tensor has the wrong rank or size."""


class DTypeError(PagedAttentionError, TypeError):
    """A tensor has the wrong dtype."""


class DeviceError(PagedAttentionError, ValueError):
    """Tensors that must share a device do not."""


class LayoutError(PagedAttentionError, ValueError):
    """A tensor is non-contiguous where that is required, or aliases another tensor."""


class BatchMetadataError(PagedAttentionError, ValueError):
    """cu_seqlens_q / seq_lens / block_table are inconsistent."""


class UnsupportedConfigError(PagedAttentionError, ValueError):
    """A configuration value (head size, block size, window, ...) is out of the supported range."""


class ScaleError(PagedAttentionError, ValueError):
    """An fp8 scale is missing, non-finite or not positive."""


class CacheFullError(PagedAttentionError, RuntimeError):
    """The block allocator has no free block left; the cache is unchanged."""


class SequenceError(PagedAttentionError, KeyError):
    """An unknown or already-freed sequence id was used."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class ContractError(PagedAttentionError, RuntimeError):
    """Checked mode found a violation of a cache contract."""


class UnwrittenKVError(ContractError):
    """Checked mode: a position the kernel will read was never written."""


class SlotConflictError(ContractError):
    """Checked mode: a write maps two tokens to one slot, or a block is not owned by the sequence."""


class NonFiniteKVError(PagedAttentionError, ValueError):
    """Checked mode: a position the kernel will read holds NaN/inf that is not the poison pattern
    (the slot was written, with non-finite values): the caller's data, not an unwritten slot."""
