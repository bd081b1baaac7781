"""How a job of the workflow is started and when its result counts: the interpreter it runs with, whether its
arguments fit on one command line, and a job whose shell is gone never writing a result."""
from __future__ import annotations

import os
import shlex
import signal
import sys

# Linux passes one argument of at most MAX_ARG_STRLEN (32 pages: 128 KiB) to a program, and a job's shell
# command reaches `bash -c` as one argument: the prompts, quoted, must fit in it with the rest of the command
# (interpreter, paths, options), for which RESERVE_BYTES are kept.
ARG_LIMIT_BYTES = 128 * 1024
RESERVE_BYTES = 16 * 1024


def prompts_overflow(prompts: list[str], limit: int = ARG_LIMIT_BYTES - RESERVE_BYTES) -> str | None:
    """Why `prompts` cannot reach a job through its command line (each one quoted as the rules quote it), or
    None when they fit."""
    size = sum(len(f"--prompt {shlex.quote(p)} ".encode()) for p in prompts)
    if size <= limit:
        return None
    return (f"the prompts take {size / 1024:.0f} KiB on a job's command line, over the {limit // 1024} KiB it can "
            f"carry (Linux passes at most {ARG_LIMIT_BYTES // 1024} KiB per argument): shorten them")


def job_python(software_env: bool) -> str:
    """The interpreter of the workflow's jobs: the one running the workflow, which has barkbench installed
    (whether or not its environment is activated); inside a software environment that Snakemake deploys for
    the job (conda, a container), that environment's own `python`."""
    return "python" if software_env else sys.executable


class ShellGone(RuntimeError):
    """The shell that started this job is gone: the workflow counts the job as failed, so no result of it may
    appear."""


_shell = {}  # the parent process this job is tied to, once `tie_to_shell` ran


def tie_to_shell(shell_pid: int) -> None:
    """Tie this process to the job's shell (its `$$`), the process the workflow watches. Linux: the kernel kills
    this process when its parent dies (PR_SET_PDEATHSIG). Everywhere: results are written only while the parent
    is the one found here (see `check_shell`), and a shell already gone stops the job at once. `shell_pid` is
    this process itself when the shell exec'd into it: then its parent (the workflow) is the one watched."""
    if shell_pid not in (os.getpid(), os.getppid()):
        raise ShellGone(f"the job's shell (pid {shell_pid}) is gone before the job started")
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died between the two looks: the signal was never armed for it
        raise ShellGone(f"the job's shell (pid {shell_pid}) is gone before the job started")
    _shell.update(pid=shell_pid, parent=parent)


def check_shell() -> None:
    """Raise ShellGone when this process was tied to a shell that is no longer its parent (an orphaned job)."""
    if _shell and os.getppid() != _shell["parent"]:
        raise ShellGone(f"the job's shell (pid {_shell['pid']}) is gone: the workflow counts this job as failed, "
                        "its result is not written")
