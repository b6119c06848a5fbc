"""Model families beyond LLaMA (model/llama.py's FAMILIES): Mistral (sliding window), Qwen2 (q/k/v biases, tied
embeddings) and a Llama with tied embeddings (Llama-3.2), each against transformers' own class on a tiny random
config (fp32, CPU): logits, the config round trip, KV-cache generation, the adapter through the fused op, the sliding
window's refusal, a PEFT adaption-prompt adapter trained on Mistral."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from model_utils import VOCAB, peft_adaption_prompt, randomize_, set_adapter_
from safetensors import safe_open

from llama_adapter_triton import (
    AdapterConfig,
    CheckpointError,
    LLaMA,
    LLaMAConfig,
    adapter_layers,
    load_adapter,
    load_checkpoint,
    load_config,
    mark_only_adapter_as_trainable,
    read_adapter_config,
    save_checkpoint,
)
from llama_adapter_triton.model.generate import generate

TOKENS = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
WINDOW = 24  # Mistral's sliding window here: TOKENS fit in it
FAMILIES = {"llama-tied": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def hf_family_model(name: str, *, gqa: bool, seed: int = 0, **changes):
    """A random transformers model of the family (fp32, eval), dim 128, 2 layers, head_dim 32; q/k/v biases (Qwen2)
    drawn N(0, 0.5), so that a wrong permutation of them changes the logits."""
    import transformers

    shapes = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2 if gqa else 4, vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=64)
    family = {"llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
              "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=WINDOW)),
              "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True))}
    config_class, model_class, extra = family[name]
    torch.manual_seed(seed)
    model = randomize_(model_class(config_class(**shapes, **{**extra, **changes})), seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("proj.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def logits(model: torch.nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out).float()


@pytest.fixture(scope="module", params=[(name, gqa) for name in FAMILIES for gqa in (False, True)],
                ids=lambda p: f"{p[0]}-{'gqa' if p[1] else 'mha'}")
def checkpoint(request, tmp_path_factory):
    """(name, folder written by transformers' save_pretrained, the transformers model)."""
    name, gqa = request.param
    hf = hf_family_model(name, gqa=gqa)
    folder = tmp_path_factory.mktemp(f"{name}-{gqa}")
    hf.save_pretrained(folder)
    return name, folder, hf


def test_logits_equal_transformers_class(checkpoint):
    name, folder, hf = checkpoint
    config = load_config(folder)
    assert (config.family, config.qkv_bias, config.tie_embeddings, config.sliding_window) == {
        "llama-tied": ("llama", False, True, None), "mistral": ("mistral", False, False, WINDOW),
        "qwen2": ("qwen2", True, True, None)}[name]
    with safe_open(folder / "model.safetensors", framework="pt") as f:  # tied: the file has no lm_head.weight
        assert ("lm_head.weight" in f.keys()) == (not config.tie_embeddings)
    model = load_checkpoint(folder)
    expected = logits(hf)
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=1e-4)
    assert expected.std() > 1.0
    if config.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight


def test_save_checkpoint_round_trip_keeps_the_family(checkpoint, tmp_path):
    """save_checkpoint writes a config.json that transformers loads as the same class, to the same logits."""
    from transformers import AutoModelForCausalLM

    name, folder, hf = checkpoint
    model = load_checkpoint(folder)
    save_checkpoint(model, tmp_path / "ours")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(again) is type(hf)
    torch.testing.assert_close(logits(again), logits(hf), atol=1e-4, rtol=1e-4)
    assert load_config(tmp_path / "ours") == dataclasses.replace(model.config, name="ours")


