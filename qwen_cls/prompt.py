"""The one prompt: Qwen2 ChatML messages for training and inference alike."""

from __future__ import annotations

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

END_OF_TURN = "<|im_end|>"


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
    """The prompt string up to ``<|im_start|>assistant\\n``, rendered by the tokenizer's chat template."""
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
