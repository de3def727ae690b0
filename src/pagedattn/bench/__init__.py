"""`pagedattn bench`: workloads.py (the standard workloads, sweeps, accounting, inputs), runner.py
(the timed run and its tables), plot.py (roofline.png). The arguments live in `pagedattn.cli.bench`."""
