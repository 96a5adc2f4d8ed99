"""Benchmarks: each prints a table with its baseline measured side by side in the same run."""
