"""The ``precision`` parameter: bfloat16 where the CPU (or GPU) computes it natively, float32 elsewhere; a run
records the dtype it trained in and notebooks 04-06 load it in that dtype (``predict`` and ``serve`` stay
float32 on a CPU); exports merge in float32; 06's head stays float32 beside a bfloat16 body."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_cls import model as M
from qwen_cls.run_record import run_precision

pytestmark = pytest.mark.filterwarnings("ignore")

CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {name}
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw {extra}
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw {extra}
"""


@pytest.mark.parametrize("name, extra, native", [
    ("AMD EPYC (Zen 4)", "avx512_vnni avx512_bf16", True),
    ("Intel Xeon (Sapphire Rapids)", "amx_tile amx_int8 amx_bf16", True),
    ("Intel Xeon (Skylake)", "avx512_vnni", False),  # AVX-512 without BF16: bfloat16 would be emulated
    ("Intel Xeon", "avx512_bf16_emulated", False),  # a flag is matched whole, not by prefix
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, name, extra, native):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(vendor="x", name=name, extra=extra))
    assert M.cpu_has_native_bf16(info) is native


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert M.cpu_has_native_bf16(tmp_path / "absent") is False  # another OS: float32, never emulated bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_pick_dtype_auto_follows_the_cpu_and_the_default_stays_float32(monkeypatch, native):
    monkeypatch.setattr(M, "cpu_has_native_bf16", lambda *a, **k: native)
    assert M.pick_dtype("cpu", "auto") == (torch.bfloat16 if native else torch.float32)
    assert M.pick_dtype("cpu") == torch.float32  # no precision: CPU float32, as before (tests, the CLI's train)
    assert M.pick_dtype("cpu", "float32") == torch.float32
    assert M.pick_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="choose one of auto, float32, bfloat16"):
        M.pick_dtype("cpu", "fp16")


def test_run_precision_maps_the_recorded_dtype():
    assert run_precision({"dtype": "bfloat16"}) == "auto"  # bfloat16 again only where it is native
    assert run_precision({"dtype": "float32"}) == "float32"
    assert run_precision({}) is None  # a run from before the key: the device's default


