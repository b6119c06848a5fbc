"""model/chat.py against hostile and broken chat templates (issue 21): the rendering budget, one-line errors naming
the template, control tokens made by a template from data; Mistral-Nemo-style templates and linear encoding."""

from __future__ import annotations

import time

import pytest
from test_chat import CONVERSATION, chat_folder, hf_ids  # noqa: F401 - chat_folder: the fixture

from llama_adapter_triton import CheckpointError, Tokenizer
from llama_adapter_triton.model.chat import ChatTemplate, encode_chat, encode_chat_prompt

HOSTILE = {  # the templates, and the other ways to make gigabytes from a few characters
    "nested range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested range, kept": "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
    "repetition": "{{ 'x' * 10**9 }}",
    "format width": "{{ '{:>1000000000}'.format(messages[0]['content']) }}",
    "nested format width": "{{ '{:>{w}}'.format('x', w=10**9) }}",
    "% width": "{{ '%1000000000s' % 'x' }}",
    "center": "{{ messages[0]['content'] | center(10**9) }}",
    "ljust": "{{ 'x'.ljust(10**9) }}",
    "power": "{{ 7 ** 100000000 }}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "list of references": "{% set s = 'x' * 1000000 %}{{ [s] * 1000 }}",
    "join": "{{ ('y' * 100000).join(range(100000) | map('string')) }}",
    "to_bytes": "{{ (1).to_bytes(10**9, 'big') }}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_templates_fail_fast_within_the_budget(name):
    template = ChatTemplate(HOSTILE[name], origin=f"{name}.jinja")
    started = time.perf_counter()
    with pytest.raises(ValueError) as e:
        template.render([("user", "hi")])
    assert time.perf_counter() - started < 1.0
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"the chat template of {name}.jinja exceeds its rendering budget")
    assert "--chat-max-seconds" in message


def test_the_budget_is_stated_and_overridable():
    from llama_adapter_triton.model.generate import parse_args

    source = "{% for i in range(300) %}{{ messages[0]['content'] }}{% endfor %}"
    assert len(ChatTemplate(source).render([("user", "0123456789")])) == 3000  # the default budget
    with pytest.raises(ValueError, match=r"exceeds its rendering budget: its output passes 2000 characters"):
        ChatTemplate(source, max_chars=2000).render([("user", "0123456789")])
    slow = ChatTemplate(HOSTILE["nested range"], max_seconds=0.05, max_chars=10**12)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"it runs longer than 0.05 s"):
        slow.render([("user", "hi")])
    assert time.perf_counter() - started < 0.5
    with pytest.raises(ValueError, match=r"max_chars must be an integer >= 1"):
        ChatTemplate(source, max_chars=0)
    args = parse_args(["--checkpoint", "x", "--chat", "--chat-max-seconds", "0.5", "--chat-max-chars", "100"])
    assert (args.chat_max_seconds, args.chat_max_chars) == (0.5, 100)
    with pytest.raises(SystemExit):
        parse_args(["--checkpoint", "x", "--chat", "--chat-max-seconds", "-1"])


BROKEN = {  # the template's own failures: each a ValueError of one line naming its file and what went wrong
    "{{ 1 / 0 }}": "ZeroDivisionError",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}": "RecursionError",
    "{% include 'other.jinja' %}": "TypeError",
    "{{ messages + 1 }}": "TypeError",
    "{{ 2.0 ** 100000 }}": "OverflowError",
    "{{ '{0} {1}'.format('a') }}": "IndexError",
}


@pytest.mark.parametrize("source", sorted(BROKEN))
def test_template_errors_are_one_line_naming_the_file(tmp_path, source):
    path = tmp_path / "broken.jinja"
    path.write_text(source)
    template = ChatTemplate.from_file(path)
    with pytest.raises(ValueError) as e:
        template.render([("user", "hi")])
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"the chat template of {path} fails on this conversation: {BROKEN[source]}")


def test_unreadable_and_empty_templates_are_named(tmp_path, chat_folder):  # noqa: F811
    from llama_adapter_triton.train.data import DataError, parse_records, tokenize_records

    (tmp_path / "latin1.jinja").write_bytes("{{ 'café' }}".encode("latin-1"))
    with pytest.raises(CheckpointError, match=r"latin1\.jinja: a chat template must be UTF-8 text; byte 7 is not"):
        ChatTemplate.from_file(tmp_path / "latin1.jinja")
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    records, _ = parse_records([{"messages": conversation}])
    empty = ChatTemplate("{% if false %}x{% endif %}", origin="empty.jinja")
    with pytest.raises(DataError, match=r"record 0: field 'messages' the chat template of empty\.jinja renders this "
                                        r"conversation as an empty string"):
        tokenize_records(records, Tokenizer(chat_folder), chat_template=empty)


