"""LLaMA-Adapter fine-tuning (arXiv 2303.16199): a frozen LLaMA, a trained adapter, packed batches, resume, several
processes (DDP / FSDP2). `llama-adapter finetune --help` lists the flags (train/config.py) and example commands.

The run in named steps, their state between steps one Progress: setup (every flag checked against the model, the
data and OUT before anything is written; data, images, model, optimizer, resume) -> train_step (accumulation, one
host sync, the divergence check, the update) -> end_epoch (eval loss, the epoch's adapter, train_state.pt) -> finish
(the final adapter, loss.png). A NaN or Inf stops every rank (TrainingDiverged) before it is applied or saved.
Elsewhere: train/outputs.py (OUT), state.py (--resume), distributed.py, multimodal.py, optim.py, data.py.
"""

from __future__ import annotations

import gc
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from llama_adapter_triton.model.adapter import AdapterConfig
from llama_adapter_triton.model.adapters.formats import save_adapter
from llama_adapter_triton.model.chat import ChatTemplate
from llama_adapter_triton.model.cli import build_parser, cli_message, parse_dataclass
from llama_adapter_triton.model.io import CheckpointError
from llama_adapter_triton.model.llama import LLaMA, LLaMAConfig
from llama_adapter_triton.model.quantize import logical_numel
from llama_adapter_triton.model.tokenizer import Tokenizer
from llama_adapter_triton.train.config import (
    PEFT_DIR,
    PROG,
    FinetuneConfig,
    UsageError,
    check_settings,
    describe_adapter,
)
from llama_adapter_triton.train.data import (
    IGNORE_INDEX,
    DataError,
    PackedLoader,
    PaddedLoader,
    Step,
    TokenizedDataset,
    load_records,
    split_eval,
    tokenize_records,
)
from llama_adapter_triton.train.distributed import Dist, adapter_tensors, build_model, setup_distributed
from llama_adapter_triton.train.loss import linear_cross_entropy
from llama_adapter_triton.train.multimodal import ImageFeatures, JointTraining, setup_images
from llama_adapter_triton.train.optim import setup_optimizer
from llama_adapter_triton.train.outputs import (
    ADAPTER_FILE,
    EPOCH_ADAPTER,
    LOG_FILE,
    PLOT_FILE,
    TB_DIR,
    OutputError,
    RunLog,
    check_outputs,
    delete_outputs,
    memory_gib,
    plot_losses,
)
from llama_adapter_triton.train.state import (
    STATE_FILE,
    input_digests,
    load_state,
    resolved_config,
    restore_state,
    save_state,
)

EXAMPLES = """examples:
    # CPU (fp32), e.g. on the demo's small base (llama-adapter demo writes runs/demo-base), ~1 minute:
    llama-adapter finetune --checkpoint runs/demo-base --data train/demo_data/demo.json --out runs/ft-cpu \\
        --adapter-layers 4 --token-budget 1024 --epochs 15 --blr 1.0 --eval-size 48
    # one GPU (bf16 base, fp32 adapter): LLaMA-7B on Alpaca-52K with the paper's settings
    llama-adapter finetune --checkpoint llama-7b/ --data alpaca_data.json --out runs/alpaca-7b
    # several GPUs of one node, DDP (--fsdp shards a base too large for one GPU)
    torchrun --nproc_per_node 8 -m llama_adapter_triton.train.finetune --checkpoint llama-7b/ \\
        --data alpaca_data.json --out runs/alpaca-7b
    # go on with a run that stopped (killed, or --stop-after-steps): the same flags plus --resume
    llama-adapter finetune --checkpoint llama-7b/ --data alpaca_data.json --out runs/alpaca-7b --resume
    # LLaMA-Adapter V2, multi-modal: a local CLIP model encodes the records' "image" files
    llama-adapter finetune --checkpoint llama-7b/ --data sqa.json --out runs/sqa-v2 --adapter-version 2 --clip clip/
"""


class TrainingDiverged(RuntimeError):
    """The loss or the gradients (or the adapter) went NaN or Inf: the run stops; nothing of it was applied or saved,
    the last saved state is intact."""


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


