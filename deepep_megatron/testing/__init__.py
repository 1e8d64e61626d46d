"""Helpers for tests and benchmarks: a pool of rank processes and plain reference implementations."""
