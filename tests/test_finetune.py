"""train/finetune.py: convergence, packed = padded, resume = uninterrupted, 2 processes (gloo) = 1, the CLI's errors.

Tiny models (dim 64, 2 heads of 32, 2 layers, the top one adapted) on a few records of the demo set: the op
runs its Triton kernels under the interpreter here, which costs ~0.1 s per (sequence, head) and pass.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from model_utils import randomize_, set_adapter_
from safetensors.torch import load_file

from llama_adapter_triton import (
    AdapterConfig,
    LLaMA,
    LLaMAConfig,
    Tokenizer,
    adapter_state_dict,
    alpaca_prompt,
    mark_only_adapter_as_trainable,
    read_adapter_config,
    save_checkpoint,
)
from llama_adapter_triton.train.data import (
    IGNORE_INDEX,
    PackedLoader,
    PaddedLoader,
    TokenizedDataset,
    load_records,
    tokenize_records,
)
from llama_adapter_triton.train.demo import DEMO_DATA, train_tokenizer
from llama_adapter_triton.train.distributed import Dist
from llama_adapter_triton.train.finetune import (
    FinetuneConfig,
    UsageError,
    batch_loss_sum,
    load_data,
    main,
    run,
)
from llama_adapter_triton.train.optim import lr_factor, param_groups, setup_optimizer

RECORDS = json.loads(DEMO_DATA.read_text())
VOCAB = 300  # examples of 33-56 tokens: one 64-row block of the kernels each


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random LLaMA (HF format) with a sentencepiece tokenizer trained on the demo set."""
    folder = tmp_path_factory.mktemp("ckpt")
    texts = [alpaca_prompt(r["instruction"], r["input"]) + " " + r["output"] for r in RECORDS]
    (folder / "tokenizer.model").write_bytes(train_tokenizer(texts, vocab_size=VOCAB))
    config = LLaMAConfig(name="tiny-ft", dim=64, n_layers=2, n_heads=2, vocab_size=VOCAB, multiple_of=32,
                         norm_eps=1e-5, max_seq_len=128)
    torch.manual_seed(0)
    save_checkpoint(randomize_(LLaMA(config), seed=0), folder)
    return folder


def data_file(folder: Path, n: int, start: int = 0) -> Path:
    path = folder / f"data-{start}-{n}.json"
    path.write_text(json.dumps(RECORDS[start:start + n]))
    return path


def config(checkpoint: Path, data: Path, out: Path, **kwargs) -> FinetuneConfig:
    """One adapted layer of two; one example per micro-batch (the interpreter's cost grows with the examples)."""
    defaults = dict(adapter_layers=1, adapter_len=4, token_budget=64, max_seq_len=64, eval_size=0, epochs=1,
                    blr=0.5, tensorboard=False, device="cpu")
    return FinetuneConfig(checkpoint=checkpoint, data=data, out=out, **{**defaults, **kwargs})


