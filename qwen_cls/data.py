"""Raw rows of the news classification data: read, validate, convert, count, sample.

A raw row is one JSON object per line::

    {"text": "<新闻正文>", "category": ["Military", "Space"], "output": "Military"}

``category`` lists the candidate labels (a JSON list, or a comma-separated string) and ``output`` is
the right one. Every problem is reported as ``path:line: what is wrong`` through :class:`DataError`.

Taught in: 01, 03, 04, 06
"""

from __future__ import annotations

import ast
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .files import DataError, json_lines, write_jsonl_atomic
from .prompt import control_tokens, user_message

REQUIRED_FIELDS = ("text", "category", "output")


@dataclass(frozen=True)
class RawRow:
    """One validated raw row; ``line`` is its 1-based line number in the source file."""

    text: str
    category: list[str]
    output: str | None
    line: int = 0

    def to_dict(self) -> dict:
        row = {"text": self.text, "category": list(self.category)}
        if self.output is not None:
            row["output"] = self.output
        return row


def parse_category(value, *, drop_empty: bool = False) -> list[str]:
    """Candidate labels from a JSON list or a comma-separated string (``"Art, Sports"``); an empty candidate
    (``""``, ``"Art,,Sports"``) is an error, since the row would no longer be what the file says, unless
    ``drop_empty`` (a dataset this package converts itself)."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            # The original dataset sometimes stores Python's repr of a list: "['Art', 'Sports']".
            try:
                value = ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                raise ValueError(f"category {value!r} looks like a list but does not parse") from None
        else:
            value = [part.strip() for part in stripped.replace("，", ",").split(",")]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("category must be a list of label strings or a comma-separated string")
    if not drop_empty and any(not v.strip() for v in value):
        raise ValueError(f"category {value!r} has an empty candidate; remove it or write the label's name")
    return [v.strip() for v in value if v.strip()]


def validate_row(obj, *, require_output: bool = True) -> RawRow:
    """Check one decoded JSON value; raise ``ValueError`` saying what to fix."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object {{text, category, output}}, got {type(obj).__name__}")
    needed = REQUIRED_FIELDS if require_output else REQUIRED_FIELDS[:2]
    missing = [f for f in needed if f not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}; each row needs text, category and output")
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    candidates = parse_category(obj["category"])
    if len(set(candidates)) != len(candidates):
        dupes = sorted(label for label, n in Counter(candidates).items() if n > 1)
        raise ValueError(f"category lists {', '.join(dupes)} more than once; list each candidate once")
    if len(candidates) < 2:
        raise ValueError(f"category needs at least 2 distinct candidate labels, got {candidates}")
    for field, value in (("text", text), *(("category", c) for c in candidates)):
        found = control_tokens(value)
        if found:
            raise ValueError(f"{field} holds {', '.join(map(repr, found))}, a special token of the chat template: the "
                             "tokenizer would read it as the control token, not as text, and the prompt would no "
                             f"longer be the one trained on; delete it or break it up (e.g. {_broken(found[0])!r})")
    output = obj.get("output")
    if output is not None or require_output:
        if not isinstance(output, str):
            raise ValueError("output must be a string: the correct label")
        output = output.strip()
        if output not in candidates:
            raise ValueError(f"output {output!r} is not among the candidates {candidates}")
    return RawRow(text=text, category=candidates, output=output)


def _broken(token: str) -> str:
    """A special token written so that no tokenizer reads it as one: a space after ``<`` and before ``>``."""
    return f"< {token[1:-1]} >"


def iter_raw_rows(path: str | os.PathLike, *, require_output: bool = True) -> Iterator[RawRow]:
    """Yield validated rows of a raw JSONL file, skipping blank lines; BOM and CRLF are fine."""
    path = Path(path)
    for lineno, obj in json_lines(path):
        try:
            row = validate_row(obj, require_output=require_output)
        except ValueError as exc:
            raise DataError(path, lineno, str(exc)) from None
        yield RawRow(row.text, row.category, row.output, lineno)


def read_raw_rows(path: str | os.PathLike, *, require_output: bool = True, limit: int = 0) -> list[RawRow]:
    """All validated rows of ``path`` (the first ``limit`` when ``limit > 0``); an empty file is an error."""
    rows = []
    for row in iter_raw_rows(path, require_output=require_output):
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise DataError(path, None, "contains no rows; expected one JSON object per line")
    return rows


def to_instruction_row(row: RawRow) -> dict:
    """The recipe's instruction row, keeping ``text`` and ``category`` for truncation and scoring."""
    out = {"input": user_message(row.text, row.category), "output": row.output}
    out.update(text=row.text, category=list(row.category))
    return out


def convert_file(raw_path: str | os.PathLike, out_path: str | os.PathLike, *, limit: int = 0,
                 allow_lookalike_labels: bool = False) -> int:
    """Validate every raw row first (look-alike labels, :func:`check_lookalike_labels`, included), then write the
    instruction rows atomically; returns the count."""
    rows = read_raw_rows(raw_path, limit=limit)
    check_lookalike_labels({raw_path: rows}, allow=allow_lookalike_labels)
    return write_jsonl_atomic((to_instruction_row(r) for r in rows), out_path)


