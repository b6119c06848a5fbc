"""The multi-modal adapter (model/visual.py): CLIP features, the projector, the model's image inputs, adapter files,
fine-tuning with images (train.finetune --clip) and generation with an image (model.generate --image).

A tiny random CLIP (4 layers of width 32 on 32x32 images) saved in Hugging Face's format stands in for a real one;
images are solid colours, which it maps to distinct features.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_utils import randomize_, set_adapter_
from PIL import Image
from safetensors.torch import load_file

from llama_adapter_triton import (
    AdapterConfig,
    CheckpointError,
    LLaMA,
    LLaMAConfig,
    Tokenizer,
    adapter_groups,
    adapter_layers,
    adapter_state_dict,
    alpaca_prompt,
    load_adapter,
    load_checkpoint,
    mark_only_adapter_as_trainable,
    read_adapter_config,
    reset_adapter,
    save_adapter,
    save_checkpoint,
    set_attention_impl,
)
from llama_adapter_triton.model.generate import main as generate_main
from llama_adapter_triton.model.visual import CLIPImageEncoder, default_clip_layers
from llama_adapter_triton.train.data import DataError, PackedLoader, TokenizedDataset, load_records, tokenize_records
from llama_adapter_triton.train.demo import train_tokenizer
from llama_adapter_triton.train.finetune import FinetuneConfig, UsageError, run
from llama_adapter_triton.train.multimodal import ImageFeatures

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
QUESTION = "What colour is the picture?"
WIDTH = 32  # the tiny CLIP's hidden size


def _clip_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                            image_size=32, patch_size=8)


def _processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A tiny random CLIP vision model with its image processor, as a local folder."""
    from transformers import CLIPVisionModel

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPVisionModel(_clip_config()).save_pretrained(folder)
    _processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, rgb in COLOURS.items():
        paths[name] = folder / f"{name}.png"
        Image.new("RGB", (48, 40), rgb).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random LLaMA (HF format) with a sentencepiece tokenizer that knows the colour answers."""
    folder = tmp_path_factory.mktemp("ckpt")
    texts = [alpaca_prompt(QUESTION, "") + " " + c for c in COLOURS] * 20 + [
        alpaca_prompt(f"Name a word like {w}.", "") + " " + w for w in ("tree", "stone", "river", "cloud")] * 5
    (folder / "tokenizer.model").write_bytes(train_tokenizer(texts, vocab_size=120))
    config = LLaMAConfig(name="tiny-mm", dim=64, n_layers=2, n_heads=2, vocab_size=120, multiple_of=32,
                         norm_eps=1e-5, max_seq_len=128)
    torch.manual_seed(0)
    save_checkpoint(randomize_(LLaMA(config), seed=0), folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# The encoder


def test_encoder_gives_the_class_token_of_each_layer_through_post_layernorm(clip, images):
    from transformers import CLIPVisionModel

    encoder = CLIPImageEncoder(clip, layers=(2, -1))
    assert encoder.layers == (2, 4) and encoder.feature_dim == 2 * WIDTH and encoder.depth == 4
    pil = [Image.open(images["red"]), Image.open(images["blue"]).convert("L")]  # any mode: converted to RGB
    features = encoder.encode(pil)
    assert features.shape == (2, 2 * WIDTH) and features.dtype == torch.float32

    reference = CLIPVisionModel.from_pretrained(clip).eval()
    pixels = _processor()(images=[im.convert("RGB") for im in pil], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = reference(pixel_values=pixels, output_hidden_states=True)
        norm = getattr(reference, "vision_model", reference).post_layernorm
        torch.testing.assert_close(features[:, :WIDTH], norm(out.hidden_states[2][:, 0]))
        torch.testing.assert_close(features[:, WIDTH:], out.pooler_output)  # the last layer: CLIP's pooled output
    files = encoder.encode_files([images["red"], images["blue"]], batch_size=1)
    torch.testing.assert_close(files[0], features[0])
    assert not torch.allclose(files[0], files[1], atol=1e-2)  # colours differ


def test_encoder_reads_a_whole_clip_model_folder(tmp_path, images):
    """A download of a whole CLIP model (text tower included): the vision tower alone is loaded."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(1)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=_clip_config().to_dict(), projection_dim=16)).eval()
    full.save_pretrained(tmp_path)
    _processor().save_pretrained(tmp_path)
    encoder = CLIPImageEncoder(tmp_path)
    assert encoder.layers == default_clip_layers(4) == (1, 2, 3, 4)
    pixels = _processor()(images=[Image.open(images["green"])], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = full.vision_model(pixel_values=pixels).pooler_output
    torch.testing.assert_close(encoder.encode_files([images["green"]])[:, -WIDTH:], pooled)


def test_default_layers():
    assert default_clip_layers(24) == (6, 12, 18, 24)
    assert default_clip_layers(12) == (3, 6, 9, 12)
    assert default_clip_layers(2) == (1, 2)


def test_encoder_bad_input(clip, images, tmp_path):
    for layers, match in (((5,), r"layers must be in 1..4"), ((0,), r"layers must be in 1..4"),
                          ((2, -3), r"must not repeat a layer, got \(2, -3\)"), ((), "non-empty")):
        with pytest.raises(ValueError, match=match):
            CLIPImageEncoder(clip, layers=layers)
    with pytest.raises(FileNotFoundError, match="not a CLIP model folder"):
        CLIPImageEncoder(tmp_path)
    # an incomplete checkpoint is refused, never filled with random weights
    import shutil

    from safetensors.torch import save_file

    partial = tmp_path / "partial"
    shutil.copytree(clip, partial)
    tensors = load_file(partial / "model.safetensors")
    dropped = sorted(k for k in tensors if "layers.1.mlp.fc1" in k)
    save_file({k: v for k, v in tensors.items() if k not in dropped}, partial / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lack or mismatch 2 tensor\(s\) .*layers.1.mlp.fc1"):
        CLIPImageEncoder(partial)
    encoder = CLIPImageEncoder(clip)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        encoder.encode_files([images["red"], tmp_path / "nope.png"])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="could not be read as an image"):
        encoder.encode_files([tmp_path / "text.png"])


# ----------------------------------------------------------------------------------------------------------------
# The model


def mm_model(visual_dim: int = 2 * WIDTH, *, seed: int = 0, **adapter_fields) -> LLaMA:
    adapter = AdapterConfig(adapter_len=4, adapter_layers=1, visual_dim=visual_dim, visual_hidden=16,
                            clip_layers=(2, 4), **adapter_fields)
    torch.manual_seed(seed)
    config = LLaMAConfig(name="tiny-mm", dim=64, n_layers=2, n_heads=2, vocab_size=120, multiple_of=32,
                         max_seq_len=128)
    return set_adapter_(randomize_(LLaMA(config, adapter), seed), seed + 1).eval()


def test_image_features_become_the_visual_token():
    model = mm_model()
    assert {k for k in adapter_state_dict(model) if k.startswith("visual_proj.")} == {
        "visual_proj.fc1.weight", "visual_proj.fc1.bias", "visual_proj.fc2.weight", "visual_proj.fc2.bias"}
    tokens = torch.randint(0, 120, (3, 9))
    features = torch.randn(3, 2 * WIDTH)
    with torch.no_grad():
        out = model(tokens, image_features=features)
        torch.testing.assert_close(out, model(tokens, visual=model.visual_proj(features)))
        assert (out - model(tokens)).abs().max() > 1e-3  # the image changes the output
        # a row without an image gets no visual token: the text-only output
        masked = model(tokens, image_features=features, image_mask=torch.tensor([True, False, True]))
        torch.testing.assert_close(masked[1], model(tokens[1:2])[0])
        torch.testing.assert_close(masked[0], out[0])


def test_a_fresh_multimodal_adapter_ignores_the_image_yet_its_gates_get_gradients():
    """Zero-init: with gates 0 the image changes nothing (bit for bit), and the gates still get a gradient, through
    which training starts to use it."""
    model = mm_model()
    for m in adapter_layers(model).values():
        m.reset_adapter()  # fresh: random prompt, zero gate
    mark_only_adapter_as_trainable(model)
    tokens = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(4))
    features = torch.randn(2, 2 * WIDTH, generator=torch.Generator().manual_seed(5))
    with_image = model(tokens, image_features=features)
    assert torch.equal(with_image, model(tokens))
    with_image.float().pow(2).mean().backward()
    gates = [m.gate.grad for m in adapter_layers(model).values()]
    assert all(g is not None and g.abs().max() > 0 for g in gates)
    assert model.visual_proj.fc1.weight.grad.abs().max() == 0  # through the zero gate: nothing yet


