"""``qwen-cls dashboard``: a run directory's local SwanLab runs served on 127.0.0.1, checked through its HTTP
API and in headless Chromium. The dashboard process group is always stopped, and the port is free afterwards.

The run directory holds what notebooks 03 and 04 write: the training experiment (loss per step, and per
epoch the accuracy and macro-F1 that ``ClassificationEvalCallback`` logs through ``trainer.log``), and
notebook 04's separate ``<run>-eval`` experiment (test metrics and sample predictions).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
from PIL import Image

from qwen_cls import tracking

pytestmark = pytest.mark.subprocess  # every test talks to a running `qwen-cls dashboard`

CHROMIUM = Path("/usr/bin/chromium")
EXPERIMENT = "dash-test"  # the run directory's name: notebook 03 names the training experiment after it
EVAL_EXPERIMENT = f"{EXPERIMENT}-eval"  # notebook 04's experiment, started in its own kernel
LOSSES = [2.5, 2.0, 1.6, 1.3, 1.1, 0.9]  # one per step, 3 steps per epoch
EPOCH_EVAL = {3: (0.25, 0.2), 6: (0.75, 0.6)}  # step at each epoch's end -> (accuracy, macro-F1)
ACCURACY, MACRO_F1 = 0.7, 0.5  # notebook 04's test metrics


def drive_callback(callback, losses: list[float], epoch_eval: dict, output_dir: Path) -> None:
    """Call a Trainer callback as the Trainer does: train begin, one log per step, and at each epoch's end
    the log ``ClassificationEvalCallback`` makes through ``trainer.log``."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(output_dir), report_to="none")
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step, loss in enumerate(losses, start=1):
        state.global_step, state.epoch = step, step / 3
        callback.on_log(args, state, control, logs={"loss": loss, "learning_rate": 1e-4 * (1 - step / 10),
                                                    "epoch": state.epoch})
        if step in epoch_eval:
            accuracy, macro_f1 = epoch_eval[step]
            callback.on_log(args, state, control, logs={"eval_accuracy": accuracy, "eval_macro_f1": macro_f1,
                                                        "epoch": state.epoch})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as notebooks 03 and 04 leave it: the training experiment and the ``-eval`` one."""
    out = tmp_path_factory.mktemp("dash") / EXPERIMENT
    tracking.finish()
    try:
        (callback,) = tracking.swanlab_callbacks("local", out, {"profile": "tiny"})
        drive_callback(callback, LOSSES, EPOCH_EVAL, out / "trainer")
        tracking.finish()
        png = out.parent / "confusion.png"
        Image.new("RGB", (32, 24), (200, 30, 30)).save(png)
        tracking.log_evaluation({"accuracy": ACCURACY, "macro_f1": MACRO_F1, "n_test": 4}, confusion_png=png,
                                samples=[{"text": "火箭发射", "category": ["Art", "Space"], "output": "Space",
                                          "prediction": "Space"}], out_dir=out, mode="local")
    finally:
        tracking.finish()
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["code"] == 0, body
    return body["data"]


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session`` and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    try:  # the swanlab child, should it have outlived its parent
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def dashboard(run_dir):
    """``qwen-cls dashboard RUN --port N`` running; yields (base url, process); always stopped."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen_cls", "dashboard", str(run_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first_line = proc.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        assert url in first_line, first_line  # it prints the address
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(f"{url}/api/v1/project")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"dashboard did not answer: {first_line}{proc.stdout.read()}") from None
                time.sleep(0.3)
        yield url, proc
    finally:
        family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))] \
            if proc.poll() is None else [proc.pid]
        stop_group(proc)
        proc.stdout.close()
        assert not [pid for pid in family if psutil.pid_exists(pid)], "dashboard processes outlived the test"
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", port))  # nothing listens any more


def experiment_id(url: str, name: str = EXPERIMENT) -> int:
    (exp,) = [e for e in get_json(f"{url}/api/v1/project")["experiments"] if e["name"] == name]
    return exp["id"]


def points(url: str, eid: int, tag: str) -> dict:
    return get_json(f"{url}/api/v1/experiment/{eid}/tag/{quote(tag, safe='')}")