def sample_rows(rows: list, n: int, seed: int) -> list:
    """Shuffle a copy of ``rows`` with ``seed`` and keep the first ``n`` (``n <= 0``: all rows, shuffled)."""
    import random

    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:n] if n > 0 else shuffled


def split_train_validation(rows: list, n_train: int, n_validation: int, seed: int) -> tuple[list, list]:
    """(training rows, validation rows) of one training file, disjoint: shuffle a copy with ``seed``
    (:func:`sample_rows`), keep the **last** ``n_validation`` rows as validation and the **first** ``n_train``
    (``0``: all the others) for training. Taking validation from the end keeps the training rows exactly the
    :func:`sample_rows` ``(rows, n_train, seed)`` they would be without a validation split, whenever the file has
    ``n_train + n_validation`` rows; with fewer, training keeps all the rows validation leaves (as
    :func:`sample_rows` keeps all rows when ``n`` exceeds them). ``ValueError`` (the message gives the counts) when
    validation would leave no training row.

    Notebook 01, ``qwen-cls run``'s preflight and ``benchmarks/choose_settings.py`` all split with this function:
    03's learning curve, the sweep's ranking and every chosen setting read validation rows, never test rows.
    """
    if n_train < 0 or n_validation < 0:
        raise ValueError(f"row counts must be >= 0, got max_train_samples={n_train}, validation_rows={n_validation}")
    shuffled = sample_rows(rows, 0, seed)
    if n_validation >= len(shuffled):
        raise ValueError(f"{len(shuffled)} rows, fewer than {n_validation} validation + 1 training rows: lower "
                         "validation_rows")
    validation = shuffled[len(shuffled) - n_validation:] if n_validation else []
    rest = shuffled[:len(shuffled) - n_validation]
    return (rest[:n_train] if n_train else rest), validation


