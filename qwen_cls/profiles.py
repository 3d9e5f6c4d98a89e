"""Parameter sets for the notebook chain: ``tiny`` (offline mechanics) and ``qwen2-0.5b`` (the recipe).

Keys are the notebooks' ``parameters`` cells; each notebook receives the keys it declares. Paths are
relative to the ``notebooks/`` folder (the notebooks' working directory); ``qwen-cls run`` makes them
absolute.
"""

from __future__ import annotations

# The recipe from the blog: LoRA r=8/alpha=32/dropout 0.1, lr 1e-4, batch 4 x accumulation 4, 2 epochs.
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

PROFILES: dict[str, dict] = {
    # Offline: bundled sample, tiny random Qwen2, minutes on a 2-core CPU. Mechanics only, not results.
    "tiny": {
        **RECIPE,
        "profile": "tiny",
        "base_model": "tiny",
        "train_path": "../data/sample/train.jsonl",
        "test_path": "../data/sample/test.jsonl",
        "download_data": False,
        "max_train_samples": 0,
        "max_test_samples": 0,
        # A random tiny model needs big steps to move its answer loss visibly in a few dozen updates.
        "learning_rate": 5e-3,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,  # a tiny model needs no memory saving; skip the recompute on CPU
        "logging_steps": 2,
        "swanlab_mode": None,  # tracking.default_mode(): local with the dashboard package, else offline
        "eval_rows": 0,  # test rows 03 scores after each epoch (0: all 30)
        "eval_batch_size": 8,
        "max_new_tokens": 6,
        "out_dir": "../runs/notebooks",
    },
    # The real model and dataset from ModelScope with the recipe's hyperparameters (a GPU is advisable).
    "qwen2-0.5b": {
        **RECIPE,
        "profile": "qwen2-0.5b",
        "base_model": "qwen/Qwen2-0.5B",
        "train_path": "../data/fudan-news/train.jsonl",
        "test_path": "../data/fudan-news/test.jsonl",
        "download_data": True,
        "max_train_samples": 0,
        "max_test_samples": 0,
        "swanlab_mode": None,  # as above
        "eval_rows": 200,  # per-epoch monitoring in 03 on a slice; 04 evaluates the whole test split
        "eval_batch_size": 8,
        "max_new_tokens": 8,
        "out_dir": "../runs/qwen2-0.5b",
    },
}

DEFAULT_PROFILE = "tiny"


def profile_parameters(name: str) -> dict:
    """A copy of the named profile's parameters; ``ValueError`` naming the profiles otherwise."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    params = dict(PROFILES[name])
    if params.get("swanlab_mode") is None:
        from .tracking import default_mode  # $QWEN_CLS_SWANLAB_MODE, else local/offline as installed

        params["swanlab_mode"] = default_mode()
    return params


def is_path_key(key: str) -> bool:
    """Parameters holding a file or folder path (made absolute by ``qwen-cls run``)."""
    return key.endswith(("_path", "_dir"))
