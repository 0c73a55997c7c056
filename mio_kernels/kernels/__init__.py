"""Triton kernels: one kernel and its launcher per file; launch configs in config.py."""
