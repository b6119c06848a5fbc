"""Generation: KV-cached decoding against full recomputation, padded batches against single prompts,
sampling, stop tokens, and the command line end to end."""

from __future__ import annotations

import copy
import dataclasses
import io
import json

import pytest
import sentencepiece
import tokenizers
import torch
from model_utils import VOCAB, copy_base, hf_model, set_adapter_, tiny_config, tiny_model

from llama_adapter_triton import (
    AdapterConfig,
    Tokenizer,
    alpaca_prompt,
    load_adapter,
    load_checkpoint,
    read_adapter_config,
    save_adapter,
    set_attention_impl,
)
from llama_adapter_triton.model.generate import _prompt_lists, generate, main, sample, stream

ADAPTER = AdapterConfig(adapter_len=4, adapter_layers=1)


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def greedy_without_cache(model, tokens: list[int], n: int, visual=None) -> list[int]:
    seq = list(tokens)
    device = next(model.parameters()).device
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq], device=device), visual=visual)[0, -1].argmax()))
    return seq[len(tokens):]


@pytest.fixture(scope="module")
def model():
    return tiny_model(ADAPTER, gqa=True, seed=2)


@pytest.fixture(scope="module")
def model_on_device(model, device):
    """The same model on the suite's device (CUDA when there is a GPU)."""
    return model.to(device) if device == "cpu" else copy.deepcopy(model).to(device)


@pytest.mark.gpu_leg
def test_kv_cached_generation_equals_full_recomputation(model_on_device, triton_kernels_only):
    model = model_on_device
    tokens = prompt(7, seed=0)
    cached = generate(model, [tokens], max_new_tokens=8)[0]
    assert cached == greedy_without_cache(model, tokens, 8)
    assert len(set(cached)) > 2  # a real sequence, not one token repeated
    assert triton_kernels_only.forward > 0


@pytest.mark.gpu_leg
def test_batch_of_uneven_prompts_equals_each_prompt_alone(model_on_device, device, triton_kernels_only):
    model = model_on_device
    prompts = [prompt(7, seed=1), prompt(3, seed=2), prompt(5, seed=3)]
    visual = torch.randn(3, 128, generator=torch.Generator().manual_seed(4)).to(device)
    batch = generate(model, prompts, max_new_tokens=6, visual=visual)
    alone = [generate(model, [p], max_new_tokens=6, visual=visual[b:b + 1])[0] for b, p in enumerate(prompts)]
    assert batch == alone
    assert alone[1] == greedy_without_cache(model, prompts[1], 6, visual=visual[1:2])

    # the same batch as a right-padded tensor with a mask of its real tokens
    padded, mask = padded_tensor(prompts, "right")
    assert generate(model, padded.to(device), prompt_mask=mask.to(device), max_new_tokens=6, visual=visual) == alone
    assert triton_kernels_only.forward > 0