def test_api_lists_the_training_run_with_its_loss_curve_and_epoch_metrics(dashboard):
    url, _ = dashboard
    project = get_json(f"{url}/api/v1/project")
    assert project["name"] == "qwen-cls"
    assert sorted(e["name"] for e in project["experiments"]) == [EXPERIMENT, EVAL_EXPERIMENT]
    eid = experiment_id(url)
    charts = {c["name"]: c["type"] for c in get_json(f"{url}/api/v1/experiment/{eid}/chart")["charts"]}
    assert charts["train/loss"] == charts["train/learning_rate"] == "line"
    assert charts["eval/accuracy"] == charts["eval/macro_f1"] == "line"  # in the training run itself
    loss = points(url, eid, "train/loss")
    assert [(p["index"], p["data"]) for p in loss["list"]] == list(enumerate(LOSSES, start=1))
    assert (loss["min"], loss["max"]) == (min(LOSSES), max(LOSSES))
    accuracy = points(url, eid, "eval/accuracy")
    assert [(p["index"], p["data"]) for p in accuracy["list"]] == [(s, a) for s, (a, _) in EPOCH_EVAL.items()]
    f1 = points(url, eid, "eval/macro_f1")
    assert [(p["index"], p["data"]) for p in f1["list"]] == [(s, f) for s, (_, f) in EPOCH_EVAL.items()]
    summary = {s["key"]: s["value"] for s in get_json(f"{url}/api/v1/experiment/{eid}/summary")["summaries"]}
    assert summary["train/loss"] == LOSSES[-1]
    assert (summary["eval/accuracy"], summary["eval/macro_f1"]) == EPOCH_EVAL[len(LOSSES)]


def test_api_lists_the_evaluation_run_with_test_metrics_and_samples(dashboard):
    url, _ = dashboard
    eid = experiment_id(url, EVAL_EXPERIMENT)
    charts = {c["name"]: c["type"] for c in get_json(f"{url}/api/v1/experiment/{eid}/chart")["charts"]}
    assert charts["eval/accuracy"] == "line" and charts["eval/samples"] == "text"
    assert "train/loss" not in charts
    summary = {s["key"]: s["value"] for s in get_json(f"{url}/api/v1/experiment/{eid}/summary")["summaries"]}
    assert (summary["eval/accuracy"], summary["eval/macro_f1"], summary["eval/n_test"]) == (ACCURACY, MACRO_F1, 4)