def log_rows(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_lr_schedule_and_weight_decay_groups():
    factors = [lr_factor(s, 4, 20, 0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warmup, peak at the end of it
    assert factors[4] == 1.0 and all(a > b for a, b in zip(factors[4:], factors[5:], strict=False))  # cosine
    assert math.isclose(lr_factor(20, 4, 20, 0.1), 0.1)  # down to min_lr / lr at the end
    model = LLaMA(LLaMAConfig(dim=64, n_layers=2, n_heads=2, vocab_size=16, multiple_of=32),
                  AdapterConfig(adapter_len=4, adapter_layers=2))
    mark_only_adapter_as_trainable(model)
    prompts = {id(m.attention.adapter_prompt) for m in model.layers}
    gates = {id(m.attention.gate) for m in model.layers}
    decay, no_decay = param_groups(model, 0.02)  # the official scripts': the gates decayed with the prompts
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == prompts | gates and no_decay["params"] == []
    decay, no_decay = param_groups(model, 0.02, decay_gates=False)
    assert {id(p) for p in decay["params"]} == prompts and {id(p) for p in no_decay["params"]} == gates
    v2 = LLaMA(LLaMAConfig(dim=64, n_layers=2, n_heads=2, vocab_size=16, multiple_of=32),
               AdapterConfig(adapter_len=4, adapter_layers=1, version=2))
    mark_only_adapter_as_trainable(v2)
    decay, no_decay = param_groups(v2, 0.05)  # V2: biases, scales and norms never decayed
    names = {id(p): n for n, p in v2.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["layers.1.attention.adapter_prompt",
                                                             "layers.1.attention.gate"]
    assert all(names[id(p)].endswith(("bias", "scale", "weight")) for p in no_decay["params"])


MM_TINY = LLaMAConfig(dim=64, n_layers=3, n_heads=2, vocab_size=16, multiple_of=32)
MM_GROUPS = {  # adapter -> the parameters AdamW decays (the official scripts' rule); every other one it does not
    "v1-projector": (AdapterConfig(adapter_len=4, adapter_layers=1, visual_dim=8, clip_layers=(1,), visual_hidden=16),
                     ["layers.2.attention.adapter_prompt", "layers.2.attention.gate", "visual_proj.fc1.weight",
                      "visual_proj.fc2.weight"]),
    "v2-early-fusion": (AdapterConfig(adapter_len=4, adapter_layers=1, version=2, visual_dim=8, clip_layers=(1,),
                                      visual_hidden=16, fusion="early", visual_len=2),
                        ["layers.0.attention.visual_gate", "layers.2.attention.adapter_prompt",
                         "layers.2.attention.gate", "visual_proj.fc1.weight", "visual_proj.fc2.weight"]),
}


@pytest.mark.parametrize("name", list(MM_GROUPS))
def test_weight_decay_groups_by_name_with_images(name):
    """The multi-modal adapters' AdamW groups, by name: the prompts, the projector's matrices and every gate (the
    early fusion's visual_gate too) decayed; the projector's biases, V2's biases, scales and norms not; with
    decay_gates=False both kinds of gate move to the undecayed group. Planted bug this catches: the visual gate left
    out of weight decay (the text-only adapters above have none)."""
    adapter, want = MM_GROUPS[name]
    model = LLaMA(MM_TINY, adapter)
    mark_only_adapter_as_trainable(model)
    names = {id(p): n for n, p in model.named_parameters()}
    trained = sorted(adapter_state_dict(model))
    for decay_gates in (True, False):
        decayed = [n for n in want if decay_gates or not n.endswith("gate")]
        decay, no_decay = param_groups(model, 0.02, decay_gates=decay_gates)
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.02, 0.0)
        assert sorted(names[id(p)] for p in decay["params"]) == decayed
        assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(set(trained) - set(decayed))


def test_schedule_defaults(tmp_path):
    """setup_optimizer with the defaults, straight (not through a run): the paper's lr rule, lr = blr 9e-3 x effective
    batch / 256 (padded: batch_size x micro-batches per step; packed: the examples / the first epoch's steps), linear
    warmup over 2 epochs of 5 (0.4 x --epochs), then cosine to --min-lr at the last step, AdamW's betas (0.9, 0.95).
    Planted bug this catches: the default warmup at 1 epoch of 5 (the runs above give --warmup-epochs)."""
    model = LLaMA(MM_TINY, AdapterConfig(adapter_len=4, adapter_layers=1))
    mark_only_adapter_as_trainable(model)
    n = 40  # examples of 6 tokens (a prompt of 2)
    data = TokenizedDataset(torch.arange(6 * n) % 16, torch.arange(0, 6 * n + 1, 6), torch.full((n,), 2),
                            torch.arange(n), pad_id=0)
    d = Dist(rank=0, world_size=1, device=torch.device("cpu"))
    # padded: 10 micro-batches of 4 examples an epoch, 2 per step, so an effective batch of 8; packed: 8 of 5 (30
    # tokens), 4 steps an epoch, so 40 / 4 = 10
    for padded, per_epoch, effective in ((True, 5, 8), (False, 4, 10)):
        cfg = FinetuneConfig(checkpoint=tmp_path, data=tmp_path / "data.json", out=tmp_path / "out", padded=padded,
                             pad_to="longest", token_budget=30, min_lr=1e-5)
        loader = PaddedLoader(data, cfg.batch_size, pad_to="longest", micro_batches_per_step=2) if padded else \
            PackedLoader(data, cfg.token_budget, micro_batches_per_step=2)
        optimizer, scheduler, _, steps = setup_optimizer(cfg, model, loader, 2, torch.float32, d, None)
        assert cfg.epochs == 5 and steps == [per_epoch] * 5
        lr = 9e-3 * effective / 256
        assert optimizer.defaults["betas"] == (0.9, 0.95) and math.isclose(optimizer.defaults["lr"], lr)
        warmup, total = 2 * per_epoch, 5 * per_epoch  # 2 epochs of 5, in steps
        want = [lr * (s + 1) / warmup if s < warmup else
                1e-5 + (lr - 1e-5) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
                for s in range(total + 1)]
        got = []
        for _ in range(total + 1):
            got.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert got == pytest.approx(want, rel=1e-12)
        assert math.isclose(max(got), lr) and math.isclose(got[-1], 1e-5)


def test_messages_data_in_the_chat_template(checkpoint, tmp_path):
    """Messages records go through the checkpoint's chat template (--chat-template when it has none): the
    sentencepiece tokenizer.model reads the template's <s> / </s> as control tokens; every reply is a target."""
    from test_chat import LLAMA2_CHAT

    from llama_adapter_triton.model.chat import ChatTemplate, encode_chat

    r = RECORDS[:3]
    messages = [("user", r[0]["instruction"]), ("assistant", r[0]["output"]), ("user", r[1]["instruction"]),
                ("assistant", r[1]["output"])]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": a, "content": b} for a, b in messages]}) + "\n"
                    + json.dumps(r[2]) + "\n")
    cfg = config(checkpoint, data, tmp_path / "out", max_seq_len=128)
    with pytest.raises(UsageError, match=r"record 0 \(and 0 more\) is a conversation for the model's chat template, "
                                         r"and .* has none .*: pass --chat-template FILE"):
        load_data(cfg, 128, say=lambda _: None)
    (tmp_path / "llama2.jinja").write_text(LLAMA2_CHAT)
    train, _, _ = load_data(replace(cfg, chat_template=tmp_path / "llama2.jinja"), 128, say=lambda _: None)
    template, tok = ChatTemplate.from_file(tmp_path / "llama2.jinja"), Tokenizer(checkpoint)
    ids, targets = encode_chat(template, tok, messages)
    assert train[0][0].tolist() == ids and ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 2
    assert int(train.num_targets[0]) == sum(targets) and train.targets[:len(ids)].tolist() == targets
    alpaca = alpaca_prompt(r[2]["instruction"], r[2]["input"]) + r[2]["output"]
    assert train[1][0].tolist() == tok.encode(alpaca, bos=True, eos=True)  # the Alpaca record: the official rule


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(checkpoint, tmp_path):
    """The same examples packed in one row (varlen op) and padded (to the longest, and to 64) agree in fp32."""
    records, _ = load_records(data_file(tmp_path, 3, start=5))
    data, _ = tokenize_records(records, Tokenizer(checkpoint), max_seq_len=64)
    model = set_adapter_(LLaMA(LLaMAConfig(name="x", dim=64, n_layers=2, n_heads=2, vocab_size=VOCAB, multiple_of=32),
                               AdapterConfig(adapter_len=4, adapter_layers=1)))
    randomize_(model, seed=3)
    mark_only_adapter_as_trainable(model)
    ids = [0, 1, 2]
    batches = {"packed": PackedLoader(data, 256).collate(ids),
               "longest": PaddedLoader(data, 3, pad_to="longest").collate(ids),
               "64": PaddedLoader(data, 3, pad_to=64).collate(ids)}
    assert batches["packed"]["tokens"].shape == (1, int(data.lengths.sum()))  # no padding at all
    results = {}
    for name, batch in batches.items():
        model.zero_grad()
        loss = batch_loss_sum(model, batch, torch.device("cpu")) / batch["num_targets"]
        loss.backward()
        results[name] = loss.detach(), {k: p.grad.clone() for k, p in adapter_state_dict(model).items()}
    loss, grads = results["packed"]
    assert all(g.abs().max() > 0 for g in grads.values())
    # the logits of every position, and the loss ignoring the non-targets, give the same (logits_at is exact)
    batch = batches["packed"]
    model.zero_grad()
    logits = model(batch["tokens"], positions=batch["positions"], cu_seqlens=batch["cu_seqlens"],
                   max_seqlen=batch["max_seqlen"])
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum") / batch["num_targets"]
    full.backward()
    torch.testing.assert_close(full.detach(), loss, atol=1e-6, rtol=1e-6)
    for k, p in adapter_state_dict(model).items():
        torch.testing.assert_close(p.grad, grads[k], atol=1e-6, rtol=1e-6, msg=k)
    # a filler micro-batch (no target: ranks short of examples run one) adds 0 and zero gradients
    model.zero_grad()
    filler = PackedLoader(data, 256)._filler()
    zero = batch_loss_sum(model, filler, torch.device("cpu"))
    zero.backward()
    assert zero.item() == 0 and all(not p.grad.any() for p in adapter_state_dict(model).values())
    for name in ("longest", "64"):
        torch.testing.assert_close(results[name][0], loss, atol=1e-5, rtol=1e-5)
        for k, g in grads.items():
            torch.testing.assert_close(results[name][1][k], g, atol=1e-5, rtol=1e-5, msg=f"{name}: {k}")


@pytest.mark.gpu_leg
def test_30_steps_lower_the_loss_and_open_the_gates(checkpoint, tmp_path, device, triton_kernels_only):
    """Packed micro-batches through the fused op: on a GPU in bf16, compiled."""
    data = data_file(tmp_path, 10)
    cfg = config(checkpoint, data, tmp_path / "out", epochs=3, lr=0.3, adapter_len=10, warmup_epochs=0.5,
                 device=device)
    result = run(cfg)
    assert triton_kernels_only.forward > 0 and triton_kernels_only.backward > 0
    rows = [r for r in log_rows(cfg.out) if r["split"] == "train"]
    assert result.steps == len(rows) == 30, "10 examples, one per step: 10 steps per epoch"
    losses = [float(r["loss"]) for r in rows]
    epochs = [sum(losses[i:i + 10]) / 10 for i in (0, 10, 20)]  # each epoch sees the same 10 examples
    assert epochs[0] > epochs[1] > epochs[2] and epochs[2] < epochs[0] - 1.0, epochs  # perplexity / e at least
    gates = [v for k, v in result.adapter.items() if k.endswith("gate")]
    assert all(g.abs().min() > 0.05 for g in gates), gates
    assert math.isclose(max(float(r["lr"]) for r in rows), 0.3, rel_tol=1e-6)  # --lr: the peak, after warmup
    assert sorted(p.name for p in cfg.out.iterdir()) == sorted(
        ["adapter.safetensors", "train_state.pt", "log.csv", "loss.png"]
        + [f"adapter-epoch{n}.safetensors" for n in range(1, 4)])
    saved = load_file(cfg.out / "adapter.safetensors")
    assert saved.keys() == result.adapter.keys() and all(torch.equal(saved[k], result.adapter[k]) for k in saved)


def test_resume_equals_an_uninterrupted_run(checkpoint, tmp_path):
    data = data_file(tmp_path, 6)
    whole = run(config(checkpoint, data, tmp_path / "whole", epochs=2, eval_size=2))
    assert whole.steps == 8
    # at the end of an epoch's steps (its eval and adapter not yet done), and mid-epoch across an epoch boundary:
    # step 2 of the second epoch, global step 6 (in the first epoch the two coincide; a resume that took one for the
    # other is caught there only by an unrelated check)
    for stop in (4, 6):
        out = tmp_path / f"stopped-{stop}"
        first = run(config(checkpoint, data, out, epochs=2, eval_size=2, stop_after_steps=stop))
        assert first.steps == stop and not (out / "adapter.safetensors").exists()
        with pytest.raises(UsageError, match=r"--resume: these settings differ .* --blr 0.5 -> 0.25"):
            run(config(checkpoint, data, out, epochs=2, eval_size=2, resume=True, blr=0.25))
        resumed = run(config(checkpoint, data, out, epochs=2, eval_size=2, resume=True))
        assert resumed.steps == 8
        for k, t in whole.adapter.items():
            assert torch.equal(resumed.adapter[k], t), (stop, k)  # bitwise
        assert resumed.eval_loss == whole.eval_loss
        keep = ("step", "epoch", "split", "loss", "lr", "grad_norm", "examples", "tokens")
        assert [{k: r[k] for k in keep} for r in log_rows(out)] == [{k: r[k] for k in keep}
                                                                      for r in log_rows(tmp_path / "whole")]


def test_a_state_from_before_decay_gates_and_tokenization_resumes_without_them(checkpoint, tmp_path):
    """A train state written before --decay-gates and --tokenization existed ran without decaying the gates and with
    the response encoded on its own: resuming it with the new defaults is refused, naming both flags; with
    --no-decay-gates --tokenization litgpt it resumes."""
    data, out = data_file(tmp_path, 2), tmp_path / "out"
    run(config(checkpoint, data, out, decay_gates=False, tokenization="litgpt", stop_after_steps=1))
    state = torch.load(out / "train_state.pt", weights_only=True)
    old = json.loads(state["config"])
    del old["decay_gates"], old["tokenization"]
    torch.save({**state, "config": json.dumps(old)}, out / "train_state.pt")
    with pytest.raises(UsageError, match=r"--resume: these settings differ .*: --tokenization 'litgpt' -> 'official'; "
                                         r"--decay-gates False -> True\."):
        run(config(checkpoint, data, out, resume=True))
    assert run(config(checkpoint, data, out, resume=True, decay_gates=False, tokenization="litgpt")).steps == 2


def test_fp16_loss_scaling_resumes_exactly(checkpoint, tmp_path, monkeypatch):
    """fp16 base with GradScaler: the adapter stays fp32, the scaler's state is saved and resumed with the rest.

    The scaler grows after every good step here (growth_interval 1), so that it overflows at the third step of
    the uninterrupted run, which then skips that step and halves its scale: a resume that did not restore the
    scaler would restart from the initial scale, take that step, and end elsewhere. That planted bug (the
    scaler's load_state_dict a no-op) is run below and must be caught."""
    base = torch.amp.GradScaler

    class EagerScaler(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, growth_interval=1, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", EagerScaler)
    data = data_file(tmp_path, 4)
    whole = run(config(checkpoint, data, tmp_path / "whole", dtype="float16"))
    assert whole.steps == 4 and all(t.dtype == torch.float32 for t in adapter_state_dict(whole.model).values())
    assert whole.model.layers[0].attention.wq.weight.dtype == torch.float16
    norms = [float(r["grad_norm"]) for r in log_rows(tmp_path / "whole")]
    assert math.isfinite(norms[0]) and math.isfinite(norms[1]) and not math.isfinite(norms[2]), norms  # skipped
    final = torch.load(tmp_path / "whole" / "train_state.pt", weights_only=True)["scaler"]

    def stopped_then_resumed(out: Path) -> tuple[dict, dict]:
        run(config(checkpoint, data, out, dtype="float16", stop_after_steps=2))
        state = torch.load(out / "train_state.pt", weights_only=True)
        assert state["scaler"]["scale"] == 2.0**18 and (state["epoch"], state["step"]) == (0, 2)  # grew twice
        resumed = run(config(checkpoint, data, out, dtype="float16", resume=True))
        return resumed.adapter, torch.load(out / "train_state.pt", weights_only=True)["scaler"]

    adapter, scaler = stopped_then_resumed(tmp_path / "part")
    assert scaler == final
    for k, t in whole.adapter.items():
        assert torch.equal(adapter[k], t), k

    monkeypatch.setattr(EagerScaler, "load_state_dict", lambda self, state: None)  # the planted bug
    adapter, _ = stopped_then_resumed(tmp_path / "forgetful")
    assert any(not torch.equal(adapter[k], t) for k, t in whole.adapter.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int) -> None:
    """What torchrun sets for a rank on this machine (and one thread, as the ranks share the cores)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)


def _rank(rank: int, world_size: int, port: int, cfg: FinetuneConfig, result_dir: Path) -> None:
    """One torchrun-like rank: the environment torchrun sets, then run(); saves this rank's adapter."""
    torchrun_env(rank, world_size, port)
    result = run(cfg)
    torch.save({"adapter": result.adapter, "local": {k: v.detach().clone() if not hasattr(v, "to_local") else
                                                     v.to_local().clone()
                                                     for k, v in adapter_state_dict(result.model).items()}},
               result_dir / f"rank{rank}.pt")


@pytest.mark.parametrize("fsdp, quantize", [(False, None), (True, None), (False, "nf4")],
                         ids=["ddp", "fsdp2", "ddp-nf4"])
def test_two_processes_equal_one_on_the_same_global_batch(checkpoint, tmp_path, fsdp, quantize):
    """gloo, 2 processes, each with its share of every step's 2 micro-batches = 1 process with 2 per step (a base
    in nf4 too: DDP broadcasts its packed weights as they are)."""
    data = data_file(tmp_path, 8)
    single = run(config(checkpoint, data, tmp_path / "single", micro_batches_per_step=2, quantize=quantize))
    cfg = config(checkpoint, data, tmp_path / "two", micro_batches_per_step=2, fsdp=fsdp, quantize=quantize)
    mp.spawn(_rank, args=(2, _free_port(), cfg, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert single.steps == 4
    # the lr: blr x effective batch / 256; packed, effective batch = train examples / steps of the first epoch
    assert math.isclose(max(float(r["lr"]) for r in log_rows(tmp_path / "single")), 0.5 * (8 / 4) / 256,
                        rel_tol=1e-5)
    for k, t in single.adapter.items():
        assert torch.equal(ranks[0]["adapter"][k], ranks[1]["adapter"][k]), k
        torch.testing.assert_close(ranks[0]["adapter"][k], t, atol=1e-5, rtol=1e-5, msg=k)
        if not fsdp:  # DDP: every rank holds the whole adapter, the same bits
            assert torch.equal(ranks[0]["local"][k], ranks[1]["local"][k]), k
    if fsdp:  # FSDP2: each rank held its shard (dim 0) of the prompts
        k = next(k for k in single.adapter if k.endswith("adapter_prompt"))
        torch.testing.assert_close(torch.cat([ranks[0]["local"][k], ranks[1]["local"][k]]), ranks[0]["adapter"][k])
    saved = load_file(tmp_path / "two" / "adapter.safetensors")  # written by rank 0 alone
    assert all(torch.equal(saved[k], ranks[0]["adapter"][k]) for k in saved)
    assert [int(r["step"]) for r in log_rows(tmp_path / "two")] == [1, 2, 3, 4]  # one writer


def test_cli_malformed_data_names_the_record_and_writes_nothing(checkpoint, tmp_path, capsys):
    records = RECORDS[:5]
    records[3] = {"instruction": "What is 2 plus 2?", "input": ""}  # no output
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--adapter-layers", "1"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "llama-adapter finetune: error:" in err and "record 3: field 'output' is missing" in err
    assert "pass --on-bad-record skip to skip them" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_refuses_earlier_results_and_bad_flags(checkpoint, tmp_path, capsys):
    data = data_file(tmp_path, 4)
    out = tmp_path / "out"
    out.mkdir()
    earlier = save_adapter_file(checkpoint, out / "adapter.safetensors")  # an earlier run's (our format)
    (out / "notes.txt").write_text("the user's notes")
    base = ["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--adapter-layers", "1"]
    with pytest.raises(SystemExit) as e:
        main(base)
    assert e.value.code == 1 and "holds the results of an earlier run (adapter.safetensors)" in capsys.readouterr().err
    assert (out / "adapter.safetensors").read_bytes() == earlier
    with pytest.raises(SystemExit):
        main([*base, "--resume"])
    assert "train_state.pt not found" in capsys.readouterr().err
    for flags, message in ((["--resume", "--overwrite"], "give one of them"),
                           (["--token-budget", "0"], "--token-budget must be an integer >= 1, got 0"),
                           (["--adapter-layers", "3"], "--adapter-layers 3 exceeds the model's 2 layers"),
                           (["--fsdp"], "--fsdp shards the model over several processes"),
                           *([(["--device", "cuda"], "--device cuda: no CUDA GPU is available")]
                             if not torch.cuda.is_available() else []),
                           (["--max-seq-len", "8192", "--token-budget", "100"],
                            "--max-seq-len 128 exceeds --token-budget 100"),
                           (["--pad-to", "many"], "--pad-to: expected a number of tokens or 'longest', got 'many'"),
                           (["--dtype", "float8"], "argument --dtype: invalid choice")):
        with pytest.raises(SystemExit) as e:
            main([*base, *flags])
        assert e.value.code == 2, flags
        assert message in capsys.readouterr().err, flags
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "notes.txt"]

    # --overwrite deletes the earlier run's files (only those) and starts again
    (out / "adapter-epoch7.safetensors").write_bytes(earlier)
    result = run(replace(config(checkpoint, data, out, overwrite=True), stop_after_steps=1))
    assert result.steps == 1
    assert sorted(p.name for p in out.iterdir()) == ["log.csv", "loss.png", "notes.txt", "train_state.pt"]


def test_cli_refuses_bad_values_before_loading_or_writing_anything(checkpoint, tmp_path, capsys, monkeypatch):
    """Non-finite numbers, an --eval-size that leaves nothing to train on, a tokenizer larger than the model's
    vocabulary, an --out that cannot be written: one line each, and nothing loaded (the model) or written."""
    import tokenizers

    import llama_adapter_triton.train.finetune as finetune

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(finetune, "build_model", no_model)
    data = data_file(tmp_path, 4)
    big = tmp_path / "big"
    big.mkdir()
    words = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB + 1)}}
    tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<s>")).save(str(big / "tokenizer.json"))
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "out"
    base = ["--checkpoint", str(checkpoint), "--data", str(data), "--adapter-layers", "1", "--device", "cpu"]
    cases = [(["--lr", "inf"], 2, "--lr must be a finite number, got inf"),
             (["--blr", "nan"], 2, "--blr must be a finite number, got nan"),
             (["--weight-decay", "inf"], 2, "--weight-decay must be a finite number, got inf"),
             (["--min-lr", "inf"], 2, "--min-lr must be a finite number, got inf"),
             (["--clip-grad", "inf"], 2, "--clip-grad must be a finite number, got inf"),
             (["--eval-size", "nan"], 2, "--eval-size must be a finite number, got nan"),
             (["--eval-size", "1e9"], 2, "--eval-size 1e+09 leaves none of the 4 examples to train on"),
             (["--eval-size", "0.9999"], 2, "--eval-size 0.9999 leaves none of the 4 examples to train on"),
             (["--tokenizer", str(big)], 1, f"the tokenizer has {VOCAB + 1} tokens, more than the model's {VOCAB}"),
             (["--out", str(tmp_path / "a-file" / "out")], 2, "a-file is a file, so the folder cannot be made")]
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "locked").mkdir(mode=0o555)
        cases.append((["--out", str(tmp_path / "locked" / "out")], 2, "locked is not writable by this process"))
    cases += [(["--quantize", "fp4"], 2, "argument --quantize: invalid choice: 'fp4'"),
              (["--quantize", "nf4", "--fsdp"], 2, "--quantize nf4 with --fsdp: FSDP2 cannot shard bitsandbytes'"),
              (["--quantize-output"], 2, "--quantize-output goes with --quantize nf4|int8")]
    for flags, code, message in cases:
        with pytest.raises(SystemExit) as e:
            main([*base, "--out", str(out), *flags])
        err = capsys.readouterr().err
        assert e.value.code == code and message in err.strip().splitlines()[-1], (flags, err)
        assert "Traceback" not in err and not out.exists(), flags
    from llama_adapter_triton.model import quantize

    monkeypatch.setattr(quantize, "_bnb", lambda: __import__("no_such_module_bitsandbytes"))
    with pytest.raises(SystemExit) as e:
        main([*base, "--out", str(out), "--quantize", "int8"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "--quantize int8 needs bitsandbytes" in err and "pip install 'bitsandbytes" in err


def test_nf4_base_adapter_learns_as_the_full_precision_one(checkpoint, tmp_path, capsys):
    """The demo's records on the tiny base in NF4 (bitsandbytes, on the CPU): the adapter learns, about as well as on
    the fp32 base."""
    data = data_file(tmp_path, 8)
    losses = {}
    for quantize in (None, "nf4"):
        cfg = config(checkpoint, data, tmp_path / f"out-{quantize}", epochs=3, lr=0.3, adapter_len=10,
                     warmup_epochs=0.5, quantize=quantize)
        run(cfg)
        losses[quantize] = [float(r["loss"]) for r in log_rows(cfg.out) if r["split"] == "train"]
    assert "base frozen in nf4, computing in float32" in capsys.readouterr().out
    epochs = {q: [sum(v[i:i + 8]) / 8 for i in (0, 16)] for q, v in losses.items()}  # the first and last epochs' means
    assert epochs["nf4"][1] < 0.85 * epochs["nf4"][0], epochs  # measured: 6.03 -> 4.82 (fp32: 6.05 -> 4.74)
    assert abs(epochs["nf4"][1] - epochs[None][1]) < 0.05 * epochs[None][1], epochs


@pytest.mark.parametrize("quantize", [None, "nf4", "int8"])
def test_every_quantize_mode_trains_saves_resumes_and_generates(checkpoint, tmp_path, capsys, quantize):
    """A whole tiny run in each --quantize mode: stopped after its first step, resumed to its end, its adapter answered
    with (int8 once crashed at its first save: get_model_state_dict fails on Linear8bitLt's SCB entry)."""
    from llama_adapter_triton.model.generate import main as generate

    data = data_file(tmp_path, 2)
    out = tmp_path / "out"
    first = run(config(checkpoint, data, out, quantize=quantize, stop_after_steps=1))
    assert first.steps == 1 and (out / "train_state.pt").is_file()
    resumed = run(config(checkpoint, data, out, quantize=quantize, resume=True))
    assert resumed.steps == 2 and (out / "adapter.safetensors").is_file()
    capsys.readouterr()
    generate(["--checkpoint", str(checkpoint), "--adapter", str(out / "adapter.safetensors"), "--device", "cpu",
              "--instruction", "Name a color.", "--max-new-tokens", "3", "--temperature", "0",
              *(["--quantize", quantize] if quantize else [])])
    captured = capsys.readouterr()
    assert captured.out.strip() and "tokens/s" in captured.err, captured


def test_activation_checkpointing_changes_nothing_but_memory(checkpoint, tmp_path):
    """The same losses and adapter, bit for bit; a resumed run may switch it."""
    data = data_file(tmp_path, 3)
    results = [run(config(checkpoint, data, tmp_path / f"out-{on}", adapter_layers=2, activation_checkpointing=on))
               for on in (False, True)]
    assert [r["loss"] for r in log_rows(results[0].out)] == [r["loss"] for r in log_rows(results[1].out)]
    for k, v in results[0].adapter.items():
        assert torch.equal(v, results[1].adapter[k]), k
    assert results[1].model.activation_checkpointing and not results[0].model.activation_checkpointing


class _Poison(torch.autograd.Function):
    """The identity forward; NaN gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_step(monkeypatch, at_call: int, what: str) -> None:
    """train.finetune's batch_loss_sum, with its at_call-th call (1-based) made NaN: what="loss" (forward) or
    "grad" (backward only: the loss stays finite)."""
    import llama_adapter_triton.train.finetune as finetune

    clean, calls = finetune.batch_loss_sum, []

    def poisoned(model, batch, device):
        loss = clean(model, batch, device)
        calls.append(1)
        if len(calls) == at_call:
            loss = loss * float("nan") if what == "loss" else _Poison.apply(loss)
        return loss

    monkeypatch.setattr(finetune, "batch_loss_sum", poisoned)


def test_a_diverging_run_stops_and_keeps_the_last_saved_state(checkpoint, tmp_path, capsys, monkeypatch):
    """A NaN loss or gradient once gave 'train loss nan', exit 0 and an adapter of NaNs: now the run stops before
    applying that step, exits 1 naming it, and the state saved before it is the one in OUT."""
    from llama_adapter_triton.train.finetune import TrainingDiverged

    data = data_file(tmp_path, 4)
    out = tmp_path / "grad"
    poison_step(monkeypatch, 3, "grad")
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--adapter-layers", "1",
              "--adapter-len", "4", "--token-budget", "64", "--max-seq-len", "64", "--eval-size", "0", "--epochs", "1",
              "--no-tensorboard", "--device", "cpu", "--save-every", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(
        "llama-adapter finetune: error: training diverged: at step 3 (epoch 1) the gradient norm is nan (the loss ")
    assert f"the last saved state, {out / 'train_state.pt'} of step 2, and the adapters written before it are " \
           "intact" in err
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["global_step"] == 2 and all(torch.isfinite(t).all() for t in state["adapter"].values())
    assert not (out / "adapter.safetensors").exists() and [r["step"] for r in log_rows(out)] == ["1", "2"]

    # a finite but huge --lr: the adapter goes non-finite after a step; it is never saved
    with pytest.raises(TrainingDiverged, match=r"after step 2 \(epoch 1\) the adapter's .* holds NaN or Inf. "
                                               r"Nothing of it was saved: the last saved state, .* of step 1, "):
        run(config(checkpoint, data, tmp_path / "lr", lr=1e30, warmup_epochs=0, save_every=1))
    assert torch.load(tmp_path / "lr" / "train_state.pt", weights_only=True)["global_step"] == 1
    with pytest.raises(UsageError, match=r"--lr 1e\+38 is too large: AdamW's first step, lr / \(1 - beta1\), "
                                         "overflows float32"):
        run(config(checkpoint, data, tmp_path / "lr38", lr=1e38))
    assert not (tmp_path / "lr38").exists()

    poison_step(monkeypatch, 2, "loss")
    with pytest.raises(TrainingDiverged, match=r"at step 2 \(epoch 1\) the loss is nan, so the step was not applied. "
                                               "Nothing of it was saved: no train state was saved yet"):
        run(config(checkpoint, data, tmp_path / "loss"))

    # fp16: a non-finite gradient is the loss scaler's to handle (it skips the step and halves its scale)
    poison_step(monkeypatch, 2, "grad")
    result = run(config(checkpoint, data, tmp_path / "fp16", dtype="float16"))
    assert result.steps == 4 and all(torch.isfinite(t).all() for t in result.adapter.values())
    scale = torch.load(tmp_path / "fp16" / "train_state.pt", weights_only=True)["scaler"]["scale"]
    assert scale == 2.0 ** 15  # 2 ** 16 to start, halved once


def _rank_poisoned(rank: int, world_size: int, port: int, cfg: FinetuneConfig, result_dir: Path) -> None:
    """A torchrun-like rank whose gradients go NaN at its second micro-batch, on rank 1 only."""
    from llama_adapter_triton.train.finetune import TrainingDiverged

    torchrun_env(rank, world_size, port)
    if rank == 1:
        poison_step(pytest.MonkeyPatch(), 2, "grad")
    try:
        run(cfg)
    except TrainingDiverged as e:
        (result_dir / f"rank{rank}.error").write_text(str(e))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_a_diverging_rank_stops_every_rank(checkpoint, tmp_path, fsdp):
    """NaN gradients on rank 1 alone: both ranks stop at the same step (no hang), no adapter is written."""
    data = data_file(tmp_path, 8)
    cfg = config(checkpoint, data, tmp_path / "two", micro_batches_per_step=2, fsdp=fsdp)
    context = mp.spawn(_rank_poisoned, args=(2, _free_port(), cfg, tmp_path), nprocs=2, join=False)
    for _ in range(60):  # 5 minutes at most, never a hang of the suite
        if context.join(timeout=5):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the ranks did not stop")
    for rank in range(2):
        assert "training diverged: at step 2 (epoch 1) the gradient norm is nan" in \
            (tmp_path / f"rank{rank}.error").read_text()
    assert not (tmp_path / "two" / "adapter.safetensors").exists()


def test_resume_refuses_changed_data_and_tokenizer(checkpoint, tmp_path, capsys):
    """Another data file of as many records was once trained on silently (fewer: "start_step=9 is past the end"):
    the train state keeps the data file's and the tokenizer's size and sha256, and a resume compares them."""
    from llama_adapter_triton import CheckpointError

    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS[:6]))
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes((checkpoint / "tokenizer.model").read_bytes())
    out = tmp_path / "out"
    run(config(checkpoint, data, out, tokenizer=tokenizer, stop_after_steps=2))
    inputs = torch.load(out / "train_state.pt", weights_only=True)["inputs"]
    assert inputs["data file"]["bytes"] == data.stat().st_size and len(inputs["tokenizer"]["sha256"]) == 64
    resume = config(checkpoint, data, out, tokenizer=tokenizer, resume=True)
    for records in (RECORDS[6:12], RECORDS[:4]):  # as many records, other ones; fewer
        data.write_text(json.dumps(records))
        with pytest.raises(UsageError, match=rf"--resume: the data differs from the run in .*out: the data file "
                                             rf"{data}: \d+ bytes, sha256 [0-9a-f]{{12}}\.\.\. -> "
                                             rf"{data.stat().st_size} bytes, sha256 [0-9a-f]{{12}}\.\.\.\. Resume "
                                             "with the data it started with"):
            run(resume)
    data.write_text(json.dumps(RECORDS[:6]))
    tokenizer.write_bytes(tokenizer.read_bytes() + b"\0")
    with pytest.raises(UsageError, match=rf"the data differs .*: the tokenizer {tokenizer}: "):
        run(resume)
    tokenizer.write_bytes((checkpoint / "tokenizer.model").read_bytes())

    # a state written before the digests were kept resumes, with a warning
    state = torch.load(out / "train_state.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "inputs"}, out / "train_state.pt")
    capsys.readouterr()
    assert run(resume).steps == 6
    assert "does not record the data's digests (an older version wrote it): resuming" in capsys.readouterr().out

    # the state is untrusted: a wrong entry is an error naming the file, never a traceback
    for key, value, message in (("epoch", "1", r"its 'epoch' must be an int >= 0, got str"),
                                ("step", 99, r"its position, step 99 of epoch 1, lies beyond this run's"),
                                ("rng", {"cpu": "seed"}, r"cannot be restored \(TypeError"),
                                ("inputs", [1], r"its 'inputs' must be a dict, got list")):
        torch.save({**state, key: value}, out / "train_state.pt")
        with pytest.raises(CheckpointError, match=rf"train_state\.pt: {message}"):
            run(resume)


def save_adapter_file(checkpoint: Path, path: Path) -> bytes:
    """An adapter file of a model of the checkpoint's shape, as a run writes it; returns its bytes."""
    from llama_adapter_triton import load_checkpoint, save_adapter

    path.parent.mkdir(parents=True, exist_ok=True)
    return save_adapter(load_checkpoint(checkpoint, adapter=AdapterConfig(adapter_len=4, adapter_layers=1)),
                        path).read_bytes()


def test_overwrite_and_resume_touch_only_the_runs_own_files(checkpoint, tmp_path):
    """--overwrite once deleted whatever bore the run's names (another tool's tensorboard/ or log.csv): the run's files
    are now recognised by their content, others refused by name and reason; a killed run's .NAME.*.tmp files go."""
    data = data_file(tmp_path, 4)
    out = tmp_path / "out"
    run(config(checkpoint, data, out, stop_after_steps=1))
    (out / ".train_state.pt.0123abcd.tmp").write_bytes(b"half a state")  # what kill -9 leaves
    (out / ".log.csv.89abcdef.tmp").write_text("step,")
    (out / ".notes.0123abcd.tmp").write_text("another tool's temporary file")
    (out / "notes.txt").write_text("the user's notes")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.17.host.other").write_bytes(b"another tool's events")

    def snapshot(folder: Path) -> dict:
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = snapshot(out)
    for flag in ("resume", "overwrite"):
        with pytest.raises(FileExistsError, match=r"holds files of the names llama-adapter finetune writes that it "
                                                  r"did not write: tensorboard \(holds 'events\.out\.tfevents\.17\."
                                                  r"host\.other', not an event file of llama-adapter finetune's "
                                                  r"\(\*\.llama-adapter-triton\)\)\. They are never deleted"):
            run(config(checkpoint, data, out, **{flag: True}))
        assert snapshot(out) == before
    (out / "tensorboard" / "events.out.tfevents.17.host.other").rename(
        out / "tensorboard" / "events.out.tfevents.17.host.1.llama-adapter-triton")  # as the run names its events

    assert run(config(checkpoint, data, out, resume=True)).steps == 4  # the temporaries go, the rest stays
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".notes.0123abcd.tmp", "adapter-epoch1.safetensors", "adapter.safetensors", "log.csv", "loss.png",
         "notes.txt", "tensorboard", "train_state.pt"])
    run(config(checkpoint, data, out, overwrite=True, stop_after_steps=1))
    assert sorted(p.name for p in out.iterdir()) == [".notes.0123abcd.tmp", "log.csv", "loss.png", "notes.txt",
                                                     "train_state.pt"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "log.csv").write_text("epoch,accuracy\n1,0.5\n")
    (other / "adapter.safetensors").write_text("not ours")
    with pytest.raises(FileExistsError, match=r"adapter\.safetensors \(cannot be read as one \(SafetensorError\)\); "
                                              r"log\.csv \(its first line is not llama-adapter finetune's header\)"):
        run(config(checkpoint, data, other, overwrite=True))
    assert (other / "log.csv").read_text() == "epoch,accuracy\n1,0.5\n"