@dataclass
class Setup:
    """What setup() built, fixed for the whole run."""

    config: FinetuneConfig
    d: Dist
    resolved: dict  # the settings, resolved, as train_state.pt keeps them
    inputs: dict[str, dict]  # input_digests
    model: LLaMA  # unwrapped (FSDP-sharded with --fsdp)
    trained: torch.nn.Module  # what the forward runs through: the model, DDP's wrapper, or the FSDP model
    joint: JointTraining | None
    image_features: ImageFeatures | None
    train_rows: torch.Tensor | None  # ImageFeatures.rows of the train data
    loader: PackedLoader | PaddedLoader
    eval_loader: PackedLoader | PaddedLoader | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]  # the trained ones, whose gradient norm is clipped
    total_steps: int


@dataclass
class Progress:
    """The loop's state: where it is, the last train state it saved, what it measured."""

    epoch: int = 0  # 0-based
    start_step: int = 0  # the first step of this epoch still to run (a resumed run starts inside an epoch)
    global_step: int = 0  # steps done
    elapsed: float = 0.0  # seconds of training steps, the earlier runs of a resumed one included
    saved_step: int | None = None  # the step of the train state in OUT; None: none saved yet
    loss: float | None = None  # of the last step
    eval_loss: float | None = None  # of the last epoch
    tokens_done: int = 0  # real tokens and seconds of this run's steps, for the final rate
    seconds_done: float = 0.0
    stopped: bool = False  # by --stop-after-steps


# ----------------------------------------------------------------------------------------------------------------
# The loss, the eval, the data


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
    if chat_template is not None:
        chat_template = replace(chat_template, max_seconds=config.chat_max_seconds, max_chars=config.chat_max_chars)
    chats = [r.index for r in records if r.messages]
    if chats and chat_template is None:
        raise UsageError(f"{config.data}: record {chats[0]} (and {len(chats) - 1} more) is a conversation for the "
                         f"model's chat template, and {tokenizer.path.parent} has none (no chat_template.jinja, no "
                         "\"chat_template\" in tokenizer_config.json): pass --chat-template FILE (a .jinja file or a "
                         "tokenizer_config.json)")
    if chats:
        say(f"chat template: {chat_template.origin}")
    data, tok_report = tokenize_records(records, tokenizer, max_seq_len=max_seq_len, chat_template=chat_template,
                                        tokenization=config.tokenization, on_bad_record=config.on_bad_record)
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


# ----------------------------------------------------------------------------------------------------------------
# setup: checks, data, model, optimizer, resume


def setup_model(config: FinetuneConfig, adapter: AdapterConfig, model_config: LLaMAConfig, dtype: torch.dtype,
                kinds: np.ndarray | None, d: Dist) -> tuple[LLaMA, torch.nn.Module, JointTraining | None]:
    """(model, the module to train through, JointTraining or None): the base with a fresh, seeded adapter."""
    torch.manual_seed(config.seed)
    model, trained = build_model(config, adapter, dtype, d)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(logical_numel(p) for p in model.parameters())
    c = model_config
    frozen = str(dtype).removeprefix("torch.")
    if config.quantize:
        frozen = f"{config.quantize}{' (output layer too)' if config.quantize_output else ''}, computing in {frozen}"
    memory = "; activation checkpointing" if config.activation_checkpointing else ""
    d.say(f"model: {config.checkpoint} ({c.n_layers} layers, dim {c.dim}, {c.n_heads} heads, {n_all / 1e6:.1f}M "
          f"parameters; base frozen in {frozen}{memory})")
    d.say(f"adapter: {describe_adapter(adapter, c.dim)}: {n_trained:,} trained parameters (fp32)")
    joint = JointTraining(model) if kinds is not None else None
    if joint is not None:
        d.say(f"joint training: {int(kinds.sum())} image examples train the visual group ({joint.size(1):,} "
              f"parameters), {int((1 - kinds).sum())} text examples the language group ({joint.size(0):,})")
    return model, trained, joint


