"""Offline tools that need no GPU: sm90.py compiles the kernels one call would launch for sm_90
(what tests/test_compile_sm90.py checks); compile_check.py reports resources per configuration
from a bare signature."""
