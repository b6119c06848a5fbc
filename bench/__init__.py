"""Benchmarks: the fused zero-init attention op against the eager reference and the peers.

- bench.common: helpers every benchmark shares (environment, timing, peak memory, CSV rows, plots).
- bench.bench_attention: the attention op, forward / backward / forward+backward, swept over shapes.
- bench.bench_finetune: fine-tuning steps of a 7B/13B-shaped model with the adapter: packed vs padded to 512 vs
  the official eager formulation; tokens/s, peak memory, the projected time of 5 epochs of Alpaca-52K.
- bench.bench_decode: generation with the KV cache (batch 1 and 16), the fused op vs the eager formulation.
- bench.tune_blocks: a block-size sweep of the op's Triton kernels (one kernel at a time, each candidate checked
  against the default blocks' results, then timed); it suggests changes to kernels/zero_init_attn.py's _blocks.

Results of GPU runs are appended to bench/results/*.csv; CPU runs are smoke tests only and write elsewhere.
"""
