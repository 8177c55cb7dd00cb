"""Benchmarks: throughput, MFU, kernel speed; each prints a table and writes bench/results/*.json."""
import common  # noqa: F401  (first: its __init__ quiets C++ logging before anything imports JAX)
