"""Benchmarks and GPU-host scripts (run on a lent H100/H200; see bench/README.md)."""
