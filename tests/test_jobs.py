"""How jobs are started: the command-line limit of the prompts, the jobs' interpreter, and a job whose shell is
gone never writing a result."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from barkbench import jobs, results

SRC = Path(__file__).resolve().parents[1] / "src"


def test_prompts_that_fit_pass_and_a_long_one_is_refused_with_its_size():
    assert jobs.prompts_overflow(["Hello, my dog is cute.", "Wow, batching is so great!"]) is None
    message = jobs.prompts_overflow(["x" * 200_000])
    assert message and "195 KiB" in message and "112 KiB" in message


def test_the_limit_counts_the_prompts_as_quoted_on_the_command_line():
    """A quote costs five bytes once quoted for the shell: 30 KiB of quotes do not fit, 30 KiB of letters do."""
    assert jobs.prompts_overflow(["a" * 30_000]) is None
    assert jobs.prompts_overflow(["'" * 30_000]) is not None


def test_the_limit_is_the_systems():
    """Prompts at the limit reach a `bash -c` command together with the reserve for the rest of the command;
    one argument of the size that the limit refuses cannot be passed at all (Linux: E2BIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("MAX_ARG_STRLEN is Linux's")
    prompts = ["it's " * 1000] * 12  # just under the limit, quotes included
    assert jobs.prompts_overflow(prompts) is None
    quoted = " ".join(f"--prompt {shlex.quote(p)}" for p in prompts)
    command = f"true {'o' * (jobs.RESERVE_BYTES - 1024)} {quoted}"
    assert subprocess.run(["bash", "-c", command]).returncode == 0
    with pytest.raises(OSError):
        subprocess.run(["bash", "-c", "true " + "x" * jobs.ARG_LIMIT_BYTES])


def test_jobs_run_this_interpreter_unless_in_a_deployed_environment():
    assert os.path.isabs(jobs.job_python(False)) and os.path.samefile(jobs.job_python(False), sys.executable)
    assert jobs.job_python(True) == "python"  # the conda env's (or container's) own, found on its PATH


def _env():
    return {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_a_job_dies_with_its_shell(tmp_path):
    """kill -9 of the shell (not of the job): the job goes too, and never writes its result."""
    out = tmp_path / "result.json"
    job = (f"{shlex.quote(sys.executable)} -c 'import sys, time; from barkbench import jobs, results; "
           "jobs.tie_to_shell(int(sys.argv[1])); open(sys.argv[2] + \".started\", \"w\").close(); "
           "time.sleep(60); results.write_atomic(sys.argv[2], b\"{}\")' $$ " + shlex.quote(str(out)))
    shell = subprocess.Popen(["bash", "-c", f"set -euo pipefail; {job} 2> {shlex.quote(str(tmp_path / 'log'))}"],
                             env=_env())
    started = Path(f"{out}.started")
    while not started.exists() and shell.poll() is None:
        time.sleep(0.1)
    assert shell.poll() is None, (tmp_path / "log").read_text()
    children = psutil.Process(shell.pid).children()
    assert len(children) == 1  # the job is the shell's child, as under Snakemake
    shell.kill()
    shell.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)
    for proc in alive:
        proc.kill()
    assert not alive, "the job outlived its shell"
    assert not out.exists()


def test_a_job_whose_shell_is_already_gone_stops_before_measuring(tmp_path):
    out = tmp_path / "bs1.json"
    run = subprocess.run([sys.executable, "-m", "barkbench", "run", "--model", "synthetic:tiny", "--variant", "eager",
                          "--job-shell-pid", str(2**22 + 12345), "--out", str(out)],
                         capture_output=True, text=True, env=_env())
    assert run.returncode == 1 and "the job's shell (pid 4206649) is gone before the job started" in run.stderr
    assert not out.exists()


def test_no_result_is_put_in_place_once_the_shell_is_gone(tmp_path, monkeypatch):
    """Where no parent-death signal exists, the last look before the rename refuses: the parent changed."""
    monkeypatch.setattr(jobs, "_shell", {"pid": 4242, "parent": os.getppid() + 1})
    out = tmp_path / "bs1.json"
    with pytest.raises(jobs.ShellGone, match="pid 4242"):
        results.write_atomic(out, b"{}")
    assert list(tmp_path.iterdir()) == []  # neither the result nor its temporary file
    monkeypatch.setattr(jobs, "_shell", {"pid": 4242, "parent": os.getppid()})
    results.write_atomic(out, b"{}")
    assert out.read_bytes() == b"{}"