def test_control_tokens_made_by_the_template_are_refused(chat_folder):  # noqa: F811
    tok = Tokenizer(chat_folder)
    joined = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}", origin="joined.jinja")
    lowered = ChatTemplate("{% for m in messages %}{{ m['content'] | lower }}{{ eos_token }}{% endfor %}",
                           origin="lowered.jinja")
    for template, messages in ((joined, [("user", "hello <"), ("assistant", "/s> world")]),
                               (lowered, [("user", "Stop </S> now"), ("assistant", "ok")])):
        with pytest.raises(ValueError, match=rf"the chat template of {template.origin} renders this conversation "
                                             r"with the special token '</s>' more often than the template writes"):
            encode_chat(template, tok, messages)
        with pytest.raises(ValueError, match=r"which would make data a control token"):
            encode_chat_prompt(template, tok, messages[:1] + [("user", messages[1][1])])
    assert encode_chat(lowered, tok, [("user", "Stop now"), ("assistant", "ok")])[0][-1] == tok.eos_id


# a template that writes the system message only into the user turn that ends the conversation, as Mistral-Nemo's
# does: the conversation's beginning is not rendered as the beginning of the whole
LAST_TURN_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}{%- for m in turns %}{%- if m['role'] == 'user' %}"
    "{%- if loop.last and system is defined %}{{- '[INST]' + system + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif m['role'] == 'assistant' %}{{- m['content'] + eos_token }}{%- endif %}{%- endfor %}"
)


def test_a_template_writing_the_system_message_into_the_last_turn(tmp_path, chat_folder):  # noqa: F811
    import json
    import shutil

    if Tokenizer(chat_folder).bos_token != "<s>":
        pytest.skip("one tokenizer does")
    folder = tmp_path / "nemo"
    shutil.copytree(chat_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LAST_TURN_SYSTEM}))
    template, tok = ChatTemplate.find(folder), Tokenizer(folder)
    for messages in (CONVERSATION, CONVERSATION[:4]):  # ending with the assistant, or with a user turn
        ids, targets = encode_chat(template, tok, messages)
        assert ids == hf_ids(folder, messages)
        runs = "".join("1" if t else "0" for t in targets).split("0")
        spans, start = [], None
        for i, t in enumerate([*targets, False]):
            if t and start is None:
                start = i
            elif not t and start is not None:
                spans.append(ids[start:i])
                start = None
        answers = [c.strip() for r, c in messages if r == "assistant"]
        assert [tok.decode(s).strip() for s in spans] == answers and all(s[-1] == tok.eos_id for s in spans), runs
    prompt = CONVERSATION[:4]
    assert encode_chat_prompt(template, tok, prompt) == hf_ids(folder, prompt, add_generation_prompt=True)


def test_encoding_is_linear_in_turns(chat_folder):  # noqa: F811
    """A long conversation is rendered a few times and tokenized about once, not once per turn."""
    template, tok = ChatTemplate.find(chat_folder), Tokenizer(chat_folder)
    messages = [("user", f"Question {i}?") if i % 2 == 0 else ("assistant", f"Answer {i}.") for i in range(400)]
    renders, encoded = [], []
    render, encode = ChatTemplate.render, tok.encode

    def counting_render(self, *args, **kwargs):
        renders.append(1)
        return render(self, *args, **kwargs)

    def counting_encode(text, **kwargs):
        encoded.append(len(text))
        return encode(text, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(ChatTemplate, "render", counting_render)
        m.setattr(tok, "encode", counting_encode)
        ids, targets = encode_chat(template, tok, messages)
    text = template.for_tokenizer(tok).render(messages)
    assert len(renders) <= 3 and sum(encoded) <= 4 * len(text)
    assert sum(targets) > 200 * len(tok.encode("Answer 1.", bos=False))


def test_on_bad_record_skip_leaves_out_bad_conversations(chat_folder):  # noqa: F811
    from llama_adapter_triton.train.data import DataError, parse_records, tokenize_records

    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    bad = [{"role": "user", "content": "q </s>"}, {"role": "assistant", "content": "a"}]
    records, _ = parse_records([{"messages": good}, {"messages": bad}, {"messages": good}])
    tok, template = Tokenizer(chat_folder), ChatTemplate.find(chat_folder)
    with pytest.raises(DataError, match=r"(?s)record 1: .*special token '</s>'.*pass on_bad_record='skip'"):
        tokenize_records(records, tok, chat_template=template)
    data, report = tokenize_records(records, tok, chat_template=template, on_bad_record="skip")
    assert data.source_index.tolist() == [0, 2] and report.skipped == [1]
    assert "skipped 1 conversation(s)" in report.summary()
