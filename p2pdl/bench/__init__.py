"""Benchmarks run by `python -m p2pdl bench …`."""
