#!/usr/bin/env bash
# What a session lent a GPU runs: one or more stages per device call (each call at most 10 minutes; the
# device machine has torch, triton and every other dependency, but no internet and no xformers).
#
#   bash bench/gpu_session.sh tests            # the whole suite, kernels compiled, all dtypes
#   bash bench/gpu_session.sh attention        # the headline sweep: bf16, head dim 128, LLaMA-7B heads
#   bash bench/gpu_session.sh attention-rest   # head dim 64, fp16 and the GQA shape
#   bash bench/gpu_session.sh report           # ratio table, targets, plot from this call's attention CSV rows
#   bash bench/gpu_session.sh finetune         # fine-tuning steps, LLaMA-7B shape: ours_packed, ours_padded512,
#                                              #   eager_padded512
#   bash bench/gpu_session.sh finetune-13b     # the same for LLaMA-13B ("skipped: out of memory" rows if not)
#   bash bench/gpu_session.sh decode           # KV-cache generation, LLaMA-7B shape, batch 1 and 16, fused/eager;
#                                              #   then batch 16 of uneven prompts (left-padded, --ragged)
#   bash bench/gpu_session.sh tune             # block-size sweep of the fwd, dkdv and dq kernels (bf16, head dim 128,
#                                              #   LLaMA-7B heads, seqlen 512-4096): suggested _blocks changes; about
#                                              #   3 minutes by its own estimate, stopped cleanly at 480 s
#   bash bench/gpu_session.sh attention report decode   # several stages in one call, in this order
#
# A plan for a 30-minute lease (none of these durations was measured yet: the first GPU session should write
# the real ones here), three calls back to back so that the machine stays warm:
#   1. tests                        the first compiled run of every kernel: nothing else means much if it fails
#   2. attention report decode      the headline numbers against the targets
#   3. finetune tune                the end-to-end target, then the block sweep
# then, with time left: attention-rest, finetune-13b.
#
# Outputs: every stage writes under runs/gpu-session/ (CSV rows appended per benchmark, plots, summaries, a log
# per stage). When $OUT is set (the device tool's folder), the call ends by packing that folder into one
# $OUT/gpu-session-<stages>.tar.gz and copying its combined log to $OUT/session.log: the device tool brings back
# at most 8 files. Unpack it here and commit the results under bench/results/ with bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES="tests attention attention-rest report finetune finetune-13b decode tune"
if [ $# -eq 0 ]; then
  echo "usage: bash bench/gpu_session.sh STAGE [STAGE ...] with STAGE one of: $STAGES" >&2
  exit 2
fi
for stage in "$@"; do
  case " $STAGES " in
    *" $stage "*) ;;
    *) echo "gpu_session.sh: unknown stage '$stage'; stages: $STAGES" >&2
       exit 2 ;;
  esac
done
PY=${PYTHON:-python3}  # the device machine's python3 holds torch
WORK=runs/gpu-session
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
"$PY" - <<'PY' | tee "$WORK/env.txt"
import torch, triton, subprocess
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("torch", torch.__version__, "triton", triton.__version__)
print("commit", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
PY
status=0
for stage in "$@"; do
  echo "=== gpu_session.sh $stage ($(date -u +%H:%M:%S) UTC)"
  case "$stage" in
    tests)
      "$PY" -m pytest -q -ra --durations=20 --junitxml="$WORK/junit.xml" ;;
    attention)
      "$PY" -m bench.bench_attention --dtypes bf16 --headdims 128 --shapes 7b --out "$WORK" ;;
    attention-rest)
      "$PY" -m bench.bench_attention --dtypes bf16,fp16 --headdims 64,128 --shapes gqa --out "$WORK" &&
        "$PY" -m bench.bench_attention --dtypes fp16 --headdims 64,128 --shapes 7b --out "$WORK" ;;
    report)
      "$PY" -m bench.bench_attention --report "$WORK/attention.csv" --out "$WORK" ;;
    finetune)
      timeout 570 "$PY" -m bench.bench_finetune --models llama-7b --out "$WORK" ;;
    finetune-13b)
      timeout 570 "$PY" -m bench.bench_finetune --models llama-13b --out "$WORK" ;;
    decode)
      timeout 400 "$PY" -m bench.bench_decode --models llama-7b --out "$WORK" &&
        timeout 170 "$PY" -m bench.bench_decode --models llama-7b --batch-sizes 16 --ragged yes --out "$WORK" ;;
    tune)
      timeout 570 "$PY" -m bench.tune_blocks --time-budget 480 --out "$WORK" ;;
  esac 2>&1 | tee "$WORK/$stage.log"
  rc=${PIPESTATUS[0]}
  echo "=== gpu_session.sh $stage: exit $rc"
  [ "$rc" -eq 0 ] || status=$rc
done
if [ -n "${OUT:-}" ]; then
  cat "$WORK/env.txt" $(printf "$WORK/%s.log " "$@") > "$OUT/session.log"
  tar -czf "$OUT/gpu-session-$(IFS=-; echo "$*").tar.gz" -C "$WORK" .
fi
exit $status