def test_image_inputs_bad_input():
    model = mm_model()
    tokens = torch.randint(0, 120, (2, 5))
    f = torch.randn(2, 2 * WIDTH)
    cases = [(dict(image_features=torch.randn(2, 7)), r"image_features must be floating-point \(batch=2, "
                                                      r"visual_dim=64\), got torch.float32 \(2, 7\)"),
             (dict(image_features=f, visual=torch.zeros(2, 64)), "not both"),
             (dict(image_features=f, image_mask=torch.ones(2)), r"image_mask must be a bool tensor \(batch=2,\)"),
             (dict(image_mask=torch.ones(2, dtype=torch.bool)), "image_mask goes with image_features")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            model(tokens, **kwargs)
    text_only = LLaMA(model.config, AdapterConfig(adapter_len=4, adapter_layers=1))
    with pytest.raises(ValueError, match="has a text-only one"):
        text_only(tokens, image_features=f)
    with pytest.raises(ValueError, match="has no adapter"):
        LLaMA(model.config)(tokens, image_features=f)
    for kwargs, match in ((dict(visual_dim=-1), "visual_dim must be an int >= 0"),
                          (dict(visual_dim=8), "clip_layers and visual_dim go together"),
                          (dict(clip_layers=(1,)), "clip_layers and visual_dim go together"),
                          (dict(visual_dim=8, clip_layers=(0,)), "clip_layers must be a sequence of layer numbers"),
                          (dict(visual_dim=8, clip_layers=(1,), visual_hidden=0), "visual_hidden must be a positive")):
        with pytest.raises(ValueError, match=match):
            AdapterConfig(**kwargs)


@pytest.mark.gpu_leg
def test_fused_op_gradients_equal_the_eager_formulation_packed_with_and_without_images(device, triton_kernels_only):
    """Packed sequences, one visual token per sequence (one without an image): loss and every trained gradient,
    projector included, through the fused op (interpreted on a CPU, compiled on a GPU) and through the official
    code's eager formulation."""
    results = {}
    lengths = [7, 12, 5]
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32, device=device)
    tokens = torch.randint(0, 120, (1, 24), generator=torch.Generator().manual_seed(0)).to(device)
    features = torch.randn(3, 2 * WIDTH, generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.tensor([True, False, True], device=device)
    for impl in ("fused", "eager"):
        model = mm_model().to(device)
        mark_only_adapter_as_trainable(model)
        if impl == "eager":  # the eager formulation has no packed mode: each sequence alone
            set_attention_impl(model, "eager")
            logits = torch.cat([model(tokens[:, cu[i]:cu[i + 1]], image_features=features[i:i + 1],
                                      image_mask=mask[i:i + 1])[0] for i in range(3)])
        else:
            logits = model(tokens, cu_seqlens=cu, max_seqlen=max(lengths), image_features=features,
                           image_mask=mask)[0]
        loss = F.cross_entropy(logits[:-1], tokens[0, 1:])
        loss.backward()
        results[impl] = (loss.detach(), {k: p.grad.clone() for k, p in adapter_state_dict(model).items()})
    torch.testing.assert_close(results["fused"][0], results["eager"][0], atol=1e-5, rtol=1e-5)
    for k, g in results["eager"][1].items():
        assert g.abs().max() > 0, k
        torch.testing.assert_close(results["fused"][1][k], g, atol=1e-5, rtol=1e-4, msg=k)
    assert triton_kernels_only.forward > 0 and triton_kernels_only.backward > 0


def test_adapter_file_round_trip_with_the_projector(tmp_path):
    model = mm_model(seed=3)
    path = save_adapter(model, tmp_path / "mm.safetensors")
    assert {k for k in load_file(path) if k.startswith("visual_proj.")} == {
        "visual_proj.fc1.weight", "visual_proj.fc1.bias", "visual_proj.fc2.weight", "visual_proj.fc2.bias"}
    config = read_adapter_config(path)
    assert config == model.adapter and config.clip_layers == (2, 4)
    fresh = mm_model(seed=9)
    load_adapter(fresh, path)
    for k, t in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[k], t), k

    text_only = LLaMA(model.config, AdapterConfig(adapter_len=4, adapter_layers=1))
    with pytest.raises(CheckpointError, match="the adapter has visual_dim=64 .* built with visual_dim=0"):
        load_adapter(text_only, path)
    other_hidden = LLaMA(model.config, AdapterConfig(adapter_len=4, adapter_layers=1, visual_dim=64,
                                                     visual_hidden=8, clip_layers=(2, 4)))
    with pytest.raises(CheckpointError, match="visual_hidden=16 .* built with visual_hidden=8"):
        load_adapter(other_hidden, path)
    save_adapter(text_only, tmp_path / "text.safetensors")
    with pytest.raises(CheckpointError, match="visual_dim=0 .* built with visual_dim=64"):
        load_adapter(fresh, tmp_path / "text.safetensors")


