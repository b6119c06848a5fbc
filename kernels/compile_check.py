"""Compile the op's Triton kernels for a GPU, on a machine without one.

    llama-adapter compile-check                 # every variant, for sm_90 (H100 / H200)
    llama-adapter compile-check --arch 80 --quick
    llama-adapter compile-check --blocks dkdv=64,64,4,3 --scenario "bf16 d128"   # try other blocks
    llama-adapter compile-check --tma           # the opt-in TMA forward: TMA, warp-specialized, no spills

The host launchers (_fwd, _bwd) run on small CPU tensors with the kernels swapped for recorders,
so what is compiled is exactly what a GPU run launches: the same constexprs, block sizes, warps
and stages, specialised by Triton's own binder as a launch would be. Each recorded launch is then
compiled for the target (LLVM, then the ptxas that ships with Triton) and checked:
  - it compiles (no type error, no unsupported op on that architecture);
  - its shared memory fits the chip (a launch would fail with OutOfResources otherwise).
Registers and spills, from ptxas -v, are reported: spills cost speed, not correctness. So is what the block
products compile to, counted in the PTX: `wgmma.mma_async` (Hopper's warpgroup MMA, tiles with M >= 64) and
`mma.sync` (the warp-level MMA of sm_80, which sm_90 runs at a fraction of wgmma's rate) instructions; a 16-bit
kernel with 0 mma.sync on sm_90 has every product on wgmma (fp32's IEEE products use neither: FMA; fp64's are
mma.sync's f64 form, wgmma has none).

Compiling is not running: a kernel that compiles can still be wrong on the GPU. This check
catches a class of failures (and resource overflows) before a GPU session, nothing more.
Must run with TRITON_INTERPRET unset (the interpreter has no compiler to check).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llama_adapter_triton.kernels import block_sizes

# shared memory a block may use (opt-in maximum), by compute capability
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class Scenario:
    name: str
    dtype: torch.dtype = torch.bfloat16
    headdim: int = 128
    seqlen_q: int = 1024
    seqlen_k: int = 1024
    nheads: int = 32
    nheads_kv: int = 32
    prompt_len: int = 10
    causal: bool = True
    varlen: bool = False
    leftpad: bool = False  # a left-padded batch (batched generation): leftpad_k
    grads: str = "all"  # "all", or "prompt": only the adapter needs gradients (first adapted layer)
    deterministic: bool = True  # False: dq summed with atomics in the dK/dV pass
    batch: int = 2


SCENARIOS = [
    Scenario("bf16 d128 causal (LLaMA-7B layer)"),
    Scenario("bf16 d64 GQA", headdim=64, nheads_kv=8),
    Scenario("fp16 d80 MQA non-causal", dtype=torch.float16, headdim=80, nheads_kv=1, causal=False),
    Scenario("fp32 d128 (IEEE dots)", dtype=torch.float32),
    Scenario("bf16 d128 packed sequences", varlen=True),
    Scenario("bf16 d128 packed, no prompt (plain layers)", varlen=True, prompt_len=0),
    Scenario("bf16 d128 decode (seqlen_q 1)", seqlen_q=1),
    Scenario("bf16 d128 decode, left-padded batch", seqlen_q=1, leftpad=True),
    Scenario("bf16 d128 no prompt", prompt_len=0),
    Scenario("bf16 d128 prompt-only grads", grads="prompt"),
    Scenario("bf16 d128 atomic dq (deterministic=False)", deterministic=False),
    Scenario("bf16 d128 packed, atomic dq", varlen=True, deterministic=False),
    Scenario("fp16 d64 GQA atomic dq", dtype=torch.float16, headdim=64, nheads_kv=8, deterministic=False),
    Scenario("bf16 d96 prompt 64", headdim=96, prompt_len=64),
    Scenario("fp64 d32 (gradcheck)", dtype=torch.float64, headdim=32, seqlen_q=64, seqlen_k=64),
]
QUICK = [0, 1, 3, 4, 5, 6, 7, 9, 10]
KERNELS = ["_zia_fwd_kernel", "_zia_bwd_preprocess_kernel", "_zia_bwd_dkdv_kernel", "_zia_bwd_dq_kernel",
           "_zia_prompt_grad_kernel"]
TMA_KERNELS = ["_zia_tma_fwd_kernel"]  # kernels.zero_init_attn_tma (backend="tma"), compiled with --tma
# what the PTX of a TMA launch must hold: TMA copies, and, warp-specialized, the register reallocation
TMA_PTX = {"tma": "cp.async.bulk.tensor", "ws": "setmaxnreg"}


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(Launch(self.kernel, grid, args, kwargs))


@dataclass(frozen=True)
class Launch:
    kernel: object  # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recording(zia, kernels: list[str] = KERNELS) -> Iterator[list[Launch]]:
    """While inside, the kernels of zia (kernels.zero_init_attn, or the module that holds `kernels`) are recorders:
    every launch the host launchers make is appended to the list yielded, and nothing runs (outputs stay as
    allocated)."""
    calls: list[Launch] = []
    saved = {n: getattr(zia, n) for n in kernels}
    try:
        for n in kernels:
            setattr(zia, n, _Recorder(saved[n], calls))
        yield calls
    finally:
        for n, kernel in saved.items():
            setattr(zia, n, kernel)


def record_tma_launches(s: Scenario) -> list[Launch]:
    """The launches of the TMA forward (backend="tma", which shares the backward) for a scenario; none where the
    scenario is not one it takes (fp64, a prompt longer than its one tile)."""
    import llama_adapter_triton.kernels.zero_init_attn_tma as tma

    if s.dtype == torch.float64 or s.prompt_len > tma.MAX_PROMPT_LEN:
        return []
    with recording(tma, TMA_KERNELS) as calls:
        q, k, v, pk, gamma, packed, leftpad = _scenario_inputs(s)
        for save_o_w in (True, False):  # training (O_w kept for the backward) and inference
            tma._fwd_tma(q, k, v, pk, pk, gamma, s.causal, s.headdim**-0.5, *packed, leftpad, save_o_w)
    return calls


def _scenario_inputs(s: Scenario):
    """(q, k, v, prompt, gamma, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), leftpad_k): empty CPU
    tensors shaped as the scenario says."""
    import llama_adapter_triton.kernels.zero_init_attn as zia

    batch = s.batch
    if s.varlen:
        q = torch.empty(batch * s.seqlen_q, s.nheads, s.headdim, dtype=s.dtype)
        k = torch.empty(batch * s.seqlen_k, s.nheads_kv, s.headdim, dtype=s.dtype)
        cu_q = torch.arange(0, (batch + 1) * s.seqlen_q, s.seqlen_q, dtype=torch.int32)
        cu_k = torch.arange(0, (batch + 1) * s.seqlen_k, s.seqlen_k, dtype=torch.int32)
        packed = (cu_q, cu_k, s.seqlen_q, s.seqlen_k)
    else:
        q = torch.empty(batch, s.seqlen_q, s.nheads, s.headdim, dtype=s.dtype)
        k = torch.empty(batch, s.seqlen_k, s.nheads_kv, s.headdim, dtype=s.dtype)
        packed = (None, None, 0, 0)
    pk = torch.empty(1, s.prompt_len, s.nheads_kv, s.headdim, dtype=s.dtype)
    gamma = torch.zeros(batch, s.nheads, dtype=zia._acc_dtype(s.dtype))  # (batch or num_seqs, nheads)
    leftpad = torch.tensor([3] + [0] * (batch - 1), dtype=torch.int32) if s.leftpad else None
    return q, k, torch.empty_like(k), pk, gamma, packed, leftpad


def record_launches(zia, s: Scenario) -> list[Launch]:
    """The kernel launches that forward + backward make for a scenario (nothing runs)."""
    with recording(zia) as calls:
        q, k, v, pk, gamma, packed, leftpad = _scenario_inputs(s)
        scale = s.headdim**-0.5
        out, o_w, lse_w, lse_p = zia._fwd(q, k, v, pk, pk, gamma, s.causal, scale, *packed, leftpad, True)
        need_all = s.grads == "all"
        zia._bwd(out, q, k, v, pk, pk, gamma, o_w, lse_w, lse_p, s.causal, scale, *packed, leftpad, s.deterministic,
                 need_all, need_all, True)
    return calls


@functools.cache
def jit_function(kernel):
    """The JITFunction a GPU launches for kernel: kernel itself, or, where it was made under the interpreter, a
    JITFunction of the same source and options (do_not_specialize...), which compiles and keys launches as one."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)


