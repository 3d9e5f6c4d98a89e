"""Labels unseen in training (issue 23, item 2): every method's label set comes from the training rows only; a
method that learns a fixed label set never predicts a label it has not seen (a row with no known candidate has
no answer and counts as wrong); ``qwen-cls run`` refuses a one-label training file before any notebook runs and
warns of test labels unseen in training, which 04 records in ``metrics.json`` (the whole chain on these rows:
``test_recipe_chain.py``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qwen_cls import data
from qwen_cls.approaches import approach_entry, load_seq_cls_base, restricted_rows, seq_cls_scores
from qwen_cls.chain.preflight import preflight
from qwen_cls.chain.templating import resolve_parameters
from qwen_cls.commands.cli import main
from qwen_cls.files import DataError
from qwen_cls.metrics import classification_metrics
from qwen_cls.rag import Neighbour, retrieval_vote

pytestmark = pytest.mark.filterwarnings("ignore")

TOPICS = {"Sports": "足球比赛冠军球队进球", "Economy": "市场经济增长银行利率", "Art": "画家展览美术馆油画",
          "Military": "军队演习舰艇导弹"}
# Training answers: Sports and Economy only. Every test answer is Art, which no training row has.
TRAIN = [{"text": f"第{i}条：" + TOPICS[label] * (1 + i % 3), "category": ["Sports", "Economy"], "output": label}
         for i, label in enumerate(["Sports", "Economy"] * 8)]
TEST = [
    {"text": "第一百条：" + TOPICS["Art"], "category": ["Art", "Sports"], "output": "Art"},
    {"text": "第一百零一条：" + TOPICS["Art"] * 2, "category": ["Economy", "Art"], "output": "Art"},
    {"text": "第一百零二条：" + TOPICS["Art"] * 3, "category": ["Art", "Military"], "output": "Art"},  # none known
]


def write_raw(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --- the label sets ---------------------------------------------------------------------------------------------

def test_training_labels_come_from_training_answers_and_unseen_test_labels_are_counted():
    assert data.training_labels(TRAIN) == ["Economy", "Sports"]
    # Art: an answer of all 3 rows; Military: a candidate of the third. Rows 1-3 all have one; all 3 answers unseen.
    assert data.unseen_labels(TRAIN, TEST) == {"labels": ["Art", "Military"], "rows": 3, "answer_rows": 3}
    seen_test = [{"text": "x", "category": ["Sports", "Economy"], "output": "Sports"},
                 {"text": "y", "category": ["Sports", "Space"], "output": "Sports"}]
    assert data.unseen_labels(TRAIN, seen_test) == {"labels": ["Space"], "rows": 1, "answer_rows": 0}
    assert data.unseen_labels(TRAIN, seen_test[:1]) == {"labels": [], "rows": 0, "answer_rows": 0}
    assert data.describe_unseen(data.unseen_labels(TRAIN, seen_test[:1]), "t", "r") is None
    text = data.describe_unseen(data.unseen_labels(TRAIN, TEST), "test.jsonl", "train.jsonl", 3)
    assert text.startswith("test.jsonl: 3 of 3 test rows") and "train.jsonl" in text and "(Art, Military)" in text
    assert "3 of them have it as their answer" in text


def test_a_training_file_with_one_label_is_refused_naming_the_file(tmp_path):
    path = write_raw(tmp_path / "one.jsonl", [r for r in TRAIN if r["output"] == "Sports"])
    with pytest.raises(DataError) as info:
        data.check_training_labels(data.read_raw_rows(path), path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "only the label 'Sports'" in message
    assert "at least 2 distinct labels" in message and "add rows whose output is another label" in message
    assert data.check_training_labels(data.read_raw_rows(write_raw(tmp_path / "two.jsonl", TRAIN)), path) == \
        ["Economy", "Sports"]


# --- each method on an unseen label -----------------------------------------------------------------------------

def test_a_restricted_classifier_never_predicts_an_unseen_label():
    classes = ["Economy", "Sports"]  # a classifier trained on TRAIN: no class for Art or Military
    log_proba = [[math.log(0.4), math.log(0.6)]] * 3
    scored = restricted_rows(log_proba, classes, TEST)
    assert [s.prediction for s in scored] == ["Sports", "Economy", None]  # never Art; no known candidate: no answer
    assert scored[0].scores["Art"] == -math.inf and scored[0].probabilities == {"Art": 0.0, "Sports": 1.0}
    assert scored[2].probabilities == {"Art": 0.0, "Military": 0.0} and scored[2].confidence == 0.0
    entry = approach_entry([r["output"] for r in TEST], [s.prediction for s in scored], train_seconds=1,
                           predict_seconds=1)
    assert entry["accuracy"] == 0.0 and entry["macro_f1"] == 0.0 and entry["n_test"] == 3
    # The leak this replaces: a head built on train + test answers has a class Art, which wins every row whose
    # other candidate is unseen too, and the third row's "guess" is right.
    leaky = restricted_rows([[0.0, 0.0, 0.0]] * 3, ["Art", "Economy", "Sports"], TEST)
    assert leaky[2].prediction == "Art"


def test_the_retrieval_vote_knows_only_the_training_labels():
    neighbours = [Neighbour(index=0, text="n", label="Sports", score=2.0)]
    prior = {"Sports": 8, "Economy": 8}
    assert retrieval_vote(neighbours, ["Art", "Sports"], prior=prior) == "Sports"
    assert retrieval_vote([], ["Art", "Economy"], prior=prior) == "Economy"  # not alphabetical Art: unseen
    assert retrieval_vote(neighbours, ["Art", "Military"], prior=prior) is None  # no known candidate: no answer
    assert retrieval_vote(neighbours, ["Art", "Military"]) == "Art"  # without the label set: alphabetical, as before


def test_no_answer_counts_as_wrong_in_every_metric():
    m = classification_metrics(["A", "B", "C", "C"], ["A", None, "C", None])
    assert m["accuracy"] == 0.5 and m["labels"] == ["A", "B", "C"]
    # A: F1 1; B: recall 0 -> F1 0; C: precision 1/1, recall 1/2 -> F1 2/3
    assert m["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]  # no answer: in no column


def test_tfidf_logreg_classes_are_the_training_labels():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from qwen_cls.rag import segment

    pipe = make_pipeline(TfidfVectorizer(tokenizer=segment, token_pattern=None, lowercase=False),
                         LogisticRegression(C=10.0, max_iter=1000))
    pipe.fit([r["text"] for r in TRAIN], [r["output"] for r in TRAIN])
    assert sorted(pipe.classes_) == data.training_labels(TRAIN)
    scored = restricted_rows(pipe.predict_log_proba([r["text"] for r in TEST]), list(pipe.classes_), TEST)
    assert [s.prediction for s in scored] == ["Sports", "Economy", None]
    assert classification_metrics([r["output"] for r in TEST], [s.prediction for s in scored])["accuracy"] == 0.0


def test_the_seq_cls_head_has_a_class_per_training_label_only(tiny_dir):
    labels = data.training_labels(TRAIN)
    model, tok = load_seq_cls_base(str(tiny_dir), labels, device="cpu")
    assert model.score.out_features == 2 and model.config.id2label == {0: "Economy", 1: "Sports"}
    scored = seq_cls_scores(model, tok, TEST, labels, max_length=32)
    assert scored[0].prediction == "Sports" and scored[1].prediction == "Economy" and scored[2].prediction is None
    assert all(s.scores["Art"] == -math.inf for s in scored)


# --- qwen-cls run: before anything runs ---------------------------------------------------------------------------

def refused_run(tmp_path, capsys, train_rows, *params: str) -> tuple[Path, str]:
    """``qwen-cls run`` on ``train_rows`` and the test rows with ``-p`` ``params``: exit 2 and no run folder
    asserted; (the training file, stderr)."""
    train = write_raw(tmp_path / "train.jsonl", train_rows)
    test = write_raw(tmp_path / "test.jsonl", TEST)
    out = tmp_path / "out"
    pairs = [arg for key, value in zip(params[::2], params[1::2]) for arg in ("-p", key, value)]
    assert main(["run", "--out", str(out), "-p", "train_path", str(train), "-p", "test_path", str(test),
                 *pairs]) == 2
    assert not out.exists()  # nothing created, no notebook executed
    return train, capsys.readouterr().err


def test_run_refuses_a_one_label_training_file_before_any_notebook(tmp_path, capsys):
    train, err = refused_run(tmp_path, capsys, [r for r in TRAIN if r["output"] == "Economy"], "validation_rows", "2")
    assert f"{train}: the training rows have only the label 'Economy'" in err and "at least 2 distinct" in err
    assert "Traceback" not in err


def test_run_refuses_a_sample_of_one_label_naming_max_train_samples(tmp_path, capsys):
    train, err = refused_run(tmp_path, capsys, TRAIN, "max_train_samples", "1")
    assert f"{train}: the 1 training rows 01 keeps (max_train_samples=1, seed=42)" in err
    assert "use more of the file (max_train_samples)" in err


def test_preflight_warns_of_test_labels_unseen_in_training(tmp_path, capsys):
    train = write_raw(tmp_path / "train.jsonl", TRAIN)
    test = write_raw(tmp_path / "test.jsonl", TEST)
    params = resolve_parameters("tiny", {"train_path": str(train), "test_path": str(test)}, tmp_path / "out")
    preflight(params)  # a warning, not an error: the run goes on
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {test}: 3 of 3 test rows have an answer or candidate that no training row of "
                          f"{train} has as its answer (Art, Military)")
    assert not (tmp_path / "out").exists()
    write_raw(test, [r for r in TRAIN[:2]])
    preflight(params)
    assert capsys.readouterr().err == ""  # every test label seen in training: nothing to say


def test_run_refuses_a_training_file_too_small_for_its_validation_rows(tmp_path, capsys):
    """01's split needs validation_rows + max_train_samples rows (8 Economy rows: 8 validation leave no training)."""
    train, err = refused_run(tmp_path, capsys, [r for r in TRAIN if r["output"] == "Economy"], "validation_rows", "8")
    assert f"{train}: 8 rows, fewer than 8 validation + 1 training rows" in err and "validation_rows=8" in err
    assert "Traceback" not in err
