"""The settings of a fine-tuning run: FinetuneConfig, whose fields generate `llama-adapter finetune`'s flags.

Fields in sections, as litgpt's TrainArgs / EvalArgs group theirs: inputs, the adapter, multi-modal, data and
batches, optimization, hardware and memory, the run's outputs. They stay one flat dataclass, so that each field is
one flag (--adapter-len, not --adapter.len) and FinetuneConfig(checkpoint=..., lr=...) takes every setting.
__post_init__ checks each value and each combination before anything is loaded; the messages name the flags.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from llama_adapter_triton.kernels.checks import check_int
from llama_adapter_triton.model.adapter import FUSIONS, GATE_ACTS, GATES, SCALES, VERSIONS, AdapterConfig
from llama_adapter_triton.model.adapters.peft import peft_export_problem
from llama_adapter_triton.model.chat import RENDER_CHARS, RENDER_SECONDS, check_budget
from llama_adapter_triton.model.checkpoint import load_config
from llama_adapter_triton.model.llama import LLaMAConfig, check_window
from llama_adapter_triton.model.prompt import TEMPLATES
from llama_adapter_triton.model.quantize import QUANTIZE_MODES, check_quantize
from llama_adapter_triton.train.data import TOKENIZATIONS

PROG = "llama-adapter finetune"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EXPORTS = ("peft",)
PEFT_DIR = "adapter-peft"  # --export peft: the final adapter as a PEFT adaption-prompt folder in OUT


class UsageError(ValueError):
    """A flag whose value does not fit the model or the data (found after parsing); names the flag."""


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


def cli_flag(name: str) -> str:
    """The flag of a field: max_seq_len -> --max-seq-len."""
    return f"--{name.replace('_', '-')}"


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run, with its default; the command line is generated from these fields."""

    # -- inputs and output -------------------------------------------------------------------------------------
    checkpoint: Path = field(metadata={"help": "base model: a Meta or Hugging Face checkpoint folder"})
    data: Path = field(metadata={"help": "Alpaca data: a JSON list or JSON Lines of {instruction, input, output}"})
    out: Path = field(metadata={"help": "output folder (adapters, train_state.pt, log.csv, loss.png)"})
    tokenizer: Path | None = field(default=None, metadata={
        "help": "tokenizer.model / tokenizer.json or its folder (default: the checkpoint folder)"})
    allow_external_files: bool = field(default=False, metadata={
        "help": "read images that lead outside --image-root (\"..\", absolute paths, links) and checkpoint shards "
                "that its shard index names outside --checkpoint; refused by default"})

    # -- the adapter (model/adapter.py) ------------------------------------------------------------------------
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

    # -- multi-modal (model/visual.py) -------------------------------------------------------------------------
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

    # -- data and batches (train/data.py) ----------------------------------------------------------------------
    template: str = field(default="alpaca", metadata={
        "help": "prompt template (model/prompt.py): alpaca, chat (the official V2 chat model's: conversation "
                "records give one example per reply), or model (the checkpoint's chat template for every record); "
                "messages records always use the checkpoint's chat template", "choices": TEMPLATES})
    chat_template: Path | None = field(default=None, metadata={
        "help": "the chat template of messages records (and --template model): a .jinja file or a "
                "tokenizer_config.json (default: the tokenizer folder's chat_template.jinja or tokenizer_config.json)"})
    chat_max_seconds: float = field(default=RENDER_SECONDS, metadata={
        "help": "the most seconds one rendering of the chat template may take (model/chat.py)"})
    chat_max_chars: int = field(default=RENDER_CHARS, metadata={
        "help": "the most characters one rendering of the chat template may build (model/chat.py)"})
    tokenization: str = field(default="official", metadata={
        "help": "official: encode(prompt + response), the prompt's tokens masked (the official script's); litgpt: "
                "the response encoded on its own after the prompt (litgpt's, and this project's before)",
        "choices": TOKENIZATIONS})
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

    # -- optimization ------------------------------------------------------------------------------------------
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

    # -- hardware and memory (model/quantize.py, model/llama.py, train/loss.py) --------------------------------
    device: str = field(default="auto", metadata={
        "help": "auto (cuda if available, else cpu), cpu, cuda or cuda:N (one process); torchrun: auto, cuda, cpu"})
    dtype: str = field(default="auto", metadata={
        "help": "base weights and activations: auto is bfloat16 on a GPU, float32 on a CPU; the adapter is fp32",
        "choices": ("auto", *DTYPES)})
    fsdp: bool = field(default=False, metadata={"help": "shard the model with FSDP2 (torchrun, for a base too large "
                                                        "for one GPU) instead of DDP"})
    quantize: str | None = field(default=None, metadata={
        "help": "store the frozen base's linear weights in nf4 (QLoRA's, with double quantization) or int8 "
                "(LLM.int8) through bitsandbytes, dequantized per matmul; --dtype is then the compute dtype",
        "choices": QUANTIZE_MODES})
    quantize_output: bool = field(default=False, metadata={"help": "with --quantize: the output layer too"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each adapted block's activations in the backward instead of keeping them (long sequences, "
                "large --token-budget)"})

    # -- the run: saving, resuming, outputs (train/outputs.py, train/state.py) ---------------------------------
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
        # in this order, which decides the message when several values are wrong
        self._check_counts()
        self._check_pairings()
        self._check_numbers()
        self._check_choices()
        check_budget(self.chat_max_seconds, self.chat_max_chars, names=("--chat-max-seconds", "--chat-max-chars"))

    def _check_counts(self) -> None:
        for name, minimum in (("adapter_len", 1), ("adapter_layers", 1), ("visual_hidden", 1), ("max_seq_len", 2),
                              ("token_budget", 1), ("batch_size", 1), ("epochs", 1), ("seed", 0), ("save_every", 0),
                              ("stop_after_steps", 0), ("visual_layers", 1), ("adapter_version", 1)):
            check_int(cli_flag(name), getattr(self, name), minimum, what=f"an integer >= {minimum}")

    def _check_pairings(self) -> None:
        """Flags that go with another flag (multi-modal, V2), and the visual flags' values."""
        if self.clip is None and (self.clip_layers is not None or self.image_root is not None):
            raise ValueError("--clip-layers and --image-root go with --clip (multi-modal fine-tuning)")
        if self.clip is None and (self.fusion is not None or self.visual_len is not None or self.visual_layers != 1
                                  or self.joint_training):
            raise ValueError("--fusion, --visual-len, --visual-layers and --joint-training go with --clip (multi-modal "
                             "fine-tuning)")
        if self.visual_len is not None:
            check_int("--visual-len", self.visual_len, 1, what="an integer >= 1")
        if self.adapter_version == 1 and (self.v2_scale != "output" or self.v2_output_layer):
            raise ValueError("--v2-scale and --v2-output-layer go with --adapter-version 2")
        if self.joint_training and self.fsdp:
            raise ValueError("--joint-training routes each micro-batch's gradients to one group of parameters, which "
                             "FSDP's sharded gradients do not allow: use DDP (leave out --fsdp)")
        if self.clip_layers is not None:
            self.clip_layers = tuple(self.clip_layers)

    def _check_numbers(self) -> None:
        """Batches, and the optimization's numbers: finite, in range."""
        if self.micro_batches_per_step is not None and self.micro_batches_per_step < 1:
            raise ValueError(f"--micro-batches-per-step must be >= 1, got {self.micro_batches_per_step}")
        if self.pad_to != "longest" and (not isinstance(self.pad_to, int) or self.pad_to < 1):
            raise ValueError(f"--pad-to must be a positive number of tokens or 'longest', got {self.pad_to!r}")
        for f in fields(self):  # every number given as a float: finite (inf, nan are typos or attacks)
            value = getattr(self, f.name)
            if f.type in ("float", "float | None") and value is not None and not math.isfinite(value):
                raise ValueError(f"{cli_flag(f.name)} must be a finite number, got {value}")
        if self.eval_size < 0 or (self.eval_size >= 1 and not float(self.eval_size).is_integer()):
            raise ValueError(f"--eval-size must be a fraction in (0, 1), a whole count >= 1, or 0, got "
                             f"{self.eval_size}")
        for name in ("blr", "lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{cli_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("min_lr", "weight_decay", "clip_grad"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{cli_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{cli_flag(name)} must lie in [0, 1), got {getattr(self, name)}")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"--warmup-epochs must lie in [0, --epochs={self.epochs}], got {self.warmup_epochs}")

    def _check_choices(self) -> None:
        """The run's mode, the choices of the word-valued flags, and what goes with --export and --quantize."""
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out, --overwrite deletes it: give one of them")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name, choices in (("gate", GATES), ("gate_act", GATE_ACTS), ("on_bad_record", ("error", "skip")),
                              ("dtype", ("auto", *DTYPES)), ("adapter_version", VERSIONS), ("v2_scale", SCALES),
                              ("template", TEMPLATES), ("fusion", (None, *FUSIONS)), ("tokenization", TOKENIZATIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{cli_flag(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
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


def resolve_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype:
    """--dtype, auto resolved: bfloat16 on a GPU, float32 on a CPU."""
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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



def check_settings(config: FinetuneConfig, world_size: int,
                   device: torch.device) -> tuple[LLaMAConfig, int, int, dict[str, Any], torch.dtype]:
    """The flags against the model's config and the processes, before anything is loaded or written; returns (the
    model's config, micro-batches per step, the examples' max_seq_len, the AdapterConfig fields, the base's dtype)."""
    model_config = load_config(config.checkpoint, allow_external_files=config.allow_external_files)
    if config.adapter_layers > model_config.n_layers:
        raise UsageError(f"--adapter-layers {config.adapter_layers} exceeds the model's {model_config.n_layers} "
                         "layers")
    if config.fsdp and world_size == 1:
        raise UsageError("--fsdp shards the model over several processes: run under torchrun --nproc_per_node N")
    mbs = config.micro_batches_per_step or world_size
    if mbs % world_size:
        raise UsageError(f"--micro-batches-per-step {mbs} must be a multiple of the number of processes "
                         f"({world_size}): they share each step's micro-batches")
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
    return model_config, mbs, max_seq_len, fields, resolve_dtype(config, device)
