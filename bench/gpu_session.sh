#!/usr/bin/env bash
# What a session lent a GPU runs. The device machine (H100 or H200) has Python 3.12, torch 2.11, triton 3.6,
# transformers, peft, pytest with pytest-xdist and pytest-timeout, pytest-benchmark, sentencepiece, tiktoken,
# matplotlib and compute-sanitizer, but no internet, no xformers, no bitsandbytes and no liger-kernel.
#
# FIRST, in one device call (the lease may be 15 minutes in all, the machine's start included):
#
#   bash bench/gpu_session.sh --plan quick       # here: the steps, their timeouts, the overheads, the total (480 s)
#   bash bench/gpu_session.sh --write-commit     # here: the commit (short hash, "-dirty" when tracked files differ)
#                                                #   into COMMIT, a file that travels with the tree (not ignored by
#                                                #   git; never commit it): the device may get no .git, and then
#                                                #   every row and the env step read the commit from it
#   device run: bash bench/gpu_session.sh quick    (no carry: quick needs no wheels; timeout_s: 540)
#   rm COMMIT                                    # here, after the call
#
# The quick plan, by value: the first 3 minutes hold the answer to "how fast is the op against SDPA / cuDNN".
# Each step runs under `timeout -s INT` (SIGINT first, so that an interrupted pytest or bench prints its summary;
# SIGKILL 4 s later) and tees its output straight into $OUT as it comes, so a step killed mid-way keeps what it
# printed, and a bench that dies before making its output folder still leaves its log. A bench's folder (CSV rows,
# appended as they are measured; plot; summary) is packed into $OUT as soon as its step ends, killed or not.
# At most 8 files come back ($OUT takes 8):
#   1. env            30 s  the GPU, torch, triton, the commit, the date; nvidia-smi      -> quick-1-env.log
#   2. attention     125 s  bench_attention, fwd+bwd (mode full): bf16, head dim 128, 32 heads, seqlen 1024/2048/4096,
#                           16k tokens: fused, fused_atomic, causal SDPA (torch's choice: cuDNN or flash; flash
#                           forced), two SDPA calls, eager; every provider checked against the fp32 oracle before
#                           it is timed; the ratio table and the targets. Then, in a process of its own, the
#                           forward alone of fused beside fused-tma (the opt-in TMA forward, backend="tma") at
#                           seqlen 1024 and 4096, into attention/tma/       -> quick-2-attention.log, .tar.gz
#   3. finetune       75 s  bench_finetune: LLaMA-7B shape, ours_packed vs eager_padded512, tokens/s and peak
#                           memory                                          -> quick-3-finetune.log, .tar.gz
#      bank           40 s  bench_decode's adapter bank rows: LLaMA-7B shape, 16 requests with 1, 4 and 16 distinct
#                           adapters (model/bank.py), 64 new tokens; decode tokens/s, peak memory, the time against
#                           one adapter's (target <= 1.1x); the table in the log  -> quick-3b-bank.log
#   4. kernels        70 s  tests/test_zero_init_attention.py compiled, bf16/fp16 (-k "not fp32": the fp32 cases,
#                           up to 7 s a compile, wait for the tests stage), 8 processes (pytest-xdist), 60 s a test
#                           (pytest-timeout); and kernel_launches' test, which fills Triton's cache for step 5
#                                                                           -> quick-4-kernels.log
#   5. sanitizer-warm 16 s  kernel_launches without the sanitizer: whatever step 4 left uncompiled, compiled now
#      sanitizer      90 s  compute-sanitizer memcheck on one small launch of each kernel, with
#                           PYTORCH_NO_CUDA_MEMORY_CACHING=1 (the caching allocator hides out-of-bounds accesses
#                           inside its blocks)                              -> quick-5-sanitizer.log
#   overheads        34 s  SIGKILL 4 s after each step's SIGINT (7 x 4 s), packing 2 folders (2 x 3 s), no installs
# total 480 s: the call's timeout_s of 540 leaves a margin. The other GPU tests (flex attention compiled, the
# tune_blocks sweep, hf providers, decode) and the fp32 kernel cases need more than quick has: the tests stage.
# Then commit the CSV rows under bench/results/ and bench/RESULTS.md (date, GPU, commit, the SDPA backends that
# ran) and say in the note which targets are met.
#
# Rehearsal on a CPU (tests/test_gpu_session.py runs it): `bash bench/gpu_session.sh quick --dry-run-cpu` runs every
# step's command under Triton's interpreter with the smallest options (the benches' --smoke, one kernel test), with
# the same timeouts, logs and packing; `--timeout STEP=SECONDS` (repeatable, also with --plan) changes a step's
# timeout, e.g. to kill one mid-way. Without OUT, quick writes into runs/gpu-session/quick-<date>/; an OUT that
# already holds a quick run's files is refused (nothing there is overwritten).
#
# Longer leases, several stages per call (each call at most 10 minutes; the tests and memory stages want the wheels
# of bitsandbytes and liger-kernel: `bash bench/gpu_session.sh --fetch-wheels` here, then carry: [".whl"]):
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
#                                              #   then batch 16 of uneven prompts (left-padded, --ragged); then
#                                              #   16 requests with 1, 4 and 16 distinct adapters (an adapter bank)
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
QUICK_WORK=""  # quick's bench folders, packed into $OUT step by step
trap 'rm -rf "$PKG_LINKS" ${QUICK_WORK:+"$QUICK_WORK"}' EXIT  # the link, not what it points to
ln -s "$PWD" "$PKG_LINKS/llama_adapter_triton"
export PYTHONPATH=$PKG_LINKS${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

# ---- the quick plan: name, timeout (s), the log in $OUT it tees into, what it does ---------------------------
QUICK_STEPS=(
  "env|30|quick-1-env|the GPU, torch, triton, the commit (git, else the COMMIT file), the date; nvidia-smi"
  "attention|125|quick-2-attention|bench_attention fwd+bwd: bf16, d128, 32 heads, seqlen 1024-4096, 16k tokens; fwd: fused-tma"
  "finetune|75|quick-3-finetune|bench_finetune: LLaMA-7B shape, ours_packed vs eager_padded512"
  "bank|40|quick-3b-bank|bench_decode's adapter bank: LLaMA-7B shape, 16 requests, 1/4/16 distinct adapters"
  "kernels|70|quick-4-kernels|tests/test_zero_init_attention.py compiled, -k 'not fp32', -n 8, 60 s a test"
  "sanitizer-warm|16|quick-5-sanitizer|kernel_launches without the sanitizer: Triton's cache filled first"
  "sanitizer|90|quick-5-sanitizer|compute-sanitizer memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1, each kernel"
)
KILL_AFTER=4  # seconds from a step's SIGINT (at its timeout) to its SIGKILL
PACK_TIMEOUT=3  # seconds to pack one bench's folder into $OUT
PACKED=(attention finetune)  # the steps whose bench folder is packed
declare -A TIMEOUT_OVERRIDE=()

quick_options() {  # --timeout STEP=SECONDS (repeatable) and, when $1 is "run", --dry-run-cpu; sets DRY_RUN
  local mode=$1 step known name
  shift
  DRY_RUN=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run-cpu)
        [ "$mode" = run ] || { echo "gpu_session.sh: --dry-run-cpu goes with quick, not --plan" >&2; exit 2; }
        DRY_RUN=1 ;;
      --timeout)
        [[ "${2:-}" =~ ^([a-z-]+)=([1-9][0-9]*)$ ]] || { echo "gpu_session.sh: --timeout takes STEP=SECONDS" \
          "(SECONDS >= 1), got '${2:-}'" >&2; exit 2; }
        known=0
        for step in "${QUICK_STEPS[@]}"; do
          name=${step%%|*}
          [ "$name" = "${BASH_REMATCH[1]}" ] && known=1
        done
        [ "$known" = 1 ] || { echo "gpu_session.sh: --timeout: no quick step '${BASH_REMATCH[1]}'" >&2; exit 2; }
        TIMEOUT_OVERRIDE[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
        shift ;;
      *) echo "gpu_session.sh: quick takes --dry-run-cpu and --timeout STEP=SECONDS, not '$1'; it is a plan of" \
              "its own: run it alone" >&2
         exit 2 ;;
    esac
    shift
  done
}

