"""``qwen-cls serve`` between clients (#33): it says which model and adapter it loaded (SHA-256 in ``/health``),
stops answering once its run folder is replaced, refuses a row ``predict`` cannot score with ``predict``'s message
so that the other clients sharing its forward pass are answered, splits a large request into passes that other
requests' rows go between, and checks ``--max-length`` as ``predict`` does. ``servable_rows`` (notebook 07's load
test) skips the rows the server refuses, with a note."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _tiny_run import SAMPLE_TEST, subprocess_env, three_step_run
from test_dashboard import free_port, raw_get, stop_group
from test_serve import as_request, post, sample_rows, start_server

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.subprocess]

LONG = "长" * 5000  # a 5000-character candidate: max_length=128 leaves no room for the text


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir made by the library: 3 LoRA steps of the tiny model (max_length 128)."""
    return three_step_run(tmp_path_factory.mktemp("runs"))


def health(url: str) -> tuple[int, dict]:
    status, body = raw_get(url, "/health")
    return status, json.loads(body)


def predict_error(run_dir: Path, rows: list[dict], tmp_path: Path, *extra: str) -> tuple[int, str]:
    """(exit status, stderr) of ``qwen-cls predict --run RUN`` on ``rows`` (a subprocess: predict's own words)."""
    raw = tmp_path / "rows.jsonl"
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "qwen_cls", "predict", "--run", str(run_dir), "--input", str(raw),
                             "--output", str(tmp_path / "out.jsonl"), "--quiet", *extra],
                            capture_output=True, text=True, env=subprocess_env(), timeout=300)
    return result.returncode, result.stderr


def sha256sum_listing(folder: Path, names: list[str]) -> str:
    """``cd folder && sha256sum NAMES | sha256sum``, by the coreutils themselves."""
    listing = subprocess.run(["sha256sum", *names], cwd=folder, capture_output=True, check=True).stdout
    return hashlib.sha256(listing).hexdigest()


@pytest.fixture(scope="module")
def server(run_dir):
    url, proc = start_server(run_dir, "--max-wait-ms", "30")
    try:
        yield url, proc
    finally:
        stop_group(proc)
        proc.stdout.close()


