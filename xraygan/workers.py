"""Warm workers: long-lived processes that import torch and xraygan once and then run one
xraygan command line after another, each exactly as the shell would run it (the same
command-line layer, its output into the step's log, its exit code returned).

A study's light steps (rebalance, generate, evaluate, gradcam, compare) take seconds; started
as new processes, each paid Python's, torch's and the command's imports again (about 6 s of one
core on the 2-core machine). The long training steps keep their own process, where Ctrl-C
saves their state.
"""

from __future__ import annotations

import os
import signal
import sys

# the commands a warm worker runs; their modules are imported once, when the worker starts
LIGHT = {"rebalance": "xraygan.rebalance", "generate": "xraygan.generate", "evaluate": "xraygan.evaluate",
         "gradcam": "xraygan.gradcam", "compare": "xraygan.evaluate"}


def warm() -> None:
    """The worker's start: it leaves Ctrl-C to the study (which lets a light step finish, or ends
    the worker), and imports what every light step needs."""
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the width rich gives a log written by a command in its own process (no terminal: 80 columns),
    # not that of the terminal the study was started from
    os.environ.setdefault("COLUMNS", "80")
    import torch  # noqa: F401

    import xraygan.cli  # noqa: F401

    for module in set(LIGHT.values()):
        importlib.import_module(module)


def run_command(argv: list[str], log: str, threads: int) -> int:
    """Run `xraygan ARGV` here with `threads` CPU threads, its stdout and stderr appended to
    `log` (at the file-descriptor level, so nothing escapes to the study's terminal); returns its
    exit code."""
    import torch

    from xraygan.cli import app

    torch.set_num_threads(threads)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "a", encoding="utf-8") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                rv = app(argv, prog_name="xraygan", standalone_mode=False)
            except SystemExit as e:
                rv = e.code
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                if torch.cuda.is_initialized():  # give the GPU memory this step cached back to the training steps
                    torch.cuda.empty_cache()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    return rv if isinstance(rv, int) else (0 if rv is None else 1)