def rows_sha256(rows: Iterable[RawRow | dict]) -> str:
    """SHA-256 of rows as ``run_config.json`` records them: each row's ``text``, ``category`` and ``output`` as
    one compact JSON line (sorted keys, UTF-8), in order. The same rows give the same digest whichever file or
    form (raw or instruction row) they come in."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for row in rows:
        item = row.to_dict() if isinstance(row, RawRow) else {k: row[k] for k in ("text", "category", "output")}
        item = {"text": item["text"], "category": list(item["category"]), "output": item.get("output")}
        digest.update(json.dumps(item, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    return digest.hexdigest()


def label_inventory(rows: Iterable[RawRow | dict]) -> Counter:
    """How many rows have each label as their answer, most common first."""
    counts = Counter(r.output if isinstance(r, RawRow) else r["output"] for r in rows)
    return Counter(dict(counts.most_common()))


def training_labels(rows: Iterable[RawRow | dict]) -> list[str]:
    """The labels a classifier can learn from ``rows``: their distinct answers, sorted.

    Every method of the notebooks that learns a fixed label set (TF-IDF + logistic regression, the retrieval
    vote, the sequence-classification head) knows these labels and no others; test answers never join them.
    """
    return sorted(label_inventory(rows))


def check_training_labels(rows: Iterable[RawRow | dict], path: str | os.PathLike, what: str = "") -> list[str]:
    """:func:`training_labels`, or a :class:`DataError` naming ``path`` when there are fewer than two (nothing to
    tell apart: 06's head would have one class). ``what`` says which rows when they are a sample of the file."""
    labels = training_labels(rows)
    if len(labels) < 2:
        found = f"only the label {labels[0]!r}" if labels else "no label"
        raise DataError(path, None, f"{what or 'the training rows'} have {found} as their answer (output); a "
                                    "classifier needs at least 2 distinct labels: add rows whose output is another "
                                    "label" + (", or use more of the file (max_train_samples)" if what else ""))
    return labels


def unseen_labels(train_rows: Iterable[RawRow | dict], test_rows: Iterable[RawRow | dict]) -> dict:
    """Test labels that no training row has as its answer, as ``metrics.json`` records them
    (``unseen_test_labels``): ``labels`` (sorted, answers and candidates), ``rows`` (test rows with such a label
    as answer or candidate) and ``answer_rows`` (test rows whose answer is one: no method that learns only the
    training labels can get them right)."""
    known = set(training_labels(train_rows))
    labels, rows, answer_rows = set(), 0, 0
    for row in test_rows:
        answer = row.output if isinstance(row, RawRow) else row["output"]
        candidates = row.category if isinstance(row, RawRow) else row["category"]
        unknown = {answer, *candidates} - known
        labels |= unknown
        rows += bool(unknown)
        answer_rows += answer not in known
    return {"labels": sorted(labels), "rows": rows, "answer_rows": answer_rows}


def describe_unseen(unseen: dict, test_path: str | os.PathLike, train_path: str | os.PathLike,
                    n_test: int | None = None) -> str | None:
    """The warning for :func:`unseen_labels` (``None`` when every test label is a training label), the same in
    ``qwen-cls run``'s preflight and notebook 04."""
    if not unseen["labels"]:
        return None
    shown = ", ".join(unseen["labels"][:10]) + (f", ... ({len(unseen['labels'])} labels)"
                                                  if len(unseen["labels"]) > 10 else "")
    of = f" of {n_test}" if n_test is not None else ""
    return (f"{test_path}: {unseen['rows']}{of} test rows have an answer or candidate that no training row of "
            f"{train_path} has as its answer ({shown}); {unseen['answer_rows']} of them have it as their answer. "
            "tfidf_logreg, retrieval_vote and seq_cls_lora learn only the training labels: they never predict "
            "these, and a row whose answer is one counts as wrong for them; zero_shot, rag and lora score any "
            "candidate's text. Add training rows with these labels to have them learned.")


# --- look-alike labels and test rows leaked into training --------------------------------------------------------

LOOKALIKE_HELP = ("keep labels that differ only by case or full-width letters (Sports / sports) as different labels "
                  "(default: refused, exit 2, naming the files and lines)")  # --allow-lookalike-labels


class LookalikeLabels(ValueError):
    """Labels that differ only by case or Unicode width (``Sports`` / ``sports`` / ``Ｓｐｏｒｔｓ``): the message names
    every spelling with its files and lines and the fix."""


def label_key(label: str) -> str:
    """What look-alike labels share: the NFKC form (full-width letters as ASCII), surrounding whitespace dropped,
    case folded. Surrounding whitespace alone never makes two labels: :func:`validate_row` strips every label."""
    return unicodedata.normalize("NFKC", label).strip().casefold()


def lookalike_labels(files: dict) -> list[dict[str, list[str]]]:
    """Groups of look-alike labels in ``files`` (path -> its :class:`RawRow` list), answers and candidates alike:
    per group, spelling -> the ``path:line`` places it occurs (each row once), spellings in the order first met.
    Empty when every label is written one way."""
    places: dict[str, dict[str, list[str]]] = {}
    for path, rows in files.items():
        for row in rows:
            for label in dict.fromkeys([*row.category, *([row.output] if row.output is not None else [])]):
                places.setdefault(label_key(label), {}).setdefault(label, []).append(f"{path}:{row.line}")
    return [group for group in places.values() if len(group) > 1]


def describe_lookalikes(groups: list[dict[str, list[str]]], *, allowed: bool = False) -> str:
    """One message for :func:`lookalike_labels`' groups: each spelling with its first places, then the fix (or,
    ``allowed``, that ``--allow-lookalike-labels`` keeps them apart)."""
    parts = []
    for group in groups:
        parts.append(" / ".join(
            f"{label!r} ({', '.join(where[:3])}{f', ... {len(where)} rows' if len(where) > 3 else ''})"
            for label, where in group.items()))
    found = "labels that differ only by case (or full-width letters): " + "; ".join(parts)
    if allowed:
        return found + ". --allow-lookalike-labels: they are learned as different labels"
    return (found + ". They would be learned as different labels: write each label one way in every file, or pass "
            "--allow-lookalike-labels if they really are different labels")


def check_lookalike_labels(files: dict, *, allow: bool = False) -> list[dict[str, list[str]]]:
    """:func:`lookalike_labels`: a :class:`LookalikeLabels` error unless ``allow`` (then a warning on stderr)."""
    import sys

    groups = lookalike_labels(files)
    if groups and not allow:
        raise LookalikeLabels(describe_lookalikes(groups))
    if groups:
        print(f"warning: {describe_lookalikes(groups, allowed=True)}", file=sys.stderr, flush=True)
    return groups


def leaked_rows(train_rows: Iterable[RawRow | dict], test_rows: Iterable[RawRow | dict]) -> list[int]:
    """Indices of the test rows whose ``text`` a training row also has: an exact match of the ``text`` field as the
    conversion keeps it (:func:`validate_row` and :func:`to_instruction_row` copy it unchanged: no stripping, no
    case or width folding), so a raw row and its instruction row compare the same. ``metrics.json`` records their
    count as ``leaked_test_rows``: such a row is scored by a model that saw its answer."""
    def text(row):
        return row.text if isinstance(row, RawRow) else row["text"]

    seen = {text(row) for row in train_rows}
    return [i for i, row in enumerate(test_rows) if text(row) in seen]


def describe_leaks(lines: list[int], n_test: int, test_path: str | os.PathLike,
                   train_path: str | os.PathLike) -> str | None:
    """The warning for leaked test rows (``lines``: their line numbers in ``test_path``); ``None`` when none."""
    if not lines:
        return None
    shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
    return (f"{test_path}: {len(lines)} of {n_test} test rows have exactly the text of a training row of "
            f"{train_path} (lines {shown}; the text field compared as written): their scores measure memory, not "
            "new data (04 records the count in metrics.json as leaked_test_rows). Remove them from one of the files")
