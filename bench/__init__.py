"""Benchmarks: `python -m bench.generation` (continuous batching vs static batches)."""
