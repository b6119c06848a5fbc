#!/usr/bin/env bash
# What a session lent a GPU runs. The device machine has torch 2.11, triton 3.6, transformers, peft, pytest,
# pytest-benchmark, sentencepiece, tiktoken and matplotlib, but no internet and no xformers.
#
# FIRST, in one device call of at most 8 minutes (the lease may be 15 minutes in all, machine start included):
#
#   bash bench/gpu_session.sh --plan quick      # here: the steps, their timeouts and the total (runs nothing)
#   bash bench/gpu_session.sh --fetch-wheels    # here: pytest-xdist into .whl/ (ignored by git), to compile the
#                                               #   kernel tests in 8 processes there; optional, but without it
#                                               #   the kernel tests may not all finish inside their timeout;
#                                               #   and bitsandbytes (43 MB: --quantize, the memory stages'
#                                               #   int8/nf4 rows and their tests) and liger-kernel (the fused
#                                               #   loss on CUDA), which the device machine does not have
#   device run: bash bench/gpu_session.sh quick    (carry: [".whl"], timeout_s: 560)
#
# The quick plan, each step under its own timeout, its results copied to $OUT as soon as it ends (a call killed
# at its limit still returns what the finished steps wrote):
#   1. env        the GPU, torch, triton and the commit                        -> $OUT/quick-1-env.txt
#   2. kernels    tests/test_zero_init_attention.py compiled, every dtype      -> $OUT/quick-2-kernels.log
#   3. gpu-tests  the other GPU tests and the model, fine-tuning, generation and multi-modal tests on CUDA
#                 (pytest -m "gpu or gpu_leg")                                  -> $OUT/quick-3-gpu-tests.log
#   4. attention  bf16, head dim 128, 32 heads, seqlen 1024/2048/4096, 16k tokens, forward+backward: fused,
#                 fused_atomic, causal SDPA (torch's default backend and flash forced), two SDPA calls, eager;
#                 the ratio table against the targets                          -> $OUT/quick-4-attention.tar.gz
#   5. finetune   fine-tuning steps of the LLaMA-7B shape: ours packed vs eager padded to 512, tokens/s and
#                 peak memory                                                   -> $OUT/quick-5-finetune.tar.gz
#   6. sanitizer  compute-sanitizer memcheck on one small launch of each kernel (if it is on the machine)
#                                                                               -> $OUT/quick-6-sanitizer.log
# Then commit the CSV rows under bench/results/ and bench/RESULTS.md (date, GPU, commit, the SDPA backends that
# ran) and say in the note which targets are met.
#
# Longer leases, several stages per call (each call at most 10 minutes):
#   bash bench/gpu_session.sh tests            # the whole suite, kernels compiled, all dtypes
#   bash bench/gpu_session.sh attention        # the headline sweep: bf16, head dim 128, LLaMA-7B heads
#   bash bench/gpu_session.sh attention-rest   # head dim 64, fp16 and the GQA shape
#   bash bench/gpu_session.sh report           # ratio table, targets, plot from this call's attention CSV rows
#   bash bench/gpu_session.sh finetune         # fine-tuning steps, LLaMA-7B shape: ours_packed, ours_padded512,
#                                              #   eager_padded512
#   bash bench/gpu_session.sh finetune-13b     # the same for LLaMA-13B ("skipped: out of memory" rows if not)
#   bash bench/gpu_session.sh memory           # bench_finetune --memory, Llama-2-7B shape: peak memory and tokens/s
#                                              #   of bf16 / int8 / nf4 bases x activation checkpointing, packed
#                                              #   16k- and 512-token micro-batches, next to the predictions
#   bash bench/gpu_session.sh memory-13b memory-70b   # the same for 13B and 70B (rows that do not fit say so)
#   bash bench/gpu_session.sh decode           # KV-cache generation, LLaMA-7B shape, batch 1 and 16, fused/eager;
#                                              #   then batch 16 of uneven prompts (left-padded, --ragged)
#   bash bench/gpu_session.sh tune             # block-size sweep of the fwd, dkdv and dq kernels (bf16, head dim 128,
#                                              #   LLaMA-7B heads, seqlen 512-4096): suggested _blocks changes; about
#                                              #   3 minutes by its own estimate, stopped cleanly at 480 s
#   bash bench/gpu_session.sh attention report decode   # several stages in one call, in this order
# These write under runs/gpu-session/; with $OUT set, the call ends by packing that folder into one
# $OUT/gpu-session-<stages>.tar.gz and its combined log into $OUT/session.log (the device tool brings back at
# most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES="tests attention attention-rest report finetune finetune-13b memory memory-13b memory-70b decode tune"
PY=${PYTHON:-python3}  # the device machine's python3 holds torch
# The device machine gets this working tree, not an install: the package is the repository's root, imported as
# llama_adapter_triton through a link to it in a folder on PYTHONPATH (this checkout, whatever else is installed).
PKG_LINKS=$(mktemp -d)
ln -s "$PWD" "$PKG_LINKS/llama_adapter_triton"
export PYTHONPATH=$PKG_LINKS${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

# ---- the quick plan: name, timeout (s), what it does --------------------------------------------------------
QUICK_STEPS=(
  "env|10|the GPU, torch, triton and the commit"
  "kernels|170|tests/test_zero_init_attention.py, kernels compiled, every dtype (8 processes with pytest-xdist)"
  "gpu-tests|60|pytest -m 'gpu or gpu_leg': GPU-only tests, and model / fine-tuning / generation tests on CUDA"
  "attention|100|bench_attention: bf16, d128, 32 heads, seqlen 1024-4096, 16k tokens, full; ratio table, targets"
  "finetune|90|bench_finetune: LLaMA-7B shape, ours_packed vs eager_padded512, tokens/s and peak memory"
  "sanitizer|40|compute-sanitizer memcheck: one small launch of each kernel"
)

plan_quick() {
  local total=0 step name timeout what
  for step in "${QUICK_STEPS[@]}"; do
    IFS="|" read -r name timeout what <<<"$step"
    printf "%-10s timeout %4d s  %s\n" "$name" "$timeout" "$what"
    total=$((total + timeout))
  done
  echo "total: $total s"
}

step_timeout() {  # the timeout of a quick step by name
  local step name timeout what
  for step in "${QUICK_STEPS[@]}"; do
    IFS="|" read -r name timeout what <<<"$step"
    [ "$name" = "$1" ] && echo "$timeout" && return
  done
}

env_line() {
  "$PY" -c '
import subprocess, time
import torch, triton
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("commit", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
print("date", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))'
}

run_quick() {
  local out=${OUT:-runs/gpu-session/quick-out} work=runs/gpu-session/quick
  mkdir -p "$out" "$work"
  unset TRITON_INTERPRET
  install_wheels
  local xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  local status=0 rc
  quick() {  # quick NAME COMMAND...: run one step under its timeout; its output lands in $work/NAME.log
    local name=$1
    shift
    echo "=== quick $name (timeout $(step_timeout "$name") s, $(date -u +%H:%M:%S) UTC)"
    timeout --kill-after=5 "$(step_timeout "$name")" "$@" >"$work/$name.log" 2>&1
    rc=$?
    [ "$rc" -eq 124 ] && echo "=== quick $name: TIMED OUT after $(step_timeout "$name") s" >>"$work/$name.log"
    echo "=== quick $name: exit $rc"
    [ "$rc" -eq 0 ] || status=$rc
  }
  quick env bash -c "$(declare -f env_line); PY=$PY env_line"
  cp "$work/env.log" "$out/quick-1-env.txt"
  cat "$work/env.log"
  quick kernels "$PY" -m pytest -q -rfE --durations=15 -p no:cacheprovider "${xdist[@]}" \
    tests/test_zero_init_attention.py
  cp "$work/kernels.log" "$out/quick-2-kernels.log"
  tail -3 "$work/kernels.log"
  quick gpu-tests "$PY" -m pytest -q -rfE --durations=10 -p no:cacheprovider -m "gpu or gpu_leg" tests \
    --ignore tests/test_zero_init_attention.py
  cp "$work/gpu-tests.log" "$out/quick-3-gpu-tests.log"
  tail -3 "$work/gpu-tests.log"
  quick attention "$PY" -m llama_adapter_triton.bench.bench_attention --dtypes bf16 --headdims 128 --shapes 7b --seqlens 1024,2048,4096 \
    --tokens 16384 --modes full --providers fused,fused_atomic,sdpa_causal,sdpa_causal_flash,sdpa2,eager \
    --out "$work/attention"
  cp "$work/attention.log" "$work/attention/" 2>/dev/null
  tar -czf "$out/quick-4-attention.tar.gz" -C "$work" attention
  tail -25 "$work/attention.log"
  quick finetune "$PY" -m llama_adapter_triton.bench.bench_finetune --models llama-7b --providers ours_packed,eager_padded512 \
    --warmup-steps 2 --steps 4 --out "$work/finetune"
  cp "$work/finetune.log" "$work/finetune/" 2>/dev/null
  tar -czf "$out/quick-5-finetune.tar.gz" -C "$work" finetune
  tail -15 "$work/finetune.log"
  if command -v compute-sanitizer >/dev/null; then
    quick sanitizer compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m llama_adapter_triton.bench.kernel_launches
  else
    echo "compute-sanitizer is not on this machine: step skipped" >"$work/sanitizer.log"
  fi
  cp "$work/sanitizer.log" "$out/quick-6-sanitizer.log"
  tail -5 "$work/sanitizer.log"
  return $status
}

fetch_wheels() {  # here, with internet: for the device's Python 3.12, into .whl/ (installed with --no-deps: the
  # device's torch stays): pytest-xdist and execnet; bitsandbytes and liger-kernel (setup.py's ranges)
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d .whl "pytest-xdist>=3.5" "execnet>=2.1" \
    "bitsandbytes>=0.50,<0.52" "liger-kernel>=0.6,<0.9"
}

install_wheels() {  # carried wheels: installed apart, no network, the device's torch untouched
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

case "${1:-}" in
  --plan)
    [ "${2:-}" = quick ] || { echo "usage: bash bench/gpu_session.sh --plan quick" >&2; exit 2; }
    plan_quick
    exit 0 ;;
  --fetch-wheels)
    fetch_wheels
    exit $? ;;
  quick)
    [ $# -eq 1 ] || { echo "gpu_session.sh: quick is a plan of its own; run it alone" >&2; exit 2; }
    run_quick
    exit $? ;;
  "")
    echo "usage: bash bench/gpu_session.sh quick | --plan quick | --fetch-wheels | STAGE [STAGE ...] with STAGE" \
         "one of: $STAGES" >&2
    exit 2 ;;
