"""Benchmarks: the Fig 10 migration micro-benchmark, step-time profiling, the Fig 16 scheduler benchmark."""