@functools.cache
def _binder(kernel, arch: int):
    """(backend, Triton's argument binder of kernel) for sm_<arch>, as JITFunction.create_binder makes them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    jit = jit_function(kernel)
    return backend, create_function_from_signature(jit.signature, jit.params, backend)


def _bind(launch: Launch, arch: int):
    backend, binder = _binder(launch.kernel, arch)
    kwargs = dict(launch.kwargs, debug=False)
    return (backend, kwargs, *binder(*launch.args, **kwargs))


def launch_key(launch: Launch, arch: int = 90) -> str:
    """What Triton's JIT cache keys the launch by on sm_<arch> (JITFunction.run): each argument as the binder
    specialises it, the constexprs and the options. Launches of one kernel with different keys compile apart."""
    _backend, _kwargs, _bound, specialization, options = _bind(launch, arch)
    return repr((specialization, sorted(options.items())))


def compile_launch(kernel, args, kwargs, arch: int):
    """Compile one recorded launch for sm_<arch>, the way JITFunction.run would on that GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    backend, kwargs, bound_args, specialization, options = _bind(Launch(kernel, (), args, kwargs), arch)
    jit = jit_function(kernel)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(jit, signature, constexprs, attrs)
    return triton_compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)


def ptxas_usage(compiled, arch: int) -> tuple[int, int]:
    """(registers per thread, spill bytes) from ptxas -v on the kernel's PTX."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        res = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores", res.stderr)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


def mma_counts(compiled) -> tuple[int, int]:
    """(wgmma.mma_async, mma.sync) instructions in the kernel's PTX: which MMA its block products compile to."""
    ptx = compiled.asm["ptx"]
    return len(re.findall(r"\bwgmma\.mma_async\b", ptx)), len(re.findall(r"\bmma\.sync\b", ptx))