esac

for stage in "$@"; do
  case " $STAGES " in
    *" $stage "*) ;;
    *) echo "gpu_session.sh: unknown stage '$stage'; stages: $STAGES (or: quick, --plan quick)" >&2
       exit 2 ;;
  esac
done
WORK=runs/gpu-session
mkdir -p "$WORK"
unset TRITON_INTERPRET
install_wheels
env_line | tee "$WORK/env.txt"
status=0
for stage in "$@"; do
  echo "=== gpu_session.sh $stage ($(date -u +%H:%M:%S) UTC)"
  case "$stage" in
    tests)
      "$PY" -m pytest -q -ra --durations=20 --junitxml="$WORK/junit.xml" ;;
    attention)
      "$PY" -m llama_adapter_triton.bench.bench_attention --dtypes bf16 --headdims 128 --shapes 7b --out "$WORK" ;;
    attention-rest)
      "$PY" -m llama_adapter_triton.bench.bench_attention --dtypes bf16,fp16 --headdims 64,128 --shapes gqa --out "$WORK" &&
        "$PY" -m llama_adapter_triton.bench.bench_attention --dtypes fp16 --headdims 64,128 --shapes 7b --out "$WORK" ;;
    report)
      "$PY" -m llama_adapter_triton.bench.bench_attention --report "$WORK/attention.csv" --out "$WORK" ;;
    finetune)
      timeout 570 "$PY" -m llama_adapter_triton.bench.bench_finetune --models llama-7b --out "$WORK" ;;
    finetune-13b)
      timeout 570 "$PY" -m llama_adapter_triton.bench.bench_finetune --models llama-13b --out "$WORK" ;;
    memory)
      timeout 570 "$PY" -m llama_adapter_triton.bench.bench_finetune --memory yes --memory-models llama2-7b --warmup-steps 1 --steps 3 \
        --out "$WORK" ;;
    memory-13b)
      timeout 570 "$PY" -m llama_adapter_triton.bench.bench_finetune --memory yes --memory-models llama2-13b --warmup-steps 1 --steps 3 \
        --out "$WORK" ;;
    memory-70b)
      timeout 570 "$PY" -m llama_adapter_triton.bench.bench_finetune --memory yes --memory-models llama2-70b --bases nf4 --warmup-steps 1 \
        --steps 3 --out "$WORK" ;;
    decode)
      timeout 400 "$PY" -m llama_adapter_triton.bench.bench_decode --models llama-7b --out "$WORK" &&
        timeout 170 "$PY" -m llama_adapter_triton.bench.bench_decode --models llama-7b --batch-sizes 16 --ragged yes --out "$WORK" ;;
    tune)
      timeout 570 "$PY" -m llama_adapter_triton.bench.tune_blocks --time-budget 480 --out "$WORK" ;;
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
