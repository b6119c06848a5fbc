"""`make demo`: LLaMA-Adapter's whole job in a few minutes on a CPU (or a GPU), with nothing to download.

    llama-adapter demo             # CPU: a few minutes on 2 cores; a GPU is used when there is one
    llama-adapter demo --smoke     # a seconds-long version of every stage (the test suite runs it)
    llama-adapter demo --device cpu --out runs/demo2
    llama-adapter demo --quantize nf4   # the same with the base in NF4 (bitsandbytes): fine-tuned and answering

The base is NOT a real LLaMA: a tiny LLaMA-shaped model (the same code as LLaMA-7B) that this script pre-trains.
1. A sentencepiece tokenizer (BPE, a small vocabulary), trained on the facts and on train/demo_data/demo.json.
2. The base, pre-trained briefly on plain-text facts as statements and as questions with their answers ("The capital
   of France is Paris.", "Q: What is the opposite of hot? A: cold"; the tables behind demo.json,
   train/demo_data/make_demo.py), never the instruction template; written as a Hugging Face checkpoint to
   runs/demo-base/ and read back by load_checkpoint (a later run reuses it; it is rebuilt, the old one moved aside,
   when its recipe changes).
3. The adapter (prompts of 10 in the top layers, gates at 0), fine-tuned on demo.json by train.finetune, the base
   frozen (packed batches, a held-out split): the base knows the facts, the adapter teaches it the instructions.
4. The answers (greedy) to held-out instructions, with the adapter and by the base alone; exact-match accuracy on
   the held-out and train splits.
Writes runs/demo/: adapter.safetensors, adapter-epochN.safetensors, log.csv, loss.png, train_state.pt; a runs/demo
holding an earlier run is moved to runs/demo-<date>-<time>/ first. Measured results: README.md (`make demo`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sentencepiece
import torch
from tqdm import tqdm

from llama_adapter_triton.model.adapters.formats import load_adapter, read_adapter_config
from llama_adapter_triton.model.checkpoint import load_checkpoint, save_checkpoint
from llama_adapter_triton.model.cli import parse_dataclass
from llama_adapter_triton.model.generate import generate
from llama_adapter_triton.model.io import write_atomic
from llama_adapter_triton.model.llama import LLaMA, LLaMAConfig
from llama_adapter_triton.model.prompt import alpaca_prompt
from llama_adapter_triton.model.quantize import QUANTIZE_MODES
from llama_adapter_triton.model.tokenizer import Tokenizer
from llama_adapter_triton.train.data import PaddedLoader, TokenizedDataset, load_records
from llama_adapter_triton.train.finetune import FinetuneConfig, batch_loss_sum, load_data, run
from llama_adapter_triton.train.optim import lr_factor

DEMO_DATA = Path(__file__).parent / "demo_data" / "demo.json"
RECIPE_FILE = "demo-base.json"
CONTEXT = 256  # the base's max_seq_len: longer than any demo example (at most ~60 tokens)
# The response encoded on its own (litgpt's rule, train.finetune --tokenization litgpt), not glued to "### Response:"
# as the official script (the default): the demo's base learned its answers after a space ("A: ▁Lima"), and its
# 512-word vocabulary has few of the unspaced pieces ("L", "ima") the official rule gives, so that a 5k-parameter
# adapter learns almost nothing in 15 epochs with that rule (measured: 0 of 48 held-out answers right).
DEMO_TOKENIZATION = "litgpt"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the demo's base model and its fine-tuning; --smoke shrinks all of it."""

    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    pretrain_steps: int = 800
    pretrain_batch: int = 64  # facts per step
    pretrain_lr: float = 3e-3
    adapter_layers: int = 4
    epochs: int = 15
    token_budget: int = 1024
    blr: float = 1.0  # lr = blr x effective batch / 256 (the paper's 9e-3 is for LLaMA-7B and 5 epochs of 52K)
    eval_size: int = 48
    records: int = 0  # fine-tune on the first N records of demo.json (0: all)
    max_new_tokens: int = 8


SMOKE = Recipe(vocab_size=200, dim=64, n_layers=2, n_heads=2, pretrain_steps=8, pretrain_batch=32, adapter_layers=1,
               epochs=1, token_budget=256, eval_size=2, records=12, max_new_tokens=3)


