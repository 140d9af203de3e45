"""Triton kernels, each beside a plain PyTorch reference, with a per-device dispatcher."""
