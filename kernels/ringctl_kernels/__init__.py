"""Triton block kernels for ring attention (see docs/internals.md)."""
