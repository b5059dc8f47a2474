"""Benchmarks (scripts; tests import the link emulator, bench.linkem)."""
