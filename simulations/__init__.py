"""Local simulations, synthetic data and benchmarks of fedseg."""
