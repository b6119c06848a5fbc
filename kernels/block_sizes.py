"""Block sizes of the zero-init attention kernels (kernels/zero_init_attn.py): the policy, and its override.

choose() gives the launchers (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, (BLOCK_M, num_warps) for the
backward's preprocess, BLOCK_P, the prompt chunk, and TRANSPOSED_DQ, the form of the dK/dV pass's atomic dq
product. The policy fits the chip's shared memory and compiles without register spills in bf16/fp16 on sm_90 at
MHA (with GQA at head dim 128 the dK/dV pass spills ~190-360 B; a few dozen bytes in dK/dV on sm_80/86, more in
fp32/fp64), as llama-adapter compile-check shows; it is not yet autotuned against GPU timings (bench/tune_blocks.py
times others).

override_blocks() is how kernels.compile_check and bench.tune_blocks try other blocks: an explicit stack of
overrides that choose() applies, innermost last; nestable, and popped on leaving, exceptions included. It is
process-wide on purpose (not a ContextVar): autograd runs CUDA backwards on its own threads.

Under Triton's interpreter (TRITON_INTERPRET=1 at import) large 64 x 64 blocks run by default, for speed;
ZIA_INTERPRET_BLOCKS=gpu (read at import, or INTERPRET_BLOCKS = "gpu") runs the GPU's block sizes instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping

import torch

from llama_adapter_triton.kernels.checks import is_int

# triton.jit decides at import time whether kernels are interpreted, so the switch is read once too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Block sizes under the interpreter: "large" (64 x 64, fast) or "gpu" (what choose picks for an H100/H200).
INTERPRET_BLOCKS = os.environ.get("ZIA_INTERPRET_BLOCKS", "large")

# what choose gives per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages), or (BLOCK_M, num_warps) for pre
BLOCK_FIELDS = {"fwd": ("M", "N", "WARPS", "STAGES"), "pre": ("M", "WARPS"), "dkdv": ("M", "N", "WARPS", "STAGES"),
                "dq": ("M", "N", "WARPS", "STAGES"), "tma": ("M", "N", "WARPS", "STAGES")}

# the active overrides, innermost last: {kernel: blocks, ...} and an optional "shared_memory" (bytes)
_OVERRIDES: list[dict] = []


# H100 / H200 (and B200) offer 227 KB of shared memory per block, sm_8x at most 163 KB: the policy's mark of a chip
# with warpgroup MMA (wgmma), whose tiles need M >= 64 rows
WARPGROUP_MMA_SHARED = 200 * 1024


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def transposed_dq(dtype: torch.dtype, shared_memory: int, atomic_dq: bool) -> bool:
    """Whether the dK/dV pass's dq product (atomic_dq) is dq^T = K^T dS^T (M = head dim) rather than dS K
    (M = BLOCK_M = 32). On a chip with wgmma the transposed form is a warpgroup MMA where dS K would compile to
    mma.sync; on sm_8x mma.sync takes M = 32 natively and the transposed form costs a second copy of K in shared
    memory (32 KB at head dim 128: too much for sm_86 / sm_89). fp32 / fp64 products have no wgmma: unchanged."""
    return atomic_dq and dtype.itemsize == 2 and shared_memory >= WARPGROUP_MMA_SHARED


@functools.cache
def _device_shared_memory(device: torch.device) -> int:
    if device.type != "cuda":
        return 232448  # no GPU (the interpreter): what an H100 offers
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def shared_memory(device: torch.device) -> int:
    """Shared memory a block may use on this device (opt-in maximum), in bytes; under an override that sets
    shared_memory (kernels.compile_check: the target chip's), that value."""
    for override in reversed(_OVERRIDES):
        if "shared_memory" in override:
            return override["shared_memory"]
    return _device_shared_memory(device)


def default_blocks(dtype: torch.dtype, head_dim_pad: int, seqlen_q: int, prompt_len: int, shared_memory: int,
                   atomic_dq: bool = False) -> dict:
    """The policy: block sizes per kernel, without overrides (atomic_dq: the dK/dV pass also sums dq).

    Under the interpreter large blocks are fastest (unless INTERPRET_BLOCKS is "gpu"). On the GPU these are
    choices that compile within the chip's shared memory, without register spills in bf16/fp16 on sm_90,
    checked for sm_80, sm_86, sm_89 and sm_90 by llama-adapter compile-check; they still await autotuning
    against measured times.
    """
    # prompts longer than one chunk loop over chunks
    block_p = min(32, max(16, _next_power_of_2(max(prompt_len, 1))))
    # the interpreter takes the chip's form too (its shared memory is an H100's): the tests check both forms
    dq_t = transposed_dq(dtype, shared_memory, atomic_dq)
    if INTERPRET and INTERPRET_BLOCKS != "gpu":
        if INTERPRET_BLOCKS != "large":
            raise ValueError(f"ZIA_INTERPRET_BLOCKS must be 'large' or 'gpu', got {INTERPRET_BLOCKS!r}")
        return dict(fwd=(64, 64, 4, 1), pre=(64, 4), dkdv=(64, 64, 4, 1), dq=(64, 64, 4, 1), tma=(64, 64, 4, 1),
                    BLOCK_P=block_p, TRANSPOSED_DQ=dq_t)
    small_m = max(16, _next_power_of_2(seqlen_q))  # decode: one query row needs no 128-row block
    if dtype.itemsize == 2:
        fwd_m = min(128, small_m)
        # dQ holds q, dout and its accumulator: 64 rows where shared memory is small (consumer GPUs)
        dq_m = min(128 if shared_memory >= 128 * 1024 else 64, small_m)
        fwd_warps = 8 if fwd_m == 128 and head_dim_pad == 128 else 4
        # with atomic_dq, dS K needs 40 KB more shared memory (2 stages where there is little), K^T dS^T more
        # registers (2 stages spill least on sm_90: compile-check)
        dkdv_stages = 2 if atomic_dq and (shared_memory < 128 * 1024 or dq_t) else 3
        # the TMA forward (opt-in): 128 rows only without a prompt (Triton 3.6's warp specialization crashes on
        # the prompt's row reductions in 128-row blocks); 4 warps, which it specializes into 12
        tma_m = min(64 if prompt_len else 128, small_m)
        return dict(fwd=(fwd_m, 64, fwd_warps, 3), pre=(64, 4), dkdv=(32, 128, 8, dkdv_stages),
                    dq=(dq_m, 32, 8 if dq_m >= 64 else 4, 3), tma=(tma_m, 128, 4, 2), BLOCK_P=block_p,
                    TRANSPOSED_DQ=dq_t)
    # fp32 (IEEE dots: no tensor cores) and fp64: smaller tiles, or the registers spill
    fwd_m = min(64, small_m)
    return dict(fwd=(fwd_m, 32, 8 if fwd_m == 64 else 4, 2), pre=(64, 4), dkdv=(32, 32, 8, 2),
                dq=(min(32, small_m), 32, 8 if small_m >= 32 else 4, 2), tma=(fwd_m, 16, 8, 2), BLOCK_P=block_p,
                TRANSPOSED_DQ=dq_t)


def choose(dtype: torch.dtype, head_dim_pad: int, seqlen_q: int, prompt_len: int, shared_memory: int,
           atomic_dq: bool = False) -> dict:
    """What the launchers use: default_blocks' choice with the active overrides applied, innermost last."""
    blocks = default_blocks(dtype, head_dim_pad, seqlen_q, prompt_len, shared_memory, atomic_dq)
    for override in _OVERRIDES:
        blocks.update((kernel, b) for kernel, b in override.items() if kernel in BLOCK_FIELDS)
    return blocks


def reduce_block(size: int) -> int:
    """Elements of one prompt's prompt_len x headdim that one program of the prompt-gradient sum takes: few on
    the GPU (more programs, each a short stream), all of them under the interpreter (fewer, faster steps)."""
    if INTERPRET and INTERPRET_BLOCKS != "gpu":
        return min(8192, _next_power_of_2(size))
    return 256


def check_blocks(kernel: str, blocks: tuple[int, ...]) -> tuple[int, ...]:
    """blocks, if they are a launch the kernels can take; else ValueError saying why. Block sizes must be powers
    of two of at least 16 (tl.arange, and tl.dot's smallest tile), warps a power of two up to 16, stages >= 1."""
    if kernel not in BLOCK_FIELDS:
        raise ValueError(f"unknown kernel {kernel!r}: choose from {', '.join(BLOCK_FIELDS)}")
    fields = BLOCK_FIELDS[kernel]
    if len(blocks) != len(fields) or not all(is_int(b) for b in blocks):
        raise ValueError(f"{kernel} takes {len(fields)} integers {','.join(fields)}, got {blocks!r}")
    for name, value in zip(fields, blocks, strict=True):
        power = value > 0 and value & (value - 1) == 0
        if name in ("M", "N") and not (power and value >= 16):
            raise ValueError(f"{kernel}: BLOCK_{name} must be a power of two >= 16, got {value}")
        if name == "WARPS" and not (power and value <= 16):
            raise ValueError(f"{kernel}: num_warps must be a power of two up to 16, got {value}")
        if name == "STAGES" and value < 1:
            raise ValueError(f"{kernel}: num_stages must be >= 1, got {value}")
    return tuple(blocks)


def parse_blocks(text: str) -> tuple[str, tuple[int, ...]]:
    """'fwd=128,64,8,3' -> ("fwd", (128, 64, 8, 3)): the command-line form of one kernel's blocks
    (KERNEL=M,N,WARPS,STAGES for fwd, dkdv, dq, tma; pre=M,WARPS). ValueError says what is wrong."""
    kernel, sep, values = text.partition("=")
    forms = "fwd|dkdv|dq|tma=M,N,WARPS,STAGES or pre=M,WARPS"
    try:
        numbers = tuple(int(x) for x in values.split(","))
    except ValueError:
        numbers = ()
    if not sep or kernel not in BLOCK_FIELDS or len(numbers) != len(BLOCK_FIELDS[kernel]):
        raise ValueError(f"takes {forms}, got {text!r}")
    return kernel, check_blocks(kernel, numbers)


@contextlib.contextmanager
def override_blocks(blocks: Mapping[str, tuple[int, ...]], *, shared_memory: int | None = None) -> Iterator[None]:
    """While inside, choose() gives these kernels' blocks instead of the policy's (the other kernels keep it),
    e.g. {"dkdv": (64, 64, 4, 3)}; shared_memory, if given, is what the policy and shared_memory() take the chip
    to have (kernels.compile_check: the target's). Popped on leaving, also after an exception; overrides nest."""
    override: dict = {kernel: check_blocks(kernel, tuple(b)) for kernel, b in blocks.items()}
    if shared_memory is not None:
        override["shared_memory"] = shared_memory
    depth = len(_OVERRIDES)
    _OVERRIDES.append(override)
    try:
        yield
    finally:
        del _OVERRIDES[depth:]

