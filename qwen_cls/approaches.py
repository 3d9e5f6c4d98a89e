"""The other classifiers of notebook 06, on the same rows as 04/05, each restricted to a row's candidates.

- a TF-IDF + logistic-regression baseline (jieba words, scikit-learn): :func:`tfidf_logreg`, :func:`restricted_rows`;
- the base model with a sequence-classification head over the label inventory (LoRA on the projections, the
  head trained and saved through ``modules_to_save``): :func:`load_seq_cls_base`, :func:`encode_texts`,
  :func:`seq_cls_scores`, :func:`save_seq_cls`, :func:`load_seq_cls`;
- one row of ``approaches.json``: :func:`approach_entry`.

A restricted prediction is the best-scoring candidate; its ``probabilities`` are the softmax of the
classifier's scores (logits or log-probabilities) over the row's candidates only, like 04's candidate scoring.
A candidate the classifier has no class for (a label absent from the training rows' answers: the classes are
built from the training rows only, never from test answers) gets score ``-inf`` and probability 0; a row with
no such class among its candidates gets no prediction (``None``), which counts as wrong.

Taught in: 06
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .evaluate import Scored
from .files import atomic_dir, save_tokenizer, save_weights, write_json_atomic
from .metrics import classification_metrics

SEQ_CLS_HEAD = "score"  # the classification head's name in Qwen2ForSequenceClassification and Gemma 3's
SEQ_CLS_FILE = "seq_cls.json"  # beside the adapter: base model, labels, max_length


def _candidates(row) -> list[str]:
    return list(row["category"] if isinstance(row, dict) else row.category)


def restricted(label_scores: Mapping[str, float], candidates: Sequence[str]) -> Scored:
    """The best candidate by ``label_scores`` and the softmax over the candidates.

    ``label_scores`` holds the classifier's classes, learnt from the training rows' answers only: a candidate
    missing from it (a label no training row has as its answer) scores ``-inf`` and is never predicted. A row
    none of whose candidates is a class gets no prediction (``None``, every probability 0): it counts as wrong
    (:func:`~qwen_cls.metrics.classification_metrics`), never as a lucky guess by list position.
    """
    scores = {c: float(label_scores.get(c, float("-inf"))) for c in candidates}
    if not any(c in label_scores for c in candidates):
        return Scored(prediction=None, scores=scores, probabilities={c: 0.0 for c in candidates})
    return Scored(prediction=max(candidates, key=scores.__getitem__), scores=scores)


def word_vectorizer(ngram_range: tuple[int, int] = (1, 2)):
    """06's TF-IDF of jieba words (``rag.segment``, as 05's retriever) and, with ``(1, 2)``, word pairs."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from .rag import segment

    return TfidfVectorizer(tokenizer=segment, token_pattern=None, lowercase=False, ngram_range=ngram_range,
                           sublinear_tf=True)


