"""model/hf.py: transformers Llama / Mistral models with a PEFT adaption prompt, their attention through the fused op
(use_fused_attention), against PEFT's own eager model: logits, the gradients of PEFT's trainable parameters, left
padding, KV-cache generation, the undo, and what is refused."""

from __future__ import annotations

import pytest
import torch
from model_utils import VOCAB, hf_model, peft_adaption_prompt, randomize_, tiny_config

from llama_adapter_triton.model.hf import FUSED, remove_fused_attention, use_fused_attention

peft = pytest.importorskip("peft")
TOKENS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


def peft_model(model_type: str, seed: int = 0, **config_kwargs):
    """A tiny random transformers model (GQA, 2 layers, head dim 32) with PEFT's adaption prompt in its top layer,
    the gate set to 0.7 (fresh it is 0: the prompt would change nothing)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    c = tiny_config(gqa=True)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "mistral": (MistralConfig, MistralForCausalLM)}[model_type]
    config = config_class(hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
                          num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, vocab_size=VOCAB,
                          max_position_embeddings=c.max_seq_len, **config_kwargs)
    torch.manual_seed(seed)
    return peft_adaption_prompt(randomize_(model_class(config), seed).eval())


def logits_and_grads(model, tokens, **kwargs):
    """The logits, and the gradients of the trainable parameters (PEFT's prompts and gates) of a loss on them."""
    model.zero_grad()
    out = model(tokens, **kwargs).logits
    (out.float().sin() * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.gpu_leg
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_fused_attention_gives_peft_logits_and_gradients(model_type, device, triton_kernels_only):
    model = peft_model(model_type, **({"sliding_window": 32} if model_type == "mistral" else {})).to(device)
    tokens = TOKENS.to(device)
    hf = model.get_base_model()
    previous = hf.config._attn_implementation
    want, want_grads = logits_and_grads(model, tokens)
    with model.disable_adapter(), torch.no_grad():
        base = model(tokens).logits
    assert (base - want).abs().max() > 1e-2  # the prompt changes the logits

    assert use_fused_attention(use_fused_attention(model)) is model  # idempotent
    assert hf.config._attn_implementation == FUSED
    got, got_grads = logits_and_grads(model, tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert sorted(got_grads) == sorted(want_grads) and len(got_grads) == 2  # the prompt and the gate
    for name, g in want_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    # both layers through the op; the backward in the adapted one only (nothing below it needs a gradient)
    assert triton_kernels_only.forward == 2 and triton_kernels_only.backward == 1

    with model.disable_adapter(), torch.no_grad():  # PEFT swaps its modules out: the base model, still fused
        torch.testing.assert_close(model(tokens).logits, base, atol=1e-4, rtol=1e-4)
    assert triton_kernels_only.forward == 4

    remove_fused_attention(model)
    assert hf.config._attn_implementation == previous
    assert not any(type(m).__name__ == "FusedAdaptedAttention" for m in model.modules())
    again, _ = logits_and_grads(model, tokens)
    torch.testing.assert_close(again, want, atol=0, rtol=0)


@pytest.mark.gpu_leg
def test_right_padding_gives_peft_logits_and_gradients_at_the_real_tokens(device, triton_kernels_only):
    """A right-padded batch (training's, as transformers' collators pad) with its attention_mask: PEFT's logits at the
    real tokens, and PEFT's gradients of a loss on them."""
    model = peft_model("llama", seed=2).to(device)
    tokens = TOKENS.to(device)
    mask = torch.ones_like(tokens)
    mask[0, 7:] = 0
    real = mask.bool()

    def masked_step():
        model.zero_grad()
        out = model(tokens, attention_mask=mask).logits
        (out[real].sin() * torch.linspace(-1, 1, out.shape[-1], device=device)).sum().backward()
        return out.detach()[real], {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want, want_grads = masked_step()
    use_fused_attention(model)
    got, got_grads = masked_step()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    holes = mask.clone()
    holes[1, 4] = 0
    with pytest.raises(ValueError, match=r"attention_mask has holes"):
        model(tokens, attention_mask=holes)


@pytest.mark.gpu_leg
def test_left_padding_and_kv_cache_generation(device, triton_kernels_only):
    """A left-padded batch gives PEFT's logits at the real tokens; greedy generation with the KV cache gives PEFT's
    tokens; generation after right padding is refused."""
    model = peft_model("llama", seed=1).to(device)
    tokens = TOKENS.to(device)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # row 1: three pad tokens on the left
    with torch.no_grad():
        want = model(tokens, attention_mask=mask).logits
        want_ids = model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=3, do_sample=False)
        use_fused_attention(model)
        got = model(tokens, attention_mask=mask).logits
        got_ids = model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=1e-4)
    assert torch.equal(got_ids, want_ids)
    assert triton_kernels_only.forward > 0
    with pytest.raises(ValueError, match=r"holes \(padding between real tokens; generation after right padding"), \
            torch.no_grad():
        model.generate(input_ids=tokens, attention_mask=mask.flip(1), max_new_tokens=2, do_sample=False)


def test_mistral_sliding_window_and_what_is_refused():
    """Mistral's sliding window: a prompt longer than it is refused; generation past it is PEFT's (transformers'
    sliding cache keeps the window's keys). Then what the drop-in refuses rather than computing something else."""
    long = torch.randint(0, VOCAB, (1, 9))
    mistral = peft_model("mistral", sliding_window=8)
    with torch.no_grad():
        want = mistral.generate(input_ids=long[:, :6], max_new_tokens=5, do_sample=False)  # 11 tokens > 8
        use_fused_attention(mistral)
        assert torch.equal(mistral.generate(input_ids=long[:, :6], max_new_tokens=5, do_sample=False), want)
    with pytest.raises(ValueError, match=r"9 keys exceed the model's sliding_window \(8\)"), torch.no_grad():
        mistral(long)

    dropout = use_fused_attention(peft_model("llama", attention_dropout=0.1)).train()
    with pytest.raises(ValueError, match=r"attention dropout \(0\.1\) is not supported"):
        dropout(long)
    llama = use_fused_attention(peft_model("llama"))
    with pytest.raises(ValueError, match=r"position_ids restart inside a row \(packed sequences\)"), torch.no_grad():
        llama(long, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]]))
    with pytest.raises(ValueError, match=r"static \(pre-allocated\) KV cache is not supported"), torch.no_grad():
        llama.generate(input_ids=long, max_new_tokens=2, do_sample=False, cache_implementation="static")

    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported"):
        use_fused_attention(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=VOCAB)))
    with pytest.raises(ValueError, match="expected a transformers model"):
        use_fused_attention(torch.nn.Linear(2, 2))


def test_output_attentions_is_refused_with_and_without_peft():
    """output_attentions=True on a fused model without PEFT once returned an empty tuple instead of the documented
    refusal (PEFT's adapted layers refused it)."""
    peft_llama = use_fused_attention(peft_model("llama"))
    plain = use_fused_attention(hf_model(tiny_config(gqa=True), seed=1).eval())
    for model in (peft_llama, plain):
        with pytest.raises(ValueError, match=rf"{FUSED}: output_attentions is not available"), torch.no_grad():
            model(TOKENS, output_attentions=True)
