"""``qwen-cls serve``: the HTTP API gives ``qwen-cls predict``'s numbers, refuses bad requests with a message and
keeps answering, refuses foreign hosts and unkeyed non-loopback binds, stops on SIGTERM without losing an accepted
request, and its page works in headless Chromium. Every server runs as a subprocess on a free port of 127.0.0.1
and is always stopped."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _tiny_run import SAMPLE_TEST, SAMPLE_TRAIN, subprocess_env, three_step_run
from test_dashboard import CHROMIUM, free_port, raw_get, stop_group

from qwen_cls.commands.cli import main

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.subprocess]  # servers run as subprocesses

LIMITS = {"--max-body-bytes": 100_000, "--max-rows": 60, "--max-text-chars": 3000, "--max-candidates": 6}
KEY = "k" * 12 + "-serve-test"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir made by the library: 3 LoRA steps of the tiny model."""
    return three_step_run(tmp_path_factory.mktemp("runs"))


def sample_rows(n: int = 50) -> list[dict]:
    """``n`` raw rows: the sample's test rows, then its training rows (or generated ones without the sample)."""
    lines = []
    for path in (SAMPLE_TEST, SAMPLE_TRAIN):
        if path.is_file():
            lines += path.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    rows += [{"text": f"第{i}条：火箭发射与球队比赛。", "category": ["Space", "Sports", "Art"][: 2 + i % 2]}
             for i in range(n)]
    return rows[:n]


