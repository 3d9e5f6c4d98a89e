"""The blog's recipe, as numbers, defined once: LoRA r=8 / alpha=32 / dropout 0.1 on the seven projections,
lr 1e-4, batch 4 x accumulation 4, 2 epochs, MAX_LENGTH 384, gradient checkpointing. Profiles, ``qwen-cls
train``'s defaults, the LoRA config and the benchmarks read them from here.

Plumbing under: 00, 02, 03, 04, 05, 06, 07 (its numbers are taught where 03 writes them out)
"""

from __future__ import annotations

RECIPE = dict(
    max_length=384,
    lora_r=8,
    lora_alpha=32,
    lora_dropout=0.1,
    learning_rate=1e-4,
    num_train_epochs=2,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=4,
    gradient_checkpointing=True,
    logging_steps=10,
    seed=42,
)
MAX_LENGTH = RECIPE["max_length"]
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The ``precision`` parameter (qwen_cls.model.pick_dtype): "auto" = bfloat16 where the hardware computes it
# natively (a CUDA card with bf16, a CPU with AMX or AVX-512 BF16), float32 elsewhere.
PRECISIONS = ("auto", "float32", "bfloat16")
