"""Benchmarks: they report numbers (bench/results/, docs/benchmarks.md) and never fail CI."""
