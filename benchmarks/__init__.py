"""Benchmarks (`make bench`): measurements of one run, printed as tables; never tests."""
