"""What one request to ``qwen-cls serve`` may hold, how its body becomes rows, and each row's answer.

**Limits** (:class:`Limits`, one field a flag): a body over ``--max-body-bytes``, more than ``--max-rows`` rows, a
text over ``--max-text-chars`` characters or more than ``--max-candidates`` candidates is answered 413 naming the
limit; the queue and the forward passes are bounded too (``--queue-size``, ``--batch-size``, ``--max-wait-ms``,
``--pass-candidates``). :func:`parse_rows` reads a body: not JSON, 400; a row that is wrong (no text, fewer than 2
candidates, ...), 422 (:class:`RequestError`). Each message says which row and what to fix; a bad request never
stops the server. Rows are validated like ``qwen-cls predict``'s input (:func:`~qwen_cls.data.validate_row`), and
:func:`answer` adds to predict's result ``confidence`` and, given a threshold, ``abstain``.

Taught in: 07
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .data import validate_row
from .predict import check_min_confidence


@dataclass(frozen=True)
class Limits:
    """What one request may hold; each is named (with its flag) in the 413 that enforces it."""

    max_body_bytes: int = 1 << 20
    max_rows: int = 64
    max_text_chars: int = 10_000
    max_candidates: int = 50
    queue_size: int = 64
    batch_size: int = 8
    max_wait_ms: float = 5.0
    pass_candidates: int = 400  # batch_size x max_candidates: a full pass as before, a large request split

    FLAGS = {"max_body_bytes": "--max-body-bytes", "max_rows": "--max-rows", "max_text_chars": "--max-text-chars",
             "max_candidates": "--max-candidates", "queue_size": "--queue-size", "batch_size": "--batch-size",
             "max_wait_ms": "--max-wait-ms", "pass_candidates": "--pass-candidates"}

    def check(self) -> None:
        """``ValueError`` naming the flag of a limit that is not a positive number (wait: >= 0)."""
        for name, flag in self.FLAGS.items():
            value = getattr(self, name)
            if name == "max_wait_ms":
                if not 0 <= value <= 1000:
                    raise ValueError(f"{flag} must be between 0 and 1000 milliseconds, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")


class RequestError(ValueError):
    """A request the server will not classify: ``status`` (400, 413, 422) and a message saying what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_rows(body: bytes, limits: Limits) -> tuple[list, list, bool]:
    """(rows, thresholds, single) from a request body: one row object or a list of them.

    ``rows`` are validated like ``qwen-cls predict``'s input (:func:`~qwen_cls.data.validate_row`, so candidates
    are stripped the same way); ``thresholds`` is each row's ``min_confidence`` (or None); ``single`` is True
    when the body was one object (the answer is then one object too)."""
    try:
        obj = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not UTF-8 text; send JSON encoded as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"the body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); send "
                                '{"text": ..., "candidates": [...]} or a list of such rows') from None
    except RecursionError:  # e.g. 100,000 nested brackets: the parser's depth, not the server, is the limit
        raise RequestError(400, "the body nests JSON arrays or objects too deeply; send "
                                '{"text": ..., "candidates": [...]} or a flat list of such rows') from None
    single = isinstance(obj, dict)
    items = [obj] if single else obj
    if not isinstance(items, list):
        raise RequestError(422, f'expected a row {{"text": ..., "candidates": [...]}} or a list of rows, got '
                                f"{type(obj).__name__}")
    if not items:
        raise RequestError(422, "the list of rows is empty; send at least one row")
    if len(items) > limits.max_rows:
        raise RequestError(413, f"{len(items)} rows in one request; this server's limit is {limits.max_rows} "
                                "(--max-rows): split them into several requests")
    rows, thresholds = [], []
    for i, item in enumerate(items):
        where = "the row" if single else f"row {i}"
        if not isinstance(item, dict):
            raise RequestError(422, f'{where}: expected an object {{"text": ..., "candidates": [...]}}, got '
                                    f"{type(item).__name__}")
        missing = [key for key in ("text", "candidates") if key not in item]
        if missing:
            raise RequestError(422, f"{where}: missing {' and '.join(missing)}; each row needs text and "
                                    "candidates (a list of at least 2 labels)")
        text, candidates = item["text"], item["candidates"]
        if isinstance(text, str) and len(text) > limits.max_text_chars:
            raise RequestError(413, f"{where}: text has {len(text)} characters; this server's limit is "
                                    f"{limits.max_text_chars} (--max-text-chars)")
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise RequestError(422, f'{where}: candidates must be a list of label strings, e.g. ["Sports", "Art"]')
        if len(candidates) > limits.max_candidates:
            raise RequestError(413, f"{where}: {len(candidates)} candidates; this server's limit is "
                                    f"{limits.max_candidates} (--max-candidates)")
        try:
            row = validate_row({"text": text, "category": candidates}, require_output=False)
            threshold = item.get("min_confidence")
            check_min_confidence(threshold)
        except ValueError as exc:  # the shared checks name predict's field and flag; name this API's
            message = str(exc).replace("--min-confidence", "min_confidence").replace("category", "candidates")
            raise RequestError(422, f"{where}: {message}") from None
        rows.append(row)
        thresholds.append(threshold)
    return rows, thresholds, single


def answer(result: dict, threshold: float | None) -> dict:
    """One row's answer: predict's result plus ``confidence`` (the top probability) and, given a threshold,
    ``abstain`` (confidence below it), as ``qwen-cls predict --min-confidence`` marks it."""
    out = {**result, "confidence": result["probabilities"][result["prediction"]]}
    if threshold is not None:
        out["abstain"] = out["confidence"] < threshold
    return out
