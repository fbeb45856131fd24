"""Experiments: benchmarks (experiments/bench/) and sweeps (python -m experiments.sweep)."""
