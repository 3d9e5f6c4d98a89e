"""Retrieval of similar labelled examples: a BM25 index (bm25s) over jieba-segmented training rows.

The retriever is built once from the training rows and saved with the run (``RUN_DIR/retriever/``).
For a query it returns the ``k`` most similar labelled rows, never the query itself (``exclude``) nor
any row whose text equals the query's after whitespace normalisation, so a test row duplicated in the
training split cannot leak its own label. Those neighbours feed two things: :func:`retrieval_vote`, a
model-free baseline, and the RAG prompt (:func:`qwen_cls.prompt.build_rag_messages`).

Taught in: 05, 06
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import bm25s
import numpy as np

from .files import DataError, atomic_dir, read_jsonl, write_json_atomic, write_jsonl_atomic

ROWS_FILE = "rows.jsonl"
META_FILE = "retriever.json"
INDEX_CHARS = 1500  # only the first characters of each text are segmented and indexed: the topic shows early
FORMAT_VERSION = 1

_segmenter = None


def _jieba():
    """A jieba tokenizer that is quiet and keeps its dictionary cache under the package cache folder."""
    global _segmenter
    if _segmenter is None:
        import jieba

        from .hub import cache_dir

        jieba.setLogLevel(logging.WARNING)
        tokenizer = jieba.Tokenizer()
        folder = cache_dir() / "jieba"
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.tmp_dir = str(folder)
        tokenizer.initialize()
        _segmenter = tokenizer
    return _segmenter


def segment(text: str, max_chars: int | None = INDEX_CHARS) -> list[str]:
    """jieba words of ``text`` (its first ``max_chars`` characters), lower-cased, punctuation dropped."""
    if max_chars:
        text = text[:max_chars]
    words = _jieba().lcut(text, HMM=False)
    return [w.lower() for w in words if any(ch.isalnum() for ch in w)]


def normalize_text(text: str) -> str:
    """Whitespace collapsed and stripped: two texts equal after this are duplicates."""
    return " ".join(text.split())


@dataclass(frozen=True)
class Neighbour:
    """A retrieved training row: its index in the corpus, text, label and BM25 score."""

    index: int
    text: str
    label: str
    score: float


class Retriever:
    """BM25 over labelled texts; :meth:`retrieve` / :meth:`retrieve_batch` give the nearest neighbours."""

    def __init__(self, bm25: bm25s.BM25, texts: Sequence[str], labels: Sequence[str], *,
                 max_chars: int | None = INDEX_CHARS):
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        self.bm25, self.texts, self.labels, self.max_chars = bm25, list(texts), list(labels), max_chars
        self._by_text: dict[str, list[int]] = {}
        for i, text in enumerate(self.texts):
            self._by_text.setdefault(normalize_text(text), []).append(i)
        self._repeats = len(self.texts) - len(self._by_text)  # extra rows to fetch so dedup still leaves k

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def build(cls, rows: Iterable, *, max_chars: int | None = INDEX_CHARS) -> "Retriever":
        """Index rows with ``text`` and ``output`` (dicts or :class:`~qwen_cls.data.RawRow`)."""
        texts, labels = [], []
        for row in rows:
            get = row.get if isinstance(row, dict) else lambda key: getattr(row, key)
            if get("output") is None:
                raise ValueError("every row of the retrieval corpus needs its label in `output`")
            texts.append(get("text"))
            labels.append(get("output"))
        if not texts:
            raise ValueError("cannot build a retriever from zero rows")
        bm25 = bm25s.BM25()
        bm25.index([segment(t, max_chars) for t in texts], show_progress=False)
        return cls(bm25, texts, labels, max_chars=max_chars)

    @property
    def label_counts(self) -> Counter:
        """How many corpus rows carry each label (a prior for the vote's tie-break)."""
        return Counter(self.labels)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the bm25s index, the rows (text + label) and a small manifest; replaces ``folder`` whole."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            self.bm25.save(str(tmp), show_progress=False)
            rows = ({"text": t, "label": label} for t, label in zip(self.texts, self.labels))
            write_jsonl_atomic(rows, tmp / ROWS_FILE)
            meta = {"format": FORMAT_VERSION, "segmenter": "jieba", "max_chars": self.max_chars,
                    "rows": len(self), "labels": dict(self.label_counts.most_common())}
            write_json_atomic(meta, tmp / META_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Retriever":
        """A retriever saved by :meth:`save`."""
        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise DataError(folder, None, f"no {META_FILE}: not a saved retriever (build one with Retriever.build)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        rows = read_jsonl(folder / ROWS_FILE)
        bm25 = bm25s.BM25.load(str(folder), show_progress=False)
        return cls(bm25, [r["text"] for r in rows], [r["label"] for r in rows], max_chars=meta.get("max_chars"))

    def retrieve(self, query_text: str, k: int, exclude: int | Iterable[int] | None = None) -> list[Neighbour]:
        """The ``k`` nearest rows (best first), skipping ``exclude`` (corpus indices) and duplicates of the query."""
        return self.retrieve_batch([query_text], k, exclude=[exclude])[0]

    def retrieve_batch(self, query_texts: Sequence[str], k: int,
                       exclude: Sequence[int | Iterable[int] | None] | None = None) -> list[list[Neighbour]]:
        """:meth:`retrieve` for many queries in one bm25s call; ``exclude[i]`` applies to query ``i``.

        Rows with a BM25 score of 0 share no word with the query and are never returned, so a row may get
        fewer than ``k`` neighbours. A text repeated in the corpus is returned once (its best-ranked copy).
        Ties in score are broken by corpus order.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        exclude = list(exclude) if exclude is not None else [None] * len(query_texts)
        if len(exclude) != len(query_texts):
            raise ValueError(f"{len(query_texts)} queries but {len(exclude)} exclude entries")
        if not query_texts:
            return []
        skips = []
        for text, ex in zip(query_texts, exclude):
            skip = set(self._by_text.get(normalize_text(text), ()))
            if ex is not None:
                skip.update([ex] if isinstance(ex, (int, np.integer)) else ex)
            skips.append(skip)
        fetch = min(len(self), k + max(len(s) for s in skips) + self._repeats)
        tokens = [segment(t, self.max_chars) for t in query_texts]
        docs, scores = self.bm25.retrieve(tokens, k=fetch, show_progress=False, n_threads=0)
        results = []
        for row_docs, row_scores, skip in zip(docs, scores, skips):
            ranked = sorted(zip(row_docs.tolist(), row_scores.tolist()), key=lambda p: (-p[1], p[0]))
            picked, seen = [], set()
            for i, s in ranked:
                key = normalize_text(self.texts[i])
                if s > 0 and i not in skip and key not in seen:  # one copy of rows repeated in the corpus
                    seen.add(key)
                    picked.append(Neighbour(i, self.texts[i], self.labels[i], float(s)))
            results.append(picked[:k])
        return results


def vote_weights(neighbours: Sequence[Neighbour], candidates: Sequence[str]) -> dict[str, float]:
    """Sum of BM25 scores per candidate label; neighbours whose label is no candidate are ignored."""
    weights = {c: 0.0 for c in candidates}
    for n in neighbours:
        if n.label in weights:
            weights[n.label] += n.score
    return weights


def retrieval_vote(neighbours: Sequence[Neighbour], candidates: Sequence[str],
                   prior: Mapping[str, int] | None = None) -> str | None:
    """The candidate with the highest score-weighted vote of the neighbours' labels.

    One of ``candidates``. Ties (including "no neighbour has a candidate label") go to the label of
    the better-ranked neighbour, then to the label more frequent in ``prior`` (e.g.
    :attr:`Retriever.label_counts`), then to the alphabetically first label: never to a list position.
    With ``prior`` given, it is the label set the vote knows (the training rows' answers): a candidate absent
    from it is never predicted, and a row with no known candidate gets ``None`` (no answer, counted as wrong).
    """
    if not candidates:
        raise ValueError("retrieval_vote needs at least one candidate label")
    if prior is not None:
        candidates = [c for c in candidates if c in prior]
        if not candidates:
            return None
    weights = vote_weights(neighbours, candidates)
    first_rank = {}
    for rank, n in enumerate(neighbours):
        first_rank.setdefault(n.label, rank)
    prior = prior or {}
    return min(candidates, key=lambda c: (-weights[c], first_rank.get(c, len(neighbours)), -prior.get(c, 0), c))


def as_examples(neighbours: Sequence[Neighbour]) -> list[dict]:
    """Neighbours as the ``{text, label}`` examples the RAG prompt takes (JSON- and ``datasets``-friendly)."""
    return [{"text": n.text, "label": n.label} for n in neighbours]