def start_server(run_dir: Path, *args: str, port: int | None = None,
                 source: str = "--run") -> tuple[str, subprocess.Popen]:
    """``qwen-cls serve --run RUN --port P ARGS`` (or ``--model``) started and answering /health: (url, process)."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen_cls", "serve", source, str(run_dir), "--port", str(port),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=subprocess_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            status, _ = raw_get(url, "/health")
            if status == 200:
                return url, proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            raise AssertionError(f"serve did not answer: {proc.stdout.read()}")
        time.sleep(0.2)


def post(url: str, body, *, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, dict]:
    """POST ``body`` (JSON-encoded unless bytes) to /v1/classify: (status, decoded answer, lower-case headers)."""
    address, port = url.removeprefix("http://").split(":")
    data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    connection = http.client.HTTPConnection(address, int(port), timeout=timeout)
    try:
        connection.request("POST", "/v1/classify", body=data,
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def health(url: str) -> dict:
    status, body = raw_get(url, "/health")
    assert status == 200
    return json.loads(body)


@pytest.fixture(scope="module")
def server(run_dir):
    """A server with small limits and a 50 ms batching window; always stopped."""
    args = [str(a) for item in LIMITS.items() for a in item] + ["--max-wait-ms", "50"]
    url, proc = start_server(run_dir, *args)
    try:
        yield url, proc
    finally:
        stop_group(proc)
        proc.stdout.close()


def as_request(row: dict, **extra) -> dict:
    category = row["category"]
    candidates = [c.strip() for c in category.split(",")] if isinstance(category, str) else category
    return {"text": row["text"], "candidates": candidates, **extra}


@pytest.mark.slow
def test_classify_gives_predicts_numbers_for_the_same_rows(server, run_dir, tmp_path):
    url, _ = server
    rows = sample_rows(50)
    raw = tmp_path / "rows.jsonl"
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "predicted.jsonl"
    assert main(["predict", "--run", str(run_dir), "--input", str(raw), "--output", str(out), "--quiet",
                 "--min-confidence", "0.4"]) == 0
    expected = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]

    before = health(url)
    # 30 rows as concurrent one-row requests (they share forward passes), 20 as one list with a threshold.
    answers: dict[int, dict] = {}

    def ask(i):
        status, body, _ = post(url, as_request(rows[i], min_confidence=0.4))
        assert status == 200, body
        answers[i] = body

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    status, listed, _ = post(url, [as_request(r) for r in rows[30:]])
    assert status == 200 and isinstance(listed, list) and len(listed) == 20
    after = health(url)

    assert sorted(answers) == list(range(30))
    got = [answers[i] for i in range(30)] + listed
    for i, (a, e) in enumerate(zip(got, expected)):
        assert a["prediction"] == e["prediction"], i
        assert set(a["probabilities"]) == set(e["probabilities"])
        for label, p in e["probabilities"].items():
            assert abs(a["probabilities"][label] - p) < 1e-4, (i, label)
        assert a["confidence"] == max(a["probabilities"].values())
        assert abs(a["confidence"] - e["confidence"]) < 1e-4
    assert [a["abstain"] for a in got[:30]] == [e["abstain"] for e in expected[:30]]  # the row's threshold
    assert all("abstain" not in a for a in listed)  # no threshold given, none set on the server
    assert after["accepted"] - before["accepted"] == 31 and after["rows"] - before["rows"] == 50
    assert after["batches"] - before["batches"] < 31  # concurrent requests shared forward passes


BAD = [  # (body, status, words the message must hold)
    (b"{not json", 400, ["not JSON"]),
    (b'{"text": "\xff\xfe", "candidates": ["A", "B"]}', 400, ["UTF-8"]),
    (b"x" * 100_001, 413, ["100000", "--max-body-bytes"]),
    ([{"text": "火箭", "candidates": ["A", "B"]}] * 61, 413, ["61 rows", "60", "--max-rows"]),
    ({"text": "长" * 3001, "candidates": ["A", "B"]}, 413, ["3001 characters", "3000", "--max-text-chars"]),
    ({"text": "火箭", "candidates": list("ABCDEFG")}, 413, ["7 candidates", "6", "--max-candidates"]),
    ({"candidates": ["A", "B"]}, 422, ["missing text"]),
    ({"text": "火箭", "candidates": ["A"]}, 422, ["at least 2"]),
    ({"text": "火箭", "candidates": "A, B"}, 422, ["list of label strings"]),
    ({"text": "火箭", "candidates": ["A", "A", "B"]}, 422, ["more than once"]),
    ({"text": "  ", "candidates": ["A", "B"]}, 422, ["non-empty"]),
    ([{"text": "火箭", "candidates": ["A", "B"]}, 7], 422, ["row 1", "expected an object"]),
    ({"text": "火箭", "candidates": ["A", "B"], "min_confidence": 2}, 422, ["min_confidence", "between 0 and 1"]),
    ([], 422, ["empty"]),
    (42, 422, ["got int"]),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_answering(server, body, status, words):
    url, proc = server
    got, answer, _ = post(url, body)
    assert got == status, answer
    for word in words:
        assert word in answer["detail"], answer
    got, answer, _ = post(url, {"text": "火箭发射成功", "candidates": ["Space", "Sports"]})
    assert got == 200 and answer["prediction"] in ("Space", "Sports")
    assert proc.poll() is None


def test_foreign_hosts_and_origins_are_refused(server):
    url, _ = server
    port = url.rsplit(":", 1)[1]
    assert raw_get(url, "/health")[0] == 200
    assert raw_get(url, "/health", host=f"localhost:{port}")[0] == 200
    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.nip.io:{port}",
                 f"127.0.0.1:{int(port) + 1}", ""):
        for target in ("/health", "/", "/openapi.json"):
            status, body = raw_get(url, target, host=host)
            assert status == 403 and b"answers only requests to" in body, (host, target, body[:200])
    status, body = raw_get(url, "/v1/classify", method="POST", headers={"Origin": "http://attacker.example"})
    assert status == 403
    status, body = raw_get(url, "/v1/classify", method="POST", headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403


def test_docs_and_page_are_served(server):
    url, _ = server
    spec = json.loads(raw_get(url, "/openapi.json")[1])
    assert set(spec["paths"]) == {"/health", "/v1/classify"}
    status, docs = raw_get(url, "/docs")
    assert status == 200 and b"swagger-ui-bundle.js" in docs and not re.search(rb"(src|href)=.https?:", docs)
    status, page = raw_get(url, "/")
    assert status == 200 and b'id="classify"' in page and b"http" not in page.split(b"<script>")[1]  # no CDN
    # Swagger UI's files come from the installed package fastapi-offline, byte for byte, and nothing else of it
    from qwen_cls.serve import DOCS_FILES, docs_assets

    for name in DOCS_FILES:
        status, body = raw_get(url, f"/docs/assets/{name}")
        assert status == 200 and body == (docs_assets() / name).read_bytes(), name
    for name in ("redoc.standalone.js", "..%2F..%2Fcore.py", "..%2Fcore.py", "index.html"):
        assert raw_get(url, f"/docs/assets/{name}")[0] == 404, name
    assert raw_get(url, "/docs/assets/swagger-ui.css", host="attacker.example:80")[0] == 403  # the same Host guard
    assert raw_get(url, "/docs", host="attacker.example:80")[0] == 403


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium); .ci/run installs it")
def test_docs_page_renders_the_operations_in_headless_chromium_offline(server):
    """``/docs`` in a browser whose network is off (no name but 127.0.0.1 resolves): Swagger UI loads from this
    server alone and shows every operation of ``/openapi.json``."""
    from _chromium import chromium_tab, outside

    url, _ = server
    spec = json.loads(raw_get(url, "/openapi.json")[1])
    operations = sorted(f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item)
    with chromium_tab() as tab:
        report = tab.open(url + "/docs", ready=f"document.querySelectorAll('.opblock').length >= {len(operations)}")
        shown = tab.evaluate("[...document.querySelectorAll('.opblock-summary')].map(o => "
                             "o.querySelector('.opblock-summary-method').innerText + ' ' + "
                             "o.querySelector('.opblock-summary-path').innerText.replace(/\u200b/g, ''))")
        title = tab.evaluate("document.querySelector('.info .title').innerText")
        errors = tab.evaluate("document.querySelectorAll('.errors-wrapper, .loading-container .errors').length")
    assert not outside(report["requests"]), outside(report["requests"])
    assert {url + "/docs/assets/swagger-ui-bundle.js", url + "/docs/assets/swagger-ui.css",
            url + "/openapi.json"} <= set(report["requests"])
    assert not report["failed"] and not report["errors"], (report["failed"], report["errors"])
    assert sorted(shown) == operations == ["GET /health", "POST /v1/classify"]
    assert title.startswith(spec["info"]["title"]) and errors == 0


@pytest.mark.slow
def test_a_full_queue_answers_503_with_retry_after_and_min_confidence_marks_abstain(run_dir):
    url, proc = start_server(run_dir, "--queue-size", "1", "--batch-size", "1", "--max-wait-ms", "0",
                             "--min-confidence", "0.99")
    rows = [as_request(r) for r in sample_rows(6)]
    answers: list = []

    def client():
        answers.append(post(url, rows))

    try:
        clients = [threading.Thread(target=client) for _ in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(180)
        statuses = sorted(status for status, _, _ in answers)
        assert len(answers) == 8 and statuses[0] == 200 and statuses[-1] == 503, statuses
        for status, body, headers in answers:
            if status == 503:
                assert headers["retry-after"] == "1" and "--queue-size" in body["detail"]
            else:
                assert status == 200 and len(body) == 6
                assert all(a["abstain"] == (a["confidence"] < 0.99) for a in body)
                assert any(a["abstain"] for a in body)  # the server's threshold applies without one in the body
        status, body, _ = post(url, rows[0])  # still answering
        assert status == 200 and "abstain" in body
        assert proc.poll() is None
    finally:
        stop_group(proc)
        proc.stdout.close()


@pytest.mark.slow
def test_model_folder_of_an_export_gives_the_runs_answers(server, run_dir, tmp_path):
    url, _ = server
    export = tmp_path / "merged"
    assert main(["export", "--run", str(run_dir), "--out", str(export)]) == 0
    rows = [as_request(r) for r in sample_rows(8)]
    status, by_run, _ = post(url, rows)
    assert status == 200
    model_url, proc = start_server(export, source="--model")
    try:
        status, by_model, _ = post(model_url, rows)
    finally:
        stop_group(proc)
        proc.stdout.close()
    assert status == 200
    assert [a["prediction"] for a in by_model] == [a["prediction"] for a in by_run]
    for a, b in zip(by_model, by_run):
        assert all(abs(a["probabilities"][k] - p) < 1e-4 for k, p in b["probabilities"].items())


def test_non_loopback_host_is_refused_without_an_api_key(run_dir):
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "qwen_cls", "serve", "--run", str(run_dir), "--host", "0.0.0.0",
                             "--port", str(port)], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 2
    assert "--api-key" in result.stderr and "Traceback" not in result.stderr
    assert "Loading weights" not in result.stderr  # refused before the model loads


@pytest.mark.slow
def test_api_key_on_a_non_loopback_host_and_the_port_from_port(run_dir):
    port = free_port()
    url, proc = start_server(run_dir, "--host", "0.0.0.0", "--api-key", KEY, port=port)
    try:
        assert url.endswith(f":{port}")
        row = {"text": "火箭发射成功", "candidates": ["Space", "Sports"]}
        assert post(url, row)[0] == 401
        assert post(url, row, headers={"Authorization": f"Bearer {KEY}x"})[0] == 401
        status, answer, _ = post(url, row, headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200 and answer["prediction"] in row["candidates"]
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        stop_group(proc)
        proc.stdout.close()


@pytest.mark.slow
def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(run_dir):
    url, proc = start_server(run_dir, "--queue-size", "256")
    rows = [as_request(r) for r in sample_rows(16)]
    outcomes: list = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                status, body, _ = post(url, rows, timeout=120)
            except (ConnectionError, http.client.RemoteDisconnected):
                outcomes.append("not accepted")  # the listening socket is closed: the request never got in
                time.sleep(0.05)
                continue
            outcomes.append((status, len(body) if isinstance(body, list) else body))

    try:
        clients = [threading.Thread(target=client) for _ in range(8)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 60
        while True:  # load on, and requests still waiting for the model
            state = health(url)
            if state["answered"] >= 2 and state["accepted"] - state["answered"] >= 4:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(120) == 0
        stop.set()
        for t in clients:
            t.join(120)
        output = proc.stdout.read()
    finally:
        stop.set()
        stop_group(proc)
        proc.stdout.close()
    answered = [o for o in outcomes if o != "not accepted"]
    assert answered and all(o == (200, 16) for o in answered), [o for o in answered if o != (200, 16)][:3]
    # Every request the server accepted came back answered, and the clients got exactly those answers.
    accepted = int(re.search(r"answered (\d+) of (\d+) accepted requests \(0 failed\)", output).group(2))
    assert accepted >= state["accepted"] and output.count("answered") >= 1
    assert re.search(rf"answered {accepted} of {accepted} accepted", output), output[-500:]
    assert len(answered) == accepted


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium); .ci/run installs it")
def test_page_in_headless_chromium_shows_the_prediction_and_bars(server):
    from _chromium import chromium_tab

    url, _ = server
    headline = "神舟飞船发射成功，航天员顺利进入空间站"
    candidates = ["Space", "Sports", "Economy"]
    status, expected, _ = post(url, {"text": headline, "candidates": candidates})
    assert status == 200
    with chromium_tab() as tab:
        tab.open(url + "/", "document.readyState === 'complete' && document.getElementById('classify') !== null")
        tab.call("Page.bringToFront")
        tab.call("Emulation.setFocusEmulationEnabled", enabled=True)  # focus() holds in a headless window
        tab.evaluate("document.getElementById('text').focus()")
        tab.call("Input.insertText", text=headline)  # typed, as a user would
        tab.evaluate("document.getElementById('candidates').focus()")
        tab.evaluate("document.getElementById('candidates').select()")
        tab.call("Input.insertText", text=", ".join(candidates))  # the edited candidates replace the defaults
        assert tab.evaluate("document.getElementById('text').value") == headline
        assert tab.evaluate("document.getElementById('candidates').value") == ", ".join(candidates)
        tab.evaluate("document.getElementById('classify').click()")
        tab.wait_for("['done', 'error'].includes(document.body.dataset.state || '')", seconds=120)
        assert tab.evaluate("document.getElementById('error').textContent") == ""
        shown = tab.evaluate("document.getElementById('prediction').textContent")
        bars = tab.evaluate("[...document.querySelectorAll('#bars .row')].map(r => [r.dataset.label, "
                            "Number(r.dataset.probability), r.querySelector('.fill').style.width])")
    assert shown == expected["prediction"]
    assert sorted(label for label, _, _ in bars) == sorted(candidates)
    for label, p, width in bars:
        assert abs(p - expected["probabilities"][label]) < 1e-6
        assert width.endswith("%") and abs(float(width[:-1]) - 100 * p) < 0.006  # the bar's length is the probability
    assert bars[0][0] == expected["prediction"]  # the winner's bar comes first


def test_serve_in_background_gives_predicts_numbers_and_the_load_test_counts_them(tiny_dir):
    """Notebook 07's server (in a thread, around a loaded model) answers like ``predict_rows``; the load test
    (``qwen_cls.serve_client``) checks every answer against them and counts requests, rows/s and latencies."""
    from qwen_cls.data import read_raw_rows
    from qwen_cls.model import load_model
    from qwen_cls.predict import predict_rows
    from qwen_cls.serve import Limits, serve_in_background
    from qwen_cls.serve_client import classify, get_json, load_test

    model, tokenizer = load_model(tiny_dir, device="cpu")
    raw = read_raw_rows(SAMPLE_TEST)[:6]
    rows = [{"text": r.text, "candidates": list(r.category)} for r in raw]
    expected = predict_rows(model, tokenizer, raw, max_length=128, batch_size=4)
    with serve_in_background(model, tokenizer, max_length=128, limits=Limits(batch_size=4), tiny_model=True) as url:
        assert url.startswith("http://127.0.0.1:")
        status, answers = classify(url, rows)
        assert status == 200 and [a["prediction"] for a in answers] == [e["prediction"] for e in expected]
        for a, e in zip(answers, expected):
            assert set(a["probabilities"]) == set(e["probabilities"])
            for label, p in e["probabilities"].items():
                assert abs(a["probabilities"][label] - p) <= 1e-4
        report = load_test(url, rows, [e["prediction"] for e in expected], clients=3, seconds=2)
        health = get_json(url, "/health")
    assert report["requests"] > 0 and report["errors"] == 0 and report["mismatches"] == 0
    assert report["serve_rows_per_second"] == pytest.approx(report["requests"] / report["wall_seconds"])
    assert report["p50_ms"] <= report["p99_ms"]
    assert health["tiny_model"] is True and health["answered"] == report["requests"] + 1  # + the list request
    with pytest.raises(OSError):  # stopped on leaving the block
        get_json(url, "/health", timeout=5)


def _status(guard, headers: dict, path: str = "/v1/classify") -> int:
    """The status ``guard`` answers a GET of ``path`` with ``headers`` (a stand-in app answers 200)."""
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path,
             "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]}
    asyncio.run(guard(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_bearer_scheme_is_case_insensitive_and_the_key_is_compared_exactly():
    from qwen_cls.serve import ServeGuard

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    key = "k" * 20
    guard = ServeGuard(app, "0.0.0.0", 8092, api_key=key, max_body_bytes=1000)
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        assert _status(guard, {"authorization": f"{scheme} {key}"}) == 200, scheme
    for wrong in (f"Basic {key}", f"Bearer {key}x", "Bearer", "", key, f"Bearer {key.upper()}"):
        assert _status(guard, {"authorization": wrong}) == 401, wrong
    assert _status(guard, {}, path="/health") == 200  # only /v1/* needs the key


@pytest.mark.parametrize("key", ["ключ-секрет-длинный-1234", "a key with spaces 123456", "tab\tkey-0123456789abc"])
def test_an_api_key_http_cannot_carry_is_refused_at_start(run_dir, key, capsys):
    assert main(["serve", "--run", str(run_dir), "--host", "0.0.0.0", "--api-key", key]) == 2
    err = capsys.readouterr().err
    assert "--api-key must be printable ASCII without spaces" in err and "Traceback" not in err


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000])
def test_deeply_nested_json_is_a_400_not_a_recursion_error(body):
    from qwen_cls.serve_requests import Limits, RequestError, parse_rows

    with pytest.raises(RequestError) as error:
        parse_rows(body, Limits())
    assert error.value.status == 400 and "nests JSON arrays or objects too deeply" in str(error.value)
