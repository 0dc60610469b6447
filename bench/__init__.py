"""Benchmarks and studies; run each from the repository root as `python -m bench.<name>`."""
