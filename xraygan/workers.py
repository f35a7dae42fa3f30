"""Warm starts for a study's steps: every step still runs in a process of its own (a crash or
the out-of-memory killer takes only that step; its memory goes back when it ends), but the
process is forked from a server that imported torch and every command once, instead of starting
a new Python that imports them again (about 6 s of a core per step on the 2-core machine, for
steps that often take 2). The step runs its exact command line through the same command-line
layer, its stdout and stderr into its log.

Where a system has no fork server (Windows), `context()` is None and the study starts each step
as `python -m xraygan ...`.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

# imported once by the fork server, so that no step imports them again
PRELOAD = ["torch", "torchvision", "xraygan.cli", "xraygan.commands", "xraygan.classifier", "xraygan.gan",
           "xraygan.diffusion", "xraygan.generate", "xraygan.rebalance", "xraygan.evaluate", "xraygan.gradcam",
           "xraygan.audit"]


def context():
    """The fork-server context with PRELOAD imported in the server, or None where there is none.

    The server is started here, with Ctrl-C ignored while it starts: it imports PRELOAD for a few
    seconds before it protects itself from SIGINT, and a Ctrl-C at the terminal in that time
    printed its traceback after the command's own last line. It keeps SIGINT ignored (an ignored
    signal stays ignored across exec), and so would the processes it forks: `step_main` restores
    Python's Ctrl-C in each step."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():  # (signal handlers are the main thread's)
        from multiprocessing import forkserver

        before = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, before)
    return ctx


def step_main(argv: list[str], log: str, threads: int, env: dict | None = None, cwd: str | None = None) -> None:
    """A step's process: its own session (Ctrl-C at the terminal reaches the study, which passes
    it on once: a training step then saves and stops), the study's environment and working folder
    now (`env`, `cwd`: the server kept those it started with), `threads` CPU threads, stdout and
    stderr appended to `log` at the file-descriptor level; exits with the command's exit code."""
    os.setsid()
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)  # the fork server ignores it; a step stops on it
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    try:  # what `top` and `ps -o comm` show for the step (Linux; 15 characters): its command, not the server's
        with open("/proc/self/comm", "w") as f:
            f.write(argv[0][:15] if argv else "xraygan")
    except OSError:
        pass
    os.environ.setdefault("COLUMNS", "80")  # rich's width without a terminal, as in a process of its own
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from xraygan.allocator import keep_freed_memory

    keep_freed_memory(everywhere=True)  # as `xraygan` does (the fork server never set it)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # the log reads as the step goes, as with a terminal
    from xraygan.cli import app

    try:
        rv = app(argv, prog_name="xraygan", standalone_mode=False)
    except SystemExit as e:
        rv = e.code
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(rv if isinstance(rv, int) else (0 if rv is None else 1))
