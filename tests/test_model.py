import json
import shutil
import time

import pytest
import torch

from qwen_cls import model as M
from qwen_cls import model_cache as MC
from qwen_cls.model_builds import tiny as T


def test_tiny_model_is_a_small_qwen2_with_the_real_tokenizer(tiny_dir, tokenizer):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 2, 151936)
    assert config["tie_word_embeddings"] is True
    names = {p.name for p in tiny_dir.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt")) for n in names)
    assert len(tokenizer) == 151669 and tokenizer.pad_token == "<|endoftext|>"
    assert "<|im_start|>" in tokenizer.chat_template and "think" not in tokenizer.chat_template


def test_tiny_model_build_is_cached_and_deterministic(tiny_dir, tmp_path):
    again = T.build_tiny_model(tiny_dir)  # already built: returned as is
    assert again == tiny_dir
    other = T.build_tiny_model(tmp_path / "t2")
    from safetensors.torch import load_file

    a, b = load_file(tiny_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_model_float32_on_cpu_without_remote_code(tiny_dir):
    model, tok = M.load_model(tiny_dir, device="cpu")
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert M.pick_dtype("cpu") == torch.float32


def test_incomplete_or_missing_model_folders(tmp_path, tiny_dir):
    with pytest.raises(M.ModelNotFound, match="no such model folder"):
        M.resolve_model(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(M.ModelNotFound, match=r"missing \*\.safetensors weights, tokenizer files"):
        M.resolve_model(broken)
    with pytest.raises(M.ModelNotFound, match="neither 'tiny'"):
        M.resolve_model("not-a-model")


def test_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("QWEN_CLS_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="qwen/Qwen2-0.5B"):
        M.resolve_model("qwen/Qwen2-0.5B")
    assert time.monotonic() - start < 5


def test_unreachable_host_is_detected_quickly(monkeypatch):
    from qwen_cls.hub import is_online

    monkeypatch.delenv("QWEN_CLS_OFFLINE", raising=False)
    start = time.monotonic()
    assert is_online("qwen-cls-test.invalid", timeout=2) is False  # .invalid never resolves (RFC 2606)
    assert time.monotonic() - start < 5


def test_a_tokenizer_without_chat_template_gets_its_model_familys(tiny_dir, tmp_path):
    from qwen_cls.prompt import QWEN2_CHAT_TEMPLATE

    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "chat_template.jinja").unlink()
    (bare / "qwen_cls_manifest.json").unlink()  # a plain model folder now, not a build missing a file
    assert M.load_tokenizer(bare).chat_template is None
    _, tok = M.load_model(bare, device="cpu")
    assert tok.chat_template == QWEN2_CHAT_TEMPLATE


def test_a_new_build_names_an_earlier_versions_build_beside_it_and_leaves_it(tmp_path, capsys):
    """After a version bump the old build stays in the cache, unused: the new build says where and how big."""
    from qwen_cls.model_builds.folders import write_manifest

    old = tmp_path / "tiny-qwen2-v1-seed0"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"x" * 3 * 2**20)
    write_manifest(old, M.TINY, "1")
    foreign = tmp_path / "mine"  # no manifest: not a build
    foreign.mkdir()
    other_seed = T.build_tiny_model(tmp_path / "tiny-other-seed", seed=1)  # this version: not earlier
    capsys.readouterr()
    built = T.build_tiny_model(tmp_path / f"tiny-qwen2-v{MC.TINY_VERSION}-seed0")
    err = capsys.readouterr().err
    assert f"note: {old} holds an earlier build of tiny (3 MiB) that this version no longer reads" in err
    assert err.count("note:") == 1 and str(other_seed) not in err and str(foreign) not in err
    assert (old / "model.safetensors").stat().st_size == 3 * 2**20 and built.is_dir()


TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_built_tokenizers_list_their_added_tokens_and_load_as_without_the_list(family, request, tmp_path):
    """The builds' tokenizer_config.json lists tokenizer.json's added tokens (so transformers 5 need not parse
    tokenizer.json in Python at each load); the folder loads to the tokenizer it loads to without the list."""
    built = request.getfixturevalue("tiny_dir" if family == "qwen2" else "gemma_dir")
    config = json.loads((built / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = json.loads((built / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    assert config["added_tokens_decoder"] == {str(t.pop("id")): t for t in added}
    assert len(added) == {"qwen2": 26, "gemma3": 6384}[family]

    bare = tmp_path / "bare"  # what save_pretrained alone writes: no list
    bare.mkdir()
    for name in TOKENIZER_NAMES:
        shutil.copyfile(built / name, bare / name)
    del config["added_tokens_decoder"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    fast, slow = M.load_tokenizer(built), M.load_tokenizer(bare)
    assert type(fast) is type(slow) and fast.padding_side == slow.padding_side
    assert fast.added_tokens_decoder == slow.added_tokens_decoder and fast.all_special_ids == slow.all_special_ids
    texts = ["体育新闻：国足 2:1 取胜", "<|im_start|>user\nhi<|im_end|>", "<start_of_turn>model\nSports<end_of_turn>"]
    assert [fast(t)["input_ids"] for t in texts] == [slow(t)["input_ids"] for t in texts]
    chat = [{"role": "user", "content": texts[0]}]
    assert fast.apply_chat_template(chat, tokenize=False) == slow.apply_chat_template(chat, tokenize=False)


def test_gemma_name_is_resolved_not_taken_for_a_folder_or_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_CLS_CACHE", str(tmp_path))
    folder = tmp_path / "gemma3-270m-q4km-dense-v2"  # the cache folder the Gemma build writes
    with pytest.raises(MC.ModelNotBuilt, match="qwen-cls gemma-model"):  # looked up in the cache, not a hub id
        M.resolve_model("gemma3-270m")
    monkeypatch.setattr(MC.ModelBuild, "state", lambda self, out, hashes=False: ("built" if out == folder else "?", []))
    assert M.resolve_model("gemma3-270m") == folder
