"""Prompt templates: the Alpaca template, as the official LLaMA-Adapter fine-tuning scripts (v1 and the V2
multi-modal one) use it, and the official V2 chat model's conversation template.

One place for training (train/data.py) and generation (model/generate.py): the model must be asked in exactly the
format it was trained on.

- "alpaca": there is no newline after "### Response:"; the response follows it directly. The official V2
  multi-modal code (llama_adapter_v2_multimodal7b/data/dataset.py) uses it for every kind of its data: instruction
  records; image-text pairs, as the instruction CAPTION_INSTRUCTION with the caption as the response; and LLaVA-style
  image conversations, as their first exchange (the human turn the instruction, the reply the response).
- "model": the checkpoint's own chat template (tokenizer_config.json's chat_template), rendered by model/chat.py
  from messages; train/data.py turns every record into messages for it (an instruction: the user's message, the
  input on a new line, and the reply), and messages records always use it.
- "chat": llama_adapter_v2_chat65b's conversation template (conversation.py's "v1", conv_v1_2), without the
  example exchange its demo puts first: the system line, then "###Human: ...###Assistant: ...###" turns, the open
  turn "###Assistant:". A conversation is learned turn by turn: each reply with the exchanges before it.
"""

from __future__ import annotations

from collections.abc import Sequence

CHAT_TEMPLATE = "model"  # the checkpoint's own chat template (model/chat.py), for messages
TEMPLATES = ("alpaca", "chat", CHAT_TEMPLATE)

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
CAPTION_INSTRUCTION = "Generate caption of this image"  # the official V2 code's image-text pairs (PretrainDataset)
CHAT_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CHAT_SEP = "###"
CHAT_ROLES = ("Human", "Assistant")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The prompt for one example; an empty or whitespace-only input uses the template without input."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def user_message(instruction: str, input: str = "") -> str:
    """An instruction as one message of a chat: the instruction, and its input (if not blank) on a new line."""
    return f"{instruction}\n{input}" if input and input.strip() else instruction


def chat_prompt(message: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The official V2 chat template up to the assistant's open turn: the system line, the earlier (human,
    assistant) exchanges, then the human's message; the reply follows "Assistant:" directly."""
    human, assistant = CHAT_ROLES
    text = CHAT_SYSTEM + CHAT_SEP
    for question, answer in history:
        text += f"{human}: {question}{CHAT_SEP}{assistant}: {answer}{CHAT_SEP}"
    return text + f"{human}: {message}{CHAT_SEP}{assistant}:"


def format_prompt(template: str, instruction: str, input: str = "", history: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt in a template of TEMPLATES; with "chat" an input is added to the message on a new line."""
    if template == "alpaca":
        if history:
            raise ValueError("the alpaca template has no earlier turns (history); use template='chat'")
        return alpaca_prompt(instruction, input)
    if template == "chat":
        return chat_prompt(user_message(instruction, input), history)
    if template == CHAT_TEMPLATE:
        raise ValueError(f"the {CHAT_TEMPLATE!r} template is the checkpoint's chat template: it renders messages "
                         "(model/chat.py), not a prompt string")
    raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