@pytest.mark.gpu_leg
@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapter_kv_cache_and_training_through_the_fused_op(name, tmp_path, device, triton_kernels_only):
    """GQA: the adapter changes the logits; KV-cached (and left-padded) generation equals full recompute; a
    gradient step trains the adapter."""
    hf_family_model(name, gqa=True, seed=3).save_pretrained(tmp_path)
    base = load_checkpoint(tmp_path, device=device)
    model = set_adapter_(load_checkpoint(tmp_path, adapter=AdapterConfig(adapter_len=4, adapter_layers=1),
                                         device=device))
    x = TOKENS.to(device)
    assert (logits(model, x) - logits(base, x)).abs().max() > 1e-2

    prompts = [TOKENS[0, :7].tolist(), TOKENS[1, :4].tolist()]
    with torch.no_grad():
        batch = generate(model, prompts, max_new_tokens=5)  # left-padded, with the KV cache
        for p, got in zip(prompts, batch, strict=True):
            seq = list(p)
            for _ in range(5):
                seq.append(int(model(torch.tensor([seq], device=device))[0, -1].argmax()))
            assert got == seq[len(p):]

    mark_only_adapter_as_trainable(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(2):
        out = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    gate = next(iter(adapter_layers(model).values())).gate
    assert gate.grad.abs().min() > 0 and losses[1] < losses[0]
    assert triton_kernels_only.forward > 0 and triton_kernels_only.backward > 0


def test_v2_adapter_wraps_linears_with_biases(tmp_path):
    """Qwen2's q/k/v biases stay the base's under V2's bias and scale (a fresh V2 adapter is the base model), and
    save_checkpoint writes the base's biases, not the adapter's."""
    hf = hf_family_model("qwen2", gqa=True)
    hf.save_pretrained(tmp_path / "hf")
    model = load_checkpoint(tmp_path / "hf", adapter=AdapterConfig(adapter_len=4, adapter_layers=1, version=2))
    torch.testing.assert_close(logits(model), logits(hf), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        model.layers[0].attention.wq.bias.fill_(3.0)  # the adapter's bias: not the base's
    assert (logits(model) - logits(hf)).abs().max() > 1e-2
    save_checkpoint(model, tmp_path / "ours")
    from transformers import AutoModelForCausalLM
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ours")), logits(hf),
                               atol=1e-4, rtol=1e-4)


def test_packed_sequences_with_biases_equal_each_sequence_alone(tmp_path):
    hf_family_model("qwen2", gqa=True).save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path)
    a, b = TOKENS[0, :9], TOKENS[1, :6]
    with torch.no_grad():
        packed = model(torch.cat([a, b]).unsqueeze(0), cu_seqlens=torch.tensor([0, 9, 15], dtype=torch.int32))
    torch.testing.assert_close(packed[0], torch.cat([logits(model, a[None])[0], logits(model, b[None])[0]]),
                               atol=1e-4, rtol=1e-4)


def test_sliding_window_is_exact_within_and_refused_beyond(tmp_path):
    hf = hf_family_model("mistral", gqa=True)
    hf.save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path)
    x = torch.randint(0, VOCAB, (1, WINDOW + 1), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(model, x[:, :WINDOW]), logits(hf, x[:, :WINDOW]), atol=1e-4, rtol=1e-4)
    # beyond the window transformers' last token no longer sees the first, which full attention would: refused
    full = hf_family_model("mistral", gqa=True, sliding_window=None)
    assert (logits(hf, x)[:, -1] - logits(full, x)[:, -1]).abs().max() > 1e-2
    message = rf"a sequence of {WINDOW + 1} tokens is longer than this mistral model's sliding_window \({WINDOW}\)"
    with pytest.raises(ValueError, match=message):
        model(x)  # the forward (training, scoring)
    with pytest.raises(ValueError, match=message):
        model(x, cu_seqlens=torch.tensor([0, WINDOW + 1], dtype=torch.int32))  # packed training
    with pytest.raises(ValueError, match=rf"max_new_tokens 4: a span of {WINDOW + 1} tokens is longer"):
        generate(model, [x[0, :WINDOW - 2].tolist()], max_new_tokens=4)  # with the KV cache: refused up front
    generate(model, [x[0, :WINDOW - 2].tolist()], max_new_tokens=3)  # the last token is never fed back: fits
    with torch.no_grad(), pytest.raises(ValueError, match=message):  # a decode step past the window
        model.setup_cache(1, WINDOW + 1)
        model(x[:, :WINDOW], input_pos=0)
        model(x[:, WINDOW:], input_pos=WINDOW)
    model.clear_cache()
    with torch.no_grad():  # left padding does not count: the real tokens fit
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x[:, :WINDOW]], dim=1)
        torch.testing.assert_close(model(padded, left_pad=[3])[:, 3:], logits(hf, x[:, :WINDOW]), atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("changes, window", [
    ({}, None),  # the releases: use_sliding_window false
    ({"use_sliding_window": True, "sliding_window": 20, "max_window_layers": 1}, 20),  # layer 1 slides
    ({"use_sliding_window": True, "sliding_window": 20, "max_window_layers": 2}, None),  # no layer slides
])
def test_qwen2_sliding_window_fields(tmp_path, changes, window):
    hf = hf_family_model("qwen2", gqa=False, **changes)
    hf.save_pretrained(tmp_path)
    assert load_config(tmp_path).sliding_window == window
    if window:  # within the window: transformers' own logits, also after our save (every layer then slides)
        from transformers import Qwen2ForCausalLM

        model = load_checkpoint(tmp_path)
        torch.testing.assert_close(logits(model), logits(hf), atol=1e-4, rtol=1e-4)
        save_checkpoint(model, tmp_path / "ours")
        assert load_config(tmp_path / "ours").sliding_window == window
        torch.testing.assert_close(logits(Qwen2ForCausalLM.from_pretrained(tmp_path / "ours")), logits(hf),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gemma"}, "model_type='gemma' is not supported (LLaMA needs 'llama' or 'mistral' or 'qwen2')"),
    ({"model_type": "mistral", "sliding_window": 0}, "'sliding_window': LLaMAConfig.sliding_window must be an integer"),
    ({"model_type": "qwen2", "use_sliding_window": "yes"}, "'use_sliding_window' must be true or false, got 'yes'"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias=True is not supported"),
])
def test_family_config_errors_name_the_key(tmp_path, changes, message):
    config = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": VOCAB, **changes}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'config.json'}: ") and message in str(info.value)


