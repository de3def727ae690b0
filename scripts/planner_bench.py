"""The planner's host-time table: now `pagedattn bench --host-only` (kept under its old name).

PYTHONPATH=src python3 scripts/planner_bench.py [--out DIR] [--workloads a,b] [--quick]
"""

from __future__ import annotations

import sys

from pagedattn.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "--host-only", *sys.argv[1:]]))