def test_listens_on_loopback_only(dashboard):
    url, proc = dashboard
    port = int(url.rsplit(":", 1)[1])
    family = psutil.Process(proc.pid)
    listening = [c.laddr for p in [family, *family.children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and {(a.ip, a.port) for a in listening} == {("127.0.0.1", port)}
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others:  # not reachable through any other interface of this machine
        with socket.socket() as client, pytest.raises(OSError):
            client.settimeout(3)
            client.connect((address, port))


def run_chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Headless Chromium as root, with a throw-away profile; killed with its helpers on timeout."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            stop_group(proc)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium); .ci/run installs it")
def test_dashboard_page_renders_in_headless_chromium(dashboard, tmp_path):
    url, _ = dashboard
    page = f"{url}/experiment/{experiment_id(url)}"
    shot = tmp_path / "dashboard.png"
    result = run_chromium("--window-size=1280,900", f"--screenshot={shot}", page)
    assert shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
    assert rgb.size == (1280, 900)
    colours = sorted(rgb.getcolors(rgb.size[0] * rgb.size[1]), reverse=True)
    # A blank or error page is one background colour with a little text; the charts page is not.
    assert colours[0][0] / (1280 * 900) < 0.8 and len(colours) > 200, (colours[0], len(colours))

    dom = run_chromium("--dump-dom", page).stdout
    assert 'id="app" data-v-app' in dom  # the Vue app mounted (not Chromium's own error page)
    assert EXPERIMENT in dom and "train/loss" in dom and "eval/accuracy" in dom
    assert "ERR_" not in dom


# ------------------------------------------------------------------ attacks: files, hosts, origins


def raw_get(url: str, target: str, *, host: str | None = None, method: str = "GET",
            headers: dict | None = None) -> tuple[int, bytes]:
    """Send ``target`` exactly as written (no normalisation of ``..`` or ``%2F``); (status, body)."""
    import http.client

    address, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(address, int(port), timeout=10)
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", f"{address}:{port}" if host is None else host)
        for key, value in (headers or {}).items():
            connection.putheader(key, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def media_target(url: str, name: str) -> str:
    eid = experiment_id(url, EVAL_EXPERIMENT)
    return f"/api/v1/media/{name}?tag={quote('eval/confusion_matrix', safe='')}&experiment_id={eid}"


def test_media_route_serves_the_runs_own_image(dashboard, run_dir):
    url, _ = dashboard
    eid = experiment_id(url, EVAL_EXPERIMENT)
    (point,) = points(url, eid, "eval/confusion_matrix")["list"]
    (name,) = point["data"]
    status, body = raw_get(url, media_target(url, quote(name, safe="")))
    assert status == 200
    (saved,) = [p for p in (run_dir / "swanlog").rglob(Path(name).name) if not p.is_symlink()]
    assert body == saved.read_bytes() and body[:8] == b"\x89PNG\r\n\x1a\n"


SECRET = "/etc/passwd"
ATTACKS = [
    "%2Fetc%2Fpasswd",  # the absolute path, encoded
    "..%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "../../../../../../../../../../etc/passwd",  # sent raw, not normalised by the client
    "..%2F..%2F..%2F..%2Fruns.swanlab",  # a file of the log folder itself, outside the media folder
    "..%5C..%5C..%5Cruns.swanlab",
    "escape.png",  # a symlink inside the media folder that leads out (made by the test)
    "missing.png",  # absent: 404 without the path
]


@pytest.mark.parametrize("name", ATTACKS)
def test_media_route_refuses_paths_outside_the_media_folder(dashboard, run_dir, name):
    url, _ = dashboard
    (media,) = {p.parent for p in (run_dir / "swanlog").rglob("*.png") if p.is_symlink()}  # the tag's folder
    link = media / "escape.png"
    if not link.is_symlink():
        link.symlink_to(SECRET)
    status, body = raw_get(url, media_target(url, name))
    assert status == 404, body[:200]
    assert b"root:" not in body  # not the file's content
    assert b"/etc" not in body and str(run_dir).encode() not in body and b"swanlog" not in body


def test_foreign_host_headers_are_refused(dashboard):
    url, _ = dashboard
    port = url.rsplit(":", 1)[1]
    assert raw_get(url, "/api/v1/project")[0] == 200
    assert raw_get(url, "/api/v1/project", host=f"localhost:{port}")[0] == 200
    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.nip.io:{port}",
                 f"127.0.0.1:{int(port) + 1}",
                 ""):
        status, body = raw_get(url, "/api/v1/project", host=host)
        assert status == 403 and b"qwen-cls" not in body, (host, body[:200])
        status, body = raw_get(url, media_target(url, "%2Fetc%2Fpasswd"), host=host)
        assert status == 403 and b"root:" not in body


def test_changes_from_a_foreign_origin_are_refused_and_errors_name_no_path(dashboard, run_dir):
    url, _ = dashboard
    eid = experiment_id(url)
    status, _ = raw_get(url, f"/api/v1/experiment/{eid}", method="DELETE",
                        headers={"Origin": "http://attacker.example"})
    assert status == 403
    assert experiment_id(url) == eid  # still there
    status, _ = raw_get(url, f"/api/v1/experiment/{eid}/stop", headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403  # an <img> on another site cannot stop an experiment
    assert raw_get(url, "/api/v1/project", headers={"Sec-Fetch-Site": "same-origin"})[0] == 200
    status, body = raw_get(url, "/api/v1/experiment/999999/tag/train%2Floss")  # swanboard raises inside
    assert status >= 400 and str(run_dir).encode() not in body and b"swanlog" not in body, body[:300]