V2_EARLY = dict(version=2, fusion="early", visual_len=2)


@pytest.mark.parametrize("kind", [{}, V2_EARLY], ids=["v1", "v2-early-fusion"])
def test_the_adapter_learns_to_read_the_image(kind, clip, images):
    """Colour questions whose answer only the image tells: trained from a fresh adapter (the eager formulation, for
    speed), the model answers each colour right, and a swapped image swaps the answer. V2 with early fusion learns it
    through the first layer's visual prompts alone: with its visual gate closed, every colour gets one answer."""
    encoder = CLIPImageEncoder(clip, layers=(2, 4))
    names = list(COLOURS)
    features = encoder.encode_files([images[n] for n in names])
    model = reset_adapter(mm_model(**kind))  # gates 0, biases 0, scales 1, as fine-tuning starts
    set_attention_impl(model, "eager")
    mark_only_adapter_as_trainable(model)
    # the question is the same tokens for every colour; each answer is one token id of its own
    question = torch.tensor([[1, 5, 6, 7, 8, 9]]).expand(3, 6)
    answers = torch.tensor([40, 41, 42])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(60):
        logits = model(question, image_features=features, logits_at=-1)
        loss = F.cross_entropy(logits, answers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert model(question, image_features=features, logits_at=-1).argmax(-1).tolist() == answers.tolist()
        swapped = model(question, image_features=features[[2, 0, 1]], logits_at=-1).argmax(-1)
        assert swapped.tolist() == answers[[2, 0, 1]].tolist()
        if kind:
            model.layers[0].attention.visual_gate.zero_()
            assert len(set(model(question, image_features=features, logits_at=-1).argmax(-1).tolist())) == 1


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning and generation


def mm_records(images: dict[str, Path], root: Path) -> list[dict]:
    """Colour questions with their images (relative to root, one absolute), and two text-only records."""
    records = []
    for i, name in enumerate(list(COLOURS) * 2):
        image = str(images[name]) if i == 0 else str(images[name].relative_to(root))
        records.append({"instruction": QUESTION, "input": "", "output": name, "image": image})
    records += [{"instruction": "Name a word like tree.", "input": "", "output": "tree"},
                {"instruction": "Name a word like river.", "input": "", "output": "river", "image": None}]
    return records


def ft_config(checkpoint: Path, data: Path, out: Path, clip: Path, **kwargs) -> FinetuneConfig:
    defaults = dict(adapter_layers=1, adapter_len=4, token_budget=128, max_seq_len=64, eval_size=2, epochs=2,
                    blr=0.5, tensorboard=False, device="cpu", clip=clip, clip_layers=(2, 4), visual_hidden=16)
    return FinetuneConfig(checkpoint=checkpoint, data=data, out=out, **{**defaults, **kwargs})


def test_finetune_with_images_trains_the_projector_and_resumes_exactly(checkpoint, clip, images, tmp_path):
    data = images["red"].parent / "mm.json"
    data.write_text(json.dumps(mm_records(images, images["red"].parent)))
    whole = run(ft_config(checkpoint, data, tmp_path / "whole", clip))
    adapter = load_file(tmp_path / "whole" / "adapter.safetensors")
    config = read_adapter_config(tmp_path / "whole" / "adapter.safetensors")
    assert (config.visual_dim, config.visual_hidden, config.clip_layers) == (2 * WIDTH, 16, (2, 4))
    fresh = load_checkpoint(checkpoint, adapter=config)
    for k in ("visual_proj.fc1.weight", "visual_proj.fc2.bias"):
        assert not torch.equal(adapter[k], adapter_state_dict(fresh)[k]), f"{k} was not trained"
    assert whole.eval_loss is not None and whole.train_loss is not None

    out = tmp_path / "stopped"
    run(ft_config(checkpoint, data, out, clip, stop_after_steps=whole.steps - 1))
    with pytest.raises(UsageError, match=r"--resume: these settings differ .* --clip-layers \[2, 4\] -> \[1, 4\]"):
        run(ft_config(checkpoint, data, out, clip, resume=True, clip_layers=(1, 4)))
    resumed = run(ft_config(checkpoint, data, out, clip, resume=True))
    for k, t in whole.adapter.items():
        assert torch.equal(resumed.adapter[k], t), k  # bitwise: the features are computed again, the same
    assert resumed.eval_loss == whole.eval_loss

    # the batches carried the images: the same data without them trains another adapter
    text = tmp_path / "text.json"
    text.write_text(json.dumps([{k: v for k, v in r.items() if k != "image"}
                                for r in mm_records(images, images["red"].parent)]))
    plain = run(ft_config(checkpoint, text, tmp_path / "plain", None, clip_layers=None))
    key = next(k for k in plain.adapter if k.endswith("adapter_prompt"))
    assert not torch.equal(plain.adapter[key], whole.adapter[key])


def test_joint_training_routes_each_kind_to_its_own_parameters(checkpoint, clip, images, tmp_path):
    """V2 with early fusion and --joint-training, on image records (captions among them) and text records: each
    micro-batch holds one kind; an image micro-batch's gradients reach the projector and the early gate only, a text
    micro-batch's everything else; a group with no example in a step is not updated; both groups train."""
    from llama_adapter_triton.train.multimodal import JointTraining

    model = reset_adapter(mm_model(**V2_EARLY))
    mark_only_adapter_as_trainable(model)
    joint = JointTraining(model)
    state, groups = adapter_state_dict(model), adapter_groups(model)
    visual, language = ([state[n] for n in groups[g]] for g in ("visual", "language"))
    assert {n for n in adapter_groups(model)["visual"] if not n.startswith("visual_proj.")} == {
        "layers.0.attention.visual_gate"}
    tokens = torch.randint(0, 120, (1, 9), generator=torch.Generator().manual_seed(0))
    features = torch.randn(1, 2 * WIDTH, generator=torch.Generator().manual_seed(1))
    step = type("Step", (), {"kind_targets": {0: 5, 1: 8}})()
    for kind, reached, untouched in ((1, visual, language), (0, language, visual)):
        model.zero_grad(set_to_none=True)
        assert joint.route({"kind": kind}, step) == step.kind_targets[kind]
        model(tokens, image_features=features, image_mask=torch.tensor([kind == 1])).square().mean().backward()
        assert any(p.grad.abs().max() > 0 for p in reached), kind
        assert all(not p.grad.any() for p in untouched), kind
    joint.drop_absent(type("Step", (), {"kind_targets": {1: 8}})())
    assert all(p.grad is None for p in language) and all(p.grad is not None for p in visual)
    joint.close()

    data = images["red"].parent / "joint.json"
    records = mm_records(images, images["red"].parent)
    records += [{"image": records[1]["image"], "caption": "green"}]  # an image-text pair: "Generate caption ..."
    data.write_text(json.dumps(records))
    result = run(ft_config(checkpoint, data, tmp_path / "joint", clip, adapter_version=2, joint_training=True,
                           eval_size=0, epochs=1, token_budget=64))
    fresh = adapter_state_dict(reset_adapter(load_checkpoint(checkpoint, adapter=result.model.adapter)))
    moved = {k for k, t in result.adapter.items() if not torch.equal(t, fresh[k])}
    assert {"visual_proj.fc1.weight", "layers.0.attention.visual_gate", "layers.1.attention.gate",
            "layers.0.feed_forward.w1.bias", "norm.weight"} <= moved
    text_only = tmp_path / "text.json"
    text_only.write_text(json.dumps(records[-3:-1]))
    with pytest.raises(ValueError, match="--fusion, --visual-len, --visual-layers and --joint-training go with --clip"):
        ft_config(checkpoint, text_only, tmp_path / "t", None, clip_layers=None, joint_training=True)
    data.write_text(json.dumps(records[:6]))
    with pytest.raises(UsageError, match="--joint-training .* are all image records"):
        run(ft_config(checkpoint, data, tmp_path / "images", clip, adapter_version=2, joint_training=True,
                      eval_size=0))


def test_finetune_image_errors(checkpoint, clip, images, tmp_path):
    root = images["red"].parent
    data = tmp_path / "mm.json"
    records = mm_records(images, root)
    data.write_text(json.dumps(records))
    with pytest.raises(UsageError, match=r"6 record\(s\) of .* have an \"image\": pass --clip"):
        run(ft_config(checkpoint, data, tmp_path / "a", None, clip_layers=None))
    # relative paths start at the data file's folder (here not the images'), or at --image-root
    with pytest.raises(DataError, match=r"5 record\(s\) name an image file that does not exist .* record 1: "):
        run(ft_config(checkpoint, data, tmp_path / "b", clip))
    assert not (tmp_path / "b").exists()  # nothing written
    text = tmp_path / "text.json"
    text.write_text(json.dumps(records[-2:]))
    with pytest.raises(UsageError, match="--clip: no record of .* has an \"image\""):
        run(ft_config(checkpoint, text, tmp_path / "c", clip, image_root=root, eval_size=0))
    with pytest.raises(UsageError, match=r"--clip / --clip-layers: layers must be in 1..4 .* got 9"):
        run(ft_config(checkpoint, data, tmp_path / "e", clip, image_root=root, clip_layers=(2, 9)))
    assert not (tmp_path / "e").exists()
    with pytest.raises(ValueError, match="--clip-layers and --image-root go with --clip"):
        ft_config(checkpoint, text, tmp_path / "d", None)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**records[1], "image": ""}, {**records[2], "image": 3}]))
    with pytest.raises(DataError, match=r"record 0: field .image. is empty.*\n.*record 1: field .image. is a JSON"):
        load_records(bad)
    # a record's image survives tokenization with its record index
    loaded, _ = load_records(data)
    assert loaded[1].image == "green.png" and loaded[-1].image is None
    data_, _ = tokenize_records(loaded, Tokenizer(checkpoint), max_seq_len=64)
    assert len(PackedLoader(data_, 128).collate([0, 1])["example_ids"]) == 2