def test_overwrite_never_follows_a_link(checkpoint, tmp_path):
    """OUT/adapter-peft, a link to another run's export: --overwrite once deleted that run's two files through it. A
    link of a run's name is refused, naming it; a killed run's temporary that is a link goes itself, never its target;
    the writers refuse to write through or over a link."""
    from llama_adapter_triton import load_checkpoint, save_adapter
    from llama_adapter_triton.model.io import write_atomic
    from llama_adapter_triton.train.state import STATE_FILE

    data = data_file(tmp_path, 1)
    other = tmp_path / "other"
    run(config(checkpoint, data, other, gate="layer", gate_act="identity", export="peft"))

    def snapshot(folder: Path) -> dict:
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = snapshot(other)
    out = tmp_path / "out"
    out.mkdir()
    for name, target in (("adapter-peft", other / "adapter-peft"), ("log.csv", other / "log.csv"),
                         (STATE_FILE, tmp_path / "nowhere")):
        (out / name).symlink_to(target)
        with pytest.raises(FileExistsError, match=rf"{re.escape(name)} \(a link to .*: never followed"):
            run(config(checkpoint, data, out, overwrite=True))
        assert (out / name).is_symlink() and snapshot(other) == before
        (out / name).unlink()
    (out / ".adapter-peft.0123abcd.tmp").symlink_to(other / "adapter-peft")  # as if a killed run's
    run(config(checkpoint, data, out, overwrite=True, stop_after_steps=1))
    assert not os.path.lexists(out / ".adapter-peft.0123abcd.tmp") and snapshot(other) == before

    model = load_checkpoint(checkpoint, adapter=AdapterConfig(adapter_len=4, adapter_layers=1, gate="layer",
                                                                gate_act="identity"))
    (out / "link.safetensors").symlink_to(other / "adapter.safetensors")
    (out / "peft-link").symlink_to(other / "adapter-peft")
    for write in (lambda: write_atomic(out / "link.safetensors", b"x", overwrite=True),
                  lambda: save_adapter(model, out / "link.safetensors", overwrite=True),
                  lambda: save_adapter(model, out / "peft-link", overwrite=True, format="peft")):
        with pytest.raises(FileExistsError, match=r"(link\.safetensors|peft-link) is a link to .*: never written"):
            write()
    assert snapshot(other) == before


