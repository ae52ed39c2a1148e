"""Attention and sampling kernels.

Each kernel has a plain-PyTorch reference (`*_reference.py`), which is the CPU path and the oracle
for the Triton versions. This package imports nothing else of rollout_accel.
"""