def test_batches_carry_each_sequence_image():
    """ImageFeatures.attach: each sequence's features (by its record), no image where a record has none or for a
    filler micro-batch."""
    features = torch.arange(6.0).view(3, 2)
    images = ImageFeatures(features, {10: 2, 12: 0})
    data = TokenizedDataset.from_examples([[1, 5, 6]] * 4, [1] * 4, pad_id=0, source_index=[10, 11, 12, 13])
    rows = images.rows(data)
    assert rows.tolist() == [2, -1, 0, -1]
    loader = PackedLoader(data, 64)
    batch = images.attach(loader.collate([2, 1, 0]), rows)
    assert batch["image_mask"].tolist() == [True, False, True]
    assert batch["image_features"][[0, 2]].tolist() == [[0.0, 1.0], [4.0, 5.0]]
    filler = images.attach(loader._filler(), rows)
    assert filler["image_mask"].tolist() == [False] and filler["image_features"].shape == (1, 2)


def test_generate_with_an_image(checkpoint, clip, images, tmp_path, capsys):
    model = load_checkpoint(checkpoint, adapter=AdapterConfig(adapter_len=4, adapter_layers=1, visual_dim=2 * WIDTH,
                                                              visual_hidden=16, clip_layers=(2, 4)))
    set_adapter_(model)
    path = save_adapter(model, tmp_path / "mm.safetensors")
    common = ["--checkpoint", str(checkpoint), "--adapter", str(path), "--instruction", QUESTION,
              "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"]
    answers = {}
    for name in ("red", "blue"):
        generate_main(common + ["--image", str(images[name]), "--clip", str(clip)])
        answers[name] = capsys.readouterr().out
    # the CLI's answer is the model's greedy answer with that image's visual token
    from llama_adapter_triton.model.generate import generate

    tokenizer = Tokenizer(checkpoint)
    encoder = CLIPImageEncoder(clip, layers=(2, 4))
    prompt = tokenizer.encode(alpaca_prompt(QUESTION, ""), bos=True, eos=False)
    model.eval()
    for name, printed in answers.items():
        with torch.no_grad():
            visual = model.visual_proj(encoder.encode_files([images[name]]))
        expect = generate(model, [prompt], max_new_tokens=4, stop_ids=tokenizer.stop_ids, visual=visual)[0]
        assert printed.strip() == tokenizer.decode(expect).strip()
    with pytest.raises(SystemExit, match="--image needs --clip"):
        generate_main(common + ["--image", str(images["red"])])
    with pytest.raises(SystemExit, match="--clip goes with --image"):
        generate_main(common + ["--clip", str(clip)])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(SystemExit, match="--image: image .*text.png.* could not be read as an image"):
        generate_main(common + ["--image", str(tmp_path / "text.png"), "--clip", str(clip)])
    with pytest.raises(SystemExit, match="llama-adapter generate: error: --image .*nope.png does not exist"):
        generate_main(common + ["--image", str(tmp_path / "nope.png"), "--clip", str(clip)])
    text_only = save_adapter(load_checkpoint(checkpoint, adapter=AdapterConfig(adapter_len=4, adapter_layers=1)),
                             tmp_path / "text.safetensors")
    with pytest.raises(SystemExit, match="needs a multi-modal adapter .* this one is text-only"):
        generate_main(common[:2] + ["--adapter", str(text_only)] + common[4:]
                      + ["--image", str(images["red"]), "--clip", str(clip)])