def run(arch: int, scenarios: list[Scenario], out=sys.stdout, blocks: dict | None = None,
        tma: bool = False) -> list[str]:
    """Compile every launch of every scenario; returns the failures (empty when all is well).
    blocks overrides the launchers' block sizes, e.g. {"dkdv": (64, 64, 4, 3)}. tma: the TMA forward's launches
    instead (sm_90 only), each of which must use TMA (its PTX has cp.async.bulk.tensor), be warp-specialized where it
    asks to be (setmaxnreg: the producer / consumer register split) and, in 16 bits, spill nothing."""
    import llama_adapter_triton.kernels.zero_init_attn as zia

    if zia.INTERPRET:
        raise RuntimeError("kernels.compile_check needs TRITON_INTERPRET unset: the interpreter compiles nothing")
    max_shared = MAX_SHARED[arch]
    # the launchers choose blocks for the target chip's shared memory, as they would on it
    with block_sizes.override_blocks(blocks or {}, shared_memory=max_shared):
        return _compile_all(zia, arch, scenarios, out, max_shared, tma)


def _tma_failures(name: str, launch: Launch, compiled, spills: int) -> tuple[str, list[str]]:
    """(what the TMA launch's PTX shows, e.g. "tma+ws", and its failures)."""
    ptx = compiled.asm["ptx"]
    found = [what for what, instr in TMA_PTX.items() if instr in ptx]
    sixteen_bit = launch.args[0].dtype.itemsize == 2  # fp32's IEEE dots may spill, as the pointer kernels' do
    failures = [f"{name}: {launch.kernel.__name__} spills {spills} bytes"] if spills and sixteen_bit else []
    if "tma" not in found:
        failures.append(f"{name}: {launch.kernel.__name__} has no TMA copy (cp.async.bulk.tensor) in its PTX")
    if launch.kwargs.get("WARP_SPECIALIZE") and "ws" not in found:
        failures.append(f"{name}: {launch.kernel.__name__} asks for warp specialization but is not specialized "
                        "(no setmaxnreg in its PTX)")
    return "+".join(found) or "-", failures


