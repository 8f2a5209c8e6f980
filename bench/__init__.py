"""Benchmarks of the volume engine, each reported as a ratio to an anchor from the same run.

`python bench/run.py` (or `make bench`) runs them all; see bench/README.md.
"""
