"""Benchmarks: the fused zero-init attention op against the eager reference and the peers.

- bench.common: helpers every benchmark shares (environment, timing, peak memory, CSV rows, plots).
- bench.bench_attention: the attention op, forward / backward / forward+backward, swept over shapes.

Results of GPU runs are appended to bench/results/*.csv; CPU runs are smoke tests only and write elsewhere.
"""