def padded_tensor(prompts: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    padded = torch.full((len(prompts), longest), 5)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for b, p in enumerate(prompts):
        span = slice(0, len(p)) if side == "right" else slice(longest - len(p), longest)
        padded[b, span], mask[b, span] = torch.tensor(p), True
    return padded, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_prompt_tensors_are_cut_to_their_mask(side):
    prompts = [prompt(7, seed=1), prompt(3, seed=2), prompt(5, seed=3)]
    assert _prompt_lists(*padded_tensor(prompts, side)) == prompts


def test_generation_stops_at_stop_ids(model):
    tokens = prompt(6, seed=5)
    free = generate(model, [tokens], max_new_tokens=8)[0]
    stop = free[3]
    first = free.index(stop)
    assert generate(model, [tokens], max_new_tokens=8, stop_ids={stop})[0] == free[:first]
    steps = list(stream(model, [tokens, tokens], max_new_tokens=8, stop_ids={stop}))
    assert len(steps) == first + 1  # every row has stopped: no step beyond the stop token


def test_sample():
    logits = torch.tensor([[0.45, 0.35, 0.2]]).log().expand(400, 3)
    assert sample(logits).tolist() == [0] * 400
    g = torch.Generator().manual_seed(0)
    draws = sample(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(draws.tolist()) == {0, 1}  # 0.45 + 0.35 reaches 0.7: token 2 is outside the nucleus
    assert set(sample(logits, temperature=1.0, generator=g).tolist()) == {0, 1, 2}
    assert sample(logits, temperature=1.0, top_p=0.01, generator=g).tolist() == [0] * 400
    again = sample(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_sampled_generation_is_reproducible(model):
    tokens = [prompt(4, seed=6), prompt(6, seed=7)]
    runs = [generate(model, tokens, max_new_tokens=5, temperature=0.8, top_p=0.9,
                     generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert runs[0] == runs[1] and all(len(r) == 5 for r in runs[0])


def test_generate_rejects_bad_input(model):
    with pytest.raises(ValueError, match=r"longest prompt \(60 tokens\) plus max_new_tokens \(5\) exceeds the model's "
                                         r"max_seq_len \(64\)"):
        generate(model, [prompt(60, 0)], max_new_tokens=5)
    with pytest.raises(ValueError, match="non-empty token sequences"):
        generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_mask row 0 is not one contiguous run"):
        generate(model, torch.ones(1, 4, dtype=torch.long), prompt_mask=torch.tensor([[1, 0, 1, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        generate(model, [[1, 2]], max_new_tokens=0)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """An HF checkpoint of a tiny model, with a sentencepiece tokenizer.model of its vocabulary, and an adapter."""
    folder = tmp_path_factory.mktemp("ckpt")
    out = io.BytesIO()
    text = [alpaca_prompt("Tell me about alpacas.", "They live in the Andes."), "Alpacas are gentle animals."] * 30
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=out, vocab_size=300,
                                             byte_fallback=True, model_type="bpe", minloglevel=2)
    (folder / "tokenizer.model").write_bytes(out.getvalue())
    config = dataclasses.replace(tiny_config(), vocab_size=300, max_seq_len=512)
    hf_model(config, seed=4).save_pretrained(folder)
    model = load_checkpoint(folder, adapter=ADAPTER)
    set_adapter_(model, seed=5)
    save_adapter(model, folder / "adapter.safetensors")
    return folder


def test_command_line_streams_the_answer(checkpoint_dir, capsys):
    main(["--checkpoint", str(checkpoint_dir), "--adapter", str(checkpoint_dir / "adapter.safetensors"),
          "--instruction", "Tell me about alpacas.", "--input", "They live in the Andes.", "--max-new-tokens", "6",
          "--temperature", "0"])
    captured = capsys.readouterr()

    tokenizer = Tokenizer(checkpoint_dir)
    model = load_checkpoint(checkpoint_dir, adapter=read_adapter_config(checkpoint_dir / "adapter.safetensors"))
    load_adapter(model, checkpoint_dir / "adapter.safetensors")
    tokens = tokenizer.encode(alpaca_prompt("Tell me about alpacas.", "They live in the Andes."), bos=True)
    answer = generate(model, [tokens], max_new_tokens=6, stop_ids=tokenizer.stop_ids)[0]
    assert answer and captured.out == tokenizer.decode(answer) + "\n"
    assert f"{len(answer)} tokens in " in captured.err and "tokens/s" in captured.err


def test_command_line_with_a_v2_adapter_and_the_chat_template(checkpoint_dir, tmp_path, capsys):
    """A V2 adapter file generates like a V1 one (the model is built from its metadata); --template chat asks in the
    official V2 chat model's template."""
    from llama_adapter_triton import AdapterConfig
    from llama_adapter_triton.model.prompt import chat_prompt

    model = load_checkpoint(checkpoint_dir, adapter=AdapterConfig(adapter_len=4, adapter_layers=1, version=2))
    set_adapter_(model, seed=6)
    with torch.no_grad():
        model.layers[0].feed_forward.w2.bias.normal_(generator=torch.Generator().manual_seed(7))
    path = save_adapter(model, tmp_path / "v2.safetensors")
    main(["--checkpoint", str(checkpoint_dir), "--adapter", str(path), "--template", "chat", "--instruction",
          "Tell me about alpacas.", "--max-new-tokens", "5", "--temperature", "0"])
    tokenizer = Tokenizer(checkpoint_dir)
    tokens = tokenizer.encode(chat_prompt("Tell me about alpacas."), bos=True)
    answer = generate(model.eval(), [tokens], max_new_tokens=5, stop_ids=tokenizer.stop_ids)[0]
    assert answer and capsys.readouterr().out == tokenizer.decode(answer) + "\n"


def test_command_line_chat_in_the_checkpoints_template(checkpoint_dir, tmp_path, capsys, monkeypatch):
    """--chat: the tokenizer folder's chat template (tokenizer_config.json's chat_template), one answer to
    --instruction, or a conversation read from stdin whose earlier turns go into every later prompt."""
    import shutil
    import sys

    from test_chat import LLAMA2_CHAT

    from llama_adapter_triton.model.chat import ChatTemplate

    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(checkpoint_dir / "tokenizer.model", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2_CHAT}))
    tokenizer = Tokenizer(folder)
    template = ChatTemplate.find(folder).for_tokenizer(tokenizer)
    model = load_checkpoint(checkpoint_dir, adapter=read_adapter_config(checkpoint_dir / "adapter.safetensors"))
    load_adapter(model, checkpoint_dir / "adapter.safetensors")

    def reply(messages) -> list[int]:
        ids = tokenizer.encode(template.render(messages, add_generation_prompt=True), bos=False, special=True)
        assert ids[:2] == [tokenizer.bos_id, *tokenizer.encode("[INST]", bos=False)[:1]]
        return generate(model, [ids], max_new_tokens=4, stop_ids=tokenizer.stop_ids)[0]

    flags = ["--checkpoint", str(checkpoint_dir), "--tokenizer", str(folder), "--adapter",
             str(checkpoint_dir / "adapter.safetensors"), "--chat", "--max-new-tokens", "4", "--temperature", "0"]
    main([*flags, "--system", "Be brief.", "--instruction", "Tell me about alpacas."])
    first = reply([("system", "Be brief."), ("user", "Tell me about alpacas.")])
    assert capsys.readouterr().out == tokenizer.decode(first) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me about alpacas.\nStop </s> now\nAnd llamas?\n\nunread\n"))
    main(flags)
    captured = capsys.readouterr()
    first = reply([("user", "Tell me about alpacas.")])
    second = reply([("user", "Tell me about alpacas."), ("assistant", tokenizer.decode(first)),
                    ("user", "And llamas?")])
    assert captured.out == tokenizer.decode(first) + "\n" + tokenizer.decode(second) + "\n"
    assert "message 2 (user): its content holds the tokenizer's special token '</s>'" in captured.err
    with pytest.raises(SystemExit, match=r"--chat: .* has no chat template .* pass --chat-template FILE"):
        main([*flags[:2], "--chat", "--instruction", "hi"])
    (tmp_path / "t.jinja").write_text(LLAMA2_CHAT)  # --chat-template: a .jinja file
    main([*flags[:2], "--chat", "--chat-template", str(tmp_path / "t.jinja"), "--instruction", "Tell me about alpacas.",
          "--max-new-tokens", "4", "--temperature", "0"])
    assert capsys.readouterr().out == tokenizer.decode(reply([("user", "Tell me about alpacas.")])) + "\n"


def test_command_line_errors(checkpoint_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint_dir)])  # --instruction is required
    assert "--instruction is required (or --chat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint_dir), "--instruction", "hi", "--system", "s"])
    assert "--system goes with --chat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint_dir), "--instruction", "hi", "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batched_generation_equals_each_prompt_alone():
    gpu = tiny_model(ADAPTER, gqa=True, seed=2).cuda()
    prompts = [prompt(7, seed=1), prompt(3, seed=2)]
    batch = generate(gpu, prompts, max_new_tokens=6)
    assert batch == [generate(gpu, [p], max_new_tokens=6)[0] for p in prompts]
    assert batch[0] == greedy_without_cache(gpu, prompts[0], 6)


def test_sampling_arguments_are_checked_and_the_top_token_always_kept():
    """top_p <= 0 once masked every token (multinomial raised); a tiny temperature gave inf - inf = NaN."""
    logits = torch.tensor([[0.45, 0.35, 0.2]]).log().expand(50, 3)
    g = torch.Generator().manual_seed(0)
    assert sample(logits, temperature=1.0, top_p=1e-12, generator=g).tolist() == [0] * 50
    assert sample(logits * 1e6, temperature=1e-30, top_p=0.5, generator=g).tolist() == [0] * 50
    for kwargs, message in ((dict(temperature=1.0, top_p=0.0), r"top_p must lie in \(0, 1\], got 0.0"),
                            (dict(temperature=1.0, top_p=1.5), r"top_p must lie in \(0, 1\], got 1.5"),
                            (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
                            (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
                            (dict(temperature=-1.0), "temperature must be a finite number >= 0")):
        with pytest.raises(ValueError, match=message):
            sample(logits, generator=g, **kwargs)


def test_command_line_user_errors_are_one_line(checkpoint_dir, tmp_path, capsys):
    """Every user error: `llama-adapter generate: error: ...` and a non-zero exit, never a traceback."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(checkpoint_dir / "adapter.safetensors", "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    prompt = next(k for k in tensors if k.endswith("adapter_prompt"))
    tensors[prompt][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors", metadata)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    # a tokenizer with more tokens than the model's 300 embedding rows
    words = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 301)}}
    tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<s>")).save(str(tmp_path / "tokenizer.json"))
    gpus = torch.cuda.device_count()
    cases = [
        (["--checkpoint", str(tmp_path / "nope")], 1, "nope: not a folder"),
        (["--adapter", str(tmp_path / "missing.safetensors")], 1, "missing.safetensors: cannot be read"),
        (["--adapter", str(tmp_path / "garbage.safetensors")], 1, "garbage.safetensors: cannot be loaded with "
                                                                  "weights_only=True"),
        (["--adapter", str(tmp_path / "nan.safetensors")], 1, f"tensor '{prompt}' holds 1 non-finite value(s)"),
        (["--tokenizer", str(tmp_path / "none.model")], 1, "none.model: no such tokenizer file"),
        (["--tokenizer", str(tmp_path / "tokenizer.json")], 1, "the tokenizer has 301 tokens, more than the model's "
                                                               "300"),
        (["--max-new-tokens", "600"], 1, "with --max-new-tokens 600 that exceeds the model's context of 512"),
        (["--top-p", "0"], 2, "--top-p must lie in (0, 1], got 0.0"),
        (["--temperature", "nan"], 2, "--temperature must be a finite number >= 0 (0: greedy), got nan"),
        (["--max-new-tokens", "0"], 2, "--max-new-tokens must be an integer >= 1, got 0"),
        (["--device", "tpu"], 2, "--device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", f"cuda:{gpus}"], 2, f"this machine has {gpus} CUDA GPU(s)" if gpus else "no CUDA GPU"),
    ]
    base = ["--checkpoint", str(checkpoint_dir), "--instruction", "Tell me about alpacas.", "--device", "cpu",
            "--max-new-tokens", "2", "--temperature", "0"]
    for flags, code, message in cases:
        with pytest.raises(SystemExit) as e:
            main(base + flags)
        # exit(1) after printing, or SystemExit(message), which Python prints and exits 1 with
        text = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")
        assert e.value.code == code or (code == 1 and isinstance(e.value.code, str)), flags
        last = text.strip().splitlines()[-1]  # after argparse's usage for a bad flag (exit 2)
        assert last.startswith("llama-adapter generate: error: ") and message in last, (flags, text)
        assert "Traceback" not in text and (code == 2 or text.strip() == last), text


def test_command_line_chat_refuses_a_bad_line_and_goes_on(checkpoint_dir, tmp_path, capsys, monkeypatch):
    """--chat (issue 21): a line that is not UTF-8 or too long for the context is refused and the conversation goes
    on; bytes that are not UTF-8 in --instruction and a template that fails are one line, no traceback."""
    import sys

    from test_chat import LLAMA2_CHAT

    from llama_adapter_triton.model.chat import ChatTemplate

    (tmp_path / "chat.jinja").write_text(LLAMA2_CHAT)
    (tmp_path / "zero.jinja").write_text("{{ 1 / 0 }}")
    flags = ["--checkpoint", str(checkpoint_dir), "--chat", "--chat-template", str(tmp_path / "chat.jinja"),
             "--max-new-tokens", "3", "--temperature", "0"]
    long_line = "alpacas " * 400
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(
        b"caf\xe9\n" + long_line.encode() + b"\nTell me about alpacas.\n\n"), encoding="utf-8"))
    main(flags)
    captured = capsys.readouterr()
    tokenizer = Tokenizer(checkpoint_dir)
    model = load_checkpoint(checkpoint_dir)
    ids = tokenizer.encode(ChatTemplate.from_file(tmp_path / "chat.jinja").for_tokenizer(tokenizer).render(
        [("user", "Tell me about alpacas.")], add_generation_prompt=True), bos=False, special=True)
    answer = generate(model, [ids], max_new_tokens=3, stop_ids=tokenizer.stop_ids)[0]
    assert captured.out == tokenizer.decode(answer) + "\n"  # the conversation holds the good line alone
    assert "this line is not taken: line 1 is not valid UTF-8 text (byte 3)" in captured.err
    assert "this line is not taken: the prompt has" in captured.err and "Traceback" not in captured.err
    with pytest.raises(SystemExit) as e:
        main([*flags[:2], "--instruction", "caf\udce9"])
    assert e.value.code == 2 and "--instruction is not valid UTF-8 text (character 3" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--chat: the chat template of .*zero\.jinja fails on this conversation: "
                                         r"ZeroDivisionError: division by zero$"):
        main([*flags[:3], "--chat-template", str(tmp_path / "zero.jinja"), "--instruction", "hi"])


def test_generate_with_several_adapters_in_one_batch(model, tmp_path):
    """adapters=[files], adapter_ids=[...]: each row generates what it would alone with its own adapter (or none),
    left-padded with the KV cache; the base model stays free of them."""
    from llama_adapter_triton import LLaMA
    from llama_adapter_triton.model.adapter import adapter_state_dict, base_name

    base = copy_base(model, LLaMA(model.config).eval())
    own = dict(base.named_parameters())
    files, alone = [], []
    for seed, config in enumerate([ADAPTER, AdapterConfig(adapter_len=4, adapter_layers=2, version=2)]):
        adapted = LLaMA(model.config, config).eval()
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if base_name(name) in own:  # the base's weights (V2's linears are wrapped: .linear.weight)
                    p.copy_(own[base_name(name)])
        set_adapter_(adapted, seed=10 + seed, gate_scale=1.0)
        with torch.no_grad():
            for name, p in adapter_state_dict(adapted).items():
                if name.endswith(".bias"):
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        files.append(save_adapter(adapted, tmp_path / f"{seed}.safetensors"))
        set_attention_impl(adapted, "eager")  # the references: the official formulation, the op's oracle
        alone.append(adapted)
    prompts = [prompt(7, seed=1), prompt(3, seed=2), prompt(5, seed=3), prompt(4, seed=4)]
    ids = [0, None, 1, 0]
    batch = generate(base, prompts, max_new_tokens=3, adapters=files, adapter_ids=ids)
    want = [generate(base if i is None else alone[i], [p], max_new_tokens=3)[0]
            for p, i in zip(prompts, ids, strict=True)]
    assert batch == want
    assert len({tuple(w) for w in want[:3]}) == 3  # the adapters change the answers
    assert all(layer.attention.row_attend is None for layer in base.layers)
    with pytest.raises(ValueError, match=r"adapter_ids must hold one id per prompt \(4\)"):
        generate(base, prompts, max_new_tokens=2, adapters=files, adapter_ids=[0, 1])
    with pytest.raises(ValueError, match="adapters and adapter_ids go together"):
        generate(base, prompts, max_new_tokens=2, adapters=files)
    with pytest.raises(ValueError, match="adapter id 2 is not in the adapter bank"):
        generate(base, prompts, max_new_tokens=2, adapters=files, adapter_ids=[0, 1, 2, None])


def test_command_line_requests_with_several_adapters(checkpoint_dir, tmp_path, capsys):
    """--adapter NAME=FILE, repeated, and --requests: a JSON line per request, in request order, each answered as
    its adapter (or the base) alone answers it; a bad line is named by its number before the weights load."""
    from llama_adapter_triton.model.generate import Args

    v2 = load_checkpoint(checkpoint_dir, adapter=AdapterConfig(adapter_len=4, adapter_layers=1, version=2))
    set_adapter_(v2, seed=8, gate_scale=1.0)
    save_adapter(v2, tmp_path / "v2.safetensors")
    v1 = load_checkpoint(checkpoint_dir, adapter=read_adapter_config(checkpoint_dir / "adapter.safetensors"))
    load_adapter(v1, checkpoint_dir / "adapter.safetensors")
    models = {"a": v1, "b": v2.eval(), None: load_checkpoint(checkpoint_dir).eval()}
    for m in models.values():
        set_attention_impl(m, "eager")  # the references: the official formulation (fast under the interpreter)
    lines = [{"adapter": "a", "prompt": "Tell me about alpacas."}, {"adapter": None, "prompt": "Alpacas?"},
             {"adapter": "b", "prompt": "Tell me about alpacas.", "input": "They live in the Andes.",
              "max_new_tokens": 2}, {"adapter": "a", "prompt": "Alpacas?"}]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    flags = ["--checkpoint", str(checkpoint_dir), "--adapter", f"a={checkpoint_dir / 'adapter.safetensors'}",
             "--adapter", f"b={tmp_path / 'v2.safetensors'}", "--max-new-tokens", "3", "--temperature", "0"]
    main([*flags, "--requests", str(tmp_path / "requests.jsonl"), "--batch-size", "3"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokenizer = Tokenizer(checkpoint_dir)
    for number, (r, got) in enumerate(zip(lines, out, strict=True), 1):
        tokens = tokenizer.encode(alpaca_prompt(r["prompt"], r.get("input", "")), bos=True)
        answer = generate(models[r["adapter"]], [tokens], max_new_tokens=r.get("max_new_tokens", 3),
                          stop_ids=tokenizer.stop_ids)[0]
        assert got == {"line": number, "adapter": r["adapter"], "output": tokenizer.decode(answer)}

    (tmp_path / "bad.jsonl").write_text(json.dumps(lines[0]) + "\n" + json.dumps({"adapter": "c", "prompt": "x"}))
    with pytest.raises(SystemExit, match=r"bad\.jsonl: line 2: adapter 'c' is not one of --adapter's names"):
        main([*flags, "--requests", str(tmp_path / "bad.jsonl")])
    (tmp_path / "bad.jsonl").write_text(json.dumps(lines[0]) + "\n\n{\"prompt\": \"x\", \"temp\": 1}\n")
    with pytest.raises(SystemExit, match=r"line 3: unknown key 'temp'"):
        main([*flags, "--requests", str(tmp_path / "bad.jsonl")])
    (tmp_path / "bad.jsonl").write_text("[1]\n")
    with pytest.raises(SystemExit, match=r"line 1: must be a JSON object"):
        main([*flags, "--requests", str(tmp_path / "bad.jsonl")])
    with pytest.raises(ValueError, match="several --adapter NAME=FILE go with --requests"):
        Args(checkpoint=checkpoint_dir, instruction="hi", adapter=["a=x", "b=y"])
    with pytest.raises(ValueError, match="--adapter x.pth: with --requests each adapter is NAME=FILE"):
        Args(checkpoint=checkpoint_dir, requests=tmp_path / "r.jsonl", adapter=["x.pth"])