def test_export_peft_writes_the_final_adapter_as_a_peft_folder(checkpoint, tmp_path, capsys):
    """--export peft: OUT/adapter-peft holds the final adapter in PEFT's format (PEFT loads it; the same tensors as
    adapter.safetensors); an earlier run's folder is refused without --overwrite and replaced with it, another
    tool's never; adapters PEFT cannot express are refused before anything is written."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    from llama_adapter_triton import load_adapter, load_checkpoint

    data = data_file(tmp_path, 2)
    out = tmp_path / "out"
    cfg = config(checkpoint, data, out, gate="layer", gate_act="identity", export="peft")
    run(cfg)
    folder = out / "adapter-peft"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ours = load_checkpoint(checkpoint, adapter=read_adapter_config(out / "adapter.safetensors"))
    exported = load_checkpoint(checkpoint, adapter=read_adapter_config(folder))
    load_adapter(ours, out / "adapter.safetensors")
    load_adapter(exported, folder)
    for (name, a), b in zip(adapter_state_dict(ours).items(), adapter_state_dict(exported).values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(checkpoint), folder)
    assert float(next(p for n, p in theirs.named_parameters() if "adaption_gate" in n).detach()) == float(
        ours.layers[1].attention.gate.detach())

    with pytest.raises(FileExistsError, match=r"holds the results of an earlier run \(.*adapter-peft"):
        run(cfg)
    run(replace(cfg, overwrite=True, stop_after_steps=1))  # deleted, and not written by a stopped run
    assert not folder.exists()
    folder.mkdir()
    (folder / "README.md").write_text("another tool's")
    with pytest.raises(FileExistsError, match=r"adapter-peft \(holds \['README\.md'\], not only"):
        run(replace(cfg, overwrite=True))
    assert (folder / "README.md").read_text() == "another tool's"

    fresh = tmp_path / "fresh"
    for flags, message in ((["--export", "peft"], "--export peft: the adapter has gate='head'"),
                           (["--export", "peft", "--gate", "layer"], "--export peft: the adapter has gate_act='tanh'"),
                           (["--export", "lora"], "argument --export: invalid choice")):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(fresh), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err, flags
    assert not fresh.exists()


def test_a_full_disk_keeps_the_last_saved_state_and_resume_goes_on(checkpoint, tmp_path, capsys, monkeypatch):
    """An OSError writing a file is one line naming it and what is intact; --resume then ends as an uninterrupted
    run would."""
    import errno

    data = data_file(tmp_path, 4)
    whole = run(config(checkpoint, data, tmp_path / "whole"))
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--adapter-layers", "1",
            "--adapter-len", "4", "--token-budget", "64", "--max-seq-len", "64", "--eval-size", "0", "--epochs", "1",
            "--blr", "0.5", "--no-tensorboard", "--device", "cpu", "--save-every", "1"]
    fsync, calls = os.fsync, []

    def full_disk(fd):  # the 3rd file written: log.csv's header, the state of step 1, then that of step 2
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SystemExit) as e:
        main(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"llama-adapter finetune: error: cannot write {out / 'train_state.pt'}: No space left on device; the last "
        f"saved state, {out / 'train_state.pt'} of step 1, and the adapters written before it are intact: --resume "
        "goes on from there")
    assert torch.load(out / "train_state.pt", weights_only=True)["global_step"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    # a log row cut short (a full disk, a kill; here after the "1" of "12") is dropped on resume
    with open(out / "log.csv", "a", newline="") as f:
        f.write("1")
    main([*argv, "--resume"])
    for k, t in whole.adapter.items():
        assert torch.equal(load_file(out / "adapter.safetensors")[k], t), k
    assert [r["step"] for r in log_rows(out)] == ["1", "2", "3", "4"]

    def full_log(self, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(csv.DictWriter, "writerow", full_log)
    from llama_adapter_triton.train.finetune import OutputError

    with pytest.raises(OutputError, match=rf"cannot write {tmp_path / 'fresh' / 'log.csv'}: No space left on device; "
                                          "no train state was saved yet: start again with --overwrite"):
        run(config(checkpoint, data, tmp_path / "fresh"))


# ----------------------------------------------------------------------------------------------------------------
# LLaMA-Adapter V2


@pytest.mark.gpu_leg
def test_v2_learns_the_demo_task_and_trains_every_part(checkpoint, tmp_path, device, triton_kernels_only):
    """--adapter-version 2 on the demo's instructions, packed, through the fused op: the loss falls as V1's does, and
    the biases, scales and norms (every layer's) move with the prompts and gates."""
    from llama_adapter_triton import load_checkpoint

    data = data_file(tmp_path, 10)
    cfg = config(checkpoint, data, tmp_path / "out", epochs=3, lr=0.05, adapter_len=10, warmup_epochs=0.5,
                 device=device, adapter_version=2)
    result = run(cfg)
    assert triton_kernels_only.forward > 0 and triton_kernels_only.backward > 0
    losses = [float(r["loss"]) for r in log_rows(cfg.out) if r["split"] == "train"]
    epochs = [sum(losses[i:i + 10]) / 10 for i in (0, 10, 20)]
    assert epochs[0] > epochs[1] > epochs[2] and epochs[2] < epochs[0] - 1.0, epochs
    fresh = load_checkpoint(checkpoint, adapter=read_adapter_config(cfg.out / "adapter.safetensors"))
    before = adapter_state_dict(fresh)
    assert before.keys() == result.adapter.keys()
    for kind in ("attention.wq.bias", "feed_forward.w2.scale", "ffn_norm.weight", "attention.gate"):
        names = [k for k in before if k.endswith(kind)]
        assert names and all((result.adapter[k] - before[k]).abs().max() > 1e-3 for k in names), kind
    assert (result.adapter["norm.weight"] - before["norm.weight"]).abs().max() > 1e-3


def test_v2_resume_equals_an_uninterrupted_run(checkpoint, tmp_path):
    """V2 with the official code's input scales and litgpt's output-layer bias: stopped mid-epoch and resumed, the
    same bits as one run; a resume with another V2 setting is refused."""
    data = data_file(tmp_path, 4)
    v2 = dict(adapter_version=2, v2_scale="input", v2_output_layer=True)
    whole = run(config(checkpoint, data, tmp_path / "whole", **v2))
    out = tmp_path / "stopped"
    run(config(checkpoint, data, out, stop_after_steps=2, **v2))
    with pytest.raises(UsageError, match=r"--resume: these settings differ .* --v2-scale 'input' -> 'output'"):
        run(config(checkpoint, data, out, resume=True, **{**v2, "v2_scale": "output"}))
    resumed = run(config(checkpoint, data, out, resume=True, **v2))
    assert whole.adapter.keys() == resumed.adapter.keys() and "output.scale" in whole.adapter
    for k, t in whole.adapter.items():
        assert torch.equal(resumed.adapter[k], t), k
    with pytest.raises(ValueError, match="--v2-scale and --v2-output-layer go with --adapter-version 2"):
        config(checkpoint, data, out, v2_output_layer=True)


def test_a_plot_of_an_earlier_version_is_the_runs_own(tmp_path):
    """loss.png carries a fixed Software tag, the one of every version so far ("... python -m train.finetune", the
    command's name before it was `llama-adapter finetune`): --overwrite and --resume recognise an older run's plot,
    and refuse a PNG of the same name that another program wrote."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llama_adapter_triton.train.outputs import PLOT_FILE, _own_file

    for software, own in (("llama-adapter-triton python -m train.finetune", True), ("matplotlib", False)):
        fig = plt.figure()
        fig.savefig(tmp_path / PLOT_FILE, format="png", metadata={"Software": software})
        plt.close(fig)
        assert (_own_file(tmp_path / PLOT_FILE) is None) == own, software
