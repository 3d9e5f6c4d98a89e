"""Every notebook, 00 to 07 in order, in the tiny profile under nbval (``--nbval-lax``: each cell must run without
an error; outputs are not compared): the copies ``qwen-cls lab --prepare-only`` makes, with a run folder of their
own and the inputs of the session's ``qwen-cls run`` (conftest.tiny_run), so that the two ways in, a learner's
copies and the headless chain, must train the same adapter. One module, so ``make test`` schedules the whole chain
on one worker beside the other test files."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import nbformat
import pytest
from _tiny_run import subprocess_env, tiny_run_inputs

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


@pytest.fixture(scope="module")
def nbval_run(tmp_path_factory, tiny_run):
    """nbval over lab's copies of 00-07 given every input of ``tiny_run``; returns (copies, run folder, pytest's
    stdout)."""
    from qwen_cls.chain.templating import prepare_notebooks
    from qwen_cls.chapters import NOTEBOOKS

    base = tmp_path_factory.mktemp("nbval")
    copies, run = base / "notebooks", base / "run"
    written = prepare_notebooks("tiny", copies, {**tiny_run_inputs(tiny_run[0]), "out_dir": str(run)})
    assert written == dict.fromkeys(NOTEBOOKS, "written")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "-q",
         *(str(copies / name) for name in NOTEBOOKS)],
        capture_output=True, text=True, timeout=1200, cwd=base, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return copies, run, proc.stdout


def test_every_notebook_runs_under_nbval(nbval_run):
    from qwen_cls.chapters import NOTEBOOKS

    copies, run, stdout = nbval_run
    code_cells = sum(c.cell_type == "code" for name in NOTEBOOKS for c in nbformat.read(copies / name, 4).cells)
    passed = re.search(r"(\d+) passed", stdout)
    assert passed and int(passed.group(1)) == code_cells, stdout[-2000:]  # every code cell ran, in order
    assert (run / "metrics.json").is_file() and (run / "serve_metrics.json").is_file()


def test_same_seed_same_adapter(nbval_run, tiny_run):
    """Two runs with the same parameters train the same adapter (LoRA init, data order, dropout all seeded): the
    lab copies under nbval and the session's ``qwen-cls run``, both given the same inputs (seed 3)."""
    import torch
    from safetensors.torch import load_file

    runs = [nbval_run[1], tiny_run[0]]
    configs = [json.loads((run / "run_config.json").read_text(encoding="utf-8")) for run in runs]
    settings = [(c["seed"], c["training"]["train_rows"], c["training"]["logging_steps"]) for c in configs]
    assert settings == [(3, 16, 1000)] * 2
    assert configs[0]["training"]["train_sha256"] == configs[1]["training"]["train_sha256"]  # the same rows, in order
    adapters = [load_file(run / "adapter" / "adapter_model.safetensors") for run in runs]
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    logs = [[{k: v for k, v in entry.items() if k not in timing}
             for entry in json.loads((run / "train_log.json").read_text(encoding="utf-8"))] for run in runs]
    # the loss of step 1 and train_loss, the mean over all 8 steps; eval accuracy before and after each epoch
    assert logs[0] == logs[1] and sum("loss" in e or "train_loss" in e for e in logs[0]) >= 2
