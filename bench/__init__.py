"""Benchmarks and load profiles of ipam (`make bench`, `make load`)."""