step_field() {  # step_field NAME FIELD: a quick step's timeout (2, with --timeout applied) or log (3)
  local step name timeout log what
  for step in "${QUICK_STEPS[@]}"; do
    IFS="|" read -r name timeout log what <<<"$step"
    [ "$name" = "$1" ] || continue
    case $2 in
      2) echo "${TIMEOUT_OVERRIDE[$name]:-$timeout}" ;;
      3) echo "$log" ;;
    esac
    return
  done
}

plan_quick() {  # every second the call can take: the steps' timeouts, the SIGKILL grace, packing, installs
  local total=0 step name timeout log what n=${#QUICK_STEPS[@]}
  for step in "${QUICK_STEPS[@]}"; do
    IFS="|" read -r name timeout log what <<<"$step"
    timeout=$(step_field "$name" 2)
    printf "%-15s %4d s  %s\n" "$name" "$timeout" "$what"
    total=$((total + timeout))
  done
  printf "%-15s %4d s  %s\n" kill-after $((n * KILL_AFTER)) "$n steps x $KILL_AFTER s: SIGKILL after a step's SIGINT"
  printf "%-15s %4d s  %s\n" packing $((${#PACKED[@]} * PACK_TIMEOUT)) \
    "${#PACKED[@]} bench folders x $PACK_TIMEOUT s, each packed into \$OUT under its own timeout"
  printf "%-15s %4d s  %s\n" installs 0 "none: quick carries no wheels"
  echo "total: $((total + n * KILL_AFTER + ${#PACKED[@]} * PACK_TIMEOUT)) s"
}

env_info() {  # the machine, the versions, the commit and the date
  "$PY" -c '
import signal, time
import torch, triton
from llama_adapter_triton.bench.common import git_commit
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
# a SIGINT ignored from the start stays ignored: an interrupted step then prints no summary before its SIGKILL
print("sigint:", "IGNORED" if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else "handled")
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
commit = git_commit()
print("commit", commit if commit != "unknown" else "unknown: no git here; write COMMIT before the device call "
      "(bash bench/gpu_session.sh --write-commit)")
print("date", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))'
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  fi
}

both() {  # both CMD... -- CMD...: the two commands in turn, the second even when the first fails; the first failure
  local first=() rc
  while [ "$1" != -- ]; do first+=("$1"); shift; done
  shift
  "${first[@]}"
  rc=$?
  "$@"
  local rc2=$?
  return $((rc ? rc : rc2))
}

run_quick() {
  local out=${OUT:-runs/gpu-session/quick-$(date -u +%Y%m%d-%H%M%S)} work status=0 rc summary=()
  if compgen -G "$out/quick-*" >/dev/null; then
    echo "gpu_session.sh: $out already holds the files of a quick run (quick-*): give OUT an empty folder" >&2
    return 2
  fi
  mkdir -p "$out" || return 2
  QUICK_WORK=$(mktemp -d)
  work=$QUICK_WORK
  if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1  # the kernels interpreted on the CPU, as in the tests
  else
    unset TRITON_INTERPRET
  fi
  quick() {  # quick NAME COMMAND...: one step under its timeout, its output teed into its log in $out as it comes
    local name=$1 t log start=$SECONDS
    shift
    t=$(step_field "$name" 2)
    log=$out/$(step_field "$name" 3).log
    echo "=== quick $name (timeout $t s, $(date -u +%H:%M:%S) UTC): $*" | tee -a "$log"
    timeout -s INT --kill-after="$KILL_AFTER" "$t" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "=== quick $name: TIMED OUT after $t s" | tee -a "$log"
    fi
    echo "=== quick $name: exit $rc ($((SECONDS - start)) s)" | tee -a "$log"
    summary+=("$(printf "%-15s exit %3d  %4d s" "$name" "$rc" $((SECONDS - start)))")
    [ "$rc" -eq 0 ] || status=$rc
  }
  pack() {  # pack NAME: the bench folder of step NAME, what it holds even if the step was killed, into $out
    local log
    log=$(step_field "$1" 3)
    if [ -d "$work/$1" ]; then
      timeout "$PACK_TIMEOUT" tar -czf "$out/$log.tar.gz" -C "$work" "$1" || status=1
    else
      echo "=== quick $1: no output folder to pack (the bench stopped before making it)" | tee -a "$out/$log.log"
    fi
  }
  local attention=(--dtypes bf16 --headdims 128 --shapes 7b --seqlens 1024,2048,4096 --tokens 16384)
  local tma=(--dtypes bf16 --headdims 128 --shapes 7b --seqlens 1024,4096 --tokens 16384)
  local finetune=(--models llama-7b --warmup-steps 2 --steps 4)
  local bank=(--models llama-7b --batch-sizes 16 --bank-adapters 1,4,16 --new-tokens 64 --warmup-tokens 8)
  local kernels=(-k "not fp32" tests/test_zero_init_attention.py
                 tests/test_gpu_session.py::test_kernel_launches_reach_every_kernel)
  if [ "$DRY_RUN" = 1 ]; then  # the same commands, the smallest options
    attention=(--smoke --seqlens 64 --shapes tiny --cpu-reps 1)
    tma=("${attention[@]}")
    finetune=(--smoke --warmup-steps 1 --steps 1)
    bank=(--smoke --batch-sizes 2 --bank-adapters 1,2)
    kernels=(-k "test_low_precision_within_twice_torch_error and seqlen1-bf16" tests/test_zero_init_attention.py)
  fi
  local pytest_opts=()
  "$PY" -c "import xdist" 2>/dev/null && pytest_opts+=(-n 8)
  "$PY" -c "import pytest_timeout" 2>/dev/null && pytest_opts+=(--timeout 60)

  export -f env_info both
  export PY
  quick env bash -c env_info
  # then the opt-in TMA forward (backend="tma") beside the pointer kernels' forward, in a process of its own (a wrong
  # or crashing kernel there costs none of the rows before), into attention/tma/ (packed with them)
  quick attention bash -c 'both "$@"' both \
    "$PY" -m llama_adapter_triton.bench.bench_attention "${attention[@]}" --modes full \
    --providers fused,fused_atomic,sdpa_causal,sdpa_causal_flash,sdpa2,eager --out "$work/attention" -- \
    "$PY" -m llama_adapter_triton.bench.bench_attention "${tma[@]}" --modes fwd --providers fused,fused-tma \
    --out "$work/attention/tma"
  pack attention
  quick finetune "$PY" -m llama_adapter_triton.bench.bench_finetune "${finetune[@]}" \
    --providers ours_packed,eager_padded512 --out "$work/finetune"
  pack finetune
  quick bank "$PY" -m llama_adapter_triton.bench.bench_decode "${bank[@]}" --providers fused --out "$work/bank"
  quick kernels "$PY" -m pytest -q -rfE --durations=15 -p no:cacheprovider "${pytest_opts[@]}" "${kernels[@]}"
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -n "$sanitizer" ]; then
    quick sanitizer-warm "$PY" -m llama_adapter_triton.bench.kernel_launches
    quick sanitizer env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 \
      "$PY" -m llama_adapter_triton.bench.kernel_launches
  else
    echo "=== quick sanitizer-warm, sanitizer: compute-sanitizer is not on this machine: skipped" |
      tee -a "$out/$(step_field sanitizer 3).log"
  fi
  echo "=== quick: done; in $out: $(cd "$out" && echo *)"
  printf "%s\n" "${summary[@]}"
  return $status
}

fetch_wheels() {  # here, with internet: for the device's Python 3.12, into .whl/ (installed with --no-deps: the
  # device's torch stays): bitsandbytes and liger-kernel (setup.py's ranges), for the stages that use them
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d .whl "bitsandbytes>=0.50,<0.52" \
    "liger-kernel>=0.6,<0.9"
}

install_wheels() {  # carried wheels: installed apart, no network, the device's torch untouched
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

case "${1:-}" in
  --plan)
    [ "${2:-}" = quick ] || { echo "usage: bash bench/gpu_session.sh --plan quick [--timeout STEP=SECONDS]" >&2; exit 2; }
    shift 2
    quick_options plan "$@"
    plan_quick
    exit 0 ;;
  --write-commit)  # here, before the device call: the commit into COMMIT, which travels with the tree
    commit=$("$PY" -c "from llama_adapter_triton.bench.common import git_commit; print(git_commit())") || exit 1
    [ "$commit" != unknown ] || { echo "gpu_session.sh --write-commit: git gives no commit here" >&2; exit 1; }
    printf "%s\n" "$commit" >COMMIT.tmp && mv COMMIT.tmp COMMIT || exit 1
    echo "COMMIT: $commit"
    exit 0 ;;
  --fetch-wheels)
    fetch_wheels
    exit $? ;;
  quick)
    shift
    quick_options run "$@"
    run_quick
    exit $? ;;
  "")
    echo "usage: bash bench/gpu_session.sh quick [--dry-run-cpu] [--timeout STEP=SECONDS] | --plan quick |" \
         "--write-commit | --fetch-wheels | STAGE [STAGE ...] with STAGE one of: $STAGES" >&2
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
env_info | tee "$WORK/env.txt"
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
        timeout 170 "$PY" -m llama_adapter_triton.bench.bench_decode --models llama-7b --batch-sizes 16 --ragged yes --out "$WORK" &&
        timeout 200 "$PY" -m llama_adapter_triton.bench.bench_decode --models llama-7b --providers fused \
          --batch-sizes 16 --bank-adapters 1,4,16 --out "$WORK" ;;
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
