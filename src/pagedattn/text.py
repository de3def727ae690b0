"""Small text helpers shared by messages and reports (no torch, no imports from the package)."""

from __future__ import annotations

from collections.abc import Iterable


def runs(values: Iterable[int], limit: int = 12) -> str:
    """Sorted ints as runs: [0, 1, 2, 7, 9, 10] -> "0..2, 7, 9..10"; more than `limit` runs end in ", ..."."""
    spans: list[list[int]] = []
    for v in values:
        v = int(v)
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    text = [f"{a}..{b}" if b > a else f"{a}" for a, b in spans[:limit]]
    return ", ".join(text) + (", ..." if len(spans) > limit else "")


def plural(n: int, word: str, many: str | None = None) -> str:
    """plural(1, "head") -> "1 head"; plural(3, "head") -> "3 heads"."""
    return f"{n} {word if n == 1 else (many or word + 's')}"