@dataclass
class DemoConfig:
    """The demo's command line."""

    out: Path | None = field(default=None, metadata={
        "help": "where the fine-tuning writes (default: runs/demo, with --smoke runs/demo-smoke)"})
    base: Path | None = field(default=None, metadata={
        "help": "where the pre-trained base is cached (default: runs/demo-base, with --smoke runs/demo-smoke-base)"})
    smoke: bool = field(default=False, metadata={"help": "a seconds-long version of every stage"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda"})
    seed: int = field(default=0, metadata={"help": "seed of everything"})
    quantize: str | None = field(default=None, metadata={
        "help": "fine-tune and answer with the base's linear weights in nf4 or int8 (bitsandbytes, model/quantize.py)",
        "choices": QUANTIZE_MODES})
    threads: int = field(default=1, metadata={
        "help": "CPU threads of torch (0: torch's default). The demo's matrices are tiny: on 2 idle cores 2 threads "
                "are ~1.4x faster than 1, on 2 cores that other processes also use they were 30x slower"})

    def __post_init__(self) -> None:
        name = "demo-smoke" if self.smoke else "demo"
        self.out = Path(self.out) if self.out is not None else Path("runs") / name
        self.base = Path(self.base) if self.base is not None else Path("runs") / f"{name}-base"
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")


# ----------------------------------------------------------------------------------------------------------------
# The pre-training text


def _tables():
    """WORDS, ANTONYMS, CAPITALS of train/demo_data/make_demo.py (the script that wrote demo.json)."""
    spec = importlib.util.spec_from_file_location("make_demo", Path(__file__).parent / "demo_data" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.WORDS, module.ANTONYMS, module.CAPITALS


def facts() -> list[str]:
    """Every fact the demo's instructions ask about (and more) as plain text: a statement and a question with its
    answer ("Q: ... A: ..."), sums also as "3 + 4 = 7", the way a real base model has seen facts on the web; never
    the instruction template."""
    words, antonyms, capitals = _tables()
    letters = "abcdefghijklmnopqrstuvwxyz"
    numbers = {2: "two", 3: "three", 4: "four"}
    pairs = [(f"The capital of {country} is {capital}.", f"What is the capital of {country}?", capital)
             for country, capital in capitals.items()]
    pairs += [(f"The opposite of {a} is {b}.", f"What is the opposite of {a}?", b)
              for pair in antonyms for a, b in (pair, pair[::-1])]
    pairs += [(f"{a} plus {b} is {a + b}.", f"What is {a} plus {b}?", a + b) for a in range(10) for b in range(10)]
    pairs += [(f"{a} minus {b} is {a - b}.", f"What is {a} minus {b}?", a - b)
              for a in range(13) for b in range(min(a, 9) + 1)]
    pairs += [(f"The letter after {a} is {b}.", f"Which letter comes after {a}?", b)
              for a, b in zip(letters, letters[1:], strict=False)]
    pairs += [(f"The number after {n} is {n + 1}.", f"What number comes after {n}?", n + 1) for n in range(20)]
    for w in words:
        pairs += [(f"{w} in capital letters is {w.upper()}.", f"What is {w} in capital letters?", w.upper()),
                  (f"{w.upper()} in small letters is {w}.", f"What is {w.upper()} in small letters?", w),
                  (f"{w} backwards is {w[::-1]}.", f"What is {w} backwards?", w[::-1])]
        for k, name in numbers.items():
            pairs += [(f"{w} {k} times is {' '.join([w] * k)}.", f"What is {w} {name} times?", " ".join([w] * k))]
    sums = [f"{a} + {b} = {a + b}" for a in range(10) for b in range(10)]  # the notation, as on the web
    sums += [f"{a} - {b} = {a - b}" for a in range(13) for b in range(min(a, 9) + 1)]
    return [text for statement, question, answer in pairs
            for text in (statement, f"Q: {question} A: {answer}")] + sums


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> bytes:
    """A sentencepiece BPE model (unk 0, BOS 1, EOS 2 as LLaMA's) trained on texts; the .model file's bytes."""
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# The base


def pretrain(model: LLaMA, tokenizer: Tokenizer, texts: Sequence[str], recipe: Recipe, *, seed: int,
             device: torch.device) -> float:
    """Next-token pre-training of the whole model on texts (one per row, BOS + text + EOS); the last loss."""
    examples = [tokenizer.encode(t, bos=True, eos=True) for t in texts]
    data = TokenizedDataset.from_examples(examples, [1] * len(examples), pad_id=tokenizer.eos_id)  # targets: all
    loader = PaddedLoader(data, recipe.pretrain_batch, pad_to="longest", seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, recipe.pretrain_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, recipe.pretrain_steps, 0.1))
    bar = tqdm(total=recipe.pretrain_steps, desc="pre-training the base", unit="step", dynamic_ncols=True)
    step, epoch, loss = 0, 0, float("nan")
    while step < recipe.pretrain_steps:
        for batch_step in loader.iter_epoch(epoch):
            t0 = time.perf_counter()
            (batch,) = batch_step.batches
            loss_sum = batch_loss_sum(model, batch, device)
            (loss_sum / batch_step.num_targets).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            loss, step = float(loss_sum.detach()) / batch_step.num_targets, step + 1
            bar.update()
            bar.set_postfix_str(f"loss {loss:.3f} {batch_step.num_real_tokens / (time.perf_counter() - t0):,.0f} "
                                "tok/s")
            if step == recipe.pretrain_steps:
                break
        epoch += 1
    bar.close()
    return loss


def _recipe_of_base(recipe: Recipe, seed: int, texts: Sequence[str]) -> dict:
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "pretrain_steps", "pretrain_batch", "pretrain_lr")
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    return {**{k: getattr(recipe, k) for k in keys}, "seed": seed, "text_sha256": digest}


def _move_aside(path: Path) -> Path:
    """Rename path to path-<date>-<time> (never over anything); returns the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    target = path.with_name(f"{path.name}-{stamp}")
    n = 1
    while target.exists():
        target, n = path.with_name(f"{path.name}-{stamp}-{n}"), n + 1
    os.rename(path, target)
    return target


def base_model(config: DemoConfig, recipe: Recipe, device: torch.device) -> Path:
    """The cached base in config.base, or a new one: tokenizer + pre-training + HF checkpoint, renamed into place."""
    texts = facts()
    tokenizer_text = texts + [alpaca_prompt(r.instruction, r.input) + " " + r.output
                              for r in load_records(DEMO_DATA)[0]]
    wanted = _recipe_of_base(recipe, config.seed, tokenizer_text)
    folder = config.base
    if folder.exists():
        try:
            cached = json.loads((folder / RECIPE_FILE).read_text())
        except (OSError, ValueError):
            cached = None
        if cached is not None and {k: v for k, v in cached.items() if k in wanted} == wanted:
            print(f"base: reusing {folder}/ (pre-trained by an earlier run in {cached['seconds']:.0f} s, final loss "
                  f"{cached['loss']:.3f}; delete it to pre-train again)")
            return folder
        print(f"base: {folder}/ was made with another recipe: moved it to {_move_aside(folder)}/")

    t0 = time.perf_counter()
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        write_atomic(tmp / "tokenizer.model", train_tokenizer(tokenizer_text, recipe.vocab_size))
        tokenizer = Tokenizer(tmp / "tokenizer.model")
        torch.manual_seed(config.seed)
        model_config = LLaMAConfig(name="demo-base", dim=recipe.dim, n_layers=recipe.n_layers, n_heads=recipe.n_heads,
                                   vocab_size=tokenizer.vocab_size, multiple_of=32, norm_eps=1e-5, max_seq_len=CONTEXT)
        model = LLaMA(model_config).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"base: pre-training a tiny LLaMA-shaped model ({recipe.n_layers} layers, dim {recipe.dim}, "
              f"{recipe.n_heads} heads, vocab {tokenizer.vocab_size}: {n_params / 1e6:.2f}M parameters) from scratch "
              f"on {len(texts)} lines of plain-text facts, e.g. {texts[0]!r}, {texts[1]!r}")
        loss = pretrain(model, tokenizer, texts, recipe, seed=config.seed, device=device)
        save_checkpoint(model, tmp)
        seconds = time.perf_counter() - t0
        write_atomic(tmp / RECIPE_FILE, json.dumps({**wanted, "seconds": seconds, "loss": loss}, indent=1).encode())
        os.rename(tmp, folder)
    except BaseException:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
        raise
    print(f"base: pre-trained in {seconds:.0f} s (final loss {loss:.3f}); saved as a Hugging Face checkpoint with "
          f"its tokenizer in {folder}/")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Answers


def answer(model: LLaMA, tokenizer: Tokenizer, records: Sequence, max_new_tokens: int,
           batch_size: int = 64) -> list[str]:
    """Greedy answers to the records' instructions (Alpaca template), decoded."""
    out = []
    for i in range(0, len(records), batch_size):
        prompts = [tokenizer.encode(alpaca_prompt(r.instruction, r.input), bos=True, eos=False)
                   for r in records[i:i + batch_size]]
        for ids in generate(model, prompts, max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids):
            out.append(tokenizer.decode(ids).strip())
    return out


def _ask(r) -> str:
    return r.instruction + (f" [input: {r.input}]" if r.input else "")


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_dataclass(DemoConfig, argv, prog="llama-adapter demo", description=__doc__.split("\n\n")[0])
    recipe = SMOKE if config.smoke else Recipe()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device if config.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    print(f"LLaMA-Adapter demo{' (smoke)' if config.smoke else ''} on {device}. The base is a tiny LLaMA-shaped model "
          "pre-trained by this demo, not a real LLaMA.")
    base = base_model(config, recipe, device)

    if config.out.exists() and any(config.out.iterdir()):
        print(f"{config.out}/ held an earlier run: moved it to {_move_aside(config.out)}/")
    with tempfile.TemporaryDirectory() as tmp:
        data = DEMO_DATA
        if recipe.records:  # --smoke: a few records
            data = Path(tmp) / "demo-subset.json"
            data.write_text(json.dumps(json.loads(DEMO_DATA.read_text())[:recipe.records]))
        ft = FinetuneConfig(checkpoint=base, data=data, out=config.out, adapter_len=10,
                            adapter_layers=recipe.adapter_layers, token_budget=recipe.token_budget,
                            epochs=recipe.epochs, blr=recipe.blr, eval_size=recipe.eval_size, seed=config.seed,
                            device=str(device), quantize=config.quantize, tokenization=DEMO_TOKENIZATION)
        print(f"\nLLaMA-Adapter: fine-tuning an adapter on {data.name} with the base frozen "
              f"(llama-adapter finetune {' '.join(_flags(ft))})")
        run(ft)
        train_data, eval_data, _ = load_data(ft, min(ft.max_seq_len, CONTEXT), say=lambda _: None)  # run()'s split
        records = load_records(data)[0]

    tokenizer = Tokenizer(base)
    adapter_file = config.out / "adapter.safetensors"
    tuned = load_checkpoint(base, adapter=read_adapter_config(adapter_file), device=device,
                            quantize=config.quantize).eval()
    load_adapter(tuned, adapter_file)
    plain = load_checkpoint(base, device=device, quantize=config.quantize).eval()
    held_out = [records[int(i)] for i in eval_data.source_index]
    trained_on = [records[int(i)] for i in train_data.source_index]
    tuned_eval = answer(tuned, tokenizer, held_out, recipe.max_new_tokens)
    plain_eval = answer(plain, tokenizer, held_out, recipe.max_new_tokens)
    tuned_train = answer(tuned, tokenizer, trained_on, recipe.max_new_tokens)

    print("\nHeld-out instructions (never trained on), answered greedily:")
    for r, a, b in list(zip(held_out, tuned_eval, plain_eval, strict=True))[:6]:
        print(f"  {_ask(r)}\n    with the adapter: {a!r}{'  (right)' if a == r.output else ''}\n"
              f"    the base alone:   {b!r}")

    def right(answers, rs):
        return sum(a == r.output for a, r in zip(answers, rs, strict=True))

    print(f"\nExactly right: held-out {right(tuned_eval, held_out)}/{len(held_out)} with the adapter, "
          f"{right(plain_eval, held_out)}/{len(held_out)} for the base alone; "
          f"train {right(tuned_train, trained_on)}/{len(trained_on)} with the adapter.")
    print(f"Wrote {config.out}/ (adapter.safetensors, log.csv, loss.png, train_state.pt, adapter-epoch*.safetensors) "
          f"in {time.perf_counter() - started:.0f} s. Try it:\n"
          f"  llama-adapter generate --checkpoint {base} --adapter {adapter_file} --temperature 0 "
          f"--max-new-tokens 8 --device {device.type} --instruction \"What is the capital of Peru?\"")


def _flags(config: FinetuneConfig) -> list[str]:
    """The command line of a FinetuneConfig: the paths and the flags that differ from the defaults."""
    default = FinetuneConfig(config.checkpoint, config.data, config.out)
    return [f"--{k.replace('_', '-')} {v}" for k, v in asdict(config).items()
            if k in ("checkpoint", "data", "out") or v != getattr(default, k)]


if __name__ == "__main__":
    main()
