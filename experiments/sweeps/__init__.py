"""Sweep files for ``python -m experiments.sweep`` (each defines ``get_sweep()``)."""