def setup(config: FinetuneConfig, d: Dist) -> tuple[Setup, Progress]:
    """Check everything before anything is written; then the data, the model, the optimizer; resume or start."""
    model_config, mbs, max_seq_len, fields, dtype = check_settings(config, d.world_size, d.device)
    resolved = resolved_config(config, mbs, dtype, fields)
    deleted = d.on_main(lambda: check_outputs(config))
    inputs = d.on_main(lambda: input_digests(config))
    state = d.on_main(lambda: load_state(config, resolved, inputs, d.say)) if config.resume else None
    train_data, eval_data, images = load_data(config, max_seq_len, d.say, vocab_size=model_config.vocab_size)
    image_features, visual, kinds = setup_images(config, images, train_data, dtype, d, d.say)
    model, trained, joint = setup_model(config, AdapterConfig(**fields, **visual), model_config, dtype, kinds, d)
    loader = _loader(config, train_data, mbs, d, shuffle=True, kinds=kinds)
    eval_loader = _loader(config, eval_data, d.world_size, d, shuffle=False) if eval_data is not None else None
    optimizer, scheduler, scaler, steps_per_epoch = setup_optimizer(
        config, model, loader, mbs, dtype, d, len(eval_data) if eval_data is not None else None)
    d.say(f"writing to {config.out}/ (only rank 0 writes)" if d.world_size > 1 else f"writing to {config.out}/")
    s = Setup(config, d, resolved, inputs, model, trained, joint, image_features,
              image_features.rows(train_data) if image_features is not None else None, loader, eval_loader,
              optimizer, scheduler, scaler, [p for p in model.parameters() if p.requires_grad], sum(steps_per_epoch))
    p = Progress()
    if state is not None:
        p.epoch, p.start_step, p.global_step, p.elapsed = restore_state(
            state, config.out / STATE_FILE, model, optimizer, scheduler, scaler, d.device, epochs=config.epochs,
            steps_per_epoch=steps_per_epoch)
        p.saved_step = p.global_step
        d.say(f"resuming {config.out} at epoch {p.epoch + 1}, step {p.start_step} of it ({p.global_step} of "
              f"{s.total_steps} steps done)")
    if d.main and deleted:  # --overwrite: an earlier run's files; --resume, --overwrite: a killed run's temporaries
        delete_outputs(deleted)
        names = ", ".join(path.name for path in deleted)
        d.say(f"{'--resume' if state is not None else '--overwrite'}: deleted {names}")
    return s, p


# ----------------------------------------------------------------------------------------------------------------
# The loop: saving (and the messages of a run that stops), the steps, the run


def kept(s: Setup, p: Progress) -> str:
    return f"the last saved state, {s.config.out / STATE_FILE} of step {p.saved_step}, and the adapters written " \
        "before it are intact" if p.saved_step is not None else "no train state was saved yet"


def diverged(s: Setup, p: Progress, what: str) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged: {what}. Nothing of it was saved: {kept(s, p)}. A smaller --lr or "
                            "--blr may help")


def write_failed(s: Setup, p: Progress, e: OSError) -> OutputError:
    goes_on = "--resume goes on from there" if p.saved_step is not None else "start again with --overwrite"
    return OutputError(f"cannot write {e.filename or s.config.out}: {e.strerror or e}; {kept(s, p)}: {goes_on}")


