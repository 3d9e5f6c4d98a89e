"""One notebook of the chain through papermill in its own kernel: ``QWEN_CLS_HEADLESS=1`` in the kernel, its stderr
passed on without the noise every kernel makes, a failed cell or dead kernel as :class:`NotebookFailed`, SIGTERM
behaving like Ctrl+C."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from .run_folder import NotebookFailed

HEADLESS_ENV = "QWEN_CLS_HEADLESS"  # set in the kernels of `qwen-cls run`: notebooks skip interactive widgets

# What every kernel says that tells a learner nothing: jupyter's local-TCP notice, and its own shutdown.
KERNEL_NOISE = ("Kernel is running over TCP without encryption", "KeyboardInterrupt caught in kernel")


def kernel_manager_class(stderr):
    """A kernel manager whose kernels write their own stderr (log lines, shutdown noise) into ``stderr``."""
    from jupyter_client import AsyncKernelManager

    class KernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            kw.setdefault("stderr", stderr)
            kw["env"] = {**(kw.get("env") or os.environ), HEADLESS_ENV: "1"}  # nobody can click a widget here
            return await super().start_kernel(**kw)

    return KernelManager


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM behaves like Ctrl+C while the chain runs, so the run folder is left in order."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_notebook(notebook: Path, target: Path, parameters: dict, *, cwd: Path, progress: bool, log_output: bool,
             run_dir: Path) -> None:
    """One notebook through papermill; the kernel's own stderr is passed on afterwards, except after Ctrl+C
    (then it holds only the noise of a kernel shut down mid-cell)."""
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    with tempfile.TemporaryFile() as kernel_stderr:
        interrupted = False
        try:
            papermill.execute_notebook(
                str(notebook), str(target), parameters=parameters, cwd=str(cwd), progress_bar=progress,
                log_output=log_output, kernel_manager_class=kernel_manager_class(kernel_stderr),
                shutdown_kernel="immediate",  # every cell has finished: a graceful exit only costs 2-3 s a notebook
            )
        except PapermillExecutionError as exc:
            raise NotebookFailed(notebook.name, f"at cell {exc.exec_count}: {exc.ename}: {exc.evalue}",
                                 run_dir) from None
        except DeadKernelError as exc:
            raise NotebookFailed(notebook.name, f"because its kernel died ({exc}; out of memory?)", run_dir) from None
        except KeyboardInterrupt:
            interrupted = True
            for name in ("asyncio", "papermill", "nbclient"):  # echoes of the interrupt (see cmd_run)
                logging.getLogger(name).disabled = True
            raise
        finally:
            if not interrupted:
                kernel_stderr.seek(0)
                text = "".join(line for line in kernel_stderr.read().decode("utf-8", "replace").splitlines(True)
                               if not any(noise in line for noise in KERNEL_NOISE))
                if text.strip():
                    sys.stderr.write(text)
                    sys.stderr.flush()