def test_run_config_records_the_training_dtype():
    from peft import LoraConfig
    from transformers import TrainingArguments

    from qwen_cls.run_record import run_config

    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj"])
    for bf16, expected in ((False, "float32"), (True, "bfloat16")):
        args = TrainingArguments(output_dir="unused", bf16=bf16, use_cpu=True, report_to="none")
        config = run_config(profile="tiny", base_model="tiny", max_length=64, lora_config=lora, args=args, seed=1,
                            gradient_checkpointing=False, train_rows=4)
        assert config["dtype"] == expected and config["training"]["bf16"] is bf16


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A 3-step tiny run whose run_config.json says it trained in bfloat16."""
    from _tiny_run import three_step_run

    out = three_step_run(tmp_path_factory.mktemp("runs"))
    (out / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "macro_f1": 0.5, "n_test": 2, "tiny_model": True}))
    config = json.loads((out / "run_config.json").read_text())
    (out / "run_config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    return out


@pytest.mark.parametrize("native", [True, False])
def test_a_bf16_run_loads_in_bf16_only_where_the_cpu_has_it_and_predict_stays_float32(bf16_run, monkeypatch, native):
    from qwen_cls.predict import load_run, run_dtype

    monkeypatch.setattr(M, "cpu_has_native_bf16", lambda *a, **k: native)
    expected = torch.bfloat16 if native else torch.float32
    assert run_dtype(bf16_run, "cpu") == expected
    model, _, _ = load_run(bf16_run, device="cpu", dtype=run_dtype(bf16_run, "cpu"))  # as notebooks 04-06 load it
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    body = [d for name, d in dtypes.items() if "lora_" not in name]
    assert set(body) == {expected}
    assert {d for name, d in dtypes.items() if "lora_" in name} == {expected}  # the adapter in the body's dtype
    served, _, _ = load_run(bf16_run, device="cpu")  # predict and serve: float32, batching cannot move the numbers
    assert {p.dtype for p in served.parameters()} == {torch.float32}


def test_export_of_a_bf16_run_merges_in_float32(bf16_run, tmp_path, monkeypatch):
    from safetensors import safe_open

    from qwen_cls.commands.cli import main

    monkeypatch.setattr(M, "cpu_has_native_bf16", lambda *a, **k: True)
    assert main(["export", "--run", str(bf16_run), "--out", str(tmp_path / "merged")]) == 0
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert json.loads((tmp_path / "merged" / "run_config.json").read_text())["dtype"] == "float32"


def test_seq_cls_head_stays_float32_beside_a_bf16_body_and_reloads_the_same(tiny_dir, tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model

    from qwen_cls.approaches import SEQ_CLS_HEAD, load_seq_cls, load_seq_cls_base, save_seq_cls, seq_cls_scores

    rows = [{"text": "火箭发射成功。", "category": ["Space", "Sports"]},
            {"text": "球队赢得冠军。", "category": ["Sports", "Space", "Art"]}]
    labels = ["Art", "Space", "Sports"]
    torch.manual_seed(0)
    model, tokenizer = load_seq_cls_base(str(tiny_dir), labels, device="cpu", dtype=torch.bfloat16)
    assert getattr(model, SEQ_CLS_HEAD).weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["q_proj"], r=2,
                                             modules_to_save=[SEQ_CLS_HEAD]))
    scored = seq_cls_scores(model, tokenizer, rows, labels, max_length=16)  # autocast: no dtype clash
    assert [set(s.scores) for s in scored] == [set(r["category"]) for r in rows]
    assert all(s.prediction in r["category"] for s, r in zip(scored, rows))
    folder = save_seq_cls(model, tokenizer, tmp_path / "seq", base_model=str(tiny_dir), labels=labels,
                          max_length=16)
    assert json.loads((folder / "seq_cls.json").read_text())["dtype"] == "bfloat16"
    reloaded, _, _, _ = load_seq_cls(folder, device="cpu", dtype=torch.bfloat16)
    again = seq_cls_scores(reloaded, tokenizer, rows, labels, max_length=16)
    assert [s.prediction for s in again] == [s.prediction for s in scored]
    assert all(a.scores[c] == b.scores[c] for a, b in zip(scored, again) for c in a.scores)


def test_float32_profile_for_the_tests_auto_for_the_real_models():
    from qwen_cls.profiles import PROFILES, SCHEMA

    assert PROFILES["tiny"]["precision"] == "float32"
    assert PROFILES["gemma3-270m"]["precision"] == "auto" and PROFILES["qwen2-0.5b"]["precision"] == "auto"
    assert SCHEMA["precision"].accepts("bfloat16") and not SCHEMA["precision"].accepts("fp16")


def test_step_progress_counts_optimizer_steps_and_shows_the_last_loss(capsys):
    from types import SimpleNamespace

    from qwen_cls.train import StepProgress

    progress = StepProgress("train")
    state = SimpleNamespace(is_world_process_zero=True, max_steps=4, global_step=0)
    progress.on_train_begin(None, state, None)
    bar = progress.bar
    for step, loss in ((1, None), (2, 1.25), (4, 0.5)):
        state.global_step = step
        progress.on_step_end(None, state, None)
        if loss is not None:
            progress.on_log(None, state, None, logs={"loss": loss})
    progress.on_log(None, state, None, logs={"eval_accuracy": 0.7})  # not a loss: the postfix keeps 0.500
    assert bar.n == 4 and bar.postfix == "loss=0.500"
    progress.on_train_end(None, state, None)
    assert progress.bar is None
    assert "4/4" in capsys.readouterr().err


def test_step_progress_is_silent_on_other_ranks():
    from types import SimpleNamespace

    from qwen_cls.train import StepProgress

    progress = StepProgress()
    state = SimpleNamespace(is_world_process_zero=False, max_steps=4, global_step=0)
    progress.on_train_begin(None, state, None)
    state.global_step = 2
    progress.on_step_end(None, state, None)
    progress.on_train_end(None, state, None)
    assert progress.bar is None


def test_epoch_line_prints_eval_logs_with_the_latest_loss_and_show_progress_replaces_the_printer(capsys, tmp_path):
    from types import SimpleNamespace

    from transformers import PrinterCallback, Trainer, TrainingArguments

    from qwen_cls.train import EpochLine, StepProgress, show_progress

    line = EpochLine(chance=0.25)
    args = SimpleNamespace(num_train_epochs=2)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=6, epoch=0.0, log_history=[])
    line.on_log(args, state, None, logs={"eval_accuracy": 0.3, "eval_macro_f1": 0.2})
    state.global_step, state.epoch, state.log_history = 3, 1.0, [{"loss": 2.5}, {"loss": 1.25}]
    line.on_log(args, state, None, logs={"loss": 1.25})  # a loss alone: no line
    line.on_log(args, state, None, logs={"eval_accuracy": 0.75, "eval_macro_f1": 0.5})
    assert capsys.readouterr().out.splitlines() == [
        "训练前 (before training), step 0/6: 还没有 loss, eval_accuracy 0.300 (chance 0.250), eval_macro_f1 0.200",
        "epoch 1/2, step 3/6: loss 1.250, eval_accuracy 0.750 (chance 0.250), eval_macro_f1 0.500"]

    model = torch.nn.Linear(2, 2)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, use_cpu=True,
                                                          report_to="none"))
    assert any(isinstance(c, PrinterCallback) for c in trainer.callback_handler.callbacks)
    assert show_progress(trainer, chance=0.5) is trainer
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert PrinterCallback not in kinds and EpochLine in kinds and StepProgress in kinds
    assert next(c for c in trainer.callback_handler.callbacks if isinstance(c, EpochLine)).chance == 0.5
