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
