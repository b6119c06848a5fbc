#!/usr/bin/env bash
# What a session lent a GPU runs, in stages of at most 10 minutes (one device call each; the
# device machine has torch, triton and every other dependency, but no internet and no xformers).
# Results land in $OUT (the device tool brings them back); commit them under bench/results/.
#
#   bash bench/gpu_session.sh tests            # the whole suite, kernels compiled, all dtypes
#   bash bench/gpu_session.sh attention        # the headline sweep: bf16, head dim 128, LLaMA-7B heads
#   bash bench/gpu_session.sh attention-rest   # head dim 64, fp16 and the GQA shape
#   bash bench/gpu_session.sh report           # ratio table, targets, plot from $OUT's CSV rows
#   bash bench/gpu_session.sh finetune         # fine-tuning steps, LLaMA-7B shape: ours_packed, ours_padded512,
#                                              #   eager_padded512 (a few minutes, estimated: not yet run on a GPU)
#   bash bench/gpu_session.sh finetune-13b     # the same for LLaMA-13B ("skipped: out of memory" rows if not)
#   bash bench/gpu_session.sh decode           # KV-cache generation, LLaMA-7B shape, batch 1 and 16, fused/eager
#   bash bench/gpu_session.sh tune             # block-size sweep of the fwd, dkdv and dq kernels (bf16, head dim 128,
#                                              #   LLaMA-7B heads, seqlen 512-4096): suggested _blocks changes; about
#                                              #   3 minutes by its own estimate, stopped cleanly at 480 s
# Each stage prints its progress (one line per provider) and appends to $OUT/<benchmark>.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  tests|attention|attention-rest|report|finetune|finetune-13b|decode|tune) ;;
  *) echo "usage: bash bench/gpu_session.sh tests|attention|attention-rest|report|finetune|finetune-13b|decode|tune" >&2
     exit 2 ;;
esac
PY=${PYTHON:-python3}  # the device machine's python3 holds torch
OUT=${OUT:-runs/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch, triton, subprocess
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("torch", torch.__version__, "triton", triton.__version__)
print("commit", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
PY
case "${1:-}" in
  tests)
    "$PY" -m pytest -q -ra --durations=20 --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/tests.log" ;;
  attention)
    "$PY" -m bench.bench_attention --dtypes bf16 --headdims 128 --shapes 7b --out "$OUT" 2>&1 \
      | tee "$OUT/attention.log" ;;
  attention-rest)
    "$PY" -m bench.bench_attention --dtypes bf16,fp16 --headdims 64,128 --shapes gqa --out "$OUT" 2>&1 \
      | tee "$OUT/attention-rest.log"
    "$PY" -m bench.bench_attention --dtypes fp16 --headdims 64,128 --shapes 7b --out "$OUT" 2>&1 \
      | tee -a "$OUT/attention-rest.log" ;;
  report)
    "$PY" -m bench.bench_attention --report "$OUT/attention.csv" --out "$OUT" 2>&1 | tee "$OUT/report.log" ;;
  finetune)
    timeout 570 "$PY" -m bench.bench_finetune --models llama-7b --out "$OUT" 2>&1 | tee "$OUT/finetune.log" ;;
  finetune-13b)
    timeout 570 "$PY" -m bench.bench_finetune --models llama-13b --out "$OUT" 2>&1 | tee "$OUT/finetune-13b.log" ;;
  decode)
    timeout 570 "$PY" -m bench.bench_decode --models llama-7b --out "$OUT" 2>&1 | tee "$OUT/decode.log" ;;
  tune)
    timeout 570 "$PY" -m bench.tune_blocks --time-budget 480 --out "$OUT" 2>&1 | tee "$OUT/tune.log" ;;
esac
