"""Two CPU processes (torchrun, gloo): both ranks train on their own shards, rank 0 alone writes the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny_run import FAST, subprocess_env, train_rows_file


@pytest.mark.slow
def test_torchrun_two_processes_share_the_work_and_rank0_writes(tmp_path):
    from qwen_cls.model_builds.tiny import build_tiny_model

    build_tiny_model()
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qwen_cls", "train", "--train", str(train_rows_file(tmp_path)), "--out", str(out),
           "--max-steps", "3", "--save-steps", "2", *FAST]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = {r: json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert sorted(p.name for p in (out / "ranks").iterdir()) == ["rank0.json", "rank1.json"]
    for r, info in ranks.items():
        assert info["rank"] == r and info["world_size"] == 2
        assert info["batches"] == 3 and info["rows"] == 3 * 2  # 3 steps x 1 batch of 2 rows, on each rank
        assert info["global_step"] == 3
    assert ranks[0]["wrote"] == ["adapter", "run_config.json", "train_log.json"]
    assert ranks[1]["wrote"] == []
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "run_config.json").read_text())
    assert config["training"]["world_size"] == 2 and config["base_model"] == "tiny"
    # one RNG state per rank in the checkpoint: the run can resume with the same two processes
    ckpt = out / "checkpoints" / "checkpoint-3"
    assert sorted(p.name for p in ckpt.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    # the training loss is gathered over both ranks (DDP), so both report the same number
    assert ranks[0]["train_loss"] == ranks[1]["train_loss"]


def test_launch_configs_are_consistent():
    import yaml

    root = Path(__file__).resolve().parents[1] / "configs"
    ds = json.loads((root / "deepspeed_zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    # batch sizes and accumulation come from the trainer's arguments, never fixed twice
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert ds[key] == "auto"
    zero2 = yaml.safe_load((root / "accelerate_deepspeed_zero2.yaml").read_text())
    assert zero2["distributed_type"] == "DEEPSPEED"
    assert (root.parent / zero2["deepspeed_config"]["deepspeed_config_file"]).resolve() == \
        (root / "deepspeed_zero2.json").resolve()
    ddp = yaml.safe_load((root / "accelerate_ddp.yaml").read_text())
    assert ddp["distributed_type"] == "MULTI_GPU" and ddp["num_processes"] >= 2
