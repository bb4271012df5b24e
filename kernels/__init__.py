"""Triton kernels for NVFP4 (installed as `nvfp4_ext.kernels`); importable without Triton."""
