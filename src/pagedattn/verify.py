"""`pagedattn verify`: run a grid of cases against the reference and print one table.

Each case gets fresh random data, a poisoned `PagedKVCache` filled through the write path, a
NaN-poisoned output buffer, and a checked-mode call of `pagedattn.attention`; the output is
compared with `reference.attention` (float32) at the tolerance of its dtype, and any mismatch is
summarised by `forensics`. `run_case` is what the tests call too, so `pytest` and `verify`
exercise one matrix (`config.seed_grid`).

Contracts:
    full     every sequence's seq_len tokens are appended to the cache, then attention reads them
    context  the cache holds ctx_len tokens, the query tokens' K/V come as k_new / v_new; decode
             sequences read their own token from the cache (decode_from_cache=True, vLLM's
             path), so it is appended before attending (write-before-attend)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from . import dispatch
from .attention import attention
from .config import Case
from .forensics import Report
from .testing import make_step


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    case: str
    contract: str
    kernel: str
    max_abs_err: float
    passed: bool
    summary: str  # forensics one-liner, or the error raised
    seconds: float
    report: Report | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "report"}
        if not math.isfinite(self.max_abs_err):  # strict JSON: NaN (raised) / inf (NaN output) -> null
            d["max_abs_err"] = None
        d["forensics"] = self.report.to_dict() if self.report is not None and not self.passed else None
        return d


def best_device() -> tuple[torch.device, str]:
    """(device, what runs there, in words)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), f"Triton kernels on {torch.cuda.get_device_name()}"
    if dispatch.interpreter_enabled():
        return torch.device("cpu"), "Triton kernels through the interpreter (CPU, TRITON_INTERPRET=1)"
    return torch.device("cpu"), (
        "the PyTorch reference (CPU, TRITON_INTERPRET unset): this checks the "
        "harness, not a kernel; set TRITON_INTERPRET=1 or use a GPU"
    )


def run_case(case: Case, device="cpu", contract: str = "full", seed: int = 0) -> CaseResult:
    """Build the case through the cache, run `attention` (checked) into a NaN-poisoned buffer, compare
    with the reference. Errors raised by the library become a failed result naming them."""
    device = torch.device(device)
    kernel = dispatch.plan_for(case.config, case.shape, device=device, context_contract=contract == "context").kernel
    start = time.perf_counter()
    try:
        step = make_step(case.config, case.shape, device=device, seed=seed, contract=contract)
        out = torch.full_like(step.q, float("nan"))
        attention(
            step.q,
            step.cache,
            step.batch,
            out=out,
            checked=True,
            sliding_window=case.config.sliding_window or None,
            **step.call_options(),
        )
        ref = step.reference()
        report = step.compare(out, ref)
    except Exception as e:  # noqa: BLE001  (a case that raises is a failed case, reported as such)
        return CaseResult(
            case.label(), contract, kernel, math.nan, False, f"{type(e).__name__}: {e}", time.perf_counter() - start
        )
    summary = report.summary() if not report.ok else "ok"
    return CaseResult(
        case.label(),
        contract,
        kernel,
        report.max_abs_err if not report.nan else math.inf,
        report.ok,
        summary,
        time.perf_counter() - start,
        report,
    )
