"""Benchmarks: `make bench` (python -m bench) prints a table and writes reports/bench.json.

Every figure is a ratio of two runs on the same data in the same process, since these machines are noisy.
"""
