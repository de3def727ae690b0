"""Benchmarks behind `pagedattn bench`: workloads.py (the standard workloads, sweeps, accounting, inputs), runner.py (the command), plot.py (roofline.png)."""
