"""What both measuring jobs, `barkbench run` and `barkbench fidelity`, do around their work (barkbench.jobwrap),
checked on each of them."""
from __future__ import annotations

import time

import pytest

from barkbench import fidelity, models, runner
from barkbench.protocol import DEADLINE_ENV, Protocol
from barkbench.records import FidelityResult, RunResult
from conftest import TINY, TORCH_THREADS


def _run(out):
    proto = Protocol(warmup=1, min_iterations=1, max_iterations=1, max_new_tokens=8)
    return runner.run(runner.RunRequest(TINY, "sdpa", proto, device="cpu", threads=TORCH_THREADS), out).to_dict()


def _fidelity(out):
    return fidelity.run_fidelity(TINY, "sdpa", str(out), device_name="cpu", tokens=4, threads=TORCH_THREADS)


JOBS = {"run": (_run, RunResult), "fidelity": (_fidelity, FidelityResult)}


@pytest.mark.parametrize("job", list(JOBS))
def test_deadline_in_the_past_fails_without_loading(job, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("an exhausted run budget must not load the model")

    monkeypatch.setattr(models, "load", no_load)
    monkeypatch.setattr(models, "resolve", no_load)
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() - 10))
    start, record_class = JOBS[job]
    out = tmp_path / "late.json"
    record = start(out)
    assert record["status"] == "failed"
    assert record["reason"].startswith("run budget exhausted before this job started (deadline ")
    assert record["finished_at"] >= record["started_at"]
    assert record_class.from_json(out).status == "failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.json"]
    if job == "run":  # what would have run, without touching the network
        assert record["model"]["id"] == TINY and record["timing"] is None
