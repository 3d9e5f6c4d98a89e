"""qwen-cls: the helper library behind the notebooks (LoRA fine-tuning of Qwen2 as a text classifier)."""

__version__ = "0.1.0"
