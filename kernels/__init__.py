"""Numba kernels on flat numpy arrays (installed as p2pdl.kernels)."""
