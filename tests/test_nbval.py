"""Every notebook, 00 to 07 in order, in the tiny profile under nbval (``--nbval-lax``: each cell must run without
an error; outputs are not compared): the copies ``qwen-cls lab --prepare-only`` makes, with a run folder of their
own. One test, so ``make test`` schedules the whole chain on one worker beside the other test files."""

from __future__ import annotations

import re
import subprocess
import sys

import nbformat
import pytest
from _tiny_run import subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def test_every_notebook_runs_under_nbval(tmp_path):
    from qwen_cls.pipeline import NOTEBOOKS, prepare_notebooks

    copies = tmp_path / "notebooks"
    written = prepare_notebooks("tiny", copies, {"out_dir": str(tmp_path / "run")})
    assert written == dict.fromkeys(NOTEBOOKS, "written")
    code_cells = sum(c.cell_type == "code" for name in NOTEBOOKS for c in nbformat.read(copies / name, 4).cells)

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "-q",
         *(str(copies / name) for name in NOTEBOOKS)],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) == code_cells, proc.stdout[-2000:]  # every code cell ran, in order
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "serve_metrics.json").is_file()
