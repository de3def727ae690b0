"""roofline.png from a results dict (results.json): each workload's achieved TFLOP/s against its
arithmetic intensity (FLOP per byte of K/V), under the two ceilings measured in the same run:
the read-bandwidth slope (TFLOP/s = TB/s x FLOP/byte) and the bf16 matmul roof. A point on the
slope reads K/V at the measured bandwidth; a point on the roof computes at the matmul rate.
vLLM's anchor times (an H100, workloads.json) are drawn as hollow markers at the same intensity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def roofline(results: dict, path: Path | str, *, with_sweeps: bool = True) -> Path:
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed (Agg)

    ceilings = results["ceilings"]
    bw, mm = ceilings["read_tbs"], ceilings["mm_tflops"]
    timed = [r for r in results["rows"] if r.get("ms") and r.get("flops") and r.get("kv_bytes")]
    workloads = [r for r in timed if r.get("kind", "workload") == "workload"]
    variants = [r for r in timed if r.get("kind") == "sweep"] if with_sweeps else []

    xs = [r["flops"] / r["kv_bytes"] for r in timed] or [1.0, 1e4]
    x_lo, x_hi = min(min(xs) / 2, mm / bw / 10), max(max(xs) * 2, mm / bw * 10)
    grid = np.logspace(np.log10(x_lo), np.log10(x_hi), 256)

    fig = Figure(figsize=(10, 7), layout="constrained")
    ax = fig.subplots()
    ax.loglog(grid, np.minimum(bw * grid, mm), color="black", lw=1.5)
    ax.loglog(grid, bw * grid, color="gray", lw=0.8, ls=":")
    ax.axhline(mm, color="gray", lw=0.8, ls=":")
    x_label = (x_lo * mm / bw) ** 0.5 / 3
    ax.annotate(
        f"read bandwidth {bw:.2f} TB/s",
        (x_label, bw * x_label * 1.3),
        ha="right",
        va="bottom",
        fontsize=8,
        color="dimgray",
    )
    ax.annotate(
        f"bf16 matmul {mm:.0f} TFLOP/s", (x_hi / 1.5, mm * 1.05), ha="right", va="bottom", fontsize=8, color="dimgray"
    )

    if variants:
        ax.scatter(
            [r["flops"] / r["kv_bytes"] for r in variants],
            [r["flops"] / r["ms"] / 1e9 for r in variants],
            s=14,
            color="silver",
            zorder=2,
            label="sweep variants",
        )
    colors = iter(matplotlib.colormaps["tab10"].colors)
    placed: list[tuple[float, float]] = []
    for r in sorted(workloads, key=lambda r: -r["flops"] / r["ms"]):
        x, y = r["flops"] / r["kv_bytes"], r["flops"] / r["ms"] / 1e9
        color = next(colors, "C0")
        ax.scatter([x], [y], s=45, color=color, zorder=3)
        label = r["name"]
        if r.get("pct_roofline") is not None:
            label += f"  {r['pct_roofline']:.0f}%"
        # a label near earlier ones (labels run ~1 decade right) goes one line below them
        near = sum(abs(np.log10(x / px)) < 1.0 and abs(np.log10(y / py)) < 0.35 for px, py in placed)
        ax.annotate(
            label,
            (x, y),
            xytext=(8, 4 - 11 * near),
            textcoords="offset points",
            fontsize=8,
            color=color,
            arrowprops=dict(arrowstyle="-", color=color, lw=0.5) if near else None,
        )
        placed.append((x, y))
        anchor = r.get("anchors", {}).get("vllm-unified", {}).get("ms")
        if anchor:
            ax.scatter([x], [r["flops"] / anchor / 1e9], s=45, facecolors="none", edgecolors=color, zorder=3)
    if any(r.get("anchors", {}).get("vllm-unified") for r in workloads):
        ax.scatter([], [], s=45, facecolors="none", edgecolors="black", label="vLLM unified_attention (H100 anchor)")
    ax.scatter([], [], s=45, color="black", label="pagedattn (this run)")

    ys = [r["flops"] / r["ms"] / 1e9 for r in timed] or [1.0]
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(min(min(ys) / 2, bw * x_lo), mm * 2)
    ax.set_xlabel("arithmetic intensity (FLOP per byte of K/V read)")
    ax.set_ylabel("achieved TFLOP/s")
    meta = results.get("meta", {})
    ax.set_title(f"pagedattn roofline — {meta.get('device', '?')} ({meta.get('date', '')})", fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(loc="lower right", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path
