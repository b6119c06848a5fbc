"""Generation with a KV cache: prefill, then one token per step; greedy or temperature / top-p sampling.

    llama-adapter generate --checkpoint CKPT_DIR --adapter adapter.safetensors \\
        --instruction "Tell me about alpacas." [--input "..."]                           # one GPU (bf16)
    llama-adapter generate --checkpoint CKPT_DIR --instruction "..." --device cpu   # CPU (fp32)
    llama-adapter generate --checkpoint llama-7b/ --adapter llama_adapter_len10_layer30_release.pth \\
        --gate-act tanh --instruction "..."            # the official v1 release: gate_act must be chosen
    llama-adapter generate --checkpoint Llama-2-7b-chat-hf/ --chat --system "Be brief."   # a conversation, a line
                                                       # per turn, in the checkpoint's own chat template
    llama-adapter generate --checkpoint CKPT_DIR --adapter fr=fr.safetensors --adapter code=code.safetensors \
        --requests requests.jsonl      # many adapters, one base, batched: a JSON line per request, in order

The instruction goes through the adapter's template (--template; model/prompt.py), BOS first, as the adapter was
trained; --chat uses the checkpoint's own chat template (model/chat.py, within its budget: --chat-max-seconds,
--chat-max-chars), and a conversation's line that cannot be taken (not UTF-8, a special-token string, one the
template refuses, one the context cannot hold) is refused on stderr while the conversation goes on. The answer is
streamed, then tokens/s. Batches of prompts of different lengths are left-padded: every row's last prompt token
sits at the same cache slot, so one decode step serves all rows, and a row generates what it would alone. A user
error prints one line and exits non-zero (2 for a flag, 1 for a file); the tokenizer and the prompt's length are
checked before the weights load. More: docs/checkpoints.md (Generation); --requests and the adapter bank
(generate(..., adapters=, adapter_ids=)): docs/adapters-bank.md.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from llama_adapter_triton.kernels.checks import check_int

from .adapter import AdapterConfig
from .bank import AdapterBank
from .chat import RENDER_CHARS, RENDER_SECONDS, ChatTemplate, check_budget, encode_chat_prompt
from .cli import check_cuda_device, cli_message, parse_dataclass
from .io import CheckpointError
from .llama import LLaMA, LLaMAConfig, check_window
from .prompt import CHAT_TEMPLATE, TEMPLATES, format_prompt, user_message
from .quantize import QUANTIZE_MODES, check_quantize

PROG = "llama-adapter generate"


def check_sampling(temperature: float, top_p: float, *, names: tuple[str, str] = ("temperature", "top_p")) -> None:
    """ValueError unless temperature is finite and >= 0 (0: greedy) and top_p lies in (0, 1]; names: how the
    message calls them (the command line's flags)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"{names[0]} must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"{names[1]} must lie in (0, 1], got {top_p!r}")


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, vocab): argmax at temperature 0, else sampled from the top-p nucleus."""
    check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # the largest logit at 0 first: a tiny temperature divides the others to -inf, never inf - inf
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest set of most likely tokens whose mass reaches top_p: always the first one, whose mass
        # before it is 0 < top_p (checked)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _prompt_lists(prompts: Sequence[Sequence[int]] | torch.Tensor, prompt_mask: torch.Tensor | None) -> list[list[int]]:
    """The prompts as lists of real token ids; a tensor's rows are cut to their mask (one contiguous run each)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts must be (batch, seqlen), got {tuple(prompts.shape)}")
        if prompt_mask is None:
            return prompts.tolist()
        if prompt_mask.shape != prompts.shape:
            raise ValueError(f"prompt_mask must have the shape of prompts {tuple(prompts.shape)}, "
                             f"got {tuple(prompt_mask.shape)}")
        rows = []
        for b, (row, keep) in enumerate(zip(prompts.tolist(), prompt_mask.bool().tolist(), strict=True)):
            idx = [t for t, k in enumerate(keep) if k]
            if idx and idx != list(range(idx[0], idx[-1] + 1)):
                raise ValueError(f"prompt_mask row {b} is not one contiguous run of real tokens (left or right "
                                 "padding)")
            rows.append([row[t] for t in idx])
        prompts = rows
    elif prompt_mask is not None:
        raise ValueError("prompt_mask goes with a (batch, seqlen) tensor of prompts, not with lists")
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty batch of non-empty token sequences")
    return prompts


