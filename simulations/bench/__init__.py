"""Benchmarks behind the numbers in docs/BENCHMARKS.md: rerun them, do not trust them."""