def test_health_names_the_model_and_adapter_with_their_sha256(server, run_dir):
    from qwen_cls.model import resolve_model

    url, _ = server
    status, state = health(url)
    assert status == 200 and state["status"] == "ok"
    adapter = run_dir.resolve() / "adapter"
    assert state["run"] == str(run_dir.resolve()) and state["adapter"] == str(adapter)
    assert state["adapter_sha256_of"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert state["adapter_sha256"] == sha256sum_listing(adapter, ["adapter_config.json", "adapter_model.safetensors"])
    assert state["model"] == "tiny" and state["model_path"] == str(resolve_model("tiny"))
    assert state["model_sha256_of"] == ["qwen_cls_manifest.json"]  # the manifest lists every file's SHA-256
    assert state["model_sha256"] == sha256sum_listing(Path(state["model_path"]), ["qwen_cls_manifest.json"])
    assert state["max_length"] == 128 and state["pass_candidates"] == 400


def test_a_row_predict_cannot_score_is_a_422_with_predicts_message(server, run_dir, tmp_path):
    url, _ = server
    row = {"text": "火箭发射成功", "category": ["Space", LONG]}
    code, stderr = predict_error(run_dir, [row], tmp_path)
    assert code == 2 and "leaves no room for the text" in stderr and "(5000 characters)" in stderr, stderr[-2000:]
    message = stderr.strip().splitlines()[-1].removeprefix("error: ")
    assert len(message) < 400  # the candidate is shown cut, with its length, not 5000 characters of it
    status, answer, _ = post(url, as_request(row))
    assert status == 422 and answer["detail"] == f"the row: {message}"
    status, answer, _ = post(url, [{"text": "好", "candidates": ["A", "B"]}, as_request(row)])
    assert status == 422 and answer["detail"] == f"row 1: {message}"


@pytest.mark.slow
def test_good_clients_get_their_answers_while_a_bad_client_keeps_sending_long_candidates(server, run_dir):
    """Before: the bad row failed the shared forward pass, and with it a third of the good clients' requests."""
    url, _ = server
    rows = [as_request(r) for r in sample_rows(12)]
    status, alone, _ = post(url, rows)  # the answers when nothing else is sent
    assert status == 200
    stop = threading.Event()
    bad_answers, good_answers = [], {}

    def bad():
        while not stop.is_set():
            bad_answers.append(post(url, {"text": "坏请求", "candidates": ["Space", LONG]})[:2])

    def good(i):
        good_answers[i] = post(url, rows[i])[:2]

    bad_clients = [threading.Thread(target=bad) for _ in range(2)]
    for t in bad_clients:
        t.start()
    try:
        for _ in range(3):  # three waves of 12 concurrent good clients, the bad ones sending all along
            threads = [threading.Thread(target=good, args=(i,)) for i in range(len(rows))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert sorted(good_answers) == list(range(len(rows)))
            for i, (status, answer) in good_answers.items():
                assert status == 200, answer
                assert answer["prediction"] == alone[i]["prediction"]
                for label, p in alone[i]["probabilities"].items():
                    assert abs(answer["probabilities"][label] - p) < 1e-4
            good_answers.clear()
    finally:
        stop.set()
        for t in bad_clients:
            t.join(60)
    assert bad_answers and {status for status, _ in bad_answers} == {422}


def test_a_failing_pass_is_scored_again_row_by_row_so_only_the_failing_request_fails(tiny_dir, monkeypatch):
    """A row that fails inside the model (not caught when it arrived) fails its own request only."""
    import qwen_cls.serve_batcher as serve_batcher
    from qwen_cls.data import validate_row
    from qwen_cls.model import load_model
    from qwen_cls.serve_requests import Limits

    model, tokenizer = load_model(tiny_dir, device="cpu")
    real = serve_batcher.predict_rows

    def predict_rows(model, tokenizer, rows, **options):
        if any(row.text == "炸" for row in rows):
            raise RuntimeError("this row breaks the model")
        return real(model, tokenizer, rows, **options)

    monkeypatch.setattr(serve_batcher, "predict_rows", predict_rows)
    batcher = serve_batcher.Batcher(model, tokenizer, max_length=128, limits=Limits(batch_size=8, max_wait_ms=200))
    rows = [validate_row({"text": text, "category": ["Space", "Sports"]}, require_output=False)
            for text in ("火箭发射", "炸", "球队比赛")]
    batcher.start()
    try:
        futures = [batcher.submit([row]) for row in rows]  # within max_wait_ms: one shared pass first
        with pytest.raises(RuntimeError, match="breaks the model"):
            futures[1].result(60)
        good = [futures[0].result(60)[0], futures[2].result(60)[0]]
    finally:
        batcher.stop()
    expected = real(model, tokenizer, [rows[0], rows[2]], max_length=128)
    assert [g["prediction"] for g in good] == [e["prediction"] for e in expected]
    assert batcher.stats["failed"] == 1 and batcher.stats["answered"] == 2


def test_a_large_request_is_split_into_passes_and_a_later_small_one_goes_between(tiny_dir):
    from qwen_cls.data import validate_row
    from qwen_cls.model import load_model
    from qwen_cls.predict import predict_rows
    from qwen_cls.serve_batcher import Batcher
    from qwen_cls.serve_requests import Limits

    model, tokenizer = load_model(tiny_dir, device="cpu")
    labels = [f"类别{i}" for i in range(8)]
    big = [validate_row({"text": f"第{i}条：火箭发射与球队比赛。", "category": labels}, require_output=False)
           for i in range(24)]
    small = [validate_row({"text": "神舟飞船发射成功", "category": ["Space", "Sports"]}, require_output=False)]
    limits = Limits(batch_size=8, pass_candidates=20, max_wait_ms=0)
    batcher = Batcher(model, tokenizer, max_length=128, limits=limits)
    batcher.start()
    try:
        done = {}
        big_future = batcher.submit(big)
        big_future.add_done_callback(lambda _: done.setdefault("big", time.monotonic()))
        deadline = time.monotonic() + 120
        while batcher.stats["batches"] < 1:  # the big request is being scored
            assert not big_future.done() and time.monotonic() < deadline, big_future.exception()
            time.sleep(0.005)
        small_future = batcher.submit(small)
        small_future.add_done_callback(lambda _: done.setdefault("small", time.monotonic()))
        big_answers, small_answers = big_future.result(300), small_future.result(300)
    finally:
        batcher.stop()
    assert done["small"] < done["big"]  # answered between the big request's passes
    # 24 rows x 8 candidates in passes of at most 20 candidates: 2 rows a pass (the small one joins one of them).
    assert batcher.stats["batches"] == 12 and batcher.stats["rows"] == 25
    assert all(candidates <= 20 for _, candidates in batcher.pass_sizes)
    assert sorted(batcher.pass_sizes) == sorted([(2, 16)] * 11 + [(3, 18)])
    expected = predict_rows(model, tokenizer, big + small, max_length=128, batch_size=8)
    got = big_answers + small_answers  # the same answers as scored together
    assert [g["prediction"] for g in got] == [e["prediction"] for e in expected]
    for g, e in zip(got, expected):
        assert all(abs(g["probabilities"][k] - p) < 1e-4 for k, p in e["probabilities"].items())


def test_replacing_the_run_folder_stops_answers_from_the_old_adapter(run_dir, tmp_path):
    """``qwen-cls run --overwrite`` renames the old run aside and a new one into place: the server, which still
    holds the old adapter, answers 503 naming the change and the fix, and /health says so."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    url, proc = start_server(run)
    try:
        row = {"text": "火箭发射成功", "candidates": ["Space", "Sports"]}
        status, before, _ = post(url, row)
        assert status == 200
        os.rename(run, tmp_path / "run.previous")  # as --overwrite does
        shutil.copytree(tmp_path / "run.previous", run)  # the new run: other inodes
        status, answer, _ = post(url, row)
        assert status == 503, answer
        assert str(run / "adapter" / "adapter_config.json") in answer["detail"]
        assert "restart" in answer["detail"] and f"qwen-cls serve --run {run}" in answer["detail"]
        status, state = health(url)
        assert status == 503 and state["status"] == "run changed" and state["problem"] == answer["detail"]
        os.rename(tmp_path / "run.previous", tmp_path / "back")
        shutil.rmtree(run)
        os.rename(tmp_path / "back", run)  # even the old files back in place: it stays refused
        assert post(url, row)[0] == 503
        assert proc.poll() is None
    finally:
        stop_group(proc)
        proc.stdout.close()


def test_a_run_folder_replaced_during_a_pass_gets_no_answer(tiny_dir, tmp_path):
    """The check after the pass: a request whose rows were scored while the adapter was replaced is refused."""
    from qwen_cls.data import validate_row
    from qwen_cls.model import load_model
    from qwen_cls.serve_batcher import Batcher, RunChanged
    from qwen_cls.serve_requests import Limits
    from qwen_cls.serving.served_files import FolderWatch

    model, tokenizer = load_model(tiny_dir, device="cpu")
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(b"old")
    watch = FolderWatch([weights], tmp_path, "`qwen-cls serve --run RUN`")

    def replace(module, args, output):
        if not weights.with_suffix(".new").exists():
            weights.with_suffix(".new").write_bytes(b"new")
            os.replace(weights.with_suffix(".new"), weights)

    batcher = Batcher(model, tokenizer, max_length=128, limits=Limits(), watch=watch)
    handle = model.register_forward_hook(replace)
    batcher.start()
    try:
        future = batcher.submit([validate_row({"text": "火箭", "category": ["Space", "Sports"]},
                                              require_output=False)])
        with pytest.raises(RunChanged, match="was replaced"):
            future.result(60)
    finally:
        batcher.stop()
        handle.remove()
    assert batcher.stats["answered"] == 0


@pytest.mark.parametrize("value", ["0", "63", "-5"])
def test_max_length_is_checked_at_start_as_predict_checks_it(run_dir, tmp_path, value):
    """Before: 0 fell back to the run's max_length and the others started a server that failed every request."""
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "qwen_cls", "serve", "--run", str(run_dir), "--port", str(port),
                             "--max-length", value], capture_output=True, text=True, env=subprocess_env(), timeout=90)
    assert result.returncode == 2
    err = result.stderr
    assert "Loading weights" not in err  # refused before the model loads
    code, predict_err = predict_error(run_dir, [{"text": "火箭", "category": ["A", "B"]}], tmp_path,
                                      "--max-length", value)
    assert code == 2
    assert err.strip() == predict_err.strip().splitlines()[-1]
    assert err.startswith("error: --max-length must be an integer >= 64") and "Traceback" not in err


