"""`AttentionOptions`: the per-model attention options, in one frozen object.

Every entry point takes the same options; they are declared here once instead of in each
signature. Scalars are checked when the object is built; tensors (ALiBi slopes, sinks, scales)
when an attention is planned with them, against its head count and device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .validate import check_option_scalars

OPTION_NAMES = (
    "scale",
    "sliding_window",
    "alibi_slopes",
    "softcap",
    "sinks",
    "k_scale",
    "v_scale",
    "kv_layout",
    "q_scale",
    "out_scale",
)


@dataclass(frozen=True, eq=False)
class AttentionOptions:
    """Attention options shared by every layer of a model.

    Parameters
    ----------
    scale : float, optional
        Softmax scale; default 1 / sqrt(head_size).
    sliding_window : int, optional
        W > 0: a query at position p sees keys j with p - W < j <= p (itself and W - 1 before). None
        or 0: no window.
    alibi_slopes : torch.Tensor, optional
        [num_q_heads] float32: logits += slope[h] * (j - p).
    softcap : float, optional
        logits -> softcap * tanh(logits / softcap) (before ALiBi). None or 0: off.
    sinks : torch.Tensor, optional
        [num_q_heads] float32: an extra logit per head that joins the softmax denominator.
    k_scale, v_scale : float, one-element tensor or [num_kv_heads] float tensor, optional
        fp8 caches hold k / k_scale and v / v_scale, per tensor or per KV head (required for fp8
        caches, ignored otherwise).
    kv_layout : {"nhd", "hnd", "vllm_v0"}
        The caches' dimension order: "nhd" [num_blocks, block_size, num_kv_heads, head_size],
        "hnd" [num_blocks, num_kv_heads, block_size, head_size], "vllm_v0" vLLM's older split-x
        K layout. Caches may have any strides (views of a larger buffer, K and V halves of one
        tensor): every tensor is read with its own strides.
    q_scale : float or one-element tensor, optional
        fp8 (e4m3) queries: the real query is q_fp8 * q_scale (required for fp8 q, ignored otherwise).
    out_scale : float or one-element tensor, optional
        fp8 (e4m3) output: it holds out / out_scale saturated to +-448 (vLLM's output_scale;
        required for an fp8 output, ignored otherwise).

    Every scale is a per-model default: `PagedAttention.run` takes per-layer device tensors.
    """

    scale: float | None = None
    sliding_window: int | None = None
    alibi_slopes: torch.Tensor | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    k_scale: float | torch.Tensor | None = None
    v_scale: float | torch.Tensor | None = None
    kv_layout: str = "nhd"
    q_scale: float | torch.Tensor | None = None
    out_scale: float | torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_option_scalars(
            scale=self.scale, sliding_window=self.sliding_window, softcap=self.softcap, kv_layout=self.kv_layout
        )

    def replace(self, **changes) -> AttentionOptions:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in OPTION_NAMES}
