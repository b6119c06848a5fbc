"""model/chat.py: chat templates rendered as transformers renders them, ids equal to apply_chat_template's, the
assistant turns as targets; a tokenizer.json built here that both transformers and model.Tokenizer read."""

from __future__ import annotations

import json

import pytest
import tokenizers

from llama_adapter_triton import CheckpointError, Tokenizer
from llama_adapter_triton.model.chat import ChatTemplate, encode_chat

# the public templates, as their tokenizer_config.json files hold them
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL = ["<s>", "</s>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>"]
TEXT = ["You are a helpful assistant. Answer in one sentence.", "What is the capital of Peru?",
        "Lima is the capital of Peru.", "And of Chile?", "Santiago. [INST] <<SYS>> [/INST] system user assistant",
        "Alpacas graze in the Andes; llamas carry loads."] * 10
CONVERSATION = [("system", "You are a helpful assistant."), ("user", "What is the capital of Peru?"),
                ("assistant", "Lima is the capital of Peru."), ("user", " And of Chile? "),
                ("assistant", "Santiago.\n")]
TEMPLATES = {"llama2": (LLAMA2_CHAT, "<s>", "</s>"), "llama3": (LLAMA3_INSTRUCT, "<|begin_of_text|>", "<|eot_id|>")}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def chat_folder(request, tmp_path_factory):
    """A tokenizer.json (byte-level BPE with both families' special tokens) and a tokenizer_config.json holding the
    template, as a checkpoint folder has them."""
    source, bos, eos = TEMPLATES[request.param]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(TEXT, tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp(request.param)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "chat_template": source,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def hf_ids(folder, messages, **kwargs) -> list[int]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    out = hf.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def test_ids_equal_transformers_apply_chat_template(chat_folder):
    template, tok = ChatTemplate.find(chat_folder), Tokenizer(chat_folder)
    for messages in (CONVERSATION, CONVERSATION[1:3]):
        ids, targets = encode_chat(template, tok, messages)
        assert ids == hf_ids(chat_folder, messages)
        prompt = messages[:-1]
        assert tok.encode(template.render(prompt, add_generation_prompt=True), bos=False, special=True) == \
            hf_ids(chat_folder, prompt, add_generation_prompt=True)


def test_targets_are_every_assistant_turn(chat_folder):
    template, tok = ChatTemplate.find(chat_folder), Tokenizer(chat_folder)
    ids, targets = encode_chat(template, tok, CONVERSATION)
    runs, start = [], None  # the runs of targets: one per assistant turn
    for i, t in enumerate([*targets, False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            runs.append(ids[start:i])
            start = None
    assert len(runs) == 2
    end_of_turn = tok.eos_id if "<s>" == template.bos_token else tok.encode("<|eot_id|>", bos=False, special=True)[0]
    for run, answer in zip(runs, ("Lima is the capital of Peru.", "Santiago."), strict=True):
        assert run[-1] == end_of_turn  # the model learns to end its turn
        assert tok.decode(run).strip() == answer  # the turn's content, and nothing of the prompt
    assert ids[0] == tok.bos_id and not targets[0]


def test_template_files_and_errors(tmp_path, chat_folder):
    source = ChatTemplate.find(chat_folder).source
    config = json.loads((chat_folder / "tokenizer_config.json").read_text())
    # a list of named templates: "default" is taken
    config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"},
                               {"name": "default", "template": source}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.from_file(tmp_path / "tokenizer_config.json").source == source
    # chat_template.jinja beside it comes first (transformers' newer save format)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                                                  "{% endfor %}")
    template = ChatTemplate.from_file(tmp_path)
    assert template.render([("user", "hi")]) == config["bos_token"] + "hi"
    del config["chat_template"]
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.find(tmp_path) is None
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: no chat template|: no chat template"):
        ChatTemplate.from_file(tmp_path)
    config["chat_template"] = [{"name": "rag", "template": "x"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"named templates \(rag\) without a \"default\" one"):
        ChatTemplate.find(tmp_path)
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(CheckpointError, match=r"bad\.jinja: the chat template is not valid jinja2"):
        ChatTemplate.from_file(tmp_path / "bad.jinja")


def test_conversation_errors_name_the_message(chat_folder):
    template, tok = ChatTemplate.find(chat_folder), Tokenizer(chat_folder)
    with pytest.raises(ValueError, match=r"message 2 \(assistant\): its content holds the tokenizer's special token "
                                         r"'</s>'"):
        encode_chat(template, tok, [("system", "s"), ("user", "q"), ("assistant", "a</s> more")])
    with pytest.raises(ValueError, match=r"message 0: role must be one of system, user, assistant, got 'bot'"):
        encode_chat(template, tok, [("bot", "q")])
    if template.bos_token == "<s>":  # Llama-2's template raises its own error: named, as a ValueError
        with pytest.raises(ValueError, match=r"refuses this conversation: Conversation roles must alternate"):
            template.render([("user", "a"), ("user", "b")])
    backwards = ChatTemplate("{% for m in messages | reverse %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match=r"message 1: the chat template of chat template .*; its assistant turns "
                                         r"cannot be found"):
        encode_chat(backwards, tok, [("user", "q"), ("assistant", "a")])
    # the sandbox: a template cannot reach Python's internals
    evil = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|access"):
        evil.render([("user", "x")])


def test_rendering_equals_transformers(chat_folder):
    """Whitespace control (trim_blocks, lstrip_blocks), loop controls, tojson, {% generation %}: as transformers."""
    from transformers import AutoTokenizer

    source = ("{% for m in messages %}\n  {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
              "    {% if m['role'] == 'assistant' %}\n{% generation %}A: {{ m['content'] }}{{ eos_token }}"
              "{% endgeneration %}\n    {% else %}\n{{ m['role'] | upper }} {{ m['content'] | tojson }}\n"
              "    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}")
    messages = [("system", "s"), ("user", "Où est Lima ?"), ("assistant", "Au Pérou."), ("user", "Et \"Quito\"?")]
    hf = AutoTokenizer.from_pretrained(str(chat_folder))
    template = ChatTemplate(source, bos_token=hf.bos_token, eos_token=hf.eos_token)
    for generation_prompt in (False, True):
        assert template.render(messages, add_generation_prompt=generation_prompt) == hf.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], chat_template=source, tokenize=False,
            add_generation_prompt=generation_prompt)


# ----------------------------------------------------------------------------------------------------------------
# Chat data (train/data.py): messages records through the model's chat template


def as_messages(conversation) -> list[dict]:
    return [{"role": r, "content": c} for r, c in conversation]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_messages_records_train_on_every_assistant_turn(tmp_path, chat_folder, suffix):
    from llama_adapter_triton.train.data import IGNORE_INDEX, Record, load_records, tokenize_records

    objects = [{"messages": as_messages(CONVERSATION)},
               {"instruction": "What is the capital of Peru?", "output": "Lima."},
               {"conversations": [{"from": "human", "value": "And of Chile?"}, {"from": "gpt", "value": "Santiago."}]}]
    path = tmp_path / f"chat{suffix}"
    path.write_text(json.dumps(objects) if suffix == ".json" else "\n".join(map(json.dumps, objects)))
    template, tok = ChatTemplate.find(chat_folder), Tokenizer(chat_folder)
    records, _ = load_records(path)  # the default template: Alpaca records as today, messages in the chat template
    assert records[0].messages == tuple(CONVERSATION) and records[1] == Record(
        "What is the capital of Peru?", "", "Lima.", 1)
    data, report = tokenize_records(records, tok, max_seq_len=512, chat_template=template)
    tokens, labels = (t.tolist() for t in data[0])
    assert tokens == hf_ids(chat_folder, CONVERSATION)  # apply_chat_template's ids
    _, targets = encode_chat(template, tok, CONVERSATION)
    assert labels == [tokens[t + 1] if targets[t + 1] else IGNORE_INDEX for t in range(len(tokens) - 1)] + \
        [IGNORE_INDEX]
    assert sum(targets) == int(data.num_targets[0]) > len(tok.encode("Santiago.", bos=False)) + 1  # both turns
    # --template model: every record in the chat template (an instruction as the user's message, ShareGPT too)
    records, _ = load_records(path, template="model")
    assert records[1].messages == (("user", "What is the capital of Peru?"), ("assistant", "Lima."))
    assert records[2].messages == (("user", "And of Chile?"), ("assistant", "Santiago."))
    data, _ = tokenize_records(records, tok, max_seq_len=512, chat_template=template)
    assert data[1][0].tolist() == hf_ids(chat_folder, records[1].messages)
    # truncation keeps the first turn's targets only
    cut = int(data.offsets[1]) - 3
    short, report = tokenize_records(records[:1], tok, max_seq_len=cut, chat_template=template)
    assert report.truncated == [0] and int(short.num_targets[0]) == sum(targets[1:cut])


def test_bad_messages_records_are_named(tmp_path, chat_folder):
    from llama_adapter_triton.train.data import DataError, load_records, parse_records, tokenize_records

    bad = [{"messages": []},
           {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
           {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]},
           {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
           {"messages": [{"role": "user", "content": "q"}]},
           {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
           {"messages": [{"role": "user", "content": "q"}], "instruction": "i"}]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(map(json.dumps, bad)))
    with pytest.raises(DataError) as e:
        load_records(path)
    assert [str(p) for p in e.value.problems] == [
        "record 0 (line 1): field 'messages' must be a non-empty list of messages",
        "record 1 (line 2): field 'messages' message 1 must be an object with a 'role' (system, user, assistant) and "
        "a non-empty 'content' string",
        "record 2 (line 3): field 'messages' message 1 is a system message: only the first message may be",
        "record 3 (line 4): field 'messages' must start with a user message (after an optional system message)",
        "record 4 (line 5): field 'messages' has no assistant message: nothing to learn",
        "record 5 (line 6): field 'messages' message 1 must be an object with a 'role' (system, user, assistant) and "
        "a non-empty 'content' string",
        "record 6 (line 7): has both 'instruction' and 'messages': a record is an instruction, an image caption or a "
        "conversation"]
    records, _ = parse_records([{"messages": as_messages(CONVERSATION[1:3])},
                                {"messages": [{"role": "user", "content": "Stop.</s>"},
                                              {"role": "assistant", "content": "<|eot_id|>"}]}])
    tok = Tokenizer(chat_folder)
    with pytest.raises(DataError, match=r"record 1: field 'messages' message 0 \(user\): its content holds the "
                                        r"tokenizer's special token '</s>'"):
        tokenize_records(records, tok, chat_template=ChatTemplate.find(chat_folder))
    with pytest.raises(DataError, match=r"record 0 is a conversation \(messages\) for the model's chat template, and "
                                        r"no chat_template was given"):
        tokenize_records(records, tok)
