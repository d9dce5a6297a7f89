"""Benchmarks: offline engine throughput and an HTTP load generator."""
