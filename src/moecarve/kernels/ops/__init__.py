"""Kernels, one op a module (`moe_ffn.py`, which imports triton), and their PyTorch reference."""
