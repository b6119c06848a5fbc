"""LLaMA-Adapter fine-tuning (arXiv 2303.16199): a frozen LLaMA, a trained adapter, packed batches, resume,
several processes (DDP / FSDP2).

    # CPU (fp32), e.g. on the demo's small base (llama-adapter demo writes runs/demo-base), ~1 minute:
    llama-adapter finetune --checkpoint runs/demo-base --data train/demo_data/demo.json --out runs/ft-cpu \\
        --adapter-layers 4 --token-budget 1024 --epochs 15 --blr 1.0 --eval-size 48
    # one GPU (bf16 base, fp32 adapter): LLaMA-7B on Alpaca-52K with the paper's settings
    llama-adapter finetune --checkpoint llama-7b/ --data alpaca_data.json --out runs/alpaca-7b
    # several GPUs of one node, DDP (only the adapter's gradients are all-reduced):
    torchrun --nproc_per_node 8 -m llama_adapter_triton.train.finetune --checkpoint llama-7b/ --data alpaca_data.json \\
        --out runs/alpaca-7b
    # a base too large for one GPU: FSDP2 shards it (and the adapter) over the GPUs
    torchrun --nproc_per_node 8 -m llama_adapter_triton.train.finetune --checkpoint llama-65b/ \\
        --data alpaca_data.json --out runs/alpaca-65b --fsdp
    # go on with a run that stopped (killed, or --stop-after-steps): the same flags plus --resume
    llama-adapter finetune --checkpoint llama-7b/ --data alpaca_data.json --out runs/alpaca-7b --resume
    # multi-modal: records with an "image" file, a local CLIP model (model/visual.py)
    llama-adapter finetune --checkpoint llama-7b/ --data sqa.json --out runs/sqa-7b --clip clip-vit-large-patch14/
    # LLaMA-Adapter V2: biases, scales and norms trained too (the official code's 31 layers of prompts, its blr)
    llama-adapter finetune --checkpoint llama-7b/ --data alpaca_data.json --out runs/v2-7b --adapter-version 2 \\
        --adapter-layers 31 --blr 1e-3 --weight-decay 0.05
    # V2, multi-modal: early fusion, and the paper's joint training on image-text pairs mixed with instructions
    llama-adapter finetune --checkpoint llama-7b/ --data captions_and_alpaca.json --out runs/v2-mm \\
        --adapter-version 2 --adapter-layers 31 --clip clip-vit-large-patch14/ --joint-training

The model: load_checkpoint (Meta or HF) with a fresh adapter (prompts N(0, 1), gates 0: the model
starts as the base) in its top --adapter-layers layers; the base is frozen and cast to --dtype
(bf16 on a GPU, fp32 on a CPU; fp16 uses loss scaling, torch.amp.GradScaler), the adapter stays fp32.
--adapter-version 2 (LLaMA-Adapter V2, model/adapter.py) also trains a bias (zero-init) and a scale (one-init) of
every linear layer of every layer, y = s * (W x + b) (--v2-scale output, the paper's and litgpt's) or
y = W (s * x) + b (--v2-scale input, the official V2 code's), the output layer's too with --v2-output-layer
(litgpt's), and every norm (fp32): the fresh model is still the base, bit for bit; the backward then reaches
every layer. --template chat formats the examples in the official V2 chat model's template (model/prompt.py).
Data: train/data.py (Alpaca JSON / JSONL, bad records reported by index, loss on response tokens only; messages
records in the checkpoint's own chat template, model/chat.py, or --chat-template's, the loss on every assistant turn;
--template model puts every record in it), a seeded held-out split (--eval-size) whose loss is computed after every
epoch.

Multi-modal (--clip): each record may name an "image" (relative to --image-root, by default the data file's
folder). The frozen CLIP encoder computes every image's features once, before the first step (with several
processes, each encodes its share and all gather the table; threads read the files ahead of the encoder);
each sequence of a batch then carries its image's features, and the model's projector
(model.visual_proj, trained with the prompts and gates, saved in the adapter file) turns them into the visual
token added to its prompts. Records without an image get no visual token. A missing or unreadable image, one over
Pillow's pixel limit (a decompression bomb), or one that leads outside --image-root ("..", an absolute path, a
link; allowed by --allow-external-files) stops the run before anything is written, naming its record.
With V2 the image goes in by early fusion (--fusion early, its default): the projector makes --visual-len (10)
tokens, the prompts of the first --visual-layers (1) layers with their own zero-init gates, apart from the
adaption prompts of the top layers (--fusion prompts adds them to those instead, as V1 and the official V2
release do). --joint-training (the V2 paper's joint training with disjoint parameters): image records (image-text
pairs {"image", "caption"} among them) train the projector and the early gates, text records the rest; each
micro-batch holds one kind, its loss is divided by its kind's targets in the step, and a group none of whose
records is in a step is not updated in it (JointTraining; with DDP, not with --fsdp).

Batches (train/data.py's module docstring has the details)
- Packed (the default): whole examples in micro-batches of at most --token-budget tokens, no padding;
  the model attends within each sequence (cu_seqlens, kernels.zero_init_attention's varlen mode).
- --padded: --batch-size examples per micro-batch, padded to --pad-to tokens (512, the official
  script's) or to the longest of the batch; for comparison.
- A step is --micro-batches-per-step micro-batches (gradient accumulation; all processes together:
  with N processes each runs micro_batches_per_step / N of them). The loss of a step is the mean
  cross-entropy over all of its target tokens, whatever the micro-batches or processes.
Learning rate: --lr, or by default --blr x effective batch / 256 (the paper's rule, blr 9e-3), where
the effective batch is the number of EXAMPLES per optimizer step: batch_size x micro_batches_per_step
when padded; when packed, where it varies from step to step, the train examples divided by the
steps of the first epoch (the mean). AdamW, betas (0.9, 0.95), weight decay 0.02 on the prompts, the projector's
weights and the gates (the official scripts decay every parameter of more than one dimension, their (1, H, 1, 1)
gates included; --no-decay-gates leaves ours, (H,) or (1,), out), none on biases, V2's scales and norms; linear warmup
over --warmup-epochs (default 2 of every 5 epochs, as the paper's 2 of 5), then cosine decay to --min-lr; gradients
clipped to --clip-grad.

Outputs (only rank 0 writes; every file goes to a temporary name and is renamed into place)
    OUT/adapter-epoch{N}.safetensors   the adapter after epoch N (save_adapter's format; load_adapter reads it)
    OUT/adapter.safetensors            the final adapter
    OUT/adapter-peft/                  with --export peft: the final adapter as PEFT's adaption prompt
                                       (adapter_config.json, adapter_model.safetensors): PeftModel.from_pretrained
                                       (LlamaForCausalLM of the base, OUT/adapter-peft) loads it
    OUT/train_state.pt                 resumable state: adapter, optimizer, scheduler, grad scaler, RNG,
                                       position (epoch, step) and config; after every epoch, every
                                       --save-every steps and at --stop-after-steps
    OUT/log.csv                        one row per step (split "train") and per epoch's eval ("eval"):
                                       step, epoch, split, loss, lr, grad_norm, examples, tokens,
                                       tokens_computed, tokens_per_s, step_s, elapsed_s, memory_gib
    OUT/loss.png                       the loss curves
    OUT/tensorboard/                   the same scalars, when the tensorboard package is installed
The run knows its own files by their content, not only their names: adapters by this project's metadata,
train_state.pt by its format entry, log.csv by its header, loss.png by its PNG Software entry, tensorboard/ by
holding only event files named *.llama-adapter-triton, adapter-peft/ by holding only its two files, marked in the
safetensors metadata. An OUT holding any of them is refused unless --resume (go
on with that run) or --overwrite (delete them first, the event files one by one); a file or folder of one of those
names that the run did not write (another tool's log.csv or tensorboard/, a file of an older version) is never
deleted or written over: the run is refused, naming it and why. Temporary .NAME.XXXXXXXX.tmp files of a killed run
are deleted by --resume and --overwrite; other files in OUT are left alone.
tokens / tokens_per_s count real tokens (no padding), tokens_computed the tokens the model ran on (padding
included: equal to tokens when packed);
memory_gib is the peak CUDA memory allocated on a GPU, the peak resident memory on a CPU.

A file that cannot be written (a full disk) stops the run with OutputError: one line naming the file and the last
saved state, which is intact (every file goes to a temporary name first), so --resume goes on from it.

Divergence: the loss and the gradient norm of every step are checked where the loss comes to the host anyway,
before the optimizer applies the step (with fp16 a non-finite gradient is the loss scaler's to handle: it skips the
step and lowers its scale), and the adapter before every save. A NaN or Inf stops the run on every rank together
(TrainingDiverged; exit status 1, naming the step and epoch): nothing non-finite is ever saved, and the last saved
state and adapters stay as they were.

Resume: --resume reads OUT/train_state.pt (torch.load with weights_only=True) and continues at the
saved (epoch, step); the data order is a function of (seed, epoch) only and the loop draws no random
numbers, so the result equals an uninterrupted run (tests: bitwise on a CPU). Settings that change the
result must match the saved ones (an error lists the differences); --save-every, --stop-after-steps,
--device, --fsdp, --tensorboard and --allow-external-files may change. The state also keeps the size and sha256
of the data file and of the tokenizer file (input_digests): a resume on other data is refused, naming what changed
(a state written before they were kept resumes with a warning). The state is untrusted input: each entry is checked
before it is used. log.csv keeps its rows up to the saved step.

Several processes (torchrun): each rank takes its share of every step's micro-batches.
- DDP (default): the base is frozen (requires_grad False), so DDP buckets and all-reduces only the
  adapter's gradients; micro-batches before the last of a step run under no_sync().
- --fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) per transformer block and at the root, built on
  the meta device and filled from rank 0's checkpoint (set_model_state_dict, broadcast_from_rank0):
  no rank but 0 ever holds the whole base. fully_shard keeps each parameter's dtype (bf16 base, fp32
  adapter) and shards frozen and trained parameters alike. Adapter and optimizer state are gathered
  to full tensors for the files: a run may resume with or without FSDP, on another number of processes
  (the same --micro-batches-per-step: the data plan does not depend on the processes).
CPU runs use the gloo backend (tested with 2 processes), GPUs NCCL.
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from llama_adapter_triton.model.adapter import (
    FUSIONS,
    GATE_ACTS,
    GATES,
    SCALES,
    VERSIONS,
    AdapterConfig,
    adapter_groups,
    adapter_state_dict,
    cast_base,
    mark_only_adapter_as_trainable,
)
from llama_adapter_triton.model.chat import ChatTemplate
from llama_adapter_triton.model.checkpoint import (
    ADAPTER_FORMAT,
    CheckpointError,
    load_checkpoint,
    load_config,
    peft_export_problem,
    save_adapter,
    write_atomic,
)
from llama_adapter_triton.model.cli import build_parser, check_cuda_device, cli_message, parse_dataclass
from llama_adapter_triton.model.llama import LLaMA, check_window
from llama_adapter_triton.model.prompt import TEMPLATES
from llama_adapter_triton.model.quantize import QUANTIZE_MODES, check_quantize, logical_numel
from llama_adapter_triton.model.tokenizer import Tokenizer
from llama_adapter_triton.train.data import (
    IGNORE_INDEX,
    TOKENIZATIONS,
    DataError,
    PackedLoader,
    PaddedLoader,
    Step,
    TokenizedDataset,
    load_records,
    split_eval,
    tokenize_records,
)
from llama_adapter_triton.train.loss import linear_cross_entropy

PROG = "llama-adapter finetune"
ADAPTER_FILE = "adapter.safetensors"
EPOCH_ADAPTER = "adapter-epoch{}.safetensors"  # N = 1, 2, ...: the adapter after epoch N
PEFT_DIR = "adapter-peft"  # --export peft: the final adapter as a PEFT adaption-prompt folder
EXPORTS = ("peft",)
STATE_FILE = "train_state.pt"
LOG_FILE = "log.csv"
PLOT_FILE = "loss.png"
TB_DIR = "tensorboard"
TB_SUFFIX = ".llama-adapter-triton"  # the end of the event files' names the run writes in TB_DIR
PLOT_TAG = f"llama-adapter-triton {PROG}"  # the PNG's Software entry
STATE_FORMAT = "llama-adapter-triton train state"
LOG_COLUMNS = ("step", "epoch", "split", "loss", "lr", "grad_norm", "examples", "tokens", "tokens_computed",
               "tokens_per_s", "step_s", "elapsed_s", "memory_gib")
# settings a resumed run may change: they do not change the result
RESUMABLE_CHANGES = ("out", "resume", "overwrite", "save_every", "stop_after_steps", "device", "tensorboard", "fsdp",
                     "allow_external_files", "activation_checkpointing", "export")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# settings that a state written before they existed ran with (the gates were not decayed before --decay-gates, the
# response was encoded on its own before --tokenization)
UNRECORDED_SETTINGS = {"decay_gates": False, "tokenization": "litgpt"}


class UsageError(ValueError):
    """A flag whose value does not fit the model or the data (found after parsing); names the flag."""


class OutputError(OSError):
    """A file of the run could not be written (a full disk, ...); the message names it and says what is intact."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradients (or the adapter) went NaN or Inf: the run stops; nothing of it was applied or saved,
    the last saved state is intact."""


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, e.g. 6,12,18,24, got {text!r}") \
            from None


def _pad_to(text: str) -> int | str:
    if text == "longest":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'longest', got {text!r}") from None


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run, with its default; the command line is generated from these fields."""

    checkpoint: Path = field(metadata={"help": "base model: a Meta or Hugging Face checkpoint folder"})
    data: Path = field(metadata={"help": "Alpaca data: a JSON list or JSON Lines of {instruction, input, output}"})
    out: Path = field(metadata={"help": "output folder (adapters, train_state.pt, log.csv, loss.png)"})
    tokenizer: Path | None = field(default=None, metadata={
        "help": "tokenizer.model / tokenizer.json or its folder (default: the checkpoint folder)"})
    # the adapter
    adapter_len: int = field(default=10, metadata={"help": "prompts per adapted layer"})
    adapter_layers: int = field(default=30, metadata={"help": "adapted layers, counted from the top"})
    gate: str = field(default="head", metadata={"help": "one gate per head or per layer", "choices": GATES})
    gate_act: str = field(default="tanh", metadata={"help": "tanh(gate) (the paper's) or the raw gate",
                                                    "choices": GATE_ACTS})
    adapter_version: int = field(default=1, metadata={
        "help": "1: LLaMA-Adapter; 2: LLaMA-Adapter V2, which also trains a bias and a scale of every linear layer "
                "and the norms (and fuses images early with --clip)", "choices": VERSIONS})
    v2_scale: str = field(default="output", metadata={
        "help": "V2: where the scale sits: output, y = s * (W x + b) (the paper's, litgpt's), or input, "
                "y = W (s * x) + b (the official V2 code's)", "choices": SCALES})
    v2_output_layer: bool = field(default=False, metadata={
        "help": "V2: a bias and a scale on the output layer too (litgpt's adapter_v2 does; the official code not)"})
    template: str = field(default="alpaca", metadata={
        "help": "prompt template (model/prompt.py): alpaca, chat (the official V2 chat model's: conversation "
                "records give one example per reply), or model (the checkpoint's chat template for every record); "
                "messages records always use the checkpoint's chat template", "choices": TEMPLATES})
    chat_template: Path | None = field(default=None, metadata={
        "help": "the chat template of messages records (and --template model): a .jinja file or a "
                "tokenizer_config.json (default: the tokenizer folder's chat_template.jinja or tokenizer_config.json)"})
    tokenization: str = field(default="official", metadata={
        "help": "official: encode(prompt + response), the prompt's tokens masked (the official script's); litgpt: "
                "the response encoded on its own after the prompt (litgpt's, and this project's before)",
        "choices": TOKENIZATIONS})
    # multi-modal (model/visual.py)
    clip: Path | None = field(default=None, metadata={
        "help": "multi-modal: a local CLIP model folder; the records' \"image\" files are encoded by it (frozen) and a "
                "projector of its features is trained with the adapter"})
    clip_layers: tuple[int, ...] | None = field(default=None, metadata={
        "help": "multi-modal: the CLIP layers whose global features are concatenated, e.g. 6,12,18,24 (default: four "
                "evenly spaced, the last included)", "type": _layer_list})
    visual_hidden: int = field(default=128, metadata={"help": "multi-modal: the projector MLP's hidden width"})
    image_root: Path | None = field(default=None, metadata={
        "help": "multi-modal: the folder relative image paths start from (default: the data file's folder)"})
    fusion: str | None = field(default=None, metadata={
        "help": "multi-modal: early (the visual tokens are the prompts of the first --visual-layers layers, apart "
                "from the adaption prompts: V2's early fusion) or prompts (added to every adapted layer's prompts: "
                "V1's, and the official V2 release's); default early with --adapter-version 2, else prompts",
        "choices": FUSIONS})
    visual_len: int | None = field(default=None, metadata={
        "help": "multi-modal: visual tokens per image (default 1; with early fusion 10, the official V2 release's "
                "number of visual queries; with prompts fusion 1 or --adapter-len)"})
    visual_layers: int = field(default=1, metadata={
        "help": "multi-modal, early fusion: the first layers whose prompts are the visual tokens (the paper: 1)"})
    joint_training: bool = field(default=False, metadata={
        "help": "multi-modal: the paper's joint training with disjoint parameters: image records train the projector "
                "and the early gates, text records the adaption prompts, gates, biases, scales and norms"})
    allow_external_files: bool = field(default=False, metadata={
        "help": "read images that lead outside --image-root (\"..\", absolute paths, links) and checkpoint shards "
                "that its shard index names outside --checkpoint; refused by default"})
    # data
    max_seq_len: int = field(default=512, metadata={
        "help": "examples are truncated to this many tokens (counted and reported); at most the model's context"})
    on_bad_record: str = field(default="error", metadata={
        "help": "a malformed record stops the run (error) or is skipped and counted (skip)",
        "choices": ("error", "skip")})
    eval_size: float = field(default=0.02, metadata={
        "help": "held-out examples: a fraction in (0, 1), a count >= 1, or 0 for no eval"})
    token_budget: int = field(default=4096, metadata={"help": "packed: the most tokens in one micro-batch"})
    padded: bool = field(default=False, metadata={"help": "pad instead of packing (the official script's layout)"})
    batch_size: int = field(default=4, metadata={"help": "padded: examples per micro-batch"})
    pad_to: int | str = field(default=512, metadata={
        "help": "padded: row length in tokens, or 'longest' (of each batch)", "type": _pad_to})
    micro_batches_per_step: int | None = field(default=None, metadata={
        "help": "micro-batches per optimizer step, all processes together (gradient accumulation; default: one "
                "per process)"})
    # optimisation
    epochs: int = field(default=5, metadata={"help": "passes over the training data"})
    blr: float = field(default=9e-3, metadata={"help": "base learning rate: lr = blr x effective batch / 256"})
    lr: float | None = field(default=None, metadata={"help": "absolute learning rate (overrides --blr)"})
    min_lr: float = field(default=0.0, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_epochs: float | None = field(default=None, metadata={
        "help": "linear warmup, in epochs (default: 0.4 x --epochs, the paper's 2 of 5)"})
    weight_decay: float = field(default=0.02, metadata={
        "help": "AdamW weight decay of the prompts, the projector's weights and (--decay-gates) the gates; biases, "
                "scales and norms are not decayed"})
    decay_gates: bool = field(default=True, metadata={
        "help": "decay the gates too, as the official scripts do (they decay every parameter of more than one "
                "dimension, their (1, H, 1, 1) gates included); --no-decay-gates leaves them out"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    clip_grad: float = field(default=1.0, metadata={"help": "clip the gradient norm to this; 0: no clipping"})
    seed: int = field(default=0, metadata={"help": "seed of the adapter's init, the eval split and the data order"})
    # hardware
    device: str = field(default="auto", metadata={
        "help": "auto (cuda if available, else cpu), cpu, cuda or cuda:N (one process); torchrun: auto, cuda, cpu"})
    dtype: str = field(default="auto", metadata={
        "help": "base weights and activations: auto is bfloat16 on a GPU, float32 on a CPU; the adapter is fp32",
        "choices": ("auto", *DTYPES)})
    fsdp: bool = field(default=False, metadata={"help": "shard the model with FSDP2 (torchrun, for a base too large "
                                                        "for one GPU) instead of DDP"})
    # memory (model/quantize.py, model/llama.py, train/loss.py)
    quantize: str | None = field(default=None, metadata={
        "help": "store the frozen base's linear weights in nf4 (QLoRA's, with double quantization) or int8 "
                "(LLM.int8) through bitsandbytes, dequantized per matmul; --dtype is then the compute dtype",
        "choices": QUANTIZE_MODES})
    quantize_output: bool = field(default=False, metadata={"help": "with --quantize: the output layer too"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each adapted block's activations in the backward instead of keeping them (long sequences, "
                "large --token-budget)"})
    # outputs
    save_every: int = field(default=0, metadata={"help": "also write train_state.pt every N steps (0: per epoch)"})
    stop_after_steps: int = field(default=0, metadata={
        "help": "stop after N optimizer steps in all, writing train_state.pt (--resume goes on); 0: run to the end"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its train_state.pt"})
    overwrite: bool = field(default=False, metadata={"help": "delete the results of an earlier run in --out first"})
    tensorboard: bool = field(default=True, metadata={"help": "TensorBoard events in OUT/tensorboard (if installed)"})
    export: str | None = field(default=None, metadata={
        "help": f"also write the final adapter in another format: peft, the folder OUT/{PEFT_DIR} that PEFT's "
                "PeftModel.from_pretrained loads (needs --gate layer --gate-act identity, V1, no --clip)",
        "choices": EXPORTS})

    def __post_init__(self) -> None:
        for name in ("checkpoint", "data", "out", "tokenizer", "clip", "image_root"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        for name, minimum in (("adapter_len", 1), ("adapter_layers", 1), ("visual_hidden", 1), ("max_seq_len", 2),
                              ("token_budget", 1), ("batch_size", 1), ("epochs", 1), ("seed", 0), ("save_every", 0),
                              ("stop_after_steps", 0), ("visual_layers", 1), ("adapter_version", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{_flag(name)} must be an integer >= {minimum}, got {value!r}")
        if self.clip is None and (self.clip_layers is not None or self.image_root is not None):
            raise ValueError("--clip-layers and --image-root go with --clip (multi-modal fine-tuning)")
        if self.clip is None and (self.fusion is not None or self.visual_len is not None or self.visual_layers != 1
                                  or self.joint_training):
            raise ValueError("--fusion, --visual-len, --visual-layers and --joint-training go with --clip (multi-modal "
                             "fine-tuning)")
        if self.visual_len is not None and (isinstance(self.visual_len, bool) or not isinstance(self.visual_len, int)
                                            or self.visual_len < 1):
            raise ValueError(f"--visual-len must be an integer >= 1, got {self.visual_len!r}")
        if self.adapter_version == 1 and (self.v2_scale != "output" or self.v2_output_layer):
            raise ValueError("--v2-scale and --v2-output-layer go with --adapter-version 2")
        if self.joint_training and self.fsdp:
            raise ValueError("--joint-training routes each micro-batch's gradients to one group of parameters, which "
                             "FSDP's sharded gradients do not allow: use DDP (leave out --fsdp)")
        if self.clip_layers is not None:
            self.clip_layers = tuple(self.clip_layers)
        if self.micro_batches_per_step is not None and self.micro_batches_per_step < 1:
            raise ValueError(f"--micro-batches-per-step must be >= 1, got {self.micro_batches_per_step}")
        if self.pad_to != "longest" and (not isinstance(self.pad_to, int) or self.pad_to < 1):
            raise ValueError(f"--pad-to must be a positive number of tokens or 'longest', got {self.pad_to!r}")
        for f in fields(self):  # every number given as a float: finite (inf, nan are typos or attacks)
            value = getattr(self, f.name)
            if f.type in ("float", "float | None") and value is not None and not math.isfinite(value):
                raise ValueError(f"{_flag(f.name)} must be a finite number, got {value}")
        if self.eval_size < 0 or (self.eval_size >= 1 and not float(self.eval_size).is_integer()):
            raise ValueError(f"--eval-size must be a fraction in (0, 1), a whole count >= 1, or 0, got "
                             f"{self.eval_size}")
        for name in ("blr", "lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("min_lr", "weight_decay", "clip_grad"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must lie in [0, 1), got {getattr(self, name)}")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"--warmup-epochs must lie in [0, --epochs={self.epochs}], got {self.warmup_epochs}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out, --overwrite deletes it: give one of them")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name, choices in (("gate", GATES), ("gate_act", GATE_ACTS), ("on_bad_record", ("error", "skip")),
                              ("dtype", ("auto", *DTYPES)), ("adapter_version", VERSIONS), ("v2_scale", SCALES),
                              ("template", TEMPLATES), ("fusion", (None, *FUSIONS)), ("tokenization", TOKENIZATIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{_flag(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        check_quantize(self.quantize, argument="--quantize")
        if self.export not in (None, *EXPORTS):
            raise ValueError(f"--export must be one of {', '.join(EXPORTS)}, got {self.export!r}")
        if self.export == "peft":
            problem = "PEFT's adaption prompt has no visual projector (--clip)" if self.clip is not None else \
                peft_export_problem(AdapterConfig(gate=self.gate, gate_act=self.gate_act, version=self.adapter_version))
            if problem:
                raise ValueError(f"--export peft: {problem}; train with --gate layer --gate-act identity "
                                 "--adapter-version 1 and no --clip")
        if self.quantize_output and self.quantize is None:
            raise ValueError("--quantize-output goes with --quantize nf4|int8")
        if self.quantize is not None and self.fsdp:
            raise ValueError(f"--quantize {self.quantize} with --fsdp: FSDP2 cannot shard bitsandbytes' packed "
                             "weights; a quantized base fits one GPU (70B in nf4: 34 GiB), so run without --fsdp "
                             "(DDP)")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


@dataclass
class RunResult:
    """What run() did: where it wrote, the last losses, and the trained model (unwrapped; FSDP-sharded with --fsdp)."""

    out: Path
    adapter: dict[str, torch.Tensor]  # the final adapter, full fp32 tensors on the CPU, on every rank
    steps: int
    train_loss: float | None  # of the last step
    eval_loss: float | None  # of the last epoch
    seconds: float
    model: LLaMA | None = None


# ----------------------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Dist:
    """This process's place: rank, world_size, device, and whether run() started the process group."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() run on rank 0 only; its result (or its exception) reaches every rank."""
        if self.world_size == 1:
            return fn()
        payload: list[Any] = [None]
        if self.main:
            try:
                payload = [(True, fn())]
            except Exception as e:  # re-raised on every rank, so that all of them stop together
                payload = [(False, e)]
        dist.broadcast_object_list(payload, src=0)
        ok, value = payload[0]
        if not ok:
            raise value
        return value

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t


def setup_distributed(device: str) -> Dist:
    """One process, or a torchrun rank (WORLD_SIZE > 1): gloo on CPUs, NCCL on GPUs (cuda:LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if device.startswith("cuda"):
        try:
            check_cuda_device(device)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if world_size == 1:
        return Dist(0, 1, torch.device(device if device != "auto" else "cuda" if cuda else "cpu"))
    if device.startswith("cuda:"):
        raise UsageError(f"--device {device}: under torchrun every rank takes cuda:LOCAL_RANK; give --device cuda")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    return Dist(rank, world_size, dev, owns)


# ----------------------------------------------------------------------------------------------------------------
# The model


def build_model(config: FinetuneConfig, adapter: AdapterConfig, dtype: torch.dtype,
                d: Dist) -> tuple[LLaMA, torch.nn.Module]:
    """(model, the module to train through): the plain model, the same under DDP, or the FSDP2-sharded model."""
    if not config.fsdp:
        model = load_checkpoint(config.checkpoint, adapter=adapter, dtype=dtype, device=d.device,
                                allow_external_files=config.allow_external_files, quantize=config.quantize,
                                quantize_output=config.quantize_output)
        mark_only_adapter_as_trainable(model)
        model.activation_checkpointing = config.activation_checkpointing
        if d.world_size == 1:
            return model, model
        # the base has requires_grad False: DDP registers (and all-reduces) the adapter's parameters only
        return model, DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = LLaMA(load_config(config.checkpoint, allow_external_files=config.allow_external_files), adapter)
    cast_base(model, dtype)
    mark_only_adapter_as_trainable(model)
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=d.device)
    # rank 0 reads the checkpoint (on the CPU) and its fresh, seeded adapter; the others receive their shards
    full = load_checkpoint(config.checkpoint, adapter=adapter, dtype=dtype,
                           allow_external_files=config.allow_external_files).state_dict() if d.main else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.activation_checkpointing = config.activation_checkpointing
    return model, model


def adapter_fields(config: FinetuneConfig) -> dict[str, Any]:
    """The AdapterConfig fields the flags give, the multi-modal defaults resolved (--fusion: early for V2, else
    prompts; --visual-len: 10 with early fusion, else 1); visual_dim and clip_layers come from the CLIP model."""
    fields: dict[str, Any] = dict(adapter_len=config.adapter_len, adapter_layers=config.adapter_layers,
                                  gate=config.gate, gate_act=config.gate_act, version=config.adapter_version)
    if config.adapter_version == 2:
        fields.update(scale=config.v2_scale, output_bias_scale=config.v2_output_layer)
    if config.clip is not None:
        fusion = config.fusion or ("early" if config.adapter_version == 2 else "prompts")
        fields.update(visual_hidden=config.visual_hidden, fusion=fusion, visual_layers=config.visual_layers,
                      visual_len=config.visual_len or (10 if fusion == "early" else 1))
    return fields


def describe_adapter(adapter: AdapterConfig, dim: int) -> str:
    """One line: what the adapter trains."""
    text = f"LLaMA-Adapter{' V2' if adapter.version == 2 else ''}: top {adapter.adapter_layers} layers x " \
           f"{adapter.adapter_len} prompts, gate per {adapter.gate} ({adapter.gate_act})"
    if adapter.version == 2:
        scale = "y = s * (W x + b)" if adapter.scale == "output" else "y = W (s * x) + b"
        output = ", the output layer too" if adapter.output_bias_scale else ""
        text += f"; bias and scale of every linear ({scale}){output}, the norms"
    if adapter.visual_dim:
        where = f"the prompts of the first {adapter.visual_layers} layer(s) (early fusion)" if adapter.early_fusion \
            else "added to every adapted layer's prompts"
        text += (f"; a {adapter.visual_dim} -> {adapter.visual_hidden} -> {adapter.visual_len} x {dim} projector of "
                 f"the image features: {where}")
    return text


class JointTraining:
    """LLaMA-Adapter V2's joint training with disjoint parameters (arXiv 2304.15010, sec. 4.2): image records train the
    "visual" group of model.adapter_groups (the projector, the early-fusion gates), text records the "language" group
    (the adaption prompts and their gates, V2's biases, scales and norms).

    The loaders keep each micro-batch to one kind (kinds: 0 text, 1 image). route() divides a micro-batch's loss by
    its kind's targets in the step, and gradient hooks on the parameters zero the other group's share before it is
    accumulated (so DDP reduces each group's own gradients); drop_absent() leaves a group whose kind has no target in
    a step without a gradient, so that AdamW does not move it (no momentum step, no decay) in that step."""

    GROUPS = ("language", "visual")  # by kind

    def __init__(self, model: LLaMA) -> None:
        state = adapter_state_dict(model)
        self.params = [[state[name] for name in adapter_groups(model)[group]] for group in self.GROUPS]
        self.active = -1
        self.handles = [p.register_hook(lambda grad, kind=kind: grad if self.active == kind else torch.zeros_like(grad))
                        for kind, params in enumerate(self.params) for p in params]

    def size(self, kind: int) -> int:
        return sum(p.numel() for p in self.params[kind])

    def route(self, batch: dict, step: Step) -> int:
        """Make the micro-batch's backward reach its kind's group only; returns its loss's divisor."""
        self.active = batch["kind"]
        return step.kind_targets.get(batch["kind"]) or 1  # a filler (kind -1): no target, no gradient

    def drop_absent(self, step: Step) -> None:
        for kind, params in enumerate(self.params):
            if not step.kind_targets.get(kind):
                for p in params:
                    p.grad = None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def adapter_tensors(model: LLaMA) -> dict[str, torch.Tensor]:
    """The adapter as full fp32 CPU tensors on every rank (gathered from the shards under FSDP: call on all ranks)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
    names = adapter_state_dict(model).keys()  # not the quantization state a quantized base adds to the state dict
    return {k: v.detach().to("cpu", torch.float32) for k, v in state.items() if k in names}


@dataclass
class ImageFeatures:
    """A multi-modal run's images: the CLIP features of each, computed once before training (the encoder is
    frozen), and which image each record has."""

    features: torch.Tensor  # (num_images, visual_dim) fp32, on the training device
    row_of_record: dict[int, int]  # record index (TokenizedDataset.source_index) -> row of features

    def rows(self, data: TokenizedDataset) -> torch.Tensor:
        """(len(data),) int64: each example's row of features, -1 for an example without an image."""
        return torch.tensor([self.row_of_record.get(i, -1) for i in data.source_index.tolist()], dtype=torch.int64)

    def attach(self, batch: dict, rows: torch.Tensor) -> dict:
        """The batch with image_features (num_seqs, visual_dim) and image_mask (num_seqs,) for the model;
        rows: self.rows(the loader's data). A filler's one row, and examples without an image, get no image."""
        seq_rows = rows[batch["example_ids"]] if len(batch["example_ids"]) else torch.full((batch["num_seqs"],), -1)
        device = self.features.device
        return {**batch, "image_features": self.features[seq_rows.clamp(min=0).to(device)],
                "image_mask": (seq_rows >= 0).to(device)}


def encode_images(config: FinetuneConfig, images: dict[int, str], dtype: torch.dtype, d: Dist,
                  say: Callable[[str], None] = print) -> tuple[ImageFeatures, tuple[int, ...]]:
    """The CLIP features of the records' images (images: record index -> file as the record gives it;
    relative to --image-root, by default the data file's folder), and the CLIP layers they come from.
    An image that leads outside --image-root ("..", an absolute path, a link) is refused unless
    --allow-external-files. With several processes each encodes every world_size-th image and all of them gather
    the whole table."""
    from llama_adapter_triton.model.visual import CLIPImageEncoder, ImageError

    def listing(items: list[str]) -> str:
        return "; ".join(items[:5]) + (f"; ... and {len(items) - 5} more" if len(items) > 5 else "")

    root = config.image_root or config.data.parent
    files: dict[Path, int] = {}  # each file once, in order of first use
    row_of_record, missing, outside = {}, [], []
    for index, image in sorted(images.items()):
        path = Path(image) if Path(image).is_absolute() else root / image
        if not path.is_file():
            missing.append(f"record {index}: {path}")
        elif not (config.allow_external_files or path.resolve().is_relative_to(root.resolve())):
            outside.append(f"record {index}: {image!r} is {path.resolve()}")
        row_of_record[index] = files.setdefault(path, len(files))
    if missing:
        raise DataError(f"{config.data}: {len(missing)} record(s) name an image file that does not exist "
                        f"(relative paths start at {root}; --image-root sets it): {listing(missing)}")
    if outside:
        raise DataError(f"{config.data}: {len(outside)} record(s) name an image outside --image-root {root} (through "
                        f"\"..\", an absolute path or a link): {listing(outside)}; refused unless you pass "
                        "--allow-external-files")
    try:
        encoder = CLIPImageEncoder(config.clip, layers=config.clip_layers, device=d.device, dtype=dtype)
    except ValueError as e:  # layers out of range, an incomplete CLIP checkpoint
        raise UsageError(f"--clip / --clip-layers: {e}") from None
    say(f"images: {len(files)} file(s) for {len(row_of_record)} record(s); CLIP {config.clip} "
        f"({encoder.depth} layers), global features of layers {', '.join(map(str, encoder.layers))}: "
        f"{encoder.feature_dim} per image, computed once")
    paths = list(files)[d.rank::d.world_size]
    features, error = None, None
    try:
        features = encoder.encode_files(paths, progress=d.main and len(files) > 64)
    except ImageError as e:  # not an image, or a decompression bomb
        records = [i for i, row in row_of_record.items() if row == files[Path(e.path)]]
        more = f" (and {len(records) - 1} more with that image)" if len(records) > 1 else ""
        error = f"{config.data}: record {records[0]}{more}: {e}"
    if d.world_size > 1:  # every rank learns of any rank's error before the gather (which would wait for ever)
        errors: list[str | None] = [None] * d.world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise DataError(error)
    if d.world_size > 1:  # rank r encoded images r, r + W, ...: gather, then interleave back
        per = -(-len(files) // d.world_size)
        mine = torch.zeros(per, encoder.feature_dim, device=d.device)
        mine[:len(features)] = features
        shares = [torch.empty_like(mine) for _ in range(d.world_size)]
        dist.all_gather(shares, mine)
        features = torch.stack(shares, dim=1).flatten(0, 1)[:len(files)]
    return ImageFeatures(features, row_of_record), encoder.layers


def batch_loss_sum(model: torch.nn.Module, batch: dict, device: torch.device, *,
                   loss_impl: str = "auto") -> torch.Tensor:
    """The summed cross-entropy (fp32) of a micro-batch's targets. Labels are already shifted (train/data.py).

    The output layer runs at the target positions only (the response, about half of an Alpaca example's
    tokens), and there in chunks or fused (train/loss.py: no (targets x vocab) fp32 tensor exists).
    The positions are found on the CPU, where the loaders make the labels, so there is no device sync.
    Multi-modal batches carry image_features and image_mask (ImageFeatures.attach). loss_impl: train/loss.py's
    impl ("full": the plain formulation with the logits of every target, for comparison)."""
    labels = batch["labels"].flatten()
    at = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # flat indices of the targets
    targets = labels.index_select(0, at).to(device, non_blocking=True)
    at = at.to(device, non_blocking=True)
    tokens = batch["tokens"].to(device, non_blocking=True)
    images = {k: batch[k] for k in ("image_features", "image_mask") if k in batch}
    if "cu_seqlens" in batch:  # packed: one row, attention within each sequence, positions restarting
        hidden = model(tokens, positions=batch["positions"].to(device, non_blocking=True),
                       cu_seqlens=batch["cu_seqlens"].to(device, non_blocking=True), max_seqlen=batch["max_seqlen"],
                       logits_at=at, head=False, **images)
    else:  # right-padded rows: causal attention never reaches the padding of a real token
        hidden = model(tokens, logits_at=at, head=False, **images)
    output = getattr(model, "module", model).output  # DDP wraps the model
    return linear_cross_entropy(hidden, output, targets, impl=loss_impl)  # (N, dim): no IGNORE_INDEX left


def param_groups(model: torch.nn.Module, weight_decay: float, *, decay_gates: bool = True) -> list[dict]:
    """AdamW groups [decay, no decay]: weight decay on the trained parameters of 2 or more dims (prompts, the
    projector's weights) and, with decay_gates, on the gates (gate, visual_gate: (nheads,) or (1,) here); none on
    the biases, V2's scales and the norms. decay_gates=True is the official scripts' rule (timm's
    param_groups_weight_decay in alpaca_finetuning_v1, misc.add_weight_decay in V2: every parameter of more than
    one dimension, their gates being (1, H, 1, 1))."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            gate = name.rsplit(".", 1)[-1] in ("gate", "visual_gate")
            (decay if p.dim() >= 2 or (decay_gates and gate) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at step (0-based): linear warmup to 1, then cosine decay to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: PackedLoader | PaddedLoader, d: Dist,
             images: ImageFeatures | None = None) -> float:
    """Mean cross-entropy over the targets of the loader's data (all ranks together)."""
    total = torch.zeros((), device=d.device)
    targets = 0
    rows = images.rows(loader.data) if images is not None else None
    for step in loader.iter_epoch(0):
        for batch in step.batches:
            if images is not None:
                batch = images.attach(batch, rows)
            total += batch_loss_sum(model, batch, d.device)
        targets += step.num_targets
    return float(d.sum(total)) / targets


# ----------------------------------------------------------------------------------------------------------------
# Outputs


_TEMP_RE = re.compile(r"\.(adapter(-epoch\d+)?\.safetensors|adapter-peft|train_state\.pt|log\.csv|loss\.png)\."
                      r"[0-9a-f]{8}\.tmp")


def _own_file(path: Path) -> str | None:
    """None if path is a file (or event folder) a run of train.finetune wrote, recognised by its content;
    else why not. path has one of the names the run writes."""
    try:
        if path.name == TB_DIR:
            if not path.is_dir():
                return "not a folder"
            other = [p.name for p in path.iterdir() if not (p.is_file() and p.name.startswith("events.out.tfevents.")
                                                            and p.name.endswith(TB_SUFFIX))]
            return f"holds {other[0]!r}, not an event file of train.finetune's (*{TB_SUFFIX})" if other else None
        if path.name == PEFT_DIR:  # --export peft: the two files save_adapter(format="peft") writes, nothing else
            if not path.is_dir():
                return "not a folder"
            names = sorted(p.name for p in path.iterdir())
            if names != ["adapter_config.json", "adapter_model.safetensors"]:
                return f"holds {names}, not only the adapter_config.json and adapter_model.safetensors it writes"
            with safe_open(path / "adapter_model.safetensors", framework="pt") as f:
                return None if (f.metadata() or {}).get("written_by") == ADAPTER_FORMAT else \
                    "not a PEFT adapter written by train.finetune"
        if not path.is_file():
            return "not a file"
        if path.name == STATE_FILE:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return None if isinstance(state, dict) and state.get("format") == STATE_FORMAT else \
                "not a train state of train.finetune's"
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if path.name == LOG_FILE:
            return None if head.split(b"\r\n", 1)[0] == ",".join(LOG_COLUMNS).encode() else \
                "its first line is not train.finetune's header"
        if path.name == PLOT_FILE:
            return None if b"tEXtSoftware\0" + PLOT_TAG.encode() in head else "not a plot of train.finetune's"
        with safe_open(path, framework="pt") as f:  # adapter.safetensors, adapter-epochN.safetensors
            return None if (f.metadata() or {}).get("format") == ADAPTER_FORMAT else "not an adapter file of ours"
    except Exception as e:  # unreadable, or not of the format its name says: not ours
        return f"cannot be read as one ({type(e).__name__})"


def earlier_outputs(out: Path) -> tuple[list[Path], list[str], list[Path]]:
    """What out holds under the names a run writes: (the files of an earlier run, recognised by their content;
    "name (why not)" for those that are not ours; temporary .NAME.*.tmp files a killed run left)."""
    if not out.is_dir():
        return [], [], []
    named = [out / n for n in (ADAPTER_FILE, STATE_FILE, LOG_FILE, PLOT_FILE, TB_DIR, PEFT_DIR) if (out / n).exists()]
    named += sorted(out.glob(EPOCH_ADAPTER.format("*")))
    ours, foreign = [], []
    for path in named:
        why = _own_file(path)
        ours.append(path) if why is None else foreign.append(f"{path.name} ({why})")
    return ours, foreign, sorted(p for p in out.iterdir() if _TEMP_RE.fullmatch(p.name))


def check_outputs(config: FinetuneConfig) -> list[Path]:
    """Refuse an out folder this process cannot write, one holding files of the run's names that it did not write,
    or one holding an earlier run's results without --resume / --overwrite. Returns what the run deletes: the
    earlier results (--overwrite) and temporary files a killed run left (--overwrite, --resume)."""
    if config.out.exists() and not config.out.is_dir():
        raise UsageError(f"--out {config.out} is a file; give a folder")
    folder = config.out  # the folder, or the one it would be made in
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"--out {config.out}: {folder} is a file, so the folder cannot be made")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {config.out}: {folder} is not writable by this process")
    ours, foreign, temps = earlier_outputs(config.out)
    if foreign:
        raise FileExistsError(f"{config.out} holds files of the names {PROG} writes that it did not write: "
                              f"{'; '.join(foreign)}. They are never deleted or written over: move them away, or "
                              "choose another --out")
    if config.resume and not (config.out / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume: {config.out / STATE_FILE} not found, so there is no run to continue "
                                "(start without --resume)")
    found = ours + temps
    if found and not (config.resume or config.overwrite):
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise FileExistsError(f"{config.out} holds the results of an earlier run ({names}); pass --resume to "
                              "continue it, or --overwrite to delete them and start again")
    return temps if config.resume else found


def _json_config(config: FinetuneConfig) -> dict:
    """The settings as they read back from JSON (paths as strings, tuples as lists), to compare with a saved run's."""
    return json.loads(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}))


def _file_digest(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def input_digests(config: FinetuneConfig) -> dict[str, dict]:
    """Size and sha256 of what the run's examples are made of: the data file, the tokenizer file (and the
    tokenizer_config.json that gives a tokenizer.json its special tokens). Kept in the train state: --resume
    refuses to go on with other data."""
    tokenizer = Tokenizer.find(config.tokenizer or config.checkpoint)
    files = {"data file": config.data, "tokenizer": tokenizer}
    if tokenizer.suffix == ".json" and (tokenizer.parent / "tokenizer_config.json").is_file():
        files["tokenizer_config.json"] = tokenizer.parent / "tokenizer_config.json"
    return {name: {"file": str(path), **_file_digest(path)} for name, path in files.items()}


# the train state's entries, and their types; loaded from an untrusted file, each is checked before it is used
_STATE_ENTRIES = {"config": str, "epoch": int, "step": int, "global_step": int, "elapsed": float, "adapter": dict,
                  "optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict}


def load_state(config: FinetuneConfig, resolved: dict, inputs: dict[str, dict],
               say: Callable[[str], None] = print) -> dict:
    """OUT/train_state.pt, checked against this run's resolved settings and input_digests."""
    path = config.out / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded with weights_only=True ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a training state written by {PROG}")
    for key, kind in _STATE_ENTRIES.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool) or \
                (kind is int and state[key] < 0):
            raise CheckpointError(f"{path}: its {key!r} must be {'an int >= 0' if kind is int else kind.__name__}, got "
                                  f"{type(state.get(key)).__name__}")
    try:
        saved = json.loads(state["config"])
    except ValueError as e:
        raise CheckpointError(f"{path}: its 'config' is not JSON ({e})") from None
    saved = {**UNRECORDED_SETTINGS, **saved}
    changed = [f"{_flag(k)} {saved.get(k)!r} -> {v!r}" for k, v in resolved.items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if changed:
        raise UsageError(f"--resume: these settings differ from the run in {config.out}: {'; '.join(changed)}. "
                         "Resume with the same settings, or start again with --overwrite")
    saved_inputs = state.get("inputs")
    if saved_inputs is None:  # written before the digests were kept
        say(f"warning: {path} does not record the data's digests (an older version wrote it): resuming on the "
            "assumption that the data file and the tokenizer have not changed")
    elif not isinstance(saved_inputs, dict):
        raise CheckpointError(f"{path}: its 'inputs' must be a dict, got {type(saved_inputs).__name__}")
    else:
        def text(entry: object) -> str:
            if entry is None:
                return "none"
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
                return f"{entry.get('bytes')} bytes, sha256 {entry['sha256'][:12]}..."
            return repr(entry)

        changed = [f"the {name} {inputs[name]['file'] if name in inputs else ''}: {text(saved_inputs.get(name))} -> "
                   f"{text(inputs.get(name))}" for name in sorted(inputs.keys() | saved_inputs.keys())
                   if saved_inputs.get(name) != inputs.get(name)]
        if changed:
            raise UsageError(f"--resume: the data differs from the run in {config.out}: {'; '.join(changed)}. "
                             "Resume with the data it started with, or start again with --overwrite")
    return state


class RunLog:
    """log.csv (one row per step and per eval), TensorBoard events when installed; rank 0 only."""

    def __init__(self, out: Path, *, resume_step: int | None, tensorboard: bool):
        self.path = out / LOG_FILE
        if resume_step is not None and self.path.exists():  # drop the rows after the saved step: they are redone
            with open(self.path, newline="") as f:
                # (a row cut short by a full disk or a kill has missing fields: it goes too)
                rows = [r for r in csv.DictReader(f) if None not in r and None not in r.values()
                        and r["step"].isdigit() and int(r["step"]) <= resume_step]
            text = io.StringIO()
            writer = csv.DictWriter(text, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
            write_atomic(self.path, text.getvalue().encode(), overwrite=True)
        else:
            write_atomic(self.path, (",".join(LOG_COLUMNS) + "\r\n").encode(), overwrite=resume_step is not None)
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, LOG_COLUMNS)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.tb = SummaryWriter(str(out / TB_DIR), purge_step=None if resume_step is None else resume_step + 1,
                                        filename_suffix=TB_SUFFIX)

    def write(self, **row: Any) -> None:
        try:
            self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            self.file.flush()
        except OSError as e:  # a full disk: name the file (the rows after the last saved step are redone on resume)
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "memory_gib"):
                if row.get(key) is not None:
                    self.tb.add_scalar(f"{row['split']}/{key}", row[key], row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(log_path: Path, png_path: Path) -> Path:
    """The train and eval loss curves of log.csv as a PNG (matplotlib's Agg canvas; no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for split, style in (("train", "-"), ("eval", "o-")):
        points = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == split]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=f"{split} loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per target token")
    ax.set_title(f"LLaMA-Adapter fine-tuning: {log_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": PLOT_TAG})  # how --overwrite knows it
    return write_atomic(png_path, buf.getvalue(), overwrite=True)


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU; peak resident memory of this process on a CPU (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------------------------
# The run


def _resolve_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_data(config: FinetuneConfig, max_seq_len: int, say: Callable[[str], None] = print, *,
              vocab_size: int | None = None) -> tuple[TokenizedDataset, TokenizedDataset | None, dict[int, str]]:
    """(train, eval or None, images): the records of config.data, tokenized and split as run() does
    (source_index: record indices), and the image of each record that has one (index -> file as written).
    vocab_size: the model's; a tokenizer with more tokens is refused before the data is read."""
    tokenizer = Tokenizer(config.tokenizer or config.checkpoint)
    if vocab_size is not None:
        tokenizer.check_vocab(vocab_size)
    records, load_report = load_records(config.data, on_bad_record=config.on_bad_record, template=config.template)
    chat_template = ChatTemplate.from_file(config.chat_template) if config.chat_template is not None else \
        ChatTemplate.find(tokenizer.path)
    chats = [r.index for r in records if r.messages]
    if chats and chat_template is None:
        raise UsageError(f"{config.data}: record {chats[0]} (and {len(chats) - 1} more) is a conversation for the "
                         f"model's chat template, and {tokenizer.path.parent} has none (no chat_template.jinja, no "
                         "\"chat_template\" in tokenizer_config.json): pass --chat-template FILE (a .jinja file or a "
                         "tokenizer_config.json)")
    if chats:
        say(f"chat template: {chat_template.origin}")
    data, tok_report = tokenize_records(records, tokenizer, max_seq_len=max_seq_len, chat_template=chat_template,
                                        tokenization=config.tokenization)
    say(f"data: {load_report.summary()}")
    say(f"      {tok_report.summary()}")
    used = set(data.source_index.tolist())
    images = {r.index: r.image for r in records if r.image is not None and r.index in used}
    eval_size = int(config.eval_size) if config.eval_size >= 1 else config.eval_size
    if eval_size == 0:
        return data, None, images
    try:
        train, held_out = split_eval(data, eval_size, seed=config.seed)
    except ValueError:  # eval_size is checked in FinetuneConfig: all that can be wrong is the count
        raise UsageError(f"--eval-size {config.eval_size:g} leaves none of the {len(data)} examples to train on") \
            from None
    return train, held_out, images


def _loader(config: FinetuneConfig, data: TokenizedDataset, mbs: int, d: Dist, *, shuffle: bool,
            kinds: np.ndarray | None = None):
    common = dict(micro_batches_per_step=mbs, shuffle=shuffle, seed=config.seed, rank=d.rank, world_size=d.world_size,
                  kinds=kinds)
    if config.padded:
        return PaddedLoader(data, config.batch_size, pad_to=config.pad_to, **common)
    return PackedLoader(data, config.token_budget, **common)


def run(config: FinetuneConfig) -> RunResult:
    """Fine-tune the adapter as configured (see the module docstring); returns where it wrote and the last losses."""
    started = time.perf_counter()
    d = setup_distributed(config.device)
    try:
        return _run(config, d, started)
    except BaseException as e:
        if d.world_size > 1:  # the error's frames hold the model, and DDP the process group: let them go before it
            traceback.clear_frames(e.__traceback__)
            gc.collect()
        raise
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _run(config: FinetuneConfig, d: Dist, started: float) -> RunResult:
    def say(message: str) -> None:
        if d.main:
            tqdm.write(message, file=sys.stdout)

    # -- check everything before anything is written
    model_config = load_config(config.checkpoint, allow_external_files=config.allow_external_files)
    if config.adapter_layers > model_config.n_layers:
        raise UsageError(f"--adapter-layers {config.adapter_layers} exceeds the model's {model_config.n_layers} "
                         "layers")
    if config.fsdp and d.world_size == 1:
        raise UsageError("--fsdp shards the model over several processes: run under torchrun --nproc_per_node N")
    mbs = config.micro_batches_per_step or d.world_size
    if mbs % d.world_size:
        raise UsageError(f"--micro-batches-per-step {mbs} must be a multiple of the number of processes "
                         f"({d.world_size}): they share each step's micro-batches")
    max_seq_len = min(config.max_seq_len, model_config.max_seq_len)
    if not config.padded and max_seq_len > config.token_budget:
        raise UsageError(f"--max-seq-len {max_seq_len} exceeds --token-budget {config.token_budget}: a packed "
                         "micro-batch holds whole examples")
    if config.padded and config.pad_to != "longest" and max_seq_len > config.pad_to:
        raise UsageError(f"--max-seq-len {max_seq_len} exceeds --pad-to {config.pad_to}")
    try:  # a sliding-window model (Mistral's) trains on examples within its window
        check_window(model_config, max_seq_len, f"--max-seq-len {max_seq_len}: an example")
    except ValueError as e:
        raise UsageError(str(e)) from None
    fields = adapter_fields(config)
    try:  # with a stand-in for the image features' width, known once CLIP has run
        AdapterConfig(**fields, **(dict(visual_dim=1, clip_layers=(1,)) if config.clip else {})).check(model_config)
    except ValueError as e:
        raise UsageError(f"--adapter-layers / --adapter-len / --visual-layers / --visual-len: {e}") from None
    dtype = _resolve_dtype(config, d.device)
    resolved = _json_config(replace(
        config, micro_batches_per_step=mbs, dtype=str(dtype).removeprefix("torch."), fusion=fields.get("fusion"),
        visual_len=fields.get("visual_len"),
        **{k: getattr(config, k).resolve() for k in ("checkpoint", "data", "tokenizer", "clip", "image_root")
           if getattr(config, k) is not None}))
    deleted = d.on_main(lambda: check_outputs(config))
    inputs = d.on_main(lambda: input_digests(config))
    state = d.on_main(lambda: load_state(config, resolved, inputs, say)) if config.resume else None
    train_data, eval_data, images = load_data(config, max_seq_len, say, vocab_size=model_config.vocab_size)
    if images and config.clip is None:
        raise UsageError(f"{len(images)} record(s) of {config.data} have an \"image\": pass --clip (a local CLIP "
                         "model folder) for multi-modal fine-tuning, or remove their images for a text-only adapter")
    if config.clip is not None and not images:
        raise UsageError(f"--clip: no record of {config.data} has an \"image\" to encode")
    image_features, visual = None, {}
    if config.clip is not None:
        image_features, clip_layers = encode_images(config, images, dtype, d, say)
        visual = dict(visual_dim=image_features.features.shape[1], clip_layers=clip_layers)
    train_rows = image_features.rows(train_data) if image_features is not None else None
    kinds = None
    if config.joint_training:  # 0: text records, 1: image records
        kinds = (train_rows >= 0).numpy().astype(np.int64)
        if kinds.all() or not kinds.any():
            raise UsageError(f"--joint-training trains the visual side on image records and the rest on text records; "
                             f"the training examples of {config.data} are all {'image' if kinds.all() else 'text'} "
                             "records")

    # -- the model
    torch.manual_seed(config.seed)
    adapter_config = AdapterConfig(**fields, **visual)
    model, trained = build_model(config, adapter_config, dtype, d)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(logical_numel(p) for p in model.parameters())
    c = model_config
    frozen = str(dtype).removeprefix("torch.")
    if config.quantize:
        frozen = f"{config.quantize}{' (output layer too)' if config.quantize_output else ''}, computing in {frozen}"
    memory = "; activation checkpointing" if config.activation_checkpointing else ""
    say(f"model: {config.checkpoint} ({c.n_layers} layers, dim {c.dim}, {c.n_heads} heads, {n_all / 1e6:.1f}M "
        f"parameters; base frozen in {frozen}{memory})")
    say(f"adapter: {describe_adapter(adapter_config, c.dim)}: {n_trained:,} trained parameters (fp32)")
    joint = JointTraining(model) if kinds is not None else None
    if joint is not None:
        say(f"joint training: {int(kinds.sum())} image examples train the visual group ({joint.size(1):,} "
            f"parameters), {int((1 - kinds).sum())} text examples the language group ({joint.size(0):,})")

    # -- batches, schedule, optimizer
    loader = _loader(config, train_data, mbs, d, shuffle=True, kinds=kinds)
    eval_loader = _loader(config, eval_data, d.world_size, d, shuffle=False) if eval_data is not None else None
    steps_per_epoch = [loader.num_steps(e) for e in range(config.epochs)]
    total_steps = sum(steps_per_epoch)
    if config.padded:
        effective = config.batch_size * mbs
        batch_text = (f"padded, {config.batch_size} examples x {config.pad_to} tokens per micro-batch x {mbs} "
                      "micro-batches per step")
    else:
        effective = len(train_data) / steps_per_epoch[0]
        batch_text = (f"packed, up to {config.token_budget} tokens per micro-batch x {mbs} micro-batches per step "
                      f"(no padding)")
    lr = config.lr if config.lr is not None else config.blr * effective / 256
    if lr / (1 - config.beta1) > torch.finfo(torch.float32).max:  # AdamW's first update would overflow
        raise UsageError(f"--lr {lr:g}{'' if config.lr is not None else ' (from --blr)'} is too large: AdamW's first "
                         "step, lr / (1 - beta1), overflows float32")
    warmup_epochs = 0.4 * config.epochs if config.warmup_epochs is None else config.warmup_epochs
    warmup_steps = round(warmup_epochs / config.epochs * total_steps)
    min_ratio = min(1.0, config.min_lr / lr)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay, decay_gates=config.decay_gates), lr=lr,
                                  betas=(config.beta1, config.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, min_ratio))
    if config.fsdp:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler  # agrees on inf/NaN across shards

        scaler = ShardedGradScaler(d.device.type, enabled=dtype == torch.float16)
    else:
        scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    eval_text = f", eval {len(eval_data)}" if eval_data is not None else ", no eval split"
    say(f"batches: {batch_text}; {d.world_size} process(es){' (FSDP2)' if config.fsdp else ''} on {d.device}; "
        f"train {len(train_data)} examples{eval_text}")
    say(f"schedule: {total_steps} steps in {config.epochs} epochs ({', '.join(map(str, steps_per_epoch))}); "
        f"effective batch {effective:.1f} examples per step; lr {lr:.3g}"
        + ("" if config.lr is not None else f" = blr {config.blr:g} x {effective:.1f} / 256")
        + f"; warmup {warmup_steps} steps, then cosine to {config.min_lr:g}")
    say(f"writing to {config.out}/ (only rank 0 writes)" if d.world_size > 1 else f"writing to {config.out}/")

    # -- resume, or start afresh
    epoch, start_step, global_step, elapsed = 0, 0, 0, 0.0
    if state is not None:
        names = set(adapter_tensors(model))
        if set(state["adapter"]) != names:
            raise CheckpointError(f"{config.out / STATE_FILE}: holds adapter tensors "
                                  f"{sorted(state['adapter'])[:2]}..., the model has {sorted(names)[:2]}...")
        epoch, start_step, global_step, elapsed = state["epoch"], state["step"], state["global_step"], state["elapsed"]
        if epoch > config.epochs or start_step > (steps_per_epoch + [0])[epoch]:
            raise CheckpointError(f"{config.out / STATE_FILE}: its position, step {start_step} of epoch {epoch + 1}, "
                                  f"lies beyond this run's {config.epochs} epochs of {steps_per_epoch} steps")
        options = StateDictOptions(full_state_dict=True, strict=False)
        try:
            set_model_state_dict(model, state["adapter"], options=options)
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["cpu"])
            if d.device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], d.device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a damaged or foreign state
            raise CheckpointError(f"{config.out / STATE_FILE}: cannot be restored ({type(e).__name__}: {e})") from None
        say(f"resuming {config.out} at epoch {epoch + 1}, step {start_step} of it ({global_step} of {total_steps} "
            "steps done)")
    if d.main and deleted:  # --overwrite: an earlier run's files; --resume, --overwrite: a killed run's temporaries
        for path in deleted:
            if path.is_dir():  # tensorboard/ (our event files only), adapter-peft/ (our two files only), a temporary
                for events in path.iterdir():
                    events.unlink()
            path.rmdir() if path.is_dir() else path.unlink()
        say(f"{'--resume' if state is not None else '--overwrite'}: deleted {', '.join(p.name for p in deleted)}")
    saved_step = global_step if state is not None else None  # of the train state in OUT

    def kept() -> str:
        return f"the last saved state, {config.out / STATE_FILE} of step {saved_step}, and the adapters written " \
            "before it are intact" if saved_step is not None else "no train state was saved yet"

    def diverged(what: str) -> TrainingDiverged:
        return TrainingDiverged(f"training diverged: {what}. Nothing of it was saved: {kept()}. A smaller --lr or "
                                "--blr may help")

    def write_failed(e: OSError) -> OutputError:
        goes_on = "--resume goes on from there" if saved_step is not None else "start again with --overwrite"
        return OutputError(f"cannot write {e.filename or config.out}: {e.strerror or e}; {kept()}: {goes_on}")

    def finite_adapter() -> dict[str, torch.Tensor]:  # on every rank: FSDP gathers
        """adapter_tensors(model), which must be finite: a NaN or Inf is never saved."""
        adapter = adapter_tensors(model)
        bad = next((k for k, t in adapter.items() if not torch.isfinite(t).all()), None)
        if bad is not None:
            raise diverged(f"after step {global_step} (epoch {epoch + 1}) the adapter's {bad!r} holds NaN or Inf")
        return adapter

    def save_state(next_epoch: int, next_step: int) -> None:  # on every rank: FSDP gathers
        nonlocal saved_step
        adapter = finite_adapter()
        optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
        if d.main:
            rng = {"cpu": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None}
            blob = {"format": STATE_FORMAT, "version": 1, "config": json.dumps(resolved), "inputs": inputs,
                    "epoch": next_epoch, "step": next_step, "global_step": global_step, "elapsed": elapsed,
                    "adapter": adapter, "optimizer": optim, "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng}
            buffer = io.BytesIO()
            torch.save(blob, buffer)
            write_atomic(config.out / STATE_FILE, buffer.getvalue(), overwrite=True)
        saved_step = global_step

    # -- train
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=total_steps, initial=global_step, desc="fine-tuning", unit="step", disable=not d.main,
               dynamic_ncols=True, file=sys.stderr)
    loss = eval_loss = None
    tokens_done, seconds_done = 0, 0.0
    stopped = False
    log = None
    try:
        log = RunLog(config.out, resume_step=global_step if state is not None else None,
                     tensorboard=config.tensorboard) if d.main else None
        while epoch < config.epochs and not stopped:
            for step in loader.iter_epoch(epoch, start_step):
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=d.device)
                for i, batch in enumerate(step.batches):
                    if image_features is not None:
                        batch = image_features.attach(batch, train_rows)
                    last = i == len(step.batches) - 1
                    if config.fsdp:
                        trained.set_requires_gradient_sync(last)
                    sync = trained.no_sync() if isinstance(trained, DistributedDataParallel) and not last \
                        else nullcontext()
                    with sync:
                        micro = batch_loss_sum(trained, batch, d.device)
                        # the step's mean over all its targets (joint training: of the micro-batch's kind); DDP /
                        # FSDP average over the ranks, hence x world_size
                        targets = step.num_targets if joint is None else joint.route(batch, step)
                        scaler.scale(micro * (d.world_size / targets)).backward()
                    loss_sum += micro.detach()
                if joint is not None:
                    joint.drop_absent(step)
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad or float("inf"))
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                # the step's one host sync: its loss (all ranks) and gradient norm, checked before the step is applied
                # (the same on every rank: all stop together). With fp16 loss scaling a non-finite gradient is the
                # scaler's: it skips the step and lowers its scale.
                loss, grad_norm = torch.stack([d.sum(loss_sum), grad_norm.float()]).tolist()
                loss /= step.num_targets
                if not math.isfinite(loss) or not (math.isfinite(grad_norm) or scaler.is_enabled()):
                    what = f"the loss is {loss}" if not math.isfinite(loss) else \
                        f"the gradient norm is {grad_norm} (the loss {loss:.4g})"
                    raise diverged(f"at step {global_step + 1} (epoch {epoch + 1}) {what}, so the step was not "
                                   "applied")
                step_lr = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step_s = time.perf_counter() - t0
                elapsed += step_s
                global_step += 1
                tokens_done, seconds_done = tokens_done + step.num_real_tokens, seconds_done + step_s
                tokens_per_s = step.num_real_tokens / step_s
                mem = memory_gib(d.device)
                if d.main:
                    log.write(step=global_step, epoch=epoch + 1, split="train", loss=loss, lr=step_lr,
                              grad_norm=grad_norm, examples=step.num_examples, tokens=step.num_real_tokens,
                              tokens_computed=step.num_tokens, tokens_per_s=tokens_per_s, step_s=step_s,
                              elapsed_s=elapsed, memory_gib=mem)
                    bar.update()
                    bar.set_postfix_str(f"epoch {epoch + 1}/{config.epochs} loss {loss:.4f} lr {step_lr:.2e} "
                                        f"{tokens_per_s:,.0f} real tok/s mem {mem:.2f} GiB")
                stopped = bool(config.stop_after_steps) and global_step >= config.stop_after_steps
                if stopped or (config.save_every and global_step % config.save_every == 0):
                    save_state(epoch, step.index + 1)
                if stopped:
                    break
            if stopped:
                break
            if eval_loader is not None:
                eval_loss = evaluate(model, eval_loader, d, image_features)
                if d.main:
                    log.write(step=global_step, epoch=epoch + 1, split="eval", loss=eval_loss, elapsed_s=elapsed)
                say(f"epoch {epoch + 1}/{config.epochs}: train loss {loss if loss is not None else float('nan'):.4f} "
                    f"(last step), eval loss {eval_loss:.4f}")
            adapter = finite_adapter()
            if d.main:
                save_adapter(model, config.out / EPOCH_ADAPTER.format(epoch + 1), overwrite=True, state=adapter)
            epoch, start_step = epoch + 1, 0
            save_state(epoch, 0)

        adapter = finite_adapter()
        if d.main:
            written = [config.out / STATE_FILE, config.out / LOG_FILE]
            if not stopped:
                written.insert(0, save_adapter(model, config.out / ADAPTER_FILE, overwrite=True, state=adapter))
            if not stopped and config.export == "peft":  # an earlier run's folder was deleted or refused at the start
                written.insert(1, save_adapter(model, config.out / PEFT_DIR, overwrite=True, state=adapter,
                                               format="peft", base_model_name_or_path=str(config.checkpoint)))
            written.append(plot_losses(config.out / LOG_FILE, config.out / PLOT_FILE))
            if log.tb is not None:
                written.append(config.out / TB_DIR)
    except OSError as e:  # all the run reads was read before: this is a write, of rank 0
        raise write_failed(e) from e
    finally:
        bar.close()
        if log is not None:
            log.close()
        if joint is not None:
            joint.close()

    if d.main:
        rate = f" ({tokens_done / seconds_done:,.0f} real tokens/s)" if seconds_done else ""
        done = f"stopped after step {global_step} of {total_steps} (--stop-after-steps; --resume goes on)" \
            if stopped else f"done: {global_step} steps"
        say(f"{done} in {time.perf_counter() - started:.1f} s{rate}; peak memory {memory_gib(d.device):.2f} GiB")
        say("wrote: " + ", ".join(str(p) for p in written)
            + (f" and adapter-epoch1..{epoch}.safetensors" if epoch else ""))
    return RunResult(config.out, adapter, global_step, loss, eval_loss, time.perf_counter() - started, model)


def main(argv: Sequence[str] | None = None) -> None:
    description = __doc__.split("\n\n")[0]
    epilog = __doc__[len(description):].strip()
    config = parse_dataclass(FinetuneConfig, argv, prog=PROG, description=description, epilog=epilog)
    try:
        run(config)
    except UsageError as e:
        build_parser(FinetuneConfig, prog=PROG, description=description).error(cli_message(e))
    except (DataError, CheckpointError, OSError, TrainingDiverged) as e:  # unusable files, failed writes, NaN
        print(f"{PROG}: error: {cli_message(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