def test_two_processes_fsdp2_equal_one_with_images(checkpoint, clip, images, tmp_path):
    """gloo, 2 processes under FSDP2 (the projector sharded with the prompts) = 1 process on the same global batch."""
    import torch.multiprocessing as mp
    from test_finetune import _free_port, _rank

    data = images["red"].parent / "mm-dist.json"
    data.write_text(json.dumps(mm_records(images, images["red"].parent)))
    single = run(ft_config(checkpoint, data, tmp_path / "single", clip, micro_batches_per_step=2, token_budget=64))
    cfg = ft_config(checkpoint, data, tmp_path / "two", clip, micro_batches_per_step=2, token_budget=64, fsdp=True)
    mp.spawn(_rank, args=(2, _free_port(), cfg, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert any(k.startswith("visual_proj.") for k in single.adapter)
    for k, t in single.adapter.items():
        assert torch.equal(ranks[0]["adapter"][k], ranks[1]["adapter"][k]), k
        torch.testing.assert_close(ranks[0]["adapter"][k], t, atol=1e-5, rtol=1e-5, msg=k)
    saved = load_file(tmp_path / "two" / "adapter.safetensors")
    assert saved.keys() == single.adapter.keys()


def _rank_expecting_data_error(rank: int, world_size: int, port: int, cfg: FinetuneConfig, result_dir: Path) -> None:
    from test_finetune import torchrun_env

    torchrun_env(rank, world_size, port)
    try:
        run(cfg)
    except DataError as e:
        (result_dir / f"rank{rank}.error").write_text(str(e))


def test_an_unreadable_image_on_one_rank_stops_every_rank(checkpoint, clip, images, tmp_path):
    """Each rank encodes its share of the images: a bad file in rank 1's share must stop rank 0 too, not hang it."""
    import torch.multiprocessing as mp
    from test_finetune import _free_port

    root = images["red"].parent
    (tmp_path / "broken.png").write_text("not an image")
    records = mm_records(images, root)[:3]  # red, green, blue: images 0, 1, 2
    records[1] = {**records[1], "image": str(tmp_path / "broken.png")}  # image 1: rank 1's share of 2 processes
    data = tmp_path / "mm.json"
    data.write_text(json.dumps(records))
    cfg = ft_config(checkpoint, data, tmp_path / "out", clip, image_root=root, eval_size=0,
                    micro_batches_per_step=2, allow_external_files=True)
    context = mp.spawn(_rank_expecting_data_error, args=(2, _free_port(), cfg, tmp_path), nprocs=2, join=False)
    for _ in range(60):  # 5 minutes at most, never a hang of the suite
        if context.join(timeout=5):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the ranks did not stop")
    for rank in range(2):
        assert "broken.png' could not be read as an image" in (tmp_path / f"rank{rank}.error").read_text()
    assert not (tmp_path / "out").exists()


def test_images_outside_the_image_root_are_refused(checkpoint, clip, images, tmp_path):
    """Records may name images under --image-root only ("..", absolute paths and links out once read anything),
    unless --allow-external-files."""
    from dataclasses import replace

    root = tmp_path / "root"
    root.mkdir()
    (root / "red.png").write_bytes(images["red"].read_bytes())
    (tmp_path / "outside.png").write_bytes(images["blue"].read_bytes())
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    records = [{"instruction": QUESTION, "input": "", "output": name, "image": image}
               for name, image in (("red", "red.png"), ("red", str(root / "red.png")), ("blue", "../outside.png"),
                                   ("blue", str(tmp_path / "outside.png")), ("blue", "link.png"))]
    data = root / "mm.json"
    data.write_text(json.dumps(records))
    cfg = ft_config(checkpoint, data, tmp_path / "out", clip, eval_size=0, epochs=1, stop_after_steps=1)
    outside = tmp_path / "outside.png"
    with pytest.raises(DataError, match=rf"3 record\(s\) name an image outside --image-root {root} \(through "
                                        rf"\"\.\.\", an absolute path or a link\): record 2: '\.\./outside\.png' is "
                                        rf"{outside}; record 3: '{outside}' is {outside}; record 4: 'link\.png' is "
                                        rf"{outside}; refused unless you pass --allow-external-files"):
        run(cfg)
    assert not cfg.out.exists()
    assert run(replace(cfg, allow_external_files=True)).steps == 1


def test_a_decompression_bomb_is_refused_naming_the_record_and_the_limit(checkpoint, clip, images, tmp_path,
                                                                        monkeypatch):
    """An image over Pillow's pixel limit once gave a traceback (or a warning, then the whole decode)."""
    from PIL import Image

    from llama_adapter_triton.model.visual import ImageError, read_image

    root = images["red"].parent
    data = tmp_path / "mm.json"
    data.write_text(json.dumps(mm_records(images, root)[:3]))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the images have 48 x 40 = 1920
    with pytest.raises(DataError, match=r"record 0: image '.*red\.png' has 48 x 40 pixels, more than the limit of "
                                        r"1,000 \(PIL\.Image\.MAX_IMAGE_PIXELS\): a decompression bomb"):
        run(ft_config(checkpoint, data, tmp_path / "out", clip, image_root=root, eval_size=0))
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # more than twice the limit: Pillow refuses it itself
    with pytest.raises(ImageError, match=r"has more pixels than twice the limit of 500"):
        read_image(images["red"])
