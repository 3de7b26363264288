"""Benchmark harness: methods x workloads on one model, side by side."""
