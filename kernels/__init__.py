"""Triton kernels of rim_fast, installed as ``rim_fast.kernels`` (never a top-level ``kernels`` module)."""