@torch.inference_mode()
def stream(model: LLaMA, prompts: Sequence[Sequence[int]] | torch.Tensor, *, max_new_tokens: int,
           prompt_mask: torch.Tensor | None = None, temperature: float = 0.0, top_p: float = 1.0,
           stop_ids: Iterable[int] = (), pad_id: int = 0, visual: torch.Tensor | None = None,
           image_features: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
           generator: torch.Generator | None = None, adapters: AdapterBank | Sequence | Mapping | None = None,
           adapter_ids: Sequence[str | int | None] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) each step, until every row has yielded a stop id or
    max_new_tokens steps. Rows that have stopped keep yielding tokens; ignore them (generate() does).

    Arguments:
        prompts: token ids, a list of sequences of any lengths, or a (batch, seqlen) tensor with
            prompt_mask (batch, seqlen) marking its real tokens (left or right padding).
        temperature / top_p: 0 is greedy; else sampling from the top-p nucleus.
        stop_ids: tokens that end a row (the tokenizer's stop_ids).
        pad_id: the token put at pad positions (any valid id: pads are masked).
        visual: (batch, dim) or (batch, n, dim) visual tokens for the adapter (multi-modal); or image_features
            (its projector's input) with image_mask (batch,) bool, False for rows without an image (LLaMA.forward).
        adapters, adapter_ids: many adapters in one batch (model/bank.py; model is then the base alone):
            adapters an AdapterBank, or adapter files (a list, ids their positions; a {name: file} dict, ids the
            names) read into a bank for this call; adapter_ids one per prompt, an adapter's name or position, or
            None for the base alone.
    """
    rows = _prompt_lists(prompts, prompt_mask)
    if (adapters is None) != (adapter_ids is None):
        raise ValueError("adapters and adapter_ids go together: the bank (or adapter files) and one id per prompt")
    if adapter_ids is not None and (isinstance(adapter_ids, (str, bytes)) or len(adapter_ids) != len(rows)):
        raise ValueError(f"adapter_ids must hold one id per prompt ({len(rows)}), got {adapter_ids!r}")
    check_sampling(temperature, top_p)
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    longest = max(len(r) for r in rows)
    total = longest + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's max_seq_len ({model.config.max_seq_len})")
    # the last forward attends over total - 1 tokens (the last one is never fed back): refused before any step
    check_window(model.config, total - 1, f"the longest prompt ({longest} tokens) with max_new_tokens "
                                          f"{max_new_tokens}: a span")
    device = model.tok_embeddings.weight.device
    left_pad = [longest - len(r) for r in rows]
    padded = [[pad_id] * p + r for p, r in zip(left_pad, rows, strict=True)]
    tokens = torch.tensor(padded, device=device)  # (B, longest)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    if adapters is not None and not isinstance(adapters, AdapterBank):
        adapters = AdapterBank(model, adapters)
    bank_rows = adapters.rows(adapter_ids) if adapters is not None else nullcontext()

    with bank_rows:  # the bank's per-row adapters, for the prefill and every decode step
        model.setup_cache(len(rows), total)
        try:
            logits = model(tokens, input_pos=0, left_pad=left_pad, visual=visual, image_features=image_features,
                           image_mask=image_mask, logits_at=-1)  # prefill: (B, vocab)
            for step in range(max_new_tokens):
                next_tokens = sample(logits, temperature=temperature, top_p=top_p, generator=generator)  # (B,)
                yield next_tokens
                done |= torch.isin(next_tokens, stop)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                logits = model(next_tokens.unsqueeze(1), input_pos=longest + step, left_pad=left_pad, logits_at=-1)
        finally:
            model.clear_cache()


def generate(model: LLaMA, prompts: Sequence[Sequence[int]] | torch.Tensor, *, max_new_tokens: int,
             stop_ids: Iterable[int] = (), **kwargs) -> list[list[int]]:
    """The new tokens of each prompt, up to (without) its first stop id; arguments as stream()."""
    stop_ids = set(stop_ids)
    out: list[list[int]] | None = None
    finished: list[bool] = []
    for next_tokens in stream(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, **kwargs):
        if out is None:
            out, finished = [[] for _ in next_tokens], [False] * len(next_tokens)
        for b, t in enumerate(next_tokens.tolist()):
            if not finished[b]:
                finished[b] = t in stop_ids
                if not finished[b]:
                    out[b].append(t)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Command line


@dataclass
class Args:
    """Generation from the command line; every field is a --flag (underscores as dashes)."""

    checkpoint: Path = field(metadata={"help": "Meta or Hugging Face checkpoint folder"})
    instruction: str | None = field(default=None, metadata={
        "help": "the instruction (in the --template); with --chat the user's message (without it, --chat reads a "
                "conversation from the terminal)"})
    input: str = field(default="", metadata={"help": "optional input / context for the instruction"})
    chat: bool = field(default=False, metadata={
        "help": "chat in the checkpoint's own chat template (its tokenizer_config.json's chat_template, or "
                "--chat-template): one answer to --instruction, or without it a conversation, a line per turn"})
    system: str | None = field(default=None, metadata={"help": "--chat: a system message first"})
    chat_template: Path | None = field(default=None, metadata={
        "help": "--chat: a .jinja file or a tokenizer_config.json whose chat template to use instead of the "
                "tokenizer folder's"})
    chat_max_seconds: float = field(default=RENDER_SECONDS, metadata={
        "help": "--chat: the most seconds one rendering of the chat template may take (model/chat.py)"})
    chat_max_chars: int = field(default=RENDER_CHARS, metadata={
        "help": "--chat: the most characters one rendering of the chat template may build (model/chat.py)"})
    adapter: list[str] | None = field(default=None, metadata={
        "metavar": "[NAME=]FILE",
        "help": "adapter: ours (.safetensors, V1 or V2), the official v1 or V2 release's .pth, a PEFT adaption-prompt "
                "folder, or litgpt's lit_model.pth.adapter(_v2); with --requests, NAME=FILE, repeated: an adapter "
                "bank (model/bank.py) the requests name"})
    requests: Path | None = field(default=None, metadata={
        "help": "a JSONL file of requests, a line each: {\"adapter\": NAME or null, \"prompt\": the instruction, "
                "optional \"input\", \"max_new_tokens\", \"temperature\", \"top_p\"}; answered in batches, a JSON "
                "line per request on stdout in request order"})
    batch_size: int = field(default=16, metadata={"help": "--requests: the most requests in one batch"})
    template: str = field(default="alpaca", metadata={
        "help": "the prompt template the adapter was trained with (model/prompt.py)", "choices": TEMPLATES})
    gate_act: str | None = field(default=None, metadata={
        "help": "required for the official v1 release, whose gate is ambiguous", "choices": ("tanh", "identity")})
    tokenizer: Path | None = field(default=None, metadata={
        "help": "tokenizer.model / tokenizer.json or its folder (default: the checkpoint folder)"})
    image: Path | None = field(default=None, metadata={
        "help": "multi-modal adapters: an image file for the instruction (needs --clip)"})
    clip: Path | None = field(default=None, metadata={
        "help": "the local CLIP model folder the multi-modal adapter was trained with"})
    max_new_tokens: int = field(default=256, metadata={"help": "at most this many new tokens"})
    temperature: float = field(default=0.1, metadata={"help": "0 for greedy (the official demo uses 0.1)"})
    top_p: float = field(default=0.75, metadata={"help": "nucleus of sampling (the official demo uses 0.75)"})
    seed: int = field(default=1234, metadata={"help": "random seed of the sampling"})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cuda or cpu"})
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 on a GPU, fp32 on the CPU",
                                                 "choices": ("auto", "bfloat16", "float16", "float32")})
    allow_external_files: bool = field(default=False, metadata={
        "help": "read checkpoint shards that its shard index names outside --checkpoint (refused by default)"})
    quantize: str | None = field(default=None, metadata={
        "help": "the base's linear weights in nf4 or int8 (bitsandbytes, model/quantize.py); --dtype computes",
        "choices": QUANTIZE_MODES})
    quantize_output: bool = field(default=False, metadata={"help": "with --quantize: the output layer too"})
    adapter_file: Path | None = field(default=None, init=False)  # the one --adapter FILE
    bank_files: dict[str, Path] = field(default_factory=dict, init=False)  # --requests: the --adapter NAME=FILE

    def __post_init__(self) -> None:
        self.chat = self.chat or self.template == CHAT_TEMPLATE  # the checkpoint's chat template is --chat's
        if self.requests is not None:
            for flag, value in (("--instruction", self.instruction), ("--chat", self.chat or None),
                                ("--image", self.image)):
                if value is not None:
                    raise ValueError(f"{flag} goes without --requests (each request holds its prompt)")
            for value in self.adapter or []:
                name, eq, file = value.partition("=")
                if not eq or not name or not file:
                    raise ValueError(f"--adapter {value}: with --requests each adapter is NAME=FILE")
                if name in self.bank_files:
                    raise ValueError(f"--adapter {value}: the name {name!r} is given twice")
                self.bank_files[name] = Path(file)
            check_int("--batch-size", self.batch_size, 1, what="an integer >= 1")
        elif self.adapter:
            if len(self.adapter) > 1:
                raise ValueError("several --adapter NAME=FILE go with --requests (a JSONL of requests naming them); "
                                 "without it, one --adapter FILE")
            self.adapter_file = Path(self.adapter[0])
        if self.instruction is None and not self.chat and self.requests is None:
            raise ValueError("--instruction is required (or --chat, for a conversation read from the terminal, or "
                             "--requests)")
        for flag, value in (("--system", self.system), ("--chat-template", self.chat_template)):
            if value is not None and not self.chat:
                raise ValueError(f"{flag} goes with --chat")
        for flag, value in (("--instruction", self.instruction), ("--input", self.input), ("--system", self.system)):
            problem = utf8_problem(value)
            if problem:
                raise ValueError(f"{flag} {problem}")
        check_budget(self.chat_max_seconds, self.chat_max_chars, names=("--chat-max-seconds", "--chat-max-chars"))
        if self.chat and self.image is not None:
            raise ValueError("--chat is text-only: --image goes without it")
        check_quantize(self.quantize, argument="--quantize")
        if self.quantize_output and self.quantize is None:
            raise ValueError("--quantize-output goes with --quantize nf4|int8")
        check_int("--max-new-tokens", self.max_new_tokens, 1, what="an integer >= 1")
        check_sampling(self.temperature, self.top_p, names=("--temperature", "--top-p"))
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device != "cpu":
            check_cuda_device(self.device)


def utf8_problem(text: str | None) -> str | None:
    """What makes text unusable as a prompt: bytes that were not UTF-8 (read with surrogateescape, as Python reads
    the command line), said with their place; None when it is fine."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid UTF-8 text (character {e.start}: {text[e.start]!r})"
    return None


def input_lines(stream) -> Iterator[tuple[str | None, str | None]]:
    """(line, None), or (None, what is wrong) for a line that is not UTF-8, from a text stream (its bytes when it
    has them: one bad line does not end the rest)."""
    raw = getattr(stream, "buffer", None)
    for number, line in enumerate(raw if raw is not None else stream, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield None, f"line {number} is not valid UTF-8 text (byte {e.start})"
                continue
        problem = utf8_problem(line)
        yield (None, f"line {number} {problem}") if problem else (line.rstrip("\r\n"), None)


def parse_args(argv: Sequence[str] | None = None) -> Args:
    return parse_dataclass(Args, argv, prog=PROG, description=__doc__.split("\n\n")[0])


def check_image_args(args: Args, adapter: AdapterConfig | None) -> None:
    """--image and --clip against the adapter's config, before anything is loaded."""
    def error(message: str) -> None:
        raise SystemExit(f"{PROG}: error: {message}")

    if args.image is None:
        if args.clip is not None:
            error("--clip goes with --image")
        return
    if adapter is None or not adapter.visual_dim:
        error("--image needs a multi-modal adapter (trained with llama-adapter finetune --clip); "
              + ("this one is text-only" if adapter is not None else "no --adapter was given"))
    if args.clip is None:
        error("--image needs --clip, the CLIP model folder the adapter was trained with")
    if not args.image.is_file():
        error(f"--image {args.image} does not exist")


def image_features(model: LLaMA, image: Path, clip: Path, dtype: torch.dtype) -> torch.Tensor:
    """The CLIP features of an image that the model's multi-modal adapter reads: (1, visual_dim), or (1, tokens,
    visual_dim) for the official V2 release's projector."""
    from .visual import CLIPImageEncoder

    device = model.tok_embeddings.weight.device
    try:
        encoder = CLIPImageEncoder.for_adapter(clip, model.adapter, device=device, dtype=dtype)
    except ValueError as e:  # an incomplete CLIP checkpoint, or fewer layers than the adapter's
        raise SystemExit(f"{PROG}: error: --clip: {e}") from None
    try:
        return encoder.encode_files([image])
    except ValueError as e:  # not an image
        raise SystemExit(f"{PROG}: error: --image: {e}") from None


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: one clear line and exit status 1 for a file that cannot be used (no traceback)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except (CheckpointError, OSError) as e:  # missing or bad checkpoint, adapter, tokenizer or CLIP files
        print(f"{PROG}: error: {cli_message(e)}", file=sys.stderr)
        sys.exit(1)


def run(args: Args) -> None:
    """Generate the answer to args.instruction (or chat: args.chat), streamed to stdout; tokens/s to stderr."""
    from .adapters.formats import load_adapter, read_adapter_config
    from .checkpoint import load_checkpoint, load_config
    from .tokenizer import Tokenizer

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    dtype = dtypes.get(args.dtype, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)

    t0 = time.perf_counter()
    # everything that can be checked before the weights load
    config = load_config(args.checkpoint, allow_external_files=args.allow_external_files)
    tokenizer = Tokenizer(args.tokenizer or args.checkpoint)
    tokenizer.check_vocab(config.vocab_size)
    if args.requests is not None:
        run_requests(args, config, tokenizer, dtype, t0)
        return
    message = None if args.instruction is None else user_message(args.instruction, args.input)
    if args.chat:
        chat = Chat(tokenizer, args.chat_template, args.system, args.chat_max_seconds, args.chat_max_chars)
        try:
            prompt = chat.prompt(message) if message is not None else None
        except ValueError as e:
            raise SystemExit(f"{PROG}: error: --chat: {e}") from None
    else:
        prompt = tokenizer.encode(format_prompt(args.template, args.instruction, args.input), bos=True, eos=False)
    if prompt is not None:
        check_prompt_length(len(prompt), args.max_new_tokens, config)
    file = args.adapter_file
    adapter = read_adapter_config(file, gate_act=args.gate_act, model=config) if file else None
    check_image_args(args, adapter)
    model = load_checkpoint(args.checkpoint, adapter=adapter, dtype=dtype, device=args.device,
                            allow_external_files=args.allow_external_files, quantize=args.quantize,
                            quantize_output=args.quantize_output).eval()
    if file:
        load_adapter(model, file, gate_act=args.gate_act)
    features = image_features(model, args.image, args.clip, dtype) if args.image is not None else None
    print(f"loaded {args.checkpoint} ({model.config.n_layers} layers, dim {model.config.dim}"
          f"{', adapter ' + str(file) if file else ''}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    if prompt is not None:  # one answer
        answer_streamed(model, tokenizer, prompt, args, generator, features)
        return
    print("chat: one line per turn; an empty line or the end of the input (Ctrl-D) ends it", file=sys.stderr)
    for message, problem in input_lines(sys.stdin):  # the conversation, a line per user turn
        if message is not None and not message.strip():
            break
        try:
            if problem is not None:
                raise ValueError(problem)
            prompt = chat.prompt(message)
            problem = prompt_length_problem(len(prompt), args.max_new_tokens, config)  # the conversation is full
            if problem is not None:
                raise ValueError(problem)
        except ValueError as e:  # say so, and read the next line: the conversation stays as it was
            print(f"{PROG}: this line is not taken: {e}", file=sys.stderr)
            continue
        answer = answer_streamed(model, tokenizer, prompt, args, generator, features)
        chat.messages += [("user", message), ("assistant", tokenizer.decode(answer))]


@dataclass
class Request:
    """One line of --requests: its number, the adapter it names (None: the base), its prompt's ids, its settings."""

    line: int
    adapter: str | None
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float


REQUEST_KEYS = ("adapter", "prompt", "input", "max_new_tokens", "temperature", "top_p")


def read_requests(args: Args, tokenizer, config: LLaMAConfig) -> list[Request]:
    """Every line of --requests, checked (its adapter among --adapter's names, its prompt within the context, its
    settings); SystemExit naming the file and the line for the first bad one."""
    requests = []

    def error(message: str) -> SystemExit:
        return SystemExit(f"{PROG}: error: --requests {args.requests}: line {number}: {message}")

    with open(args.requests, "rb") as f:
        for number, (line, problem) in enumerate(input_lines(f), 1):  # error() names the line number
            if problem is not None:
                raise SystemExit(f"{PROG}: error: --requests {args.requests}: {problem}")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise error(f"not JSON ({e})") from None
            if not isinstance(record, dict):
                raise error(f"must be a JSON object, got {type(record).__name__}")
            unknown = sorted(record.keys() - set(REQUEST_KEYS))
            if unknown:
                raise error(f"unknown key {unknown[0]!r} (a request has {', '.join(REQUEST_KEYS)})")
            adapter = record.get("adapter")
            if adapter is not None and adapter not in args.bank_files:
                raise error(f"adapter {adapter!r} is not one of --adapter's names {sorted(args.bank_files)} (null: "
                            "the base alone)")
            text, extra = record.get("prompt"), record.get("input", "")
            if not isinstance(text, str) or not text.strip() or not isinstance(extra, str):
                raise error("needs \"prompt\", a non-empty string (and \"input\", if any, a string)")
            settings = {key: record.get(key, getattr(args, key)) for key in ("max_new_tokens", "temperature", "top_p")}
            try:
                check_int("max_new_tokens", settings["max_new_tokens"], 1, what="an integer >= 1")
                check_sampling(settings["temperature"], settings["top_p"])
            except ValueError as e:
                raise error(str(e)) from None
            prompt = tokenizer.encode(format_prompt(args.template, text, extra), bos=True, eos=False)
            problem = prompt_length_problem(len(prompt), settings["max_new_tokens"], config)
            if problem is not None:
                raise error(problem.replace("--max-new-tokens", "max_new_tokens"))
            requests.append(Request(number, adapter, prompt, **settings))
    if not requests:
        raise SystemExit(f"{PROG}: error: --requests {args.requests}: holds no request")
    return requests


def request_batches(requests: list[Request], batch_size: int) -> Iterator[list[Request]]:
    """Consecutive requests in batches of at most batch_size that share temperature and top_p (request order)."""
    batch: list[Request] = []
    for r in requests:
        if batch and (len(batch) == batch_size or (r.temperature, r.top_p) != (batch[0].temperature, batch[0].top_p)):
            yield batch
            batch = []
        batch.append(r)
    if batch:
        yield batch


def run_requests(args: Args, config: LLaMAConfig, tokenizer, dtype: torch.dtype, t0: float) -> None:
    """--requests: the base model and an adapter bank of --adapter's NAME=FILE; a JSON line per request on stdout
    ({"line", "adapter", "output"}), in request order, a batch at a time; tokens/s to stderr."""
    from .adapters.formats import read_adapter_config
    from .checkpoint import load_checkpoint

    requests = read_requests(args, tokenizer, config)
    for name, file in args.bank_files.items():  # checked against the base before the weights load
        try:
            read_adapter_config(file, gate_act=args.gate_act, model=config)
        except CheckpointError as e:
            raise CheckpointError(f"--adapter {name}={file}: {e}") from None
    model = load_checkpoint(args.checkpoint, dtype=dtype, device=args.device,
                            allow_external_files=args.allow_external_files, quantize=args.quantize,
                            quantize_output=args.quantize_output).eval()
    try:
        bank = AdapterBank(model, args.bank_files, gate_act=args.gate_act)
    except ValueError as e:  # a multi-modal adapter
        raise SystemExit(f"{PROG}: error: --adapter: {e}") from None
    print(f"loaded {args.checkpoint} ({config.n_layers} layers, dim {config.dim}) and {len(bank)} adapter(s) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    t1, total = time.perf_counter(), 0
    for batch in request_batches(requests, args.batch_size):
        answers = generate(model, [r.prompt for r in batch], max_new_tokens=max(r.max_new_tokens for r in batch),
                           temperature=batch[0].temperature, top_p=batch[0].top_p, stop_ids=tokenizer.stop_ids,
                           generator=generator, adapters=bank, adapter_ids=[r.adapter for r in batch])
        for r, answer in zip(batch, answers, strict=True):
            answer = answer[:r.max_new_tokens]
            total += len(answer)
            print(json.dumps({"line": r.line, "adapter": r.adapter, "output": tokenizer.decode(answer)}), flush=True)
    seconds = time.perf_counter() - t1
    print(f"{len(requests)} requests, {total} tokens in {seconds:.2f} s: {total / seconds:.1f} tokens/s",
          file=sys.stderr)


class Chat:
    """A conversation in the checkpoint's chat template (model/chat.py): the messages so far, and the prompt of the
    next assistant turn."""

    def __init__(self, tokenizer, template_file: Path | None, system: str | None,
                 max_seconds: float = RENDER_SECONDS, max_chars: int = RENDER_CHARS):
        template = ChatTemplate.from_file(template_file) if template_file is not None else \
            ChatTemplate.find(tokenizer.path)
        if template is None:
            raise SystemExit(f"{PROG}: error: --chat: {tokenizer.path.parent} has no chat template (no "
                             "chat_template.jinja, no \"chat_template\" in tokenizer_config.json); pass "
                             "--chat-template FILE, or use --template alpaca|chat")
        self.template = replace(template, max_seconds=max_seconds, max_chars=max_chars)
        self.tokenizer = tokenizer
        self.messages: list[tuple[str, str]] = [("system", system)] if system else []

    def prompt(self, message: str) -> list[int]:
        """The ids of the conversation so far with the user's message and the assistant's turn opened; ValueError
        for a message holding a special-token string (model/chat.py) or one the template refuses."""
        return encode_chat_prompt(self.template, self.tokenizer, [*self.messages, ("user", message)])


def prompt_length_problem(length: int, max_new_tokens: int, config: LLaMAConfig) -> str | None:
    """What is wrong with a prompt plus max_new_tokens beyond the model's context or its sliding window (Mistral
    v0.1: as stream() checks it), or None."""
    if length + max_new_tokens > config.max_seq_len:
        return (f"the prompt has {length} tokens; with --max-new-tokens {max_new_tokens} that exceeds the model's "
                f"context of {config.max_seq_len} tokens")
    try:
        check_window(config, length + max_new_tokens - 1,
                     f"the prompt ({length} tokens) with --max-new-tokens {max_new_tokens}: a span")
    except ValueError as e:
        return str(e)
    return None


def check_prompt_length(length: int, max_new_tokens: int, config: LLaMAConfig) -> None:
    """A one-line exit, before the weights load, for prompt_length_problem."""
    problem = prompt_length_problem(length, max_new_tokens, config)
    if problem is not None:
        raise SystemExit(f"{PROG}: error: {problem}")


def answer_streamed(model: LLaMA, tokenizer, prompt: list[int], args: Args, generator: torch.Generator,
                    features: torch.Tensor | None) -> list[int]:
    """The answer's tokens (without its stop token), streamed to stdout as they come; tokens/s to stderr."""
    answer: list[int] = []
    printed = ""
    t0 = time.perf_counter()
    for next_tokens in stream(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, stop_ids=tokenizer.stop_ids, generator=generator,
                              image_features=features):
        token = int(next_tokens[0])
        if token in tokenizer.stop_ids:
            break
        answer.append(token)
        text = tokenizer.decode(answer)  # decode it all: pieces alone lose their leading spaces
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(printed):], end="", flush=True)
            printed = text
    seconds = time.perf_counter() - t0
    print(tokenizer.decode(answer)[len(printed):])
    line = f"{len(answer)} tokens in {seconds:.2f} s: {len(answer) / seconds:.1f} tokens/s"
    if args.device.startswith("cuda"):
        line += f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    print(line, file=sys.stderr)
    return answer


if __name__ == "__main__":
    main()