def tfidf_logreg(vectorizer=None):
    """06's ``tfidf_logreg``, as its section 2 writes it out: ``vectorizer`` (default :func:`word_vectorizer`)
    then ``LogisticRegression(C=10.0, max_iter=1000)`` (C large: weak regularisation, few training rows)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(word_vectorizer() if vectorizer is None else vectorizer,
                         LogisticRegression(C=10.0, max_iter=1000))


def restricted_rows(score_matrix, classes: Sequence[str], rows) -> list[Scored]:
    """:func:`restricted` for each row: ``score_matrix[i, j]`` scores ``classes[j]`` for ``rows[i]`` (e.g.
    scikit-learn's ``predict_log_proba`` with ``classes_``, or a head's logits with the label inventory)."""
    matrix = score_matrix.tolist() if hasattr(score_matrix, "tolist") else score_matrix
    if len(matrix) != len(rows):
        raise ValueError(f"{len(matrix)} score rows but {len(rows)} rows")
    return [restricted(dict(zip(classes, values)), _candidates(row)) for values, row in zip(matrix, rows)]


def approach_entry(y_true: Sequence[str], predictions: Sequence[str], *, train_seconds: float,
                   predict_seconds: float) -> dict:
    """One method of ``approaches.json``: ``accuracy``, ``macro_f1``, ``n_test``, ``train_seconds`` and
    ``rows_per_second`` (test rows classified per second of inference)."""
    m = classification_metrics(list(y_true), list(predictions))
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n_test": m["n_test"],
            "train_seconds": float(train_seconds),
            "rows_per_second": m["n_test"] / predict_seconds if predict_seconds > 0 else float("inf")}


# --- the base model with a sequence-classification head --------------------------------------------------------

def load_seq_cls_base(base_model: str, labels: Sequence[str], *, device=None, dtype: torch.dtype | None = None):
    """(model, tokenizer): ``base_model`` under ``AutoModelForSequenceClassification`` with a new head of
    ``len(labels)`` outputs (random until trained), its pad token set so the last real token is found.
    ``dtype``: the body's (default ``pick_dtype``); the head stays float32, so training updates it in full
    precision (the body runs under autocast, :func:`seq_cls_scores` too)."""
    from transformers import AutoModelForSequenceClassification

    from .model import load_tokenizer, pick_device, pick_dtype, resolve_model

    folder = resolve_model(base_model)
    device = torch.device(device) if device is not None else pick_device()
    tokenizer = load_tokenizer(folder)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)}, dtype=dtype or pick_dtype(device),
        trust_remote_code=False, use_safetensors=True,
    )
    getattr(model, SEQ_CLS_HEAD).float()
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token of each row
    return model.to(device), tokenizer


def encode_texts(tokenizer, rows, labels: Sequence[str], max_length: int):
    """A ``datasets.Dataset`` of the rows' texts alone (no prompt, no candidates), cut to ``max_length``
    tokens, with ``labels`` = the index of each row's ``output`` in ``labels``."""
    from datasets import Dataset

    index = {label: i for i, label in enumerate(labels)}
    texts = [r["text"] for r in rows]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                              "labels": [index[r["output"]] for r in rows]})


@torch.inference_mode()
def seq_cls_scores(model, tokenizer, rows, labels: Sequence[str], *, max_length: int,
                   batch_size: int = 16) -> list[Scored]:
    """The head's logits for each row, restricted to its candidates (:func:`restricted_rows`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    low = body_dtype(model)
    logits = []
    for start in range(0, len(rows), batch_size):
        texts = [r["text"] for r in rows[start:start + batch_size]]
        batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.autocast(device.type, dtype=low, enabled=low != torch.float32):  # a bfloat16 body, float32 head
            logits.append(model(**batch.to(device)).logits.float().cpu())
    model.train(was_training)
    matrix = torch.cat(logits) if logits else torch.zeros((0, len(labels)))
    return restricted_rows(matrix, labels, rows)


def body_dtype(model) -> torch.dtype:
    """The dtype most of ``model``'s weights are in (a bfloat16 body beside float32 LoRA and head: bfloat16)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get)


def save_seq_cls(model, tokenizer, folder: str | os.PathLike, *, base_model: str, labels: Sequence[str],
                 max_length: int) -> Path:
    """Save the LoRA adapter with the trained head (``modules_to_save``), the tokenizer and ``seq_cls.json``;
    refuses a model whose head would not be saved (it would come back random)."""
    saved = getattr(model, "modules_to_save", None) or set()
    if SEQ_CLS_HEAD not in saved:
        raise ValueError(f"the LoRA config does not save the head {SEQ_CLS_HEAD!r} (modules_to_save={saved}); "
                         "reloaded, it would be a new random head")
    folder = Path(folder)
    from .model import dtype_name

    with atomic_dir(folder) as tmp:
        save_weights(model, str(tmp))
        save_tokenizer(tokenizer, tmp)
        write_json_atomic({"base_model": base_model, "labels": list(labels), "max_length": max_length,
                           "dtype": dtype_name(body_dtype(model))}, tmp / SEQ_CLS_FILE)
    return folder


def load_seq_cls(folder: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None):
    """(model, tokenizer, labels, max_length) saved by :func:`save_seq_cls`: the base, the adapter and the
    trained head; the body in ``dtype`` (default: the one it was trained in where the device computes it
    natively, as :func:`qwen_cls.predict.run_dtype`)."""
    from peft import PeftModel

    from .model import trained_dtype

    folder = Path(folder)
    meta = json.loads((folder / SEQ_CLS_FILE).read_text(encoding="utf-8"))
    if dtype is None:
        dtype = trained_dtype(meta, device)
    model, tokenizer = load_seq_cls_base(meta["base_model"], meta["labels"], device=device, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(folder))
    return model.eval(), tokenizer, meta["labels"], meta["max_length"]