def test_servable_rows_skips_what_the_server_refuses_and_the_load_test_then_has_no_error(tiny_dir):
    """Notebook 07's load test: a test row of megabytes (or a 5000-character candidate) is skipped with a note, instead
    of the load test counting errors and the notebook failing on a bare ``assert``."""
    from qwen_cls.data import read_raw_rows
    from qwen_cls.model import load_model
    from qwen_cls.predict import predict_rows
    from qwen_cls.serve import Limits, servable_rows, serve_in_background
    from qwen_cls.serve_client import load_test

    model, tokenizer = load_model(tiny_dir, device="cpu")
    rows = [{"text": r.text, "candidates": list(r.category)} for r in read_raw_rows(SAMPLE_TEST)[:4]]
    rows.insert(1, {"text": "大" * 700_000, "candidates": ["Space", "Sports"]})  # 2.1 MB of UTF-8: over 1 MiB
    rows.insert(3, {"text": "火箭", "candidates": ["Space", LONG]})
    limits = Limits(batch_size=4)
    keep, note = servable_rows(rows, tokenizer, max_length=128, limits=limits)
    assert keep == [0, 2, 4, 5]
    assert note.startswith("skipped 2 of 6 rows") and "1 over --max-body-bytes (e.g. row 1: the body has" in note
    assert "1 over max_length=128 (e.g. row 3: max_length=128 leaves no room for the text" in note
    kept = [rows[i] for i in keep]
    expected = predict_rows(model, tokenizer, [{"text": r["text"], "category": r["candidates"]} for r in kept],
                            max_length=128)
    with serve_in_background(model, tokenizer, max_length=128, limits=limits) as url:
        report = load_test(url, kept, [e["prediction"] for e in expected], clients=2, seconds=1)
        refused = load_test(url, rows, [None] * len(rows), clients=1, seconds=1)  # what 07 met before
    assert report["requests"] > 0 and report["errors"] == 0 and report["mismatches"] == 0
    assert refused["errors"] > 0 and "422" in refused["error_kinds"]
    with pytest.raises(ValueError, match="no row is left to send"):
        servable_rows([rows[3]], tokenizer, max_length=128, limits=limits)
