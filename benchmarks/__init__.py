"""Benchmarks of diffmem: ``compare.py`` (comparison table) and the pytest-benchmark suite."""
