"""Scores computed once: what 04 saves is what 05 reads back, and only for the same rows, model and prompt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from qwen_cls.data import read_raw_rows
from qwen_cls.evaluate import score_candidates
from qwen_cls.files import write_jsonl_atomic
from qwen_cls.model import load_model
from qwen_cls.saved_scores import model_fingerprint, reuse_or_score, row_digests, save_scoring, scoring_record

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "test.jsonl"
ABS = 1e-4  # float32 rounding of a total log-probability scored in another batch (other padding)


@pytest.fixture(scope="module")
def lora_model(tiny_dir):
    model, tokenizer = load_model(tiny_dir, device="cpu")
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so the adapter really changes the scores
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def rows():
    return [r.to_dict() | {"output": r.output} for r in read_raw_rows(SAMPLE)][:10]


def _as_04(model, tokenizer, rows, run_dir: Path, max_length=96):
    """What notebook 04 writes: LoRA and zero-shot scores in predictions.jsonl, their record in scoring.json."""
    lora = score_candidates(model, tokenizer, rows, max_length=max_length, batch_size=4)
    lora_record = scoring_record(model, tokenizer, rows, max_length=max_length, seconds=5.0)
    with model.disable_adapter():
        zero = score_candidates(model, tokenizer, rows, max_length=max_length, batch_size=4)
        zero_record = scoring_record(model, tokenizer, rows, max_length=max_length, seconds=2.0)
    write_jsonl_atomic(({"text": r["text"], "category": r["category"], "output": r["output"],
                         "prediction": a.prediction, "scores": a.scores, "zero_shot_scores": b.scores}
                        for r, a, b in zip(rows, lora, zero)), run_dir / "predictions.jsonl")
    save_scoring(run_dir, {"lora": lora_record, "zero_shot": zero_record})
    return lora, zero


def test_fingerprint_tells_adapter_on_from_off_and_off_equals_the_base(lora_model, tiny_dir):
    model, _ = lora_model
    on = model_fingerprint(model)
    with model.disable_adapter():
        off = model_fingerprint(model)
    base, _ = load_model(tiny_dir, device="cpu")
    assert on != off
    assert off == model_fingerprint(base)  # the same weights loaded without any adapter


def test_05_reads_04s_scores_and_they_equal_a_fresh_scoring(lora_model, rows, tmp_path):
    model, tokenizer = lora_model
    lora, zero = _as_04(model, tokenizer, rows, tmp_path)
    assert any(a.prediction != b.prediction or a.scores != b.scores for a, b in zip(lora, zero))  # adapter matters
    first = rows[:6]  # 05 compares the first rag_test_rows rows
    got = reuse_or_score(model, tokenizer, first, run_dir=tmp_path, method="lora", max_length=96, batch_size=3)
    assert got.reused and got.seconds == pytest.approx(5.0 / 10 * 6)  # 04's seconds per row x 6 rows
    fresh = score_candidates(model, tokenizer, first, max_length=96, batch_size=3)
    assert [s.prediction for s in got.scored] == [s.prediction for s in fresh]
    for a, b in zip(got.scored, fresh):
        assert a.scores == pytest.approx(b.scores, abs=ABS)
        assert a.probabilities == pytest.approx(b.probabilities, abs=ABS)
    assert [s.scores for s in got.scored] == [s.scores for s in lora[:6]]  # exactly the numbers 04 saved
    with model.disable_adapter():
        got_zero = reuse_or_score(model, tokenizer, first, run_dir=tmp_path, method="zero_shot", max_length=96)
        fresh_zero = score_candidates(model, tokenizer, first, max_length=96, batch_size=3)
    assert got_zero.reused and got_zero.seconds == pytest.approx(2.0 / 10 * 6)
    assert [s.prediction for s in got_zero.scored] == [s.prediction for s in fresh_zero]
    for a, b in zip(got_zero.scored, fresh_zero):
        assert a.scores == pytest.approx(b.scores, abs=ABS)


def test_anything_different_is_scored_afresh(lora_model, rows, tmp_path):
    model, tokenizer = lora_model
    _as_04(model, tokenizer, rows, tmp_path)
    cases = {
        "adapter off, asked for lora": dict(method="lora", off=True),
        "other max_length": dict(method="lora", max_length=112),
        "other rows": dict(method="lora", rows=[rows[0] | {"text": rows[0]["text"] + "。"}]),
        "other candidate order": dict(method="lora", rows=[rows[1] | {"category": rows[1]["category"][::-1]}]),
    }
    for name, case in cases.items():
        asked = case.get("rows", rows[:3])
        max_length = case.get("max_length", 96)
        if case.get("off"):
            with model.disable_adapter():
                got = reuse_or_score(model, tokenizer, asked, run_dir=tmp_path, method=case["method"],
                                     max_length=max_length)
                fresh = score_candidates(model, tokenizer, asked, max_length=max_length)
        else:
            got = reuse_or_score(model, tokenizer, asked, run_dir=tmp_path, method=case["method"],
                                 max_length=max_length)
            fresh = score_candidates(model, tokenizer, asked, max_length=max_length)
        assert not got.reused, name
        assert [s.scores for s in got.scored] == [s.scores for s in fresh], name  # the fresh scoring itself
    assert "max_length 96, now 112" in reuse_or_score(model, tokenizer, rows[:1], run_dir=tmp_path, method="lora",
                                                        max_length=112).reason
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not reuse_or_score(model, tokenizer, rows[:1], run_dir=empty, method="lora", max_length=96).reused


def test_scoring_json_holds_one_digest_per_row(lora_model, rows, tmp_path):
    model, tokenizer = lora_model
    _as_04(model, tokenizer, rows, tmp_path)
    saved = json.loads((tmp_path / "scoring.json").read_text(encoding="utf-8"))
    assert set(saved) == {"lora", "zero_shot"}
    assert saved["lora"]["rows"] == 10 and saved["lora"]["max_length"] == 96
    assert saved["lora"]["row_digests"] == row_digests(tokenizer, rows, 96)
    assert len(set(saved["lora"]["row_digests"])) == 10
    with pytest.raises(ValueError, match="unknown methods"):
        save_scoring(tmp_path, {"rag": saved["lora"]})


def test_an_edited_adapter_config_is_scored_afresh(lora_model, rows, tmp_path, tiny_dir):
    """Issue 33: the saved scores' key covers adapter_config.json, not only the adapter's weights. An adapter whose
    lora_alpha was edited after 04 scores differently with the same weights: 05 must score it again."""
    trained, _ = lora_model
    adapter = tmp_path / "adapter"
    trained.save_pretrained(adapter)
    run = tmp_path / "run"
    run.mkdir()
    model, tokenizer = load_model(tiny_dir, device="cpu", adapter=str(adapter), dtype=torch.float32)
    _as_04(model, tokenizer, rows, run)
    again, _ = load_model(tiny_dir, device="cpu", adapter=str(adapter), dtype=torch.float32)
    assert reuse_or_score(again, tokenizer, rows[:3], run_dir=run, method="lora", max_length=96).reused  # unedited

    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    assert config["lora_alpha"] == 8 and config["r"] == 4  # PEFT's default alpha: scaling 8 / 4 = 2
    config["lora_alpha"] = 32  # scaling 32 / 4 = 8: every LoRA update 4 times larger, weights unchanged
    config_path.write_text(json.dumps(config), encoding="utf-8")
    edited, _ = load_model(tiny_dir, device="cpu", adapter=str(adapter), dtype=torch.float32)
    got = reuse_or_score(edited, tokenizer, rows[:3], run_dir=run, method="lora", max_length=96)
    assert not got.reused and "adapter settings (adapter_config.json)" in got.reason
    fresh = score_candidates(edited, tokenizer, rows[:3], max_length=96)
    assert [s.scores for s in got.scored] == [s.scores for s in fresh]
    saved = [json.loads(line)["scores"] for line in (run / "predictions.jsonl").read_text().splitlines()[:3]]
    assert any(abs(s.scores[c] - old[c]) > 1e-3 for s, old in zip(got.scored, saved) for c in old)  # it matters
    with edited.disable_adapter():  # adapter off: the base model, whatever the adapter's config says
        assert reuse_or_score(edited, tokenizer, rows[:3], run_dir=run, method="zero_shot", max_length=96).reused


@pytest.mark.subprocess
def test_the_fingerprint_is_the_same_in_another_process(lora_model, tmp_path, tiny_dir):
    """target_modules is a set inside PEFT (its order changes with each process's string hashing): the settings
    enter the fingerprint sorted, so 05's kernel computes 04's fingerprint for the same adapter."""
    import subprocess
    import sys

    trained, _ = lora_model
    trained.save_pretrained(tmp_path / "adapter")
    code = ("import sys, torch; from qwen_cls.model import load_model; from qwen_cls.saved_scores import "
            "model_fingerprint; m, _ = load_model(sys.argv[1], device='cpu', adapter=sys.argv[2], "
            "dtype=torch.float32); print(model_fingerprint(m))")
    prints = {subprocess.run([sys.executable, "-c", code, str(tiny_dir), str(tmp_path / "adapter")], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
              for seed in ("1", "2")}
    assert len(prints) == 1 and len(prints.pop().strip()) == 64
