"""The one prompt: chat messages for training and inference alike, rendered by each model family's template.

A :class:`ChatFamily` holds what differs between model families: the chat template that renders the
messages (Qwen2's ChatML, Gemma 3's turns) and the token that ends the assistant's answer.

Taught in: 01, 02, 05
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SYSTEM_PROMPT = "你是一个文本分类领域的专家，你会接收到一段文本和几个潜在的分类选项列表，请输出文本内容的正确分类"

# Qwen2's plain ChatML template (as shipped with Qwen2-0.5B); the tiny model's tokenizer gets it too.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma 3's template, verbatim from google/gemma-3-*-it: no system role, the system text opens the first
# user turn (followed by a blank line); every message is trimmed; the assistant's role is called "model".
GEMMA3_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


@dataclass(frozen=True)
class ChatFamily:
    """What a model family's prompt needs: its chat template and the token that ends the answer."""

    name: str
    chat_template: str
    end_of_turn: str
    stop_tokens: tuple[str, ...]  # where free generation stops: the end of turn, then end of text
    model_types: tuple[str, ...]  # ``config.model_type`` values of the family


QWEN2_FAMILY = ChatFamily("qwen2", QWEN2_CHAT_TEMPLATE, "<|im_end|>", ("<|im_end|>", "<|endoftext|>"), ("qwen2",))
GEMMA_FAMILY = ChatFamily("gemma3", GEMMA3_CHAT_TEMPLATE, "<end_of_turn>", ("<end_of_turn>", "<eos>"),
                          ("gemma3", "gemma3_text"))
CHAT_FAMILIES = (QWEN2_FAMILY, GEMMA_FAMILY)

# Every special token of the families' tokenizers (Qwen2 / Qwen2.5: ``<|im_end|>``, ``<|endoftext|>``, ``<|fim_pad|>``,
# ...; Gemma 3: ``<start_of_turn>``, ``<end_of_turn>``, ``<bos>``, ``<eos>``, ``<pad>``, ``<unk>``, ``<mask>``,
# ``<unusedN>``, the image markers). A tokenizer turns such a string inside a text into the control token itself,
# not into its characters: a text holding ``<|im_end|>`` would end the user's turn in the middle of the prompt.
# ``tests/test_prompt_tokenize.py`` checks that this matches every special token of the three offline tokenizers.
CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>|<(?:pad|eos|bos|unk|mask|unused\d+|start_of_turn|end_of_turn|"
                           r"start_of_image|end_of_image|image_soft_token)>")


def control_tokens(text: str) -> list[str]:
    """The chat families' special tokens (:data:`CONTROL_TOKEN`) written in ``text``, in order, each once."""
    return list(dict.fromkeys(CONTROL_TOKEN.findall(text)))


END_OF_TURN = QWEN2_FAMILY.end_of_turn  # Qwen2's; other families: ``chat_family(tokenizer).end_of_turn``


def chat_family(tokenizer_or_config) -> ChatFamily:
    """The family of a tokenizer (by its end-of-turn token), a model config (by ``model_type``) or a name."""
    model_type = getattr(tokenizer_or_config, "model_type", tokenizer_or_config)
    if isinstance(model_type, str):
        for family in CHAT_FAMILIES:
            if model_type == family.name or model_type in family.model_types:
                return family
        raise ValueError(f"no chat family for model type {model_type!r}; known: "
                         f"{', '.join(t for f in CHAT_FAMILIES for t in f.model_types)}")
    tokenizer = tokenizer_or_config
    unknown = {None, tokenizer.unk_token_id}
    for family in CHAT_FAMILIES:
        if tokenizer.convert_tokens_to_ids(family.end_of_turn) not in unknown:
            return family
    raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')}: none of the end-of-turn tokens "
                     f"{[f.end_of_turn for f in CHAT_FAMILIES]} is in its vocabulary; add a ChatFamily to "
                     "qwen_cls.prompt.CHAT_FAMILIES")


def user_message(text: str, category: list[str]) -> str:
    """``文本:{text},分类选项列表:{category}``: the recipe's input, with Python's list repr."""
    return f"文本:{text},分类选项列表:{category}"


def build_messages(text: str, category: list[str], system: str = SYSTEM_PROMPT) -> list[dict]:
    """System + user messages; the assistant's answer is what the model learns to write."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user_message(text, category)},
    ]


def render_prompt(tokenizer, text: str, category: list[str], system: str = SYSTEM_PROMPT) -> str:
    """The prompt string up to the answer (``<|im_start|>assistant\\n``, ``<start_of_turn>model\\n``),
    rendered by the tokenizer's chat template."""
    return tokenizer.apply_chat_template(
        build_messages(text, category, system), tokenize=False, add_generation_prompt=True
    )


# --- RAG: retrieved labelled examples ahead of the query --------------------------------------------

EXAMPLE_CHARS = 120  # each retrieved example's text is cut to this many characters before it enters a prompt


def example_pair(example) -> tuple[str, str]:
    """``(text, label)`` of an example given as a dict ``{text, label}``, an object with those attributes, or a pair."""
    if isinstance(example, dict):
        return example["text"], example["label"]
    if hasattr(example, "text") and hasattr(example, "label"):
        return example.text, example.label
    text, label = example
    return text, label


def shorten_example(text: str, max_chars: int = EXAMPLE_CHARS) -> str:
    """The start of an example's text, whitespace collapsed, at most ``max_chars`` characters."""
    return " ".join(text.split())[:max_chars]


def rag_user_message(text: str, category: list[str], examples, example_chars: int = EXAMPLE_CHARS) -> str:
    """The retrieved examples (shortened text + label), then exactly the plain :func:`user_message`."""
    lines = ["以下是与待分类文本相似的已标注示例:"]
    for n, example in enumerate(examples, 1):
        ex_text, label = example_pair(example)
        lines.append(f"示例{n} 文本:{shorten_example(ex_text, example_chars)},分类:{label}")
    lines.append("请对下面的文本分类。")
    lines.append(user_message(text, category))
    return "\n".join(lines)


def build_rag_messages(text: str, category: list[str], examples, system: str = SYSTEM_PROMPT,
                       example_chars: int = EXAMPLE_CHARS) -> list[dict]:
    """The same system message as :func:`build_messages`; the user message carries the examples first."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": rag_user_message(text, category, examples, example_chars)},
    ]


def render_rag_prompt(tokenizer, text: str, category: list[str], examples, system: str = SYSTEM_PROMPT,
                      example_chars: int = EXAMPLE_CHARS) -> str:
    """:func:`render_prompt` for the RAG messages (with no examples it is exactly :func:`render_prompt`)."""
    if not examples:
        return render_prompt(tokenizer, text, category, system)
    return tokenizer.apply_chat_template(
        build_rag_messages(text, category, examples, system, example_chars), tokenize=False,
        add_generation_prompt=True,
    )
