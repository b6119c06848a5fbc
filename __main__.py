"""The `llama-adapter` command (also `python -m llama_adapter_triton`): one sub-command per tool.

    llama-adapter finetune --checkpoint llama-7b/ --data alpaca_data.json --out runs/alpaca-7b
    llama-adapter generate --checkpoint llama-7b/ --adapter runs/alpaca-7b/adapter.safetensors --instruction "..."
    llama-adapter bench attention
    llama-adapter COMMAND --help

Each sub-command is its module's own command line (`python -m llama_adapter_triton.train.finetune` is the same).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

PROG = "llama-adapter"

# name -> (module under llama_adapter_triton, what it does)
COMMANDS = {
    "finetune": ("train.finetune", "fine-tune an adapter on Alpaca or chat data (one GPU, or torchrun)"),
    "generate": ("model.generate", "generate with a checkpoint and an adapter, KV-cached"),
    "demo": ("train.demo", "the bundled demo: a tiny base, an adapter fine-tuned on CPU, its answers"),
    "scienceqa": ("train.scienceqa", "ScienceQA: convert its files to records, evaluate a model's accuracy"),
    "compile-check": ("kernels.compile_check", "compile every kernel launch for a GPU arch, without a GPU"),
}
BENCHES = {
    "attention": ("bench.bench_attention", "the op against the eager reference, SDPA, xformers, FlexAttention"),
    "finetune": ("bench.bench_finetune", "fine-tuning steps of a 7B/13B shape; the memory plan and rows"),
    "decode": ("bench.bench_decode", "KV-cache generation, fused against eager"),
    "tune-blocks": ("bench.tune_blocks", "block-size sweep of the op's Triton kernels"),
    "kernel-launches": ("bench.kernel_launches", "one small forward + backward through every kernel"),
}


def _usage(prog: str, table: dict[str, tuple[str, str]]) -> str:
    width = max(map(len, table)) + 2
    rows = "\n".join(f"  {name:<{width}}{what}" for name, (_, what) in table.items())
    return f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for its options)\n\ncommands:\n{rows}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table, prog = COMMANDS | {"bench": ("", "benchmarks: " + ", ".join(BENCHES))}, PROG
    if argv[:1] == ["bench"]:
        table, prog, argv = BENCHES, f"{PROG} bench", argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(prog, table))
        return 0
    if argv[0] not in table:
        print(f"{_usage(prog, table)}\n{prog}: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__package__}.{table[argv[0]][0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