def _compile_all(zia, arch, scenarios, out, max_shared, tma=False) -> list[str]:
    if tma and arch < 90:
        raise ValueError(f"the TMA forward is for sm_90 and later, not sm_{arch}")
    failures, seen = [], set()
    print(f"{'scenario':36s} {'kernel':28s} {'warps':>5s} {'stages':>6s} {'smem KB':>8s} {'regs':>5s} "
          f"{'spill B':>7s} {'wgmma':>5s} {'mma.sync':>8s} {'s':>5s}  {'uses':s}", file=out)
    for s in scenarios:
        for launch in record_tma_launches(s) if tma else record_launches(zia, s):
            kernel, args, kwargs = launch.kernel, launch.args, launch.kwargs
            key = (kernel.__name__, repr(sorted((k, str(v)) for k, v in kwargs.items())),
                   tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args))
            if key in seen:
                continue
            seen.add(key)
            t0 = time.time()
            try:
                compiled = compile_launch(kernel, args, kwargs, arch)
                regs, spills = ptxas_usage(compiled, arch)
                wgmma, mma_sync = mma_counts(compiled)
            except Exception as e:  # report every failure, not only the first
                failures.append(f"{s.name}: {kernel.__name__} failed to compile for sm_{arch}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                print(f"{s.name:36s} {kernel.__name__:28s} FAILED: {failures[-1]}", file=out)
                continue
            shared = compiled.metadata.shared
            uses = ""
            if kernel.__name__ in TMA_KERNELS:
                uses, tma_failures = _tma_failures(s.name, launch, compiled, spills)
                failures += tma_failures
            print(f"{s.name:36s} {kernel.__name__:28s} {kwargs.get('num_warps', 4):5d} "
                  f"{kwargs.get('num_stages', 3):6d} {shared / 1024:8.1f} {regs:5d} {spills:7d} {wgmma:5d} "
                  f"{mma_sync:8d} {time.time() - t0:5.1f}  {uses}", file=out)
            if shared > max_shared:
                failures.append(f"{s.name}: {kernel.__name__} needs {shared} bytes of shared memory, "
                                f"sm_{arch} has {max_shared}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama-adapter compile-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90,
                        help="compute capability x10: 90 (H100/H200), 80 (A100), 86/89 (RTX 30xx/40xx, L4, A10)")
    parser.add_argument("--quick", action="store_true", help="a covering subset of the scenarios")
    parser.add_argument("--scenario", default="", help="only the scenarios whose name contains this text")
    parser.add_argument("--blocks", action="append", default=[], metavar="KERNEL=M,N,WARPS,STAGES",
                        help="override a kernel's blocks (KERNEL: fwd, dkdv, dq; or pre=M,WARPS); repeatable")
    parser.add_argument("--tma", action="store_true",
                        help="the TMA forward instead (backend='tma'; sm_90): it must use TMA, be warp-specialized "
                             "and spill nothing in 16 bits")
    args = parser.parse_args(argv)
    if args.arch not in MAX_SHARED:
        parser.error(f"--arch must be one of {sorted(MAX_SHARED)}, got {args.arch}")
    if args.tma and args.arch < 90:
        parser.error(f"--tma needs --arch 90 (TMA is Hopper's), got --arch {args.arch}")
    blocks = {}
    for item in args.blocks:
        try:
            name, numbers = block_sizes.parse_blocks(item)
        except ValueError as exc:
            parser.error(f"--blocks {exc}")
        blocks[name] = numbers
    scenarios = [s for s in ([SCENARIOS[i] for i in QUICK] if args.quick else SCENARIOS) if args.scenario in s.name]
    if not scenarios:
        parser.error(f"--scenario {args.scenario!r} matches none of: {', '.join(s.name for s in SCENARIOS)}")
    failures = run(args.arch, scenarios, blocks=blocks, tma=args.tma)
    for f in failures:
        print("FAIL:", f)
    print(f"{'all kernels compile' if not failures else f'{len(failures)} failures'} for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
