"""Benchmark harness: `python -m benchmarks <op> --device cpu|cuda`. One file per op: bench_<op>.py."""
