"""Benchmarks: ``python -m benchmarks --list``; see harness.py and docs/benchmarks.md."""