def finite_adapter(s: Setup, p: Progress) -> dict[str, torch.Tensor]:
    """adapter_tensors(model), which must be finite: a NaN or Inf is never saved. On every rank: FSDP gathers."""
    adapter = adapter_tensors(s.model)
    bad = next((k for k, t in adapter.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise diverged(s, p, f"after step {p.global_step} (epoch {p.epoch + 1}) the adapter's {bad!r} holds NaN or Inf")
    return adapter


def save(s: Setup, p: Progress, next_epoch: int, next_step: int) -> None:
    """train_state.pt, to go on at step next_step of epoch next_epoch. On every rank: FSDP gathers."""
    save_state(s.config.out / STATE_FILE, s.model, s.optimizer, s.scheduler, s.scaler, s.d, resolved=s.resolved,
               inputs=s.inputs, adapter=finite_adapter(s, p), epoch=next_epoch, step=next_step,
               global_step=p.global_step, elapsed=p.elapsed)
    p.saved_step = p.global_step


def train_step(s: Setup, p: Progress, step: Step) -> dict[str, Any]:
    """One optimizer step: this rank's micro-batches of the step (gradient accumulation), the divergence check, the
    update. Returns its log.csv row."""
    d, scaler = s.d, s.scaler
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=d.device)
    for i, batch in enumerate(step.batches):
        if s.image_features is not None:
            batch = s.image_features.attach(batch, s.train_rows)
        last = i == len(step.batches) - 1
        if s.config.fsdp:
            s.trained.set_requires_gradient_sync(last)
        sync = s.trained.no_sync() if isinstance(s.trained, DistributedDataParallel) and not last else nullcontext()
        with sync:
            micro = batch_loss_sum(s.trained, batch, d.device)
            # the step's mean over all its targets (joint training: of the micro-batch's kind); DDP / FSDP average
            # over the ranks, hence x world_size
            targets = step.num_targets if s.joint is None else s.joint.route(batch, step)
            scaler.scale(micro * (d.world_size / targets)).backward()
        loss_sum += micro.detach()
    if s.joint is not None:
        s.joint.drop_absent(step)
    scaler.unscale_(s.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, s.config.clip_grad or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # the step's one host sync: its loss (all ranks) and gradient norm, checked before the step is applied (the same
    # on every rank: all stop together). With fp16 loss scaling a non-finite gradient is the scaler's: it skips the
    # step and lowers its scale.
    loss, grad_norm = torch.stack([d.sum(loss_sum), grad_norm.float()]).tolist()
    p.loss = loss = loss / step.num_targets
    if not math.isfinite(loss) or not (math.isfinite(grad_norm) or scaler.is_enabled()):
        what = f"the loss is {loss}" if not math.isfinite(loss) else \
            f"the gradient norm is {grad_norm} (the loss {loss:.4g})"
        raise diverged(s, p, f"at step {p.global_step + 1} (epoch {p.epoch + 1}) {what}, so the step was not applied")
    step_lr = s.optimizer.param_groups[0]["lr"]
    scaler.step(s.optimizer)
    scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    s.scheduler.step()
    step_s = time.perf_counter() - t0
    p.elapsed += step_s
    p.global_step += 1
    p.tokens_done, p.seconds_done = p.tokens_done + step.num_real_tokens, p.seconds_done + step_s
    return dict(step=p.global_step, epoch=p.epoch + 1, split="train", loss=loss, lr=step_lr, grad_norm=grad_norm,
                examples=step.num_examples, tokens=step.num_real_tokens, tokens_computed=step.num_tokens,
                tokens_per_s=step.num_real_tokens / step_s, step_s=step_s, elapsed_s=p.elapsed,
                memory_gib=memory_gib(d.device))


def end_epoch(s: Setup, p: Progress, log: RunLog | None) -> None:
    """After an epoch: its eval loss, its adapter file, and the train state (at the next epoch's start)."""
    if s.eval_loader is not None:
        p.eval_loss = evaluate(s.model, s.eval_loader, s.d, s.image_features)
        if s.d.main:
            log.write(step=p.global_step, epoch=p.epoch + 1, split="eval", loss=p.eval_loss, elapsed_s=p.elapsed)
        s.d.say(f"epoch {p.epoch + 1}/{s.config.epochs}: train loss "
                f"{p.loss if p.loss is not None else float('nan'):.4f} (last step), eval loss {p.eval_loss:.4f}")
    adapter = finite_adapter(s, p)
    if s.d.main:
        save_adapter(s.model, s.config.out / EPOCH_ADAPTER.format(p.epoch + 1), overwrite=True, state=adapter)
    p.epoch, p.start_step = p.epoch + 1, 0
    save(s, p, p.epoch, 0)


def finish(s: Setup, p: Progress, log: RunLog | None) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The final adapter (and --export's), unless --stop-after-steps stopped the run, and loss.png; returns (the
    adapter, the files written: rank 0's list)."""
    config = s.config
    adapter = finite_adapter(s, p)
    written = []
    if s.d.main:
        written = [config.out / STATE_FILE, config.out / LOG_FILE]
        if not p.stopped:
            written.insert(0, save_adapter(s.model, config.out / ADAPTER_FILE, overwrite=True, state=adapter))
        if not p.stopped and config.export == "peft":  # an earlier run's folder was deleted or refused at the start
            written.insert(1, save_adapter(s.model, config.out / PEFT_DIR, overwrite=True, state=adapter,
                                           format="peft", base_model_name_or_path=str(config.checkpoint)))
        written.append(plot_losses(config.out / LOG_FILE, config.out / PLOT_FILE))
        if log.tb is not None:
            written.append(config.out / TB_DIR)
    return adapter, written


def fit(s: Setup, p: Progress) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The loop: train_step for each step (train_state.pt every --save-every steps and at --stop-after-steps),
    end_epoch after each epoch, then finish. A failed write (rank 0) becomes OutputError."""
    config, d = s.config, s.d
    bar = tqdm(total=s.total_steps, initial=p.global_step, desc="fine-tuning", unit="step", disable=not d.main,
               dynamic_ncols=True, file=sys.stderr)
    log = None
    try:
        log = RunLog(config.out, resume_step=p.saved_step, tensorboard=config.tensorboard) if d.main else None
        while p.epoch < config.epochs and not p.stopped:
            for step in s.loader.iter_epoch(p.epoch, p.start_step):
                row = train_step(s, p, step)
                if d.main:
                    log.write(**row)
                    bar.update()
                    bar.set_postfix_str(f"epoch {p.epoch + 1}/{config.epochs} loss {row['loss']:.4f} lr "
                                        f"{row['lr']:.2e} {row['tokens_per_s']:,.0f} real tok/s mem "
                                        f"{row['memory_gib']:.2f} GiB")
                p.stopped = bool(config.stop_after_steps) and p.global_step >= config.stop_after_steps
                if p.stopped or (config.save_every and p.global_step % config.save_every == 0):
                    save(s, p, p.epoch, step.index + 1)
                if p.stopped:
                    break
            if not p.stopped:
                end_epoch(s, p, log)
        return finish(s, p, log)
    except OSError as e:  # all the run reads was read before: this is a write, of rank 0
        raise write_failed(s, p, e) from e
    finally:
        bar.close()
        if log is not None:
            log.close()
        if s.joint is not None:
            s.joint.close()


def run(config: FinetuneConfig) -> RunResult:
    """Fine-tune the adapter as configured (see the module docstring); returns where it wrote and the last losses."""
    started = time.perf_counter()
    d = setup_distributed(config.device)
    try:
        s, p = setup(config, d)
        adapter, written = fit(s, p)
        rate = f" ({p.tokens_done / p.seconds_done:,.0f} real tokens/s)" if p.seconds_done else ""
        done = f"stopped after step {p.global_step} of {s.total_steps} (--stop-after-steps; --resume goes on)" \
            if p.stopped else f"done: {p.global_step} steps"
        d.say(f"{done} in {time.perf_counter() - started:.1f} s{rate}; peak memory {memory_gib(d.device):.2f} GiB")
        d.say("wrote: " + ", ".join(str(path) for path in written)
              + (f" and adapter-epoch1..{p.epoch}.safetensors" if p.epoch else ""))
        return RunResult(config.out, adapter, p.global_step, p.loss, p.eval_loss, time.perf_counter() - started,
                         model=s.model)
    except BaseException as e:
        if d.world_size > 1:  # the error's frames hold the model, and DDP the process group: let them go before it
            traceback.clear_frames(e.__traceback__)
            gc.collect()
        raise
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> None:
    description = __doc__.split("\n\n")[0]
    config = parse_dataclass(FinetuneConfig, argv, prog=PROG, description=description, epilog=EXAMPLES)
    try:
        run(config)
    except UsageError as e:
        build_parser(FinetuneConfig, prog=PROG, description=description).error(cli_message(e))
    except (DataError, CheckpointError, OSError, TrainingDiverged) as e:  # unusable files, failed writes, NaN
        print(f"{PROG}: error: {cli_message(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
