"""Benchmarks reachable as ``nlgraph bench NAME`` (one module per NAME)."""