def test_config_fields_are_checked():
    small = dict(dim=128, n_layers=1, n_heads=4, vocab_size=VOCAB)
    assert LLaMAConfig(**small, family="qwen2").qkv_bias and not LLaMAConfig(**small, family="mistral").qkv_bias
    for changes, message in [({"family": "gpt2"}, "family must be one of llama, mistral, qwen2, got 'gpt2'"),
                             ({"qkv_bias": True}, "qkv_bias=True does not fit family 'llama'"),
                             ({"family": "qwen2", "qkv_bias": 1}, "qkv_bias must be True or False, got 1"),
                             ({"sliding_window": 8}, "sliding_window is mistral's and qwen2's"),
                             ({"family": "mistral", "sliding_window": -1}, "sliding_window must be an integer >= 1")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            LLaMAConfig(**small, **changes)
    assert [n for n, _ in LLaMA(LLaMAConfig(**small, family="qwen2")).named_parameters() if n.endswith("bias")] == [
        "layers.0.attention.wq.bias", "layers.0.attention.wk.bias", "layers.0.attention.wv.bias"]


def test_peft_adaption_prompt_trained_on_mistral_loads(tmp_path):
    """PEFT's adaption prompt on MistralForCausalLM (GQA), its gates opened: our import gives PEFT's logits."""
    pytest.importorskip("peft")
    hf = hf_family_model("mistral", gqa=True, seed=11)
    hf.save_pretrained(tmp_path / "base")
    peft_model = peft_adaption_prompt(hf)
    expected = logits(peft_model.eval())
    assert (expected - logits(hf_family_model("mistral", gqa=True, seed=11))).abs().max() > 1e-2
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = read_adapter_config(tmp_path / "peft")
    model = load_checkpoint(tmp_path / "base", adapter=adapter)
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=1e-4)


def test_finetune_refuses_examples_beyond_the_window(tmp_path):
    """train.finetune checks --max-seq-len against the window before anything is read or written."""
    from llama_adapter_triton.train.finetune import FinetuneConfig, UsageError, run

    hf_family_model("mistral", gqa=True).save_pretrained(tmp_path / "mistral")
    (tmp_path / "data.json").write_text(json.dumps([{"instruction": "Hi.", "input": "", "output": "Hello."}]))
    config = FinetuneConfig(checkpoint=tmp_path / "mistral", data=tmp_path / "data.json", out=tmp_path / "out",
                            adapter_layers=1, max_seq_len=WINDOW + 1, token_budget=64, device="cpu",
                            tensorboard=False)
    with pytest.raises(UsageError, match=rf"--max-seq-len {WINDOW + 1}: an example of {WINDOW + 1} tokens is longer "
                                         rf"than this mistral model's sliding_window \({WINDOW}\)"):
        run(config)
    assert not (tmp_path / "out").exists()


def test_generate_command_refuses_a_span_beyond_the_window(tmp_path, capsys):
    """model.generate checks the prompt and --max-new-tokens against the window before the weights load."""
    import tokenizers

    from llama_adapter_triton.model.generate import main

    hf_family_model("mistral", gqa=True).save_pretrained(tmp_path)
    words = ["<unk>", "<s>", "</s>", "Tell", "me", "about", "alpacas."]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(SystemExit, match=r"llama-adapter generate: error: the prompt \((\d+) tokens\) with "
                                         rf"--max-new-tokens \d+: a span of \d+ tokens is longer than this mistral "
                                         rf"model's sliding_window \({WINDOW}\)"):
        main(["--checkpoint", str(tmp_path), "--instruction", "Tell me about alpacas.", "--max-new-tokens", "30"])
