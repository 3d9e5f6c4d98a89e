"""SwanLab tracking: modes, the cloud credential check, the recorded config, and what a run writes.

Logs are read back from disk (the dashboard database ``runs.swanlab`` with sqlite3, the metric files,
``config.yaml``, the media files), and compared with the Trainer's own ``log_history``.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path

import pytest
import yaml
from PIL import Image

from qwen_cls import tracking
from qwen_cls.commands.cli import main as cli_main
from qwen_cls.serving import dashboard

ROWS = [
    {"text": "国足在世界杯预选赛中以二比零战胜对手", "category": ["Sports", "Military"], "output": "Sports"},
    {"text": "新型驱逐舰今日正式服役，海军实力增强", "category": ["Sports", "Military"], "output": "Military"},
    {"text": "美术馆举办现代油画展，吸引众多观众", "category": ["Art", "Space"], "output": "Art"},
    {"text": "火箭成功发射通信卫星进入预定轨道", "category": ["Art", "Space"], "output": "Space"},
] * 2


@pytest.fixture(autouse=True)
def no_active_run():
    """Every test starts and ends without an active SwanLab run."""
    tracking.finish()
    yield
    tracking.finish()


def experiments(log_dir: Path) -> dict[str, tuple[int, str]]:
    """name -> (experiment id, run folder) from the dashboard database."""
    with sqlite3.connect(log_dir / "runs.swanlab") as db:
        return {name: (eid, run_id) for eid, name, run_id in db.execute("select id, name, run_id from experiment")}


def metric(log_dir: Path, experiment: str, key: str) -> list[dict]:
    """The logged points of ``key`` ({index, data, ...}), read from the run's metric files."""
    eid, run_id = experiments(log_dir)[experiment]
    with sqlite3.connect(log_dir / "runs.swanlab") as db:
        (folder,) = db.execute("select folder from tag where experiment_id = ? and name = ?", (eid, key)).fetchone()
    points = []
    for part in sorted((log_dir / run_id / "logs" / folder).glob("*.log")):
        points += [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(points, key=lambda p: p["index"])


def recorded_config(log_dir: Path, run_id: str) -> dict:
    """``config.yaml`` of a run as {key: value}."""
    raw = yaml.safe_load((log_dir / run_id / "files" / "config.yaml").read_text(encoding="utf-8"))
    return {key: entry["value"] for key, entry in raw.items()}


# ------------------------------------------------------------------ modes


def test_modes_are_checked(monkeypatch):
    monkeypatch.delenv(tracking.MODE_ENV, raising=False)
    assert tracking.dashboard_available()  # swanlab[dashboard] is a dependency
    assert tracking.default_mode() == "local"
    monkeypatch.setenv(tracking.MODE_ENV, "offline")
    assert tracking.default_mode() == "offline"
    assert tracking.check_mode(None) == "offline"
    monkeypatch.setenv(tracking.MODE_ENV, "wandb")
    with pytest.raises(tracking.TrackingError, match="local, offline, disabled, cloud"):
        tracking.default_mode()
    with pytest.raises(ValueError, match="got 'online'"):
        tracking.check_mode("online")


def test_local_without_dashboard_package_says_what_to_do(monkeypatch):
    monkeypatch.setattr(tracking, "dashboard_available", lambda: False)
    monkeypatch.delenv(tracking.MODE_ENV, raising=False)
    assert tracking.default_mode() == "offline"
    with pytest.raises(tracking.TrackingError, match=r"pip install 'swanlab\[dashboard\]'.*'offline'"):
        tracking.check_mode("local")


def test_disabled_logs_nothing(tmp_path):
    assert tracking.swanlab_callbacks("disabled", tmp_path, {"profile": "tiny"}) == []
    assert tracking.log_evaluation({"accuracy": 1.0}, out_dir=tmp_path, mode="disabled") is False
    assert tracking.log_evaluation({"accuracy": 1.0}) is False  # no run, no out_dir
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def no_credentials(tmp_path, monkeypatch):
    """No API key anywhere swanlab looks: env, ./.env, ./.swanlab/.netrc, $SWANLAB_ROOT/.netrc."""
    for var in ("SWANLAB_API_KEY", "SWANLAB_ROOT", "SWANLAB_SAVE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "swanlab-root"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cloud_without_credentials_fails_early_naming_offline_choices(no_credentials):
    out = no_credentials / "run"
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.swanlab_callbacks("cloud", out, {"profile": "tiny"})
    message = str(caught.value)
    assert "SWANLAB_API_KEY" in message and "swanlab login" in message
    assert "swanlab_mode='local'" in message and "'offline'" in message and "'disabled'" in message
    assert not out.exists()  # failed before creating anything, and never prompted on stdin


def test_cloud_with_an_api_key_passes_the_check(no_credentials, monkeypatch):
    monkeypatch.setenv("SWANLAB_API_KEY", "k" * 21)
    assert tracking.check_mode("cloud") == "cloud"
    assert tracking.SWANLAB_MODE["cloud"] == "online"


def test_cloud_key_from_a_netrc_login_counts(no_credentials):
    root = no_credentials / "swanlab-root"
    root.mkdir()
    (root / ".netrc").write_text("machine https://api.swanlab.cn\n  login https://swanlab.cn\n  password abc123\n")
    assert tracking.cloud_api_key() == "abc123"


# ------------------------------------------------------------------ config


def test_experiment_config_is_plain_yaml():
    from transformers import TrainingArguments

    from qwen_cls.train import LORA_TARGET_MODULES, recipe_lora_config

    config = tracking.experiment_config(
        profile="tiny", base_model="tiny", lora=recipe_lora_config(),
        training=TrainingArguments(output_dir="unused", learning_rate=5e-3, report_to="none"),
        n_train=8, n_test=4, seed=42,
    )
    assert yaml.safe_load(yaml.safe_dump(config)) == config  # only builtins
    assert config["lora"]["r"] == 8 and config["lora"]["lora_alpha"] == 32
    assert config["lora"]["target_modules"] == sorted(LORA_TARGET_MODULES)
    assert config["lora"]["task_type"] == "CAUSAL_LM"
    assert config["training"]["learning_rate"] == 5e-3
    assert config["data"] == {"n_train": 8, "n_test": 4}
    assert config["seed"] == 42


def test_sample_text():
    row = {"text": "火箭" * 200, "category": ["Art", "Space"], "output": "Space", "prediction": "Art"}
    assert tracking.sample_text(row, max_chars=4) == (
        "input: 火箭火箭…\ncandidates: Art, Space\nprediction: Art\ntruth: Space (wrong)")


# ------------------------------------------------------------------ a real (tiny) training, logged locally


def confusion_png(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow([[1, 0], [1, 2]])
    fig.savefig(path)
    plt.close(fig)
    return path


@pytest.mark.slow
def test_trainer_run_is_logged_locally(tmp_path, tiny_dir):
    from datasets import Dataset
    from transformers import TrainingArguments

    from qwen_cls.model import load_model
    from qwen_cls.tokenization import tokenize_dataset
    from qwen_cls.train import AnswerOnlyTrainer, model_inputs, padding_collator, prepare_lora_model, recipe_lora_config

    model, tokenizer = load_model(tiny_dir, device="cpu")
    lora = recipe_lora_config()
    model = prepare_lora_model(model, lora, gradient_checkpointing=False)
    train = model_inputs(tokenize_dataset(Dataset.from_list(ROWS), tokenizer, 96))
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True)
    config = tracking.experiment_config(profile="tiny", base_model="tiny", lora=lora, training=args,
                                        n_train=len(train), n_test=2)
    out = tmp_path / "run"
    callbacks = tracking.swanlab_callbacks("local", out, config, experiment_name="unit-train")
    trainer = AnswerOnlyTrainer(model=model, args=args, train_dataset=train, data_collator=padding_collator(tokenizer),
                                callbacks=callbacks)
    trainer.train()
    samples = [dict(ROWS[0], prediction="Sports"), dict(ROWS[1], prediction="Sports")]
    assert tracking.log_evaluation({"accuracy": 0.5, "macro_f1": 1 / 3, "n_test": 2},
                                   confusion_png=confusion_png(tmp_path / "cm.png"), samples=samples)
    tracking.finish()

    log_dir = out / "swanlog"
    assert (log_dir / "runs.swanlab").is_file()
    run_id = experiments(log_dir)["unit-train"][1]
    history = [e for e in trainer.state.log_history if "loss" in e]
    assert len(history) == 4
    loss = metric(log_dir, "unit-train", "train/loss")
    assert [p["index"] for p in loss] == [e["step"] for e in history] == [1, 2, 3, 4]
    assert [p["data"] for p in loss] == pytest.approx([e["loss"] for e in history])
    lr = metric(log_dir, "unit-train", "train/learning_rate")
    assert [p["data"] for p in lr] == pytest.approx([e["learning_rate"] for e in history])
    assert [p["data"] for p in lr] == pytest.approx([5e-3, 3.75e-3, 2.5e-3, 1.25e-3])  # linear decay, 4 steps
    assert [p["data"] for p in metric(log_dir, "unit-train", "eval/accuracy")] == [0.5]
    assert [p["data"] for p in metric(log_dir, "unit-train", "eval/macro_f1")] == pytest.approx([1 / 3])

    recorded = recorded_config(log_dir, run_id)
    assert recorded["profile"] == "tiny" and recorded["base_model"] == "tiny"
    assert recorded["lora"]["r"] == 8 and recorded["lora"]["lora_dropout"] == 0.1
    assert recorded["training"]["max_steps"] == 4 and recorded["training"]["learning_rate"] == 5e-3
    assert recorded["data"] == {"n_train": 8, "n_test": 2}

    pngs = list((log_dir / run_id / "media" / "image").glob("*.png"))
    assert len(pngs) == 1
    with Image.open(pngs[0]) as logged, Image.open(tmp_path / "cm.png") as drawn:  # swanlab re-encodes it
        assert logged.size == drawn.size == (200, 200)
        assert list(logged.convert("RGB").getdata()) == list(drawn.convert("RGB").getdata())
    texts = sorted(p.read_text(encoding="utf-8") for p in (log_dir / run_id / "media" / "text").glob("*.txt"))
    assert texts == sorted(tracking.sample_text(s) for s in samples)
    assert "truth: Military (wrong)" in "".join(texts) and f"input: {ROWS[0]['text']}" in "".join(texts)


def test_evaluation_in_a_new_process_starts_an_eval_run(tmp_path):
    out = tmp_path / "demo"
    config = {"profile": "tiny", "data": {"n_test": 3}}
    assert tracking.log_evaluation({"accuracy": 2 / 3, "macro_f1": 0.5, "invalid_rate": 0.0}, out_dir=out,
                                   mode="local", config=config)
    tracking.finish()
    log_dir = out / "swanlog"
    assert list(experiments(log_dir)) == ["demo-eval"]
    assert [p["data"] for p in metric(log_dir, "demo-eval", "eval/accuracy")] == pytest.approx([2 / 3])
    assert [p["data"] for p in metric(log_dir, "demo-eval", "eval/invalid_rate")] == [0.0]
    assert recorded_config(log_dir, experiments(log_dir)["demo-eval"][1]) == config
    with sqlite3.connect(log_dir / "runs.swanlab") as db:  # the dashboard says the numbers mean nothing
        assert db.execute("select description from experiment").fetchall() == [(tracking.TINY_WARNING,)]


def drive_callback(callback, losses: list[float], output_dir: Path) -> None:
    """Call a Trainer callback as the Trainer does: train begin, then one log per step."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(output_dir), report_to="none")
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step, loss in enumerate(losses, start=1):
        state.global_step = step
        callback.on_log(args, state, control, logs={"loss": loss, "learning_rate": 1e-4})


def test_offline_mode_writes_only_log_files(tmp_path):
    out = tmp_path / "run"
    (callback,) = tracking.swanlab_callbacks("offline", out, {"profile": "tiny"}, experiment_name="off")
    drive_callback(callback, [3.0, 2.0], tmp_path / "trainer")
    tracking.finish()
    log_dir = out / "swanlog"
    (run_dir,) = [p for p in log_dir.iterdir() if p.is_dir()]
    records = b"".join(p.read_bytes() for p in run_dir.glob("*.swanlab"))
    assert b"train/loss" in records and b"train/learning_rate" in records
    assert not (log_dir / "runs.swanlab").exists()  # no dashboard database in offline mode
    with pytest.raises(tracking.TrackingError, match="offline mode"):
        dashboard.find_log_dir(out)


# ------------------------------------------------------------------ dashboard command errors


def test_dashboard_user_mistakes_exit_2(tmp_path, capsys):
    assert cli_main(["dashboard", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert cli_main(["dashboard", str(tmp_path)]) == 2
    assert "swanlab_mode='local'" in capsys.readouterr().err
    (tmp_path / "swanlog").mkdir()
    (tmp_path / "swanlog" / "runs.swanlab").touch()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli_main(["dashboard", str(tmp_path), "--port", str(port)]) == 2
    assert f"--port {port} is in use" in capsys.readouterr().err


def test_a_port_lingering_after_a_closed_server_is_waited_for(capsys):
    import time

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the side that closes first keeps the port in TIME_WAIT for a while
    server.close()
    client.close()
    assert not dashboard.port_is_free(port)  # what swanlab's own check sees: it would pick a random port
    start = time.monotonic()
    assert dashboard.wait_for_port(port, timeout=1.0) is False  # TIME_WAIT outlasts one second
    assert time.monotonic() - start >= 1.0  # ... but it was waited for, not refused at once
    assert f"port {port} was closed moments ago" in capsys.readouterr().out


# ------------------------------------------------------------------ per-epoch evaluation in the training run


def hand_macro_f1(truth: list[str], predicted: list[str]) -> float:
    """Macro-F1 over the union of labels, F1 = 2tp / (2tp + fp + fn) per label (0 without a true positive)."""
    f1s = []
    for label in sorted(set(truth) | set(predicted)):
        tp = sum(t == p == label for t, p in zip(truth, predicted))
        fp = sum(p == label != t for t, p in zip(truth, predicted))
        fn = sum(t == label != p for t, p in zip(truth, predicted))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


def test_eval_callback_needs_rows_and_a_trainer(tokenizer):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from qwen_cls.train import ClassificationEvalCallback

    with pytest.raises(ValueError, match="at least one"):
        ClassificationEvalCallback([], tokenizer)
    unbound = ClassificationEvalCallback(ROWS[:2], tokenizer)
    with pytest.raises(RuntimeError, match=r"\.bind\(trainer\)"):
        unbound.on_epoch_end(TrainingArguments(output_dir="unused", report_to="none"), TrainerState(),
                             TrainerControl())


@pytest.mark.slow
def test_epoch_evaluation_is_logged_in_the_training_run(tmp_path, tiny_dir):
    """Two epochs with ClassificationEvalCallback: one SwanLab experiment holds the loss curve and, per
    epoch, eval/accuracy and eval/macro_f1; the last values equal a scoring of the trained model."""
    from datasets import Dataset
    from transformers import TrainerCallback, TrainingArguments

    from qwen_cls.evaluate import score_candidates
    from qwen_cls.model import load_model
    from qwen_cls.tokenization import tokenize_dataset
    from qwen_cls.train import (
        AnswerOnlyTrainer,
        ClassificationEvalCallback,
        model_inputs,
        padding_collator,
        prepare_lora_model,
        recipe_lora_config,
    )

    model, tokenizer = load_model(tiny_dir, device="cpu")
    model = prepare_lora_model(model, recipe_lora_config(), gradient_checkpointing=False)
    train = model_inputs(tokenize_dataset(Dataset.from_list(ROWS), tokenizer, 96))  # 8 rows: 2 steps per epoch
    eval_rows = ROWS[:4] + [{"text": "油画与雕塑作品展出", "category": ["Art", "Military", "Space"], "output": "Art"}]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), num_train_epochs=2, per_device_train_batch_size=4,
                             learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, seed=0)
    out = tmp_path / "run"
    trainer = AnswerOnlyTrainer(model=model, args=args, train_dataset=train, data_collator=padding_collator(tokenizer),
                                callbacks=tracking.swanlab_callbacks("local", out, {"profile": "tiny"},
                                                                     experiment_name="train-and-eval"))
    evaluator = ClassificationEvalCallback(eval_rows, tokenizer, max_length=96, batch_size=2).bind(trainer)
    assert evaluator.bind(trainer) is evaluator  # binding twice registers it once
    assert sum(c is evaluator for c in trainer.callback_handler.callbacks) == 1

    class ModeProbe(TrainerCallback):  # runs after the evaluator: training mode must be back on
        modes: list[bool] = []

        def on_epoch_end(self, args, state, control, **kwargs):
            self.modes.append(trainer.model.training)

    trainer.add_callback(ModeProbe())
    model.eval()  # the untrained model scored independently: the learning curve's first point (epoch 0)
    untrained = [s.prediction for s in score_candidates(model, tokenizer, eval_rows, max_length=96)]
    model.train()
    trainer.train()
    tracking.finish()
    assert ModeProbe.modes == [True, True]

    logged = [e for e in trainer.state.log_history if "eval_accuracy" in e]
    assert [e["step"] for e in logged] == [0, 2, 4] and [e["epoch"] for e in logged] == [0.0, 1.0, 2.0]
    assert [{k: e[k] for k in ("step", "eval_accuracy", "eval_macro_f1")} for e in logged] == [
        {k: h[k] for k in ("step", "eval_accuracy", "eval_macro_f1")} for h in evaluator.history]

    model.eval()  # the trained model scored independently: the last epoch's numbers
    predicted = [s.prediction for s in score_candidates(model, tokenizer, eval_rows, max_length=96)]
    truth = [r["output"] for r in eval_rows]
    assert logged[0]["eval_accuracy"] == pytest.approx(sum(t == p for t, p in zip(truth, untrained)) / 5)
    assert logged[-1]["eval_accuracy"] == pytest.approx(sum(t == p for t, p in zip(truth, predicted)) / 5)
    assert logged[-1]["eval_macro_f1"] == pytest.approx(hand_macro_f1(truth, predicted))

    log_dir = out / "swanlog"
    assert list(experiments(log_dir)) == ["train-and-eval"]  # one experiment holds both
    loss = metric(log_dir, "train-and-eval", "train/loss")
    assert [p["index"] for p in loss] == [1, 2, 3, 4]
    accuracy = metric(log_dir, "train-and-eval", "eval/accuracy")
    assert [(p["index"], p["data"]) for p in accuracy] == [(e["step"], pytest.approx(e["eval_accuracy"]))
                                                           for e in logged]
    f1 = metric(log_dir, "train-and-eval", "eval/macro_f1")
    assert [p["data"] for p in f1] == pytest.approx([e["eval_macro_f1"] for e in logged])
